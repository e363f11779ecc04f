"""A pure tensor function run through ``torch.compile`` where that works, eagerly where it does not.

The compile state of a run (the compiled callable, whether compiling failed) is held by one
:class:`CompiledOrEager` object, not by module globals: the fused head loss keeps one per objective
(:class:`~distillens_trainer.loss.fused.ChunkDivergence`), the lens profile one per accumulator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)


class CompiledOrEager:
    """``function`` through ``torch.compile`` when ``enabled``: compiled by the first call, eager from the first
    failure on (said once, naming ``what``).

    Args:
        function: the eager function (what runs when ``enabled`` is False or compiling failed).
        what: how the warning names it, e.g. "the fused divergence".
        enabled: compile at all.
        compiled_form: the function to compile when it differs from ``function`` (e.g. a branch-free variant);
            the same results, up to floating-point rounding.
        dynamic: ``torch.compile``'s ``dynamic`` (True: one compilation for every chunk length).
    """

    def __init__(
        self,
        function: Callable[..., Any],
        what: str,
        *,
        enabled: bool = True,
        compiled_form: Callable[..., Any] | None = None,
        dynamic: bool = True,
    ) -> None:
        self.function = function
        self.what = what
        self.enabled = enabled
        self._compiled_form = compiled_form if compiled_form is not None else function
        self._dynamic = dynamic
        self._compiled: Callable[..., Any] | None = None
        self._failed = False

    @property
    def compiles(self) -> bool:
        """Whether the next call runs compiled (enabled, and no failure yet)."""
        return self.enabled and not self._failed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiles:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self._compiled_form, dynamic=self._dynamic)
                return self._compiled(*args, **kwargs)
            except Exception as error:
                self._failed = True
                logger.warning(
                    "DistillLens: torch.compile of %s failed (%s: %s); using eager mode.",
                    self.what,
                    type(error).__name__,
                    str(error).splitlines()[0] if str(error) else "",
                )
        return self.function(*args, **kwargs)
