"""``distillens demo``: an offline, end-to-end DistillLens run on the built-in task suite, on a CPU.

One command, no downloads::

    distillens demo --output_dir runs/demo                  # about 4 minutes on 2 CPU cores (2 once cached)
    distillens demo --output_dir runs/smoke --preset smoke  # checks the plumbing in about a minute; scores ~0

The demo

1. writes the procedural task suite (:func:`distillens_demo.data.suite.write_task_suite`) to
   ``<output_dir>/data`` and trains its byte-level BPE tokenizer (``<output_dir>/tokenizer``);
2. trains a small Llama-style teacher from scratch with plain SFT (cross-entropy only) and caches it, with
   its tokenizer, under ``<cache_dir>/teacher-<hash>`` (default cache: ``.distillens-cache`` in the parent
   folder of ``output_dir``); the hash covers the data, the tokenizer, the teacher's architecture and its
   training settings, so a second run with the same settings reuses the teacher;
3. builds the shallower and narrower initial student every method starts from: random weights, then a short
   SFT warm-up (``student_warmup_steps``, cached the same way), as in MiniLLM-style distillation where
   students start from an SFT checkpoint: reverse KL from random weights barely moves a student off its
   loss plateau;
4. trains that student three ways, with the same data order: ``sft`` (cross-entropy only), ``kd`` (reverse KL
   on the final logits only) and ``distillens`` (reverse KL plus the Jensen-Shannon logit-lens term, the
   paper's defaults);
5. evaluates the teacher, the initial student and the three students with greedy decoding on the test split
   (exact match with :func:`distillens_demo.data.suite.score_answer`, ROUGE-L with
   :func:`distillens_trainer.evaluation.rouge_l`) and measures, on the validation split, the Jensen-Shannon
   divergence between every student layer and the teacher layer at the same relative depth, read through
   each model's logit lens;
6. prints a comparison table (with, for the default preset, the exact-match ranges the multi-seed benchmark
   found and what changes between machines) and writes ``results.json``, ``training_curves.png``,
   ``lens_divergence.png``, ``exact_match_per_task.png``, ``training_logs.json`` and the generations to
   ``output_dir``, and every model (``teacher``, ``init`` and the students, each with its tokenizer and a
   ``distillens.json`` recording the prompt format) to ``output_dir/models/<name>``, ready for
   ``distillens train`` and ``distillens eval``.

The tree follows those steps, with dependencies pointing one way, from :mod:`.run` down to :mod:`.data`:

- :mod:`.data` (step 1): the procedural task families (:mod:`.data.tasks`) and the suite's splits, files,
  exact-match scoring and tokenizer (:mod:`.data.suite`); it reads none of the demo's settings;
- :mod:`.arguments`: :class:`DemoArguments`, the presets, the methods and the constants;
- :mod:`.models` (steps 2-4): the suite in memory (:mod:`.models.training_data`), the models and their training
  (:mod:`.models.training`), the teacher and initial student cached or trained (:mod:`.models.cached`) over the
  on-disk cache (:mod:`.models.store`);
- :mod:`.report` (steps 5-6): generation scores and the lens-divergence profile (:mod:`.report.scoring`), the
  figures (:mod:`.report.plots`);
- :mod:`.run`: :func:`run_demo`, the order of the whole run, the table and the output files.

A folder an earlier demo wrote (it holds ``.distillens-demo``) is reused: its results, models and generations
are replaced. Any other non-empty folder is refused unless ``--overwrite_output_dir`` is given.

This package's public API is deliberately small; it is what ``distillens demo`` (:func:`run_demo`,
:func:`output_summary`), ``benchmarks/quality.py`` (which repeats the comparison over seeds) and
``benchmarks/real_model.py`` (which trains a GGUF-shrunk student with the same training loop) use:

- running the demo: :class:`DemoArguments`, :func:`run_demo`, :func:`output_summary`,
  :func:`configure_logging`, :func:`set_threads`;
- its building blocks: :class:`Suite` and :func:`prepare_suite` (the task suite in memory),
  :func:`get_teacher` and :func:`get_student_init` (cached), :func:`train_model` and :func:`train_student`
  (both return a :class:`TrainingRun`; the model is trained in place), :func:`evaluate_generation`,
  :func:`default_max_new_tokens`, :func:`lens_divergence_profile` (built on
  :class:`~distillens_trainer.diagnostics.profile.LensProfileAccumulator`, the profile ``distillens lens`` and
  ``lens_eval_profile`` use too) and
  :func:`count_parameters`;
- the names a caller needs to read its outputs: :data:`INIT_NAME`, :data:`METHODS`, :data:`PRESETS`,
  :data:`CACHE_DIRNAME`, :data:`RESULTS_NAME`, :data:`FIGURE_NAMES`.

Everything else (cache keys, plots, the table, the task families) lives in its submodule. Training runs
in-process with :class:`~distillens_trainer.DistillLensTrainer`, in fp32, on the GPU when one is visible.
"""

from __future__ import annotations

from .arguments import CACHE_DIRNAME, FIGURE_NAMES, INIT_NAME, METHODS, PRESETS, RESULTS_NAME, DemoArguments
from .data.suite import default_max_new_tokens
from .models.cached import get_student_init, get_teacher
from .models.training import TrainingRun, count_parameters, train_model, train_student
from .models.training_data import Suite, prepare_suite
from .report.scoring import evaluate_generation, lens_divergence_profile
from .run import configure_logging, output_summary, run_demo, set_threads

__all__ = [
    "CACHE_DIRNAME",
    "FIGURE_NAMES",
    "INIT_NAME",
    "METHODS",
    "PRESETS",
    "RESULTS_NAME",
    "DemoArguments",
    "Suite",
    "TrainingRun",
    "configure_logging",
    "count_parameters",
    "default_max_new_tokens",
    "evaluate_generation",
    "get_student_init",
    "get_teacher",
    "lens_divergence_profile",
    "output_summary",
    "prepare_suite",
    "run_demo",
    "set_threads",
    "train_model",
    "train_student",
]
