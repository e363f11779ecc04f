"""Lens diagnostics: per-layer logit-lens profiles of a student (and its teacher), their figures, and the
per-layer evaluation profile logged during training.

- :mod:`.profile`: the chunked accumulator of per-layer lens statistics on response tokens;
- :mod:`.report`: :func:`profile_models`, the ``lens.json`` report;
- :mod:`.figures`: the PNG figures of a report (matplotlib, the ``demo`` extra);
- :mod:`.training`: ``lens_eval_profile``, the per-layer metrics added at each evaluation;
- :mod:`.command`: ``distillens lens``.
"""

from .figures import write_figures
from .profile import LensProfileAccumulator
from .report import profile_models

__all__ = ["LensProfileAccumulator", "profile_models", "write_figures"]
