"""``distillens demo``: an offline, end-to-end DistillLens run on the built-in task suite, on a CPU.

One command, no downloads::

    distillens demo --output_dir runs/demo                  # about 4 minutes on 2 CPU cores (2 once cached)
    distillens demo --output_dir runs/smoke --preset smoke  # checks the plumbing in about a minute; scores ~0

The demo

1. writes the procedural task suite (:func:`distillens_trainer.tasks.write_task_suite`) to
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
   (exact match with :func:`distillens_trainer.tasks.score_answer`, ROUGE-L with
   :func:`distillens_trainer.evaluation.rouge_l`) and measures, on the validation split, the Jensen-Shannon
   divergence between every student layer and the teacher layer at the same relative depth, read through
   each model's logit lens;
6. prints a comparison table (with, for the default preset, the exact-match ranges the multi-seed benchmark
   found and what changes between machines) and writes ``results.json``, ``training_curves.png``,
   ``lens_divergence.png``, ``exact_match_per_task.png``, ``training_logs.json`` and the generations to
   ``output_dir``, and every model (``teacher``, ``init`` and the students, each with its tokenizer and a
   ``distillens.json`` recording the prompt format) to ``output_dir/models/<name>``, ready for
   ``distillens train`` and ``distillens eval``.

A folder an earlier demo wrote (it holds ``.distillens-demo``) is reused: its results, models and generations
are replaced. Any other non-empty folder is refused unless ``--overwrite_output_dir`` is given.

The building blocks (:func:`prepare_suite`, :func:`get_teacher`, :func:`get_student_init`,
:func:`train_student`, :func:`evaluate_generation`, :func:`lens_divergence_profile`) are public so that
``benchmarks/quality.py`` can repeat the comparison over seeds. Training runs in-process with
:class:`~distillens_trainer.DistillLensTrainer`, in fp32, on the GPU when one is visible.

The package holds one module per concern, with dependencies pointing one way, from :mod:`.run` down to
:mod:`.arguments`: :mod:`.arguments` (the presets, the methods, the constants and :class:`DemoArguments`),
:mod:`.training` (the suite in memory, the models and their training), :mod:`.cache` (the cached teacher and
initial student), :mod:`.scoring` (generation scores and the lens-divergence profile), :mod:`.plots` (the
figures) and :mod:`.run` (:func:`run_demo`, the table and the output files). Every public name is
re-exported here.
"""

from __future__ import annotations

from .arguments import (
    BENCHMARK_EXACT_MATCH_RANGES,
    BENCHMARK_SEEDS,
    CACHE_DIRNAME,
    CACHE_FORMAT,
    DEMO_MARKER_NAME,
    DEMO_METHODS,
    FIGURE_NAMES,
    HEAD_DIM,
    INIT_NAME,
    LENS_EVAL_DIVERGENCE,
    METHOD_DESCRIPTIONS,
    METHODS,
    PRESETS,
    PROMPT_TEMPLATES,
    RESULTS_NAME,
    SMOKE_NOTE,
    TEACHER_INFO_NAME,
    TEACHER_OBJECTIVE,
    DemoArguments,
)
from .cache import (
    get_student_init,
    get_teacher,
    load_cached_model,
    store_model,
    student_init_key,
    teacher_cache_path,
    teacher_key,
)
from .plots import (
    plot_lens_divergence,
    plot_per_task,
    plot_training_curves,
)
from .run import (
    check_output_dir,
    configure_logging,
    format_table,
    output_summary,
    run_demo,
    set_threads,
)
from .scoring import (
    default_max_new_tokens,
    evaluate_generation,
    lens_divergence_profile,
)
from .training import (
    Suite,
    build_model,
    count_parameters,
    explicit_lens_layers,
    method_objective,
    model_config,
    prepare_suite,
    prompt_of,
    suite_key,
    tokenize_examples,
    train_model,
    train_student,
    write_suite,
)

__all__ = [
    "BENCHMARK_EXACT_MATCH_RANGES",
    "BENCHMARK_SEEDS",
    "CACHE_DIRNAME",
    "CACHE_FORMAT",
    "DEMO_MARKER_NAME",
    "DEMO_METHODS",
    "FIGURE_NAMES",
    "HEAD_DIM",
    "INIT_NAME",
    "LENS_EVAL_DIVERGENCE",
    "METHODS",
    "METHOD_DESCRIPTIONS",
    "PRESETS",
    "PROMPT_TEMPLATES",
    "RESULTS_NAME",
    "SMOKE_NOTE",
    "TEACHER_INFO_NAME",
    "TEACHER_OBJECTIVE",
    "DemoArguments",
    "Suite",
    "build_model",
    "check_output_dir",
    "configure_logging",
    "count_parameters",
    "default_max_new_tokens",
    "evaluate_generation",
    "explicit_lens_layers",
    "format_table",
    "get_student_init",
    "get_teacher",
    "lens_divergence_profile",
    "load_cached_model",
    "method_objective",
    "model_config",
    "output_summary",
    "plot_lens_divergence",
    "plot_per_task",
    "plot_training_curves",
    "prepare_suite",
    "prompt_of",
    "run_demo",
    "set_threads",
    "store_model",
    "student_init_key",
    "suite_key",
    "teacher_cache_path",
    "teacher_key",
    "tokenize_examples",
    "train_model",
    "train_student",
    "write_suite",
]
