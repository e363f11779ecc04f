"""Distillation quality, round 3: the paper's protocol at CPU scale (docs/real-model.md).

What changes from round 2 (``benchmarks/real_model.py --preset round2``):

1. **A teacher tuned on the task.** SmolLM2-135M-Instruct gets a LoRA SFT on the Dolly training rows; the
   candidates of ``teacher_grid`` (learning rate x steps, i.e. rows seen) are scored on Dolly dev prompts (greedy
   ROUGE-L) and the best is kept. Its adapter (``teacher_sft/adapter/``, about 20 MB) is committed, so every later
   session merges the same tuned teacher (checked against the SHA-256 of its merged weights) instead of training it
   again. The shipped teacher is scored beside it (``teacher_shipped``).
2. **The five evaluation sets** of the paper (Dolly, SelfInst, Vicuna, S-NI, UnNI; ``../shared/data``), a fixed
   random subset of ``prompts_per_set`` prompts each (all of Vicuna), greedy for every run and the paper's sampled
   protocol (T=1, top-p 1, top-k 0) over ``sample_seeds`` for the teacher and the off-policy students' first seed.
3. **A learning rate per method**, chosen at seed 0 from ``lr_grid`` on Dolly dev prompts (greedy ROUGE-L), then
   the other seeds at the chosen rate. The on-policy pair shares a rate chosen the same way on ``kd_onpolicy``
   from ``onpolicy_lr_grid`` and runs one seed (the budget; on-policy sampling is most of its time).

The student is round 2's (14 of the teacher's 30 blocks, ``distillens shrink``), cut from the *tuned* teacher and
healed by a shared forward-KL warm-up (row ``init``). Methods: ``sft`` (CE), ``kd`` (reverse KL, no CE: DistillLens
minus its lens), ``kd_ce`` (0.5 CE + 0.5 reverse KL, the paper's KD baseline), ``distillens`` (paper defaults), and
``kd_onpolicy`` / ``distillens_onpolicy`` (``lmbda=1``).

Every step is a job with a record in ``output_dir`` (``teacher_sft/*.json``, ``sweep/*.json``, ``runs/*.json``): a
rerun with the same settings skips finished jobs, so the comparison is finished in parts; ``--commit_runs true``
commits each record as it lands. An ETA is printed after every job. ``--report_only true`` writes ``results.json``
/ ``results.md`` / ``rouge_per_set.png`` from the records alone::

    PYTHONPATH=src OMP_NUM_THREADS=2 nohup python benchmarks/real_model_round3.py \\
        --output_dir benchmarks/results/real_model_round3 --preset cpu --threads 2 --commit_runs true &
    PYTHONPATH=src python benchmarks/real_model_round3.py --output_dir /tmp/r3_smoke --preset smoke
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import mean_std, paired_difference
from real_model import (
    autocast,
    check_settings,
    cpu_has_fast_bf16,
    interval_cell,
    mean_std_cell,
    teacher_source,
    tokenize,
    weights_digest,
)

from distillens_demo import (
    Suite,
    configure_logging,
    lens_divergence_profile,
    set_threads,
    train_model,
)
from distillens_trainer.data import build_prompt
from distillens_trainer.evaluation import generate_responses, references_of, score_responses
from distillens_trainer.files import write_json_atomic, write_text_atomic
from distillens_trainer.models.loading import load_causal_lm, load_tokenizer_from
from distillens_trainer.models.shrink import evenly_spaced_layers, shrink_model

logger = logging.getLogger("distillens_trainer.benchmarks.real_model_round3")

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
# The paper's five evaluation sets (MiniLLM's files), by the keys results.json uses.
EVAL_SETS = {
    "dolly": "dolly/test_500.jsonl",
    "self_inst": "self-inst/minillm_242.jsonl",
    "vicuna": "vicuna/test_80.jsonl",
    "sinst": "sinst/test_11_1694.jsonl",
    "uinst": "uinst/short_resp_1050.jsonl",
}
TRAIN_FILE, DEV_FILE = "dolly/train_11435.jsonl", "dolly/dev_1000.jsonl"
PROMPT_FORMAT = "chat"  # SmolLM2-135M-Instruct's chat template, as in rounds 1 and 2
OFF_POLICY = ("sft", "kd", "kd_ce", "distillens")
ON_POLICY = ("kd_onpolicy", "distillens_onpolicy")
OBJECTIVES: dict[str, dict[str, Any]] = {
    "teacher_sft": {"ce_weight": 1.0, "kd_weight": 0.0, "lens_weight": 0.0},
    "warm_start": {"ce_weight": 0.0, "kd_weight": 1.0, "kd_divergence": "fkl", "lens_weight": 0.0},
    "sft": {"ce_weight": 1.0, "kd_weight": 0.0, "lens_weight": 0.0},
    "kd": {"ce_weight": 0.0, "kd_weight": 1.0, "kd_divergence": "rkl", "lens_weight": 0.0},
    "kd_ce": {"ce_weight": 0.5, "kd_weight": 0.5, "kd_divergence": "rkl", "lens_weight": 0.0},
    "distillens": {
        "ce_weight": 0.0, "kd_weight": 1.0, "kd_divergence": "rkl", "lens_weight": 1.0, "lens_divergence": "jsd",
    },
}  # fmt: skip
OBJECTIVES["kd_onpolicy"] = OBJECTIVES["kd"] | {"lmbda": 1.0}
OBJECTIVES["distillens_onpolicy"] = OBJECTIVES["distillens"] | {"lmbda": 1.0}
WARMUP_LEARNING_RATE = 2e-4  # round 2's warm-up rate
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Minutes each kind of job took on an idle 2-core CPU at 2 threads (first guesses; replaced by what the finished
# records of this output_dir measured, scaled per step).
ESTIMATE_MIN = {
    "teacher_sft": 30.0, "eval_teacher": 9.0, "warm_start": 36.0, "sweep": 10.0, "sweep_onpolicy": 30.0,
    "run": 16.0, "run_sampled": 28.0,
}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "seeds": [0, 1], "num_train": 32, "num_validation": 4, "num_dev_select": 4, "prompts_per_set": 3,
        "teacher_grid": ["3e-4:2", "1e-4:2"], "warmup_steps": 2, "steps": 2, "batch_size": 2,
        "lr_grid": [1e-4, 2e-4], "onpolicy_lr_grid": [1e-5], "sample_seeds": [0, 1], "max_length": 128,
        "max_prompt_length": 96, "max_new_tokens": 8, "onpolicy_max_new_tokens": 8, "student_layers": 10,
    },
    "cpu": {  # about 7-8 h on an idle 2-core CPU (docs/real-model.md)
        "seeds": [0, 1, 2], "num_train": 4000, "num_validation": 64, "num_dev_select": 100,
        "prompts_per_set": 100, "teacher_grid": ["1e-4:150", "3e-4:75", "3e-4:150"], "warmup_steps": 200,
        "steps": 100, "batch_size": 8, "lr_grid": [5e-5, 1e-4, 2e-4], "onpolicy_lr_grid": [1e-5, 5e-5],
        "sample_seeds": [0, 1], "max_length": 256, "max_prompt_length": 192, "max_new_tokens": 128,
        "onpolicy_max_new_tokens": 64, "student_layers": 14,
    },
    "gpu": {  # the cpu protocol on one GPU: every prompt of the five sets, more rows and steps; not run yet
        "seeds": [0, 1, 2], "num_train": 11435, "num_validation": 500, "num_dev_select": 500,
        "prompts_per_set": 0, "teacher_grid": ["1e-4:1000", "3e-4:500", "3e-4:1000"], "warmup_steps": 600,
        "steps": 500, "batch_size": 16, "lr_grid": [2e-5, 5e-5, 1e-4, 2e-4],
        "onpolicy_lr_grid": [1e-6, 1e-5, 5e-5], "sample_seeds": [0, 1, 2], "max_length": 512,
        "max_prompt_length": 256, "max_new_tokens": 256, "onpolicy_max_new_tokens": 256, "student_layers": 14,
    },
}  # fmt: skip


@dataclass
class Round3Arguments:
    """Round-3 settings; unset fields (None) take the preset's value."""

    output_dir: str = field(metadata={"help": "Folder of the job records, the report and the caches."})
    preset: str = field(default="cpu", metadata={"help": ", ".join(PRESETS) + ".", "choices": list(PRESETS)})
    seeds: list[int] | None = field(default=None, metadata={"help": "Training seeds (data order)."})
    teacher_dir: str | None = field(
        default=None, metadata={"help": "Teacher folder (default: SmolLM2 wheel)."}
    )
    teacher_gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file in teacher_dir, if any."}
    )
    data_dir: str = field(default=str(DATA_DIR), metadata={"help": "Folder of MiniLLM's evaluation sets."})
    student_layers: int | None = field(default=None, metadata={"help": "Teacher blocks the student keeps."})
    num_train: int | None = field(default=None, metadata={"help": "First N Dolly training rows (the pool)."})
    num_validation: int | None = field(
        default=None, metadata={"help": "Dolly dev rows for the teacher-forced scores (the first N)."}
    )
    num_dev_select: int | None = field(
        default=None, metadata={"help": "Dolly dev prompts that choose learning rates (rows 500 on)."}
    )
    prompts_per_set: int | None = field(
        default=None, metadata={"help": "Test prompts per evaluation set, a fixed random subset (0: all)."}
    )
    teacher_grid: list[str] | None = field(
        default=None, metadata={"help": "Teacher SFT candidates as learning_rate:steps."}
    )
    teacher_lora_rank: int = field(default=16, metadata={"help": "LoRA rank of the teacher's SFT."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Steps of the student's warm-up."})
    steps: int | None = field(default=None, metadata={"help": "Optimizer steps of every compared method."})
    batch_size: int | None = field(default=None, metadata={"help": "Training batch size."})
    lr_grid: list[float] | None = field(
        default=None, metadata={"help": "Learning rates of the off-policy sweep."}
    )
    onpolicy_lr_grid: list[float] | None = field(
        default=None, metadata={"help": "Learning rates of the on-policy sweep (on kd_onpolicy)."}
    )
    sample_seeds: list[int] | None = field(
        default=None, metadata={"help": "Generation seeds of the sampled protocol."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Training tokens per example."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompt tokens (longer rows dropped)."}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "Generated tokens per test prompt."})
    onpolicy_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens the on-policy methods sample per training completion."}
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast (default: where supported)."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generate() call."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: the usable cores)."})
    commit_runs: bool = field(default=False, metadata={"help": "git-commit every job record as it lands."})
    allow_retrained_start: bool = field(
        default=False,
        metadata={
            "help": "Go on when the warm start, trained again in a later session, has other weights than the "
            "recorded one (another CPU rounds otherwise); every record names the start it trained from."
        },
    )
    report_only: bool = field(default=False, metadata={"help": "Only write the report from the records."})

    def __post_init__(self) -> None:
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: give at least one seed, each once.")
        for candidate in self.teacher_grid:
            parse_candidate(candidate)
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_fast_bf16()
        # round 2's bf16_generation: students generate from a bf16 copy, as the bf16 teacher does
        self.bf16_generation = bool(self.bf16)

    def fingerprint(self) -> dict[str, Any]:
        """The settings every record of one output_dir must share (seeds may grow)."""
        ignored = {"output_dir", "preset", "seeds", "generation_batch_size", "allow_retrained_start"}
        return {name: value for name, value in self.study_settings().items() if name not in ignored}

    def study_settings(self) -> dict[str, Any]:
        """The settings a report echoes: all but how this one invocation runs (each job records its threads)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUN_CONTROL}


# how one invocation runs, not what it studies: the report and the fingerprint leave these out
RUN_CONTROL = frozenset({"threads", "commit_runs", "report_only"})


def parse_candidate(candidate: str) -> tuple[float, int]:
    """``"3e-4:150"`` -> (3e-4, 150): a teacher SFT candidate's learning rate and steps."""
    try:
        rate, steps = candidate.split(":")
        return float(rate), int(steps)
    except ValueError:
        raise ValueError(f"teacher_grid: {candidate!r} is not learning_rate:steps (e.g. 3e-4:150).") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"data_dir: {path} is missing; give the folder of MiniLLM's evaluation sets.")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_prompts(args: Round3Arguments) -> dict[str, list[dict[str, Any]]]:
    """Each evaluation set's test rows: a fixed random subset (seed 0) of ``prompts_per_set``, in file order."""
    sets = {}
    for name, file in EVAL_SETS.items():
        rows = read_jsonl(Path(args.data_dir) / file)
        if args.prompts_per_set and len(rows) > args.prompts_per_set:
            keep = sorted(random.Random(0).sample(range(len(rows)), args.prompts_per_set))
            rows = [rows[i] for i in keep]
        sets[name] = rows
    return sets


def dev_prompts(args: Round3Arguments) -> list[dict[str, Any]]:
    """Dolly dev rows that choose learning rates: from row 500 on, apart from the teacher-forced rows."""
    return read_jsonl(Path(args.data_dir) / DEV_FILE)[500 : 500 + args.num_dev_select]


class Round3:
    """The models, data and records of one output_dir."""

    def __init__(self, args: Round3Arguments, command: str) -> None:
        self.args, self.command = args, command
        self.root = Path(args.output_dir)
        self.started = time.perf_counter()
        self.done_this_session = 0
        self.sets = test_prompts(args)
        self.dev = dev_prompts(args)
        self.shipped: Any = None
        self.teacher: Any = None  # the tuned teacher, fp32 (what the student is cut from)
        self.teacher_bf16: Any = None  # the copy training and evaluation read where autocast is on
        self.init: Any = None
        self.start_sha256: str | None = None  # the warm start's digest, as this session trained or read it
        self.retrain_s = 0.0  # seconds the warm start took to train again inside the current job
        self.suite: Suite | None = None

    # -- records ------------------------------------------------------------------------------------------------
    def record_path(self, name: str) -> Path:
        folder = (
            "teacher_sft"
            if name.startswith("teacher_sft_")
            else "sweep"
            if name.startswith("sweep_")
            else "runs"
        )
        return self.root / folder / f"{name}.json"

    def record(self, name: str) -> dict[str, Any] | None:
        path = self.record_path(name)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def save(self, name: str, record: dict[str, Any]) -> None:
        path = self.record_path(name)
        write_json_atomic(path, record)
        if self.args.commit_runs:
            commit([path], f"Round 3: {name}")

    # -- the plan -----------------------------------------------------------------------------------------------
    def jobs(self) -> list[tuple[str, str]]:
        """Every job as (name, kind), in the order they run."""
        args = self.args
        jobs = [("teacher_shipped", "eval_teacher")]
        jobs += [(f"teacher_sft_{candidate_name(c)}", "teacher_sft") for c in args.teacher_grid]
        jobs += [("teacher", "eval_teacher"), ("init", "warm_start")]
        # A method's sweep, then its first seed at once: the swept model of the chosen rate is that run, and the
        # swept models (not committed) are gone in the next session.
        for m in OFF_POLICY:
            jobs += [(f"sweep_{m}_lr{lr:g}", "sweep") for lr in args.lr_grid]
            jobs += [(f"{m}_seed{args.seeds[0]}", "run_sampled")]
        jobs += [(f"{m}_seed{seed}", "run") for seed in args.seeds[1:] for m in OFF_POLICY]
        jobs += [(f"sweep_kd_onpolicy_lr{lr:g}", "sweep_onpolicy") for lr in args.onpolicy_lr_grid]
        jobs += [(f"{m}_seed{args.seeds[0]}", "run") for m in ON_POLICY]
        return jobs

    def pending(self) -> list[tuple[str, str]]:
        return [(name, kind) for name, kind in self.jobs() if self.record(name) is None]

    def eta_minutes(self, pending: list[tuple[str, str]]) -> float:
        """Minutes the pending jobs should take: each kind's measured mean where this folder has one."""
        measured: dict[str, list[float]] = {}
        for name, kind in self.jobs():
            rec = self.record(name)
            if rec and rec.get("job_time_s") and rec.get("threads") == self.threads:
                measured.setdefault(kind, []).append(working_seconds(rec) / 60)
        return sum(statistics.fmean(measured[k]) if k in measured else ESTIMATE_MIN[k] for _, k in pending)

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def run(self) -> None:
        pending = self.pending()
        logger.info(
            "%d jobs to do of %d; ETA %.0f min", len(pending), len(self.jobs()), self.eta_minutes(pending)
        )
        for name, kind in pending:
            start = time.perf_counter()
            record = self.stamped(getattr(self, f"job_{kind}")(name), name, kind, start)
            self.save(name, record)
            left = self.pending()
            logger.info(
                "done %s in %.1f min; %d jobs left, ETA %.0f min (elapsed this session %.0f min)",
                name, record["job_time_s"] / 60, len(left), self.eta_minutes(left),
                (time.perf_counter() - self.started) / 60,
            )  # fmt: skip
        self.score_retrained_start()

    def stamped(self, record: dict[str, Any], name: str, kind: str, start: float) -> dict[str, Any]:
        """``record`` with what every record says of how it ran: job, kind, wall time since ``start``, threads,
        CPU, and the seconds a warm start trained again inside it took (``warm_start_retrain_s``)."""
        record |= {"job": name, "kind": kind, "job_time_s": round(time.perf_counter() - start, 1)}
        record |= {"threads": self.threads, "cpu": CPU_MODEL}
        if self.retrain_s:
            record["warm_start_retrain_s"], self.retrain_s = round(self.retrain_s, 1), 0.0
        return record

    # -- models -------------------------------------------------------------------------------------------------
    def load_shipped(self) -> Any:
        if self.shipped is None:
            teacher_dir, gguf_file = teacher_source(self.args)
            self.shipped = load_causal_lm(teacher_dir, gguf_file=gguf_file).eval().requires_grad_(False)
            tokenizer = load_tokenizer_from(teacher_dir, gguf_file)
            self.suite = Suite(
                splits={"train": read_jsonl(Path(self.args.data_dir) / TRAIN_FILE)[: self.args.num_train]},
                tokenizer=tokenizer,
            )
            validation = read_jsonl(Path(self.args.data_dir) / DEV_FILE)[: self.args.num_validation]
            self.suite.splits["validation"] = validation
            self.suite.train_dataset = tokenize(self.suite.splits["train"], tokenizer, self.args)
            self.suite.eval_dataset = tokenize(validation, tokenizer, self.args)
        return self.shipped

    @property
    def tokenizer(self) -> Any:
        self.load_shipped()
        return self.suite.tokenizer

    def tuned_teacher(self) -> Any:
        """The shipped teacher with the chosen LoRA adapter merged, fp32 (checked against its recorded digest)."""
        if self.teacher is None:
            from peft import PeftModel

            choice = self.teacher_choice()
            adapter = self.root / "teacher_sft" / "adapter"
            if not (adapter / "adapter_config.json").is_file():
                raise ValueError(
                    f"{adapter} is missing: remove {self.record_path('teacher_sft_' + choice)} to tune again."
                )
            base = copy.deepcopy(self.load_shipped())
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
            digest = weights_digest(merged)
            recorded = (self.record(f"teacher_sft_{choice}") or {}).get("merged_sha256")
            if recorded != digest:
                raise ValueError(
                    f"the tuned teacher merged from {adapter} has SHA-256 {digest}, not {recorded}."
                )
            self.teacher = merged.eval().requires_grad_(False)
        return self.teacher

    def teacher_choice(self) -> str:
        """The teacher candidate with the best dev ROUGE-L (ties: fewer steps, then the lower rate)."""
        scored = [
            (candidate_name(c), self.record(f"teacher_sft_{candidate_name(c)}"))
            for c in self.args.teacher_grid
        ]
        missing = [name for name, rec in scored if rec is None]
        if missing:
            raise RuntimeError(f"teacher candidates {missing} have not run")
        return max(
            scored, key=lambda item: (item[1]["dev_rougeL"], -item[1]["steps"], -item[1]["learning_rate"])
        )[0]

    def bf16_teacher(self) -> Any:
        """The tuned teacher as training and evaluation read it: bf16 where autocast is on (round 2's choice)."""
        if not self.args.bf16:
            return self.tuned_teacher()
        if self.teacher_bf16 is None:
            self.teacher_bf16 = copy.deepcopy(self.tuned_teacher()).to(torch.bfloat16)
        return self.teacher_bf16

    def student_init(self) -> Any:
        """The shared warm start, kept in ``warm_start/`` (not committed) and checked against its digest."""
        if self.init is None:
            folder = self.root / "warm_start"
            rec = self.record("init")
            if rec is not None and (folder / "config.json").is_file():
                self.init = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            else:  # trained again: its time is the session's, not the job's (``warm_start_retrain_s``)
                began = time.perf_counter()
                self.init, _ = self.warm_up()
                self.retrain_s = time.perf_counter() - began
            self.start_sha256 = weights_digest(self.init)
            if rec is not None and self.start_sha256 != rec["weights_sha256"]:
                where = f"the warm start trained again ({self.start_sha256[:12]}) differs from {self.record_path('init')} ({rec['weights_sha256'][:12]}, {rec.get('cpu', 'another CPU')})"
                if not self.args.allow_retrained_start:
                    raise ValueError(
                        f"{where}: --allow_retrained_start true goes on from it, each record naming its start."
                    )
                logger.warning("%s; going on from it (--allow_retrained_start)", where)
        return self.init

    def score_retrained_start(self) -> None:
        """Score, once, a warm start trained again with other weights than ``init``'s that runs trained from, as an
        ``init_<digest>`` record: those runs can then be read against their own start."""
        unscored = [digest for digest, record in retrained_starts(self).items() if record is None]
        if not unscored or not self.args.allow_retrained_start:
            return
        if self.init is None and not (self.root / "warm_start" / "config.json").is_file():
            return  # that start is gone with the session that trained it
        start = time.perf_counter()
        model = self.student_init()
        if self.start_sha256 not in unscored:
            return
        # the dev score is what the sweeps trained from this start read against
        record = {"weights_sha256": self.start_sha256, "dev_rougeL": self.dev_rouge(model)}
        record |= self.evaluate(model, sampled=False)
        name = retrained_start_name(self.start_sha256)
        self.save(name, self.stamped(record, name, "score_start", start))
        logger.info("scored the retrained warm start %s", self.start_sha256[:12])

    def warm_up(self) -> tuple[Any, Any]:
        kept = evenly_spaced_layers(self.tuned_teacher().config.num_hidden_layers, self.args.student_layers)
        student = shrink_model(self.tuned_teacher(), kept)  # fp32, before the teacher goes to bf16
        run = self.train(student, "warm_start", self.args.warmup_steps, WARMUP_LEARNING_RATE, seed=0)
        student.save_pretrained(self.root / "warm_start")
        return student, run

    def train(
        self, model: Any, method: str, steps: int, learning_rate: float, seed: int, teacher: Any = "auto"
    ) -> Any:
        args = self.args
        objective = dict(OBJECTIVES[method])
        overrides: dict[str, Any] = {"bf16": bool(args.bf16), "use_cpu": not torch.cuda.is_available()}
        if "lmbda" in objective:
            overrides |= {"lmbda": objective.pop("lmbda"), "max_new_tokens": args.onpolicy_max_new_tokens}
        lens = {"lens_num_layers": 5} if objective.get("lens_weight") else {}
        self.load_shipped()
        return train_model(
            model, self.suite, objective=objective, output_dir=self.root / "trainer", max_steps=steps,
            learning_rate=learning_rate, batch_size=args.batch_size, seed=seed, logging_steps=max(1, steps // 10),
            teacher=self.bf16_teacher() if teacher == "auto" else teacher, description=method,
            config_overrides=overrides, **lens,
        )  # fmt: skip

    # -- scoring ------------------------------------------------------------------------------------------------
    def generate(self, model: Any, rows: list[dict[str, Any]], *, sample_seed: int | None) -> list[str]:
        """Responses to ``rows``: greedy (``sample_seed`` None) or the paper's sampled protocol."""
        args = self.args
        generator = model
        if args.bf16_generation and next(model.parameters()).dtype != torch.bfloat16:
            generator = copy.deepcopy(model).to(torch.bfloat16)
        prompts = [build_prompt(row, self.tokenizer, PROMPT_FORMAT) for row in rows]
        sampling = (
            {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
            if sample_seed is not None
            else {"do_sample": False}
        )
        with autocast(args):
            return generate_responses(
                generator, self.tokenizer, prompts, batch_size=args.generation_batch_size,
                max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
                seed=sample_seed if sample_seed is not None else 0, show_progress=False, **sampling,
            )  # fmt: skip

    def score_sets(self, model: Any, *, sample_seed: int | None) -> dict[str, Any]:
        """ROUGE-L and exact match (x100) per evaluation set and their average over sets, with samples."""
        rows = [row for name in EVAL_SETS for row in self.sets[name]]
        responses = self.generate(model, rows, sample_seed=sample_seed)
        result: dict[str, Any] = {"rougeL": {}, "exact_match": {}, "samples": {}}
        offset = 0
        for name in EVAL_SETS:
            part = self.sets[name]
            answers = responses[offset : offset + len(part)]
            offset += len(part)
            scores = score_responses(answers, [references_of(row) for row in part])
            for metric in ("rougeL", "exact_match"):
                result[metric][name] = round(statistics.fmean(s[metric] for s in scores), 3)
            result["samples"][name] = [
                {"prompt": row["instruction"], "response": a} for row, a in zip(part[:2], answers[:2])
            ]
        for metric in ("rougeL", "exact_match"):
            result[metric]["average"] = round(statistics.fmean(result[metric][name] for name in EVAL_SETS), 3)
        return result

    def dev_rouge(self, model: Any) -> float:
        responses = self.generate(model, self.dev, sample_seed=None)
        scores = score_responses(responses, [references_of(row) for row in self.dev])
        return round(statistics.fmean(s["rougeL"] for s in scores), 3)

    def evaluate(self, model: Any, *, sampled: bool) -> dict[str, Any]:
        start = time.perf_counter()
        record: dict[str, Any] = {"greedy": self.score_sets(model, sample_seed=None)}
        if sampled:
            record["sampled"] = {
                str(s): self.score_sets(model, sample_seed=s) for s in self.args.sample_seeds
            }
        teacher = self.bf16_teacher()
        if model is not teacher:
            with autocast(self.args):
                profile = lens_divergence_profile(
                    model, teacher, self.tokenizer, self.suite.eval_dataset, batch_size=4
                )
            record["teacher_forced"] = {
                "output_jsd": profile["final"],
                "validation_ce": profile["student_ce"],
                "lens": profile,
            }
        record["eval_time_s"] = round(time.perf_counter() - start, 1)
        return record

    # -- jobs ---------------------------------------------------------------------------------------------------
    def job_eval_teacher(self, name: str) -> dict[str, Any]:
        if name == "teacher_shipped":
            shipped = self.load_shipped()
            model = copy.deepcopy(shipped).to(torch.bfloat16) if self.args.bf16 else shipped
            return {"greedy": self.score_sets(model, sample_seed=None), "dev_rougeL": self.dev_rouge(model)}
        teacher = self.bf16_teacher()
        record = self.evaluate(teacher, sampled=True)
        return record | {
            "choice": self.teacher_choice(),
            "weights_sha256": weights_digest(self.tuned_teacher()),
        }

    def tune_teacher(self, name: str) -> tuple[Any, Any]:
        """Train the teacher candidate ``name`` (LoRA SFT, seed 0) and keep its adapter in ``candidates/`` (not
        committed); returns the PEFT model and its training run."""
        from peft import LoraConfig, get_peft_model

        candidate = next(c for c in self.args.teacher_grid if name == f"teacher_sft_{candidate_name(c)}")
        learning_rate, steps = parse_candidate(candidate)
        lora = LoraConfig(
            r=self.args.teacher_lora_rank,
            lora_alpha=2 * self.args.teacher_lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(0)
        model = get_peft_model(copy.deepcopy(self.load_shipped()).requires_grad_(False), lora)
        run = self.train(model, "teacher_sft", steps, learning_rate, seed=0, teacher=None)
        model.save_pretrained(self.root / "teacher_sft" / "candidates" / name)
        return model, run

    def job_teacher_sft(self, name: str) -> dict[str, Any]:
        learning_rate, steps = parse_candidate(
            next(c for c in self.args.teacher_grid if name == f"teacher_sft_{candidate_name(c)}")
        )
        model, run = self.tune_teacher(name)
        merged = copy.deepcopy(model).merge_and_unload()
        record = {"learning_rate": learning_rate, "steps": steps, "rows": steps * self.args.batch_size,
                  "dev_rougeL": self.dev_rouge(model), "lora_rank": self.args.teacher_lora_rank,
                  "train_time_s": run.train_time_s, "final_loss": run.final_loss,
                  "merged_sha256": weights_digest(merged)}  # fmt: skip
        if name == f"teacher_sft_{candidate_name(self.args.teacher_grid[-1])}":
            self.save(name, record)  # the last candidate: choose, and keep the chosen adapter (committed)
            self.keep_chosen_adapter()
        return record

    def keep_chosen_adapter(self) -> None:
        """Copy the chosen candidate's adapter to ``teacher_sft/adapter`` (committed). A candidate trained in an
        earlier session has no adapter here: it is trained again and must reproduce its recorded digest."""
        chosen = f"teacher_sft_{self.teacher_choice()}"
        source = self.root / "teacher_sft" / "candidates" / chosen
        if not (source / "adapter_config.json").is_file():
            model, _ = self.tune_teacher(chosen)
            digest = weights_digest(copy.deepcopy(model).merge_and_unload())
            if digest != self.record(chosen)["merged_sha256"]:
                raise ValueError(f"{chosen} trained again gave other weights than its record; tune it again.")
        adapter = self.root / "teacher_sft" / "adapter"
        if adapter.exists():
            shutil.rmtree(adapter)
        shutil.copytree(source, adapter)
        if self.args.commit_runs:
            commit([adapter], "Round 3: the tuned teacher's adapter")

    def job_warm_start(self, name: str) -> dict[str, Any]:
        student, run = self.warm_up()
        self.init, self.start_sha256 = student, weights_digest(student)
        record = {"steps": self.args.warmup_steps, "train_time_s": run.train_time_s, "weights_sha256": self.start_sha256,
                  "kept_layers": evenly_spaced_layers(30, self.args.student_layers), "params": student.num_parameters()}  # fmt: skip
        return record | self.evaluate(student, sampled=False)

    def sweep_model_dir(self, name: str) -> Path:
        return self.root / "sweep_models" / name

    def job_sweep(self, name: str) -> dict[str, Any]:
        method, rate = name.removeprefix("sweep_").rsplit("_lr", 1)
        model = copy.deepcopy(self.student_init())
        run = self.train(model, method, self.args.steps, float(rate), seed=self.args.seeds[0])
        model.save_pretrained(self.sweep_model_dir(name))  # the seed-0 run, if this rate is chosen
        return {
            "method": method,
            "learning_rate": float(rate),
            "dev_rougeL": self.dev_rouge(model),
            "train": run.summary(),
            "start_sha256": self.start_sha256,
        }

    job_sweep_onpolicy = job_sweep

    def chosen_rate(self, method: str) -> float:
        """The sweep's learning rate with the best dev ROUGE-L (ties: the lower rate)."""
        swept = "kd_onpolicy" if method in ON_POLICY else method
        grid = self.args.onpolicy_lr_grid if method in ON_POLICY else self.args.lr_grid
        records = [self.record(f"sweep_{swept}_lr{lr:g}") for lr in grid]
        if any(r is None for r in records):
            raise RuntimeError(f"the sweep of {swept} has not finished")
        return max(records, key=lambda r: (r["dev_rougeL"], -r["learning_rate"]))["learning_rate"]

    def job_run(self, name: str) -> dict[str, Any]:
        method, seed = name.rsplit("_seed", 1)
        seed_value = int(seed)
        rate = self.chosen_rate(method)
        swept = self.sweep_model_dir(f"sweep_{method}_lr{rate:g}")
        record: dict[str, Any] = {"method": method, "seed": seed_value, "learning_rate": rate}
        if seed_value == self.args.seeds[0] and (swept / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(swept, dtype=torch.float32)
            sweep = self.record(f"sweep_{method}_lr{rate:g}")
            record |= {"train": sweep["train"], "start_sha256": sweep.get("start_sha256")}
        else:
            model = copy.deepcopy(self.student_init())
            record["train"] = self.train(model, method, self.args.steps, rate, seed=seed_value).summary()
            record["start_sha256"] = self.start_sha256
        return record | self.evaluate(
            model, sampled=name.endswith(f"_seed{self.args.seeds[0]}") and method in OFF_POLICY
        )

    job_run_sampled = job_run


def working_seconds(record: dict[str, Any]) -> float:
    """A job's wall time less the time its process was stopped (``paused_s``, added by hand to a record whose run
    was paused with SIGSTOP for a measurement) and less the warm start trained again inside it
    (``warm_start_retrain_s``)."""
    return record["job_time_s"] - record.get("paused_s", 0.0) - record.get("warm_start_retrain_s", 0.0)


def cpu_model() -> str:
    """This CPU as /proc/cpuinfo names it (name and model number): what a record's bits may depend on."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    fields_ = dict(line.split(":", 1) for line in info.split("\n\n")[0].splitlines() if ":" in line)
    fields_ = {k.strip(): v.strip() for k, v in fields_.items()}
    return f"{fields_.get('model name', 'unknown')} (model {fields_.get('model', '?')})"


CPU_MODEL = cpu_model()


def retrained_start_name(digest: str) -> str:
    """The record of a warm start trained again with other weights than ``init``'s: ``init_<first 12 hex digits>``."""
    return f"init_{digest[:12]}"


def candidate_name(candidate: str) -> str:
    rate, steps = parse_candidate(candidate)
    return f"lr{rate:g}_steps{steps}"


def commit(paths: list[Path], message: str) -> None:
    """Commit ``paths`` alone (other staged changes stay staged); retried while another git command runs."""
    names = [str(p) for p in paths]
    for attempt in range(5):
        added = subprocess.run(["git", "add", "--", *names], capture_output=True, text=True)
        done = (
            added.returncode == 0
            and subprocess.run(
                ["git", "commit", "-q", "-m", message, "--", *names], capture_output=True, text=True
            ).returncode
            == 0
        )
        if done:
            return
        time.sleep(5 * (attempt + 1))
    logger.warning("could not commit %s; commit it by hand", names)


# -- the report -------------------------------------------------------------------------------------------------
STUDENTS = OFF_POLICY + ON_POLICY
ROWS = ("teacher_shipped", "teacher", "init", *STUDENTS)
METRIC_KEYS = (*EVAL_SETS, "average")


def records_by_method(study: Round3) -> dict[str, dict[int, dict[str, Any]]]:
    """Finished evaluation records as {method: {seed: record}}; the teachers, the start and any scored retrained
    start (``init_<digest>``) under seed 0."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for name in ("teacher_shipped", "teacher", "init"):
        if (rec := study.record(name)) is not None:
            table[name] = {study.args.seeds[0]: rec}
    for digest, rec in retrained_starts(study).items():
        if rec is not None:
            table[retrained_start_name(digest)] = {study.args.seeds[0]: rec}
    for method in STUDENTS:
        for seed in study.args.seeds:
            if (rec := study.record(f"{method}_seed{seed}")) is not None:
                table.setdefault(method, {})[seed] = rec
    return table


def summarise(study: Round3, table: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for method, runs in table.items():
        seeds = sorted(runs)
        entry: dict[str, Any] = {"seeds": seeds}
        if method in STUDENTS and all("learning_rate" in runs[s] for s in seeds):
            entry["learning_rate"] = runs[seeds[0]]["learning_rate"]
        for metric in ("rougeL", "exact_match"):
            entry[metric] = {
                key: {"per_seed": [runs[s]["greedy"][metric][key] for s in seeds], **mean_std([runs[s]["greedy"][metric][key] for s in seeds])}
                for key in METRIC_KEYS
            }  # fmt: skip
        sampled = runs[seeds[0]].get("sampled")
        if sampled:  # the paper's sampled protocol, the first training seed over the generation seeds
            entry["sampled_rougeL"] = {
                key: {"per_generation_seed": [s["rougeL"][key] for s in sampled.values()], **mean_std([s["rougeL"][key] for s in sampled.values()])}
                for key in METRIC_KEYS
            }  # fmt: skip
        forced = [runs[s]["teacher_forced"] for s in seeds if "teacher_forced" in runs[s]]
        if forced:
            entry["output_jsd"] = mean_std([f["output_jsd"] for f in forced])
            entry["validation_ce"] = mean_std([f["validation_ce"] for f in forced])
            profiles = [f["lens"] for f in forced]
            depth = len(profiles[0]["pairs"])
            entry["lens_jsd"] = {
                "relative_depth": [round(s / depth, 4) for s, _ in profiles[0]["pairs"]],
                "mean": [
                    round(statistics.fmean(p["divergence"][i] for p in profiles), 5) for i in range(depth)
                ],
            }
        methods[method] = entry
    paired: dict[str, Any] = {}
    for reference in ("kd", "kd_ce"):
        for method in STUDENTS:
            if method == reference or method not in table or reference not in table:
                continue
            common = [s for s in study.args.seeds if s in table[method] and s in table[reference]]
            if len(common) < 2:
                continue
            runs, base = [table[method][s] for s in common], [table[reference][s] for s in common]
            diff: dict[str, Any] = {"seeds": common}
            diff["rougeL"] = {
                key: paired_difference([r["greedy"]["rougeL"][key] - b["greedy"]["rougeL"][key] for r, b in zip(runs, base)])
                for key in METRIC_KEYS
            }  # fmt: skip
            for score in ("output_jsd", "validation_ce"):
                diff[score] = paired_difference(
                    [r["teacher_forced"][score] - b["teacher_forced"][score] for r, b in zip(runs, base)],
                    digits=5,
                )
            paired[f"{method} - {reference}"] = diff
    return {"methods": methods, "paired": paired}


def starts_of(study: Round3) -> dict[str, Any]:
    """The warm start every student trained from: the recorded one, and any other (retrained on another CPU)."""
    recorded = (study.record("init") or {}).get("weights_sha256")
    others: dict[str, list[str]] = {}
    for name, kind in study.jobs():
        rec = study.record(name)
        if kind.startswith(("sweep", "run")) and rec and rec.get("start_sha256") not in (None, recorded):
            others.setdefault(rec["start_sha256"], []).append(name)
    return {"init_sha256": recorded, "other_starts": others}


def retrained_starts(study: Round3) -> dict[str, dict[str, Any] | None]:
    """{digest: its ``init_<digest>`` record, or None while unscored} of every other start runs trained from."""
    return {digest: study.record(retrained_start_name(digest)) for digest in starts_of(study)["other_starts"]}


def time_spent(study: Round3) -> dict[str, Any]:
    """Hours the finished jobs and the scored retrained starts took, per kind of job and per thread count (a warm
    start trained again, at the start of a later session or inside a job, is not counted)."""
    kinds: dict[str, dict[str, Any]] = {}
    finished = [(study.record(name), kind) for name, kind in study.jobs()]
    finished += [(rec, "score_start") for rec in retrained_starts(study).values()]
    for rec, kind in finished:
        if rec and rec.get("job_time_s"):
            entry = kinds.setdefault(f"{kind} @ {rec.get('threads')} threads", {"jobs": 0, "hours": 0.0})
            entry["jobs"] += 1
            entry["hours"] = round(entry["hours"] + working_seconds(rec) / 3600, 3)
    return {"per_kind": kinds, "hours": round(sum(k["hours"] for k in kinds.values()), 2)}


def settings_of(study: Round3) -> dict[str, Any]:
    args = study.args
    teacher = {candidate_name(c): study.record(f"teacher_sft_{candidate_name(c)}") for c in args.teacher_grid}
    grids = [*((m, args.lr_grid) for m in OFF_POLICY), ("kd_onpolicy", args.onpolicy_lr_grid)]
    sweeps = {
        method: {f"{lr:g}": (study.record(f"sweep_{method}_lr{lr:g}") or {}).get("dev_rougeL") for lr in grid}
        for method, grid in grids
    }
    rates: dict[str, float | None] = {}
    for method in STUDENTS:
        try:
            rates[method] = study.chosen_rate(method)
        except RuntimeError:
            rates[method] = None
    teacher_choice = None
    if all(teacher.values()):
        teacher_choice = study.teacher_choice()
    return args.study_settings() | {
        "prompts_per_set": {name: len(rows) for name, rows in study.sets.items()},
        "dev_prompts": len(study.dev),
        "learning_rates": rates,
        "lr_sweeps_dev_rougeL": sweeps,
        "teacher_sft": {"candidates": teacher, "chosen": teacher_choice},
        "prompt_format": PROMPT_FORMAT,
    }


def markdown(report: dict[str, Any]) -> str:
    """``results.md``: greedy ROUGE-L per set, sampled ROUGE-L, teacher-forced scores, paired differences."""
    sets = " | ".join(METRIC_KEYS)
    bar = "|---" * (len(METRIC_KEYS) + 3) + "|"
    lines = [
        f"Command: `{report['command']}`",
        "",
        "Greedy ROUGE-L (×100), mean ± std over training seeds:",
        "",
    ]
    lines += [f"| method | lr | seeds | {sets} |", bar]
    for name, entry in report["methods"].items():
        cells = " | ".join(mean_std_cell(entry["rougeL"][key]) for key in METRIC_KEYS)
        lines.append(f"| {name} | {entry.get('learning_rate', '-')} | {len(entry['seeds'])} | {cells} |")
    sampled = {n: e for n, e in report["methods"].items() if "sampled_rougeL" in e}
    if sampled:
        lines += [
            "",
            "Sampled ROUGE-L (T=1, top-p 1, top-k 0; first training seed, mean ± std over generation seeds):",
            "",
        ]
        lines += [f"| method | {sets} |", "|---" * (len(METRIC_KEYS) + 1) + "|"]
        for name, entry in sampled.items():
            lines.append(
                f"| {name} | "
                + " | ".join(mean_std_cell(entry["sampled_rougeL"][key]) for key in METRIC_KEYS)
                + " |"
            )
    lines += [
        "",
        "Teacher-forced on Dolly validation responses:",
        "",
        "| method | output JSD | validation CE |",
        "|---|---|---|",
    ]
    for name, entry in report["methods"].items():
        if "output_jsd" in entry:
            lines.append(
                f"| {name} | {mean_std_cell(entry['output_jsd'], 4)} | {mean_std_cell(entry['validation_ce'], 3)} |"
            )
    if report["paired"]:
        lines += [
            "",
            "Paired differences, 95% t intervals over training seeds (greedy ROUGE-L per set; teacher-forced):",
            "",
        ]
        lines += [
            f"| difference | {sets} | output JSD | validation CE |",
            "|---" * (len(METRIC_KEYS) + 3) + "|",
        ]
        for name, diff in report["paired"].items():
            cells = " | ".join(interval_cell(diff["rougeL"][key]) for key in METRIC_KEYS)
            lines.append(
                f"| {name} | {cells} | {interval_cell(diff['output_jsd'], 4)} | {interval_cell(diff['validation_ce'], 3)} |"
            )
    settings = report["settings"]
    lines += ["", f"Prompts per set: {settings['prompts_per_set']}; learning rates: {settings['learning_rates']}.",
              "Teacher SFT candidates (dev ROUGE-L): " + ", ".join(f"{k}: {(v or {}).get('dev_rougeL', '-')}" for k, v in settings["teacher_sft"]["candidates"].items())
              + f"; chosen {settings['teacher_sft']['chosen']}.",
              f"Learning-rate sweeps (dev ROUGE-L): {settings['lr_sweeps_dev_rougeL']}."]  # fmt: skip
    spent = ", ".join(
        f"{k}: {v['jobs']} in {v['hours']:.2f} h" for k, v in report["time"]["per_kind"].items()
    )
    lines += ["", f"Time of the finished jobs: {report['time']['hours']:.2f} h ({spent})."]
    for digest, jobs in report["starts"]["other_starts"].items():
        lines += [
            "",
            f"Trained from a retrained warm start ({digest[:12]}, not the recorded one; scored as"
            f" `{retrained_start_name(digest)}` where it was): {', '.join(jobs)}.",
        ]
    if report["pending"]:
        lines += [
            "",
            f"Still to run ({len(report['pending'])}): {', '.join(report['pending'])}; ETA {report['eta_min']:.0f} min.",
        ]
    for name, entry in report["samples"].items():
        for set_name, samples in entry.items():
            for sample in samples[:1]:
                text = " ".join(sample["response"].split())
                text = text if len(text) <= 240 else text[:240] + " …"
                lines.append(
                    f"- **{name}** ({set_name}) — *{' '.join(sample['prompt'].split())[:120]}* → {text}"
                )
    return "\n".join(lines) + "\n"


def plot_per_set(methods: dict[str, Any], path: Path) -> None:
    """Greedy ROUGE-L per evaluation set and on average, one bar per method (error bars: std over seeds)."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ROWS if n in methods]
    figure, axis = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        means = [methods[name]["rougeL"][k]["mean"] for k in METRIC_KEYS]
        stds = [methods[name]["rougeL"][k]["std"] for k in METRIC_KEYS]
        axis.bar(
            [j + i * width for j in range(len(METRIC_KEYS))], means, width, yerr=stds, label=name, capsize=2
        )
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(METRIC_KEYS))], list(METRIC_KEYS))
    axis.set_ylabel("greedy ROUGE-L (×100)")
    axis.set_title("SmolLM2-135M-Instruct (LoRA-SFT on Dolly) -> 14-block student, round 3")
    axis.legend(fontsize=7, ncol=3)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(study: Round3) -> dict[str, Any]:
    from real_model import plot_lens_jsd

    table = records_by_method(study)
    pending = study.pending()
    report = {
        "command": study.command,
        "settings": settings_of(study),
        **summarise(study, table),
        "samples": {m: runs[min(runs)]["greedy"]["samples"] for m, runs in table.items()},
        "starts": starts_of(study),
        "time": time_spent(study),
        "pending": [name for name, _ in pending],
        "eta_min": round(study.eta_minutes(pending), 1),
    }
    write_json_atomic(study.root / "results.json", report)
    write_text_atomic(study.root / "results.md", markdown(report))
    plot_per_set(report["methods"], study.root / "rouge_per_set.png")
    plot_lens_jsd(report["methods"], study.root / "lens_jsd.png")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        (args,) = HfArgumentParser(Round3Arguments).parse_args_into_dataclasses(args=argv)
        configure_logging()
        check_settings(args)
        study = Round3(
            args, shlex.join(["PYTHONPATH=src", "python", "benchmarks/real_model_round3.py", *argv])
        )
        if not args.report_only:
            set_threads(args.threads)
            study.run()
        report = write_report(study)
        if args.commit_runs:
            commit(
                [
                    study.root / n
                    for n in (
                        "results.json",
                        "results.md",
                        "rouge_per_set.png",
                        "lens_jsd.png",
                        "settings.json",
                    )
                ],
                "Round 3: report",
            )
        print(markdown(report))
    except ValueError as error:
        print(f"real_model_round3.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
