"""Tiny deterministic DistillLens run, launched by tests/distributed/test_distributed.py (torchrun) or imported.

    python tests/distributed/train_tiny.py make-models MODELS_DIR
    torchrun --nproc_per_node 2 tests/distributed/train_tiny.py train --models MODELS_DIR --out OUT \
        --deepspeed examples/deepspeed/zero3.json --per-device-batch 2 --steps 4 --evaluate --rouge

``train`` trains the student for ``--steps`` optimizer steps with the logit lens on, then writes
``OUT/result.json`` (rank 0): the per-step training losses from ``log_history``, evaluation metrics,
and under ZeRO-3 numerical checks that the logit lens gathers the partitioned norm and head weights.
It also saves the student to ``OUT/student`` and the student's logits on a fixed probe batch to
``OUT/probe_logits.pt``.

On-policy runs (``--lmbda``, ``--max-new-tokens``; ``--scripted`` replaces sampling with the deterministic
:func:`scripted_completion`, so runs of any world size see the same completions): every rank also writes
``OUT/result_rank{R}.json`` with its optimizer windows (whether each generated completions, how many prompts,
its ``num_items_in_batch``) and its logged ``on_policy_fraction`` / ``completion_length`` per step.
``--use-cpu`` runs a torchrun launch without DeepSpeed as DDP over gloo.

Teacher cache::

    python tests/distributed/train_tiny.py make-cache MODELS_DIR CACHE_DIR --cache-mode hidden --cache-dtype float32
    torchrun --nproc_per_node 2 tests/distributed/train_tiny.py train --models MODELS_DIR --out OUT \
        --use-cpu --per-device-batch 2 --teacher-cache CACHE_DIR

``make-cache`` writes a cache of the tiny teacher over the training and evaluation rows (one process); ``train
--teacher-cache`` distils from it without building a teacher model.

FSDP2::

    torchrun --nproc_per_node 2 tests/distributed/train_tiny.py train --models MODELS_DIR --out OUT \
        --fsdp --per-device-batch 2 --teacher qwen2_teacher

``--fsdp`` shards the student through the Trainer's ``fsdp`` / ``fsdp_config`` (FSDP2) on the CPU shim
(:func:`enable_fsdp_on_cpu`); an ``accelerate launch`` with an FSDP2 config file needs no flag. ``--teacher
qwen2_teacher`` distils from a Qwen2 teacher (same tokenizer) into the Llama student. The result then records,
per training step, the all-gathers of the groups holding each model's LM head, and each rank's bytes of the
teacher's shards.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

HIDDEN_SIZE = 32
TEACHER_LAYERS = 4
STUDENT_LAYERS = 3
NUM_WORDS = 60  # vocabulary: 4 special tokens + w0..w59
SEQ_LEN = 16
NUM_TRAIN = 32
NUM_EVAL = 6
LENS_STUDENT_LAYERS = [1, 2, 3]  # teacher layers follow proportionally: 1, 2, 4
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


# --------------------------------------------------------------------------------------------- measuring
def local_parameter_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of this rank's shards, bytes of the whole model) over ``model``'s parameters (FSDP2 ``DTensor`` s
    count their local shard)."""
    local = whole = 0
    for param in model.parameters():
        size = param.element_size()
        shard = param.to_local() if hasattr(param, "to_local") else param
        local += shard.numel() * size
        whole += param.numel() * size
    return local, whole


# --------------------------------------------------------------------------------------------- CPU shims
def _use_gloo_on_cpu() -> None:
    """Where accelerate finds no device backend for a launched CPU rank, choose gloo (``MULTI_CPU``)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_distillens_cpu_shim", False):
        return

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        chosen, distributed_type = original(self, cpu, sagemaker_dp, backend)
        if chosen is None and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, distributed_type

    _prepare_backend._distillens_cpu_shim = True
    PartialState._prepare_backend = _prepare_backend


def enable_deepspeed_on_cpu() -> None:
    """Let accelerate + DeepSpeed run several CPU processes (gloo); a no-op on a machine with CUDA.

    On a CPU-only machine accelerate's ``PartialState`` finds no device backend for a DeepSpeed run,
    initialises DeepSpeed's process group but then reports ``num_processes == 1`` on every rank (so HF
    computes ``train_batch_size`` for one process and every rank believes it is the main one). Choosing
    gloo, as accelerate does for multi-CPU runs, gives the real world size. DeepSpeed's optional
    shared-memory all-reduce kernel is also skipped: it is JIT-compiled (minutes) on first use and gloo
    does the same reduction.
    """
    if torch.cuda.is_available():
        return
    _use_gloo_on_cpu()
    try:  # by module name: the package attribute deepspeed.comm.torch can be torch itself
        deepspeed_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(deepspeed_torch_comm, "build_shm_op"):
        deepspeed_torch_comm.build_shm_op = lambda: None


def enable_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on several CPU processes (gloo); a no-op on a machine with CUDA.

    On a CPU-only machine accelerate's ``AcceleratorState`` only turns an FSDP plugin on for GPU-like device types:
    a multi-CPU run keeps ``MULTI_CPU`` and trains as DDP, silently. ``fully_shard`` itself works over gloo, so the
    shim sets the distributed type to FSDP where a plugin was given, as accelerate does on GPUs (and, for an
    ``accelerate launch`` with a GPU config, chooses gloo as :func:`enable_deepspeed_on_cpu` does).
    """
    if torch.cuda.is_available():
        return
    _use_gloo_on_cpu()
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_distillens_cpu_shim", False):
        return

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._distillens_cpu_shim = True
    AcceleratorState.__init__ = __init__


def fsdp_gather_recorder(trainer) -> list[dict[str, int]]:
    """Per training micro-batch (its forwards, objective and backward), the all-gathers of the FSDP2 groups that hold
    each model's LM head, by role, on this rank (FSDPParamGroup.unshard counted where it really gathers), and how
    often the student head's gradient went into FSDP's reduce-scatter (``student_head_reductions``)."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from distillens_trainer.models.facts import unwrap_model

    heads = {
        "student": unwrap_model(trainer.model).get_output_embeddings(),
        "teacher": unwrap_model(trainer.teacher_model).get_output_embeddings(),
    }
    steps: list[dict[str, int]] = []
    active = [False]
    original = FSDPParamGroup.unshard

    def unshard(group, async_op=False):
        if active[0] and not group.is_unsharded and group._all_gather_result is None:
            for role, head in heads.items():
                # the modules of each parameter (a tied head shares its weight with the embedding)
                owners = [(p._module_info.module, *p._module_info.shared_modules) for p in group.fsdp_params]
                if any(head in modules for modules in owners):
                    steps[-1][role] += 1
        return original(group, async_op)

    FSDPParamGroup.unshard = unshard
    original_post_backward = FSDPParamGroup.post_backward
    student_head = heads["student"]

    def post_backward(group, *args):
        if active[0]:
            for fsdp_param in group.fsdp_params:
                modules = (fsdp_param._module_info.module, *fsdp_param._module_info.shared_modules)
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                has_grad = unsharded is not None and (
                    fsdp_param.unsharded_accumulated_grad is not None or unsharded.grad is not None
                )
                if student_head in modules and has_grad:
                    steps[-1]["student_head_reductions"] += 1
        return original_post_backward(group, *args)

    FSDPParamGroup.post_backward = post_backward
    training_step = trainer.training_step

    def counted_training_step(*args, **kwargs):  # forward, objective and backward of one micro-batch
        steps.append({"student": 0, "teacher": 0, "student_head_reductions": 0})
        active[0] = True
        try:
            return training_step(*args, **kwargs)
        finally:
            active[0] = False

    trainer.training_step = counted_training_step
    return steps


# --------------------------------------------------------------------------------------------- models, data
def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": len(SPECIAL_TOKENS) + i for i in range(NUM_WORDS)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _causal_lm(architecture: str, num_layers: int, tie_word_embeddings: bool, seed: int, hidden_size: int):
    """A tiny random ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` over the tiny tokenizer."""
    import transformers

    config_class = getattr(transformers, f"{architecture}Config")
    model_class = getattr(transformers, f"{architecture}ForCausalLM")
    config = config_class(
        vocab_size=len(SPECIAL_TOKENS) + NUM_WORDS,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # peaked distributions, so the KD and lens terms are far from zero
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # non-trivial norm weights, so a lens that skipped the norm would be caught
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.uniform_(0.5, 1.5)
    return model


def make_models(models_dir: str | os.PathLike[str], hidden_size: int = HIDDEN_SIZE) -> tuple[Path, Path]:
    """Save a 4-layer Llama teacher (untied head), a 4-layer Qwen2 teacher (``qwen2_teacher``, another width) and a
    3-layer Llama student (tied head), with a tokenizer, once; returns the Llama teacher's and the student's paths.
    ``hidden_size`` widens every model (benchmarks); the tests use the default."""
    models_dir = Path(models_dir)
    tokenizer = build_tokenizer()
    builders = {
        "teacher": lambda: _causal_lm("Llama", TEACHER_LAYERS, False, 1, hidden_size),
        # another width than the student's
        "qwen2_teacher": lambda: _causal_lm("Qwen2", TEACHER_LAYERS, False, 3, hidden_size + 16),
        "student": lambda: _causal_lm("Llama", STUDENT_LAYERS, True, 2, hidden_size),
    }
    for name, build in builders.items():
        path = models_dir / name
        if not (path / "config.json").exists():
            build().save_pretrained(path)
            tokenizer.save_pretrained(path)
    return models_dir / "teacher", models_dir / "student"


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length sequences: BOS, a prompt (labels -100), a response, then right padding (labels -100)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.rows: list[dict[str, torch.Tensor]] = []
        for _ in range(num_samples):
            length = int(torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (1,), generator=generator))
            prompt = int(torch.randint(2, length // 2 + 1, (1,), generator=generator))
            ids = torch.randint(
                len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + NUM_WORDS, (length,), generator=generator
            )
            ids[0] = 1
            input_ids = torch.zeros(SEQ_LEN, dtype=torch.long)
            input_ids[:length] = ids
            attention_mask = torch.zeros(SEQ_LEN, dtype=torch.long)
            attention_mask[:length] = 1
            labels = input_ids.clone()
            labels[:prompt] = -100
            labels[length:] = -100
            self.rows.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def probe_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.randint(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + NUM_WORDS, (2, 10), generator=generator)


def rouge_examples() -> list[dict[str, str]]:
    return [{"instruction": f"w{i} w{i + 1} w{i + 2}", "output": f"w{i + 3} w{i + 4}"} for i in range(3)]


def cache_rows(dataset: TokenDataset) -> list[dict[str, list[int]]]:
    """The dataset's rows without their right padding: the tokens a trainer's batch keys by (its attention mask
    drops the padding), so the cache finds every row the trainer sees."""
    rows = []
    for row in dataset.rows:
        real = row["attention_mask"].bool()
        rows.append({"input_ids": row["input_ids"][real].tolist(), "labels": row["labels"][real].tolist()})
    return rows


def make_cache(
    models_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    mode: str = "hidden",
    dtype: str = "float32",
    top_k: int = 32,
    **config_overrides: Any,
) -> dict[str, Any]:
    """A teacher cache of the tiny teacher (fp32) over the training and evaluation rows, for the layer map a
    :func:`train` run with the same ``config_overrides`` resolves; returns the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillens_trainer.loss.layer_map import resolve_layer_map
    from distillens_trainer.teacher.cache.writer import teacher_cache_settings, write_teacher_cache
    from distillens_trainer.teacher.frozen import shared_vocab_size

    models_dir = Path(models_dir)
    teacher = AutoModelForCausalLM.from_pretrained(models_dir / "teacher", dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(models_dir / "student", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "student")
    args = training_config(Path(cache_dir) / "unused", **config_overrides)
    layer_map = resolve_layer_map(
        student.config.num_hidden_layers,
        teacher.config.num_hidden_layers,
        args.lens_student_layers,
        args.lens_teacher_layers,
        args.lens_num_layers,
    )
    settings = teacher_cache_settings(
        teacher,
        mode=mode,
        layer_map=layer_map,
        vocab_size=shared_vocab_size(student, teacher, tokenizer),
        dtype=dtype,
        top_k=top_k,
        temperature=args.temperature,
        lens_final_norm=args.lens_final_norm,
        tokenizer=tokenizer,
    )
    datasets = [cache_rows(TokenDataset(NUM_TRAIN, seed=0)), cache_rows(TokenDataset(NUM_EVAL, seed=1))]
    return write_teacher_cache(
        teacher, datasets, settings, cache_dir, pad_token_id=tokenizer.pad_token_id, show_progress=False
    )


def training_config(out: str | os.PathLike[str], **overrides: Any):
    """The DistillLensConfig shared by every run (overrides on top)."""
    from distillens_trainer import DistillLensConfig

    settings: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 3,
        "learning_rate": 3e-3,
        "warmup_steps": 0,
        "lr_scheduler_type": "linear",
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "ce_weight": 0.1,
        "kd_weight": 1.0,
        "lens_weight": 1.0,
        "lens_student_layers": LENS_STUDENT_LAYERS,
    }
    settings.update(overrides)
    return DistillLensConfig(**settings)


# --------------------------------------------------------------------------------------------- ZeRO-3 checks
def _reference_lens(
    hidden: torch.Tensor, norm_weight: torch.Tensor | None, eps: float, head_weight: torch.Tensor
):
    if norm_weight is not None:  # LlamaRMSNorm
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = norm_weight * (hidden * torch.rsqrt(variance + eps))
    return hidden @ head_weight.T


def lens_gather_check(lens) -> dict[str, Any]:
    """The lens on partitioned weights vs the same maths on gathered copies (run on every rank)."""
    import deepspeed

    norm, head = lens.norm, lens.head
    partitioned = {
        "norm_local_numel": int(norm.weight.numel()),
        "head_local_numel": int(head.weight.numel()),
        "head_ds_shape": list(getattr(head.weight, "ds_shape", head.weight.shape)),
    }
    with deepspeed.zero.GatheredParameters([norm.weight, head.weight]):
        norm_weight = norm.weight.detach().clone()
        head_weight = head.weight.detach().clone()
    generator = torch.Generator().manual_seed(7)
    hidden = torch.randn(5, head_weight.shape[1], generator=generator, dtype=head_weight.dtype)
    diffs = {}
    with torch.no_grad():
        for layer in (1, lens.num_layers):
            got = lens(hidden, layer)
            want = _reference_lens(
                hidden, norm_weight if layer < lens.num_layers else None, norm.variance_epsilon, head_weight
            )
            diffs[str(layer)] = float((got - want).abs().max())
    return {**partitioned, "max_abs_diff": diffs}


# --------------------------------------------------------------------------------------------- on-policy
EOS_ID = 2  # "</s>"


def scripted_completion(prompt: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for sampling (as tests/trainer/test_on_policy.py's): word tokens from the prompt; odd-length
    prompts get an EOS after two tokens, followed by tokens that must not be trained on."""
    first_word = len(SPECIAL_TOKENS)
    base = int(prompt.sum())
    tokens = [first_word + (base + 7 * k) % NUM_WORDS for k in range(2 + len(prompt) % 4)]
    if len(prompt) % 2:
        tokens = [*tokens[:2], EOS_ID, first_word, first_word + 1]
    return torch.tensor(tokens)


def recording_trainer_class(scripted: bool = False):
    """``DistillLensTrainer`` that records each optimizer window it assembles: its step, whether it generated
    completions (on-policy, without ``seq_kd``), how many prompts and its ``num_items_in_batch``. With
    ``scripted`` the completions come from :func:`scripted_completion` (the trainer's generation seam)."""
    from distillens_trainer import DistillLensTrainer

    class RecordingTrainer(DistillLensTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.windows: list[dict[str, Any]] = []
            self._window_prompts = 0

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            self._window_prompts = 0
            step = self.state.global_step
            batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
            if batches:
                self.windows.append(
                    {
                        "step": step,
                        "generated": self._window_prompts > 0,
                        "prompts": self._window_prompts,
                        "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch),
                    }
                )
            return batches, num_items_in_batch

        def generate_completions(self, model, prompts):
            self._window_prompts += len(prompts)
            if scripted:
                return [scripted_completion(prompt) for prompt in prompts]
            return super().generate_completions(model, prompts)

    return RecordingTrainer


# --------------------------------------------------------------------------------------------- training
class StepClock(TrainerCallback):
    """Wall seconds of each optimizer step (from its start to its end), on this rank."""

    def __init__(self, seconds: list[float]) -> None:
        self.seconds = seconds
        self.started = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.started)


def train(
    models_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    deepspeed: str | dict | None = None,
    per_device_batch: int = 4,
    steps: int = 4,
    evaluate: bool = False,
    rouge: bool = False,
    zero3_persistence_threshold: int | None = None,
    save_steps: int | None = None,
    teacher_object: bool = False,
    scripted: bool = False,
    teacher_cache: str | os.PathLike[str] | None = None,
    teacher_name: str = "teacher",
    fsdp: bool = False,
    resume: str | None = None,
    **config_overrides: Any,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillens_trainer.models.facts import model_vocab_size
    from distillens_trainer.teacher.placement import is_zero3_enabled

    out = Path(out)
    models_dir = Path(models_dir)
    if deepspeed is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        enable_deepspeed_on_cpu()  # DeepSpeed from --deepspeed, or from an accelerate launch config
    if fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        enable_fsdp_on_cpu()  # FSDP2 from the Trainer's arguments, or from an accelerate launch config
        if fsdp:
            config_overrides.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2}, use_cpu=True)
    if isinstance(deepspeed, str):
        deepspeed = json.loads(Path(deepspeed).read_text())
    if deepspeed is not None and zero3_persistence_threshold is not None:
        # The example config's "auto" keeps tensors under 10·hidden elements whole on every rank; 0
        # partitions every tensor, so the final norm read by the lens is partitioned too.
        deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] = zero3_persistence_threshold
    teacher: Any = str(models_dir / teacher_name)
    if teacher_cache is not None:  # distil from the cache: no teacher model at all
        teacher = None
        config_overrides["teacher_cache"] = str(teacher_cache)
    elif teacher_object:  # a model object with full weights, loaded before DeepSpeed is configured
        teacher = AutoModelForCausalLM.from_pretrained(models_dir / teacher_name, dtype=torch.float32)
    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    args = training_config(
        out / "run",
        max_steps=steps,
        per_device_train_batch_size=per_device_batch,
        deepspeed=deepspeed,
        **saving,
        **config_overrides,
    )
    # Loaded after the arguments, so under ZeRO-3 from_pretrained partitions them at load (zero.Init).
    student = AutoModelForCausalLM.from_pretrained(models_dir / "student", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "student")
    callbacks = []
    if rouge:
        from distillens_trainer.evaluation import RougeEvalCallback

        callbacks.append(
            RougeEvalCallback(
                tokenizer, rouge_examples(), prompt_template="plain", max_new_tokens=4, batch_size=2
            )
        )
    trainer = recording_trainer_class(scripted)(
        model=student,
        args=args,
        teacher_model=teacher,
        train_dataset=TokenDataset(NUM_TRAIN, seed=0),
        eval_dataset=TokenDataset(NUM_EVAL, seed=1),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    online = trainer.teacher_model is not None  # else a teacher cache stands in for it
    result: dict[str, Any] = {
        "world_size": int(args.world_size),
        "teacher_type": type(trainer.teacher_model).__name__,
        "teacher_vocab_size": model_vocab_size(trainer.teacher_model) if online else None,
        "cached_teacher": None if trainer.cached_teacher is None else trainer.cached_teacher.mode,
        "vocab_size": trainer.vocab_size,
        "layer_map": [list(pair) for pair in trainer.layer_map],
    }
    zero3 = is_zero3_enabled(trainer.accelerator)
    result["zero3"] = zero3
    result["fsdp_version"] = trainer.fsdp_version
    if trainer.fsdp_version == 2:
        result["teacher_class"] = type(trainer.teacher_model).__name__
        local, whole = local_parameter_bytes(trainer.teacher_model)
        dtype = str(next(trainer.teacher_model.parameters()).dtype)
        result["teacher_bytes"] = {"local": local, "whole": whole, "dtype": dtype}
        result["fsdp_head_gathers"] = fsdp_gather_recorder(trainer)
    if zero3 and trainer.teacher_lens is not None:
        result["teacher_lens_check"] = lens_gather_check(trainer.teacher_lens)
    step_seconds: list[float] = []
    trainer.add_callback(StepClock(step_seconds))
    trainer.train(resume_from_checkpoint=resume)
    result["step_seconds"] = step_seconds
    objective = trainer.objective
    result["fused"] = {"lens": objective.fuses_lens, "output": objective.fuses_output}
    result["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result["log_history"] = trainer.state.log_history
    result["windows"] = trainer.windows
    steps = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    rank_result = {
        "rank": int(trainer.args.process_index),
        "cached_teacher": None if trainer.cached_teacher is None else trainer.cached_teacher.mode,
        "windows": trainer.windows,
        "on_policy_fraction": [entry.get("on_policy_fraction") for entry in steps],
        "completion_length": [entry.get("completion_length") for entry in steps],
        "teacher_bytes": result.get("teacher_bytes"),
        "fsdp_head_gathers": result.get("fsdp_head_gathers"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"result_rank{rank_result['rank']}.json").write_text(json.dumps(rank_result, indent=1))
    if zero3:
        result["student_lens_check"] = lens_gather_check(trainer.student_lens)
        if trainer.teacher_lens is not None:
            result["teacher_lens_check_after"] = lens_gather_check(trainer.teacher_lens)
    if evaluate:
        result["eval_metrics"] = trainer.evaluate()
    model = trainer.model_wrapped
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe_batch()).logits.float()
    trainer.save_model(str(out / "student"))
    if trainer.is_world_process_zero():
        torch.save(logits, out / "probe_logits.pt")
        (out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-models")
    make.add_argument("models_dir")
    make.add_argument("--hidden-size", type=int, default=HIDDEN_SIZE)
    cache = commands.add_parser("make-cache")
    cache.add_argument("models_dir")
    cache.add_argument("cache_dir")
    cache.add_argument("--cache-mode", choices=["hidden", "topk"], default="hidden")
    cache.add_argument("--cache-dtype", choices=["float32", "bfloat16"], default="float32")
    cache.add_argument("--top-k", type=int, default=32)
    run = commands.add_parser("train")
    run.add_argument("--models", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--deepspeed")
    run.add_argument("--per-device-batch", type=int, default=4)
    run.add_argument("--steps", type=int, default=4)
    run.add_argument("--evaluate", action="store_true")
    run.add_argument("--rouge", action="store_true")
    run.add_argument("--zero3-persistence-threshold", type=int)
    run.add_argument("--save-steps", type=int)
    run.add_argument("--teacher-dtype", default="auto")
    run.add_argument("--teacher-object", action="store_true", help="pass the teacher as a loaded model")
    run.add_argument("--use-cpu", action="store_true", help="DDP over gloo when launched without DeepSpeed")
    run.add_argument("--seed", type=int, default=0, help="training seed (data_seed stays 0)")
    run.add_argument("--lmbda", type=float, default=0.0, help="the on-policy share of optimizer windows")
    run.add_argument("--max-new-tokens", type=int, help="most tokens per completion (default: the config's)")
    run.add_argument("--scripted", action="store_true", help="scripted_completion instead of sampling")
    run.add_argument("--teacher-cache", help="distil from this cache (make-cache): no teacher model")
    run.add_argument("--teacher", default="teacher", help="the teacher's folder under --models")
    run.add_argument("--fsdp", action="store_true", help="FSDP2 through the Trainer's fsdp arguments")
    run.add_argument("--resume", help="resume_from_checkpoint (a checkpoint folder)")
    run.add_argument("--head-chunk-size", type=int, help="head_chunk_size (default: the config's)")
    run.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    run.add_argument("--lens-eval-profile", action="store_true", help="lens_eval_profile (with --evaluate)")
    options = parser.parse_args(argv)
    if options.command == "make-models":
        make_models(options.models_dir, options.hidden_size)
        return
    if options.command == "make-cache":
        make_cache(
            options.models_dir,
            options.cache_dir,
            mode=options.cache_mode,
            dtype=options.cache_dtype,
            top_k=options.top_k,
        )
        return
    train(
        options.models,
        options.out,
        deepspeed=options.deepspeed,
        per_device_batch=options.per_device_batch,
        steps=options.steps,
        evaluate=options.evaluate,
        rouge=options.rouge,
        zero3_persistence_threshold=options.zero3_persistence_threshold,
        save_steps=options.save_steps,
        teacher_object=options.teacher_object,
        teacher_dtype=options.teacher_dtype,
        scripted=options.scripted,
        teacher_cache=options.teacher_cache,
        teacher_name=options.teacher,
        fsdp=options.fsdp,
        resume=options.resume,
        seed=options.seed,
        lmbda=options.lmbda,
        **({"use_cpu": True} if options.use_cpu else {}),
        **({} if options.max_new_tokens is None else {"max_new_tokens": options.max_new_tokens}),
        **({} if options.head_chunk_size is None else {"head_chunk_size": options.head_chunk_size}),
        **({"bf16": True} if options.bf16 else {}),
        **({"lens_eval_profile": True} if options.lens_eval_profile else {}),
    )
    from distillens_trainer.commands.process import end_process_group

    end_process_group(wait_for_peers=True)  # as the CLI does


if __name__ == "__main__":
    main()
    from distillens_trainer.commands.process import exit_launched_process, launched_world_size

    if launched_world_size() > 1:  # as the CLI does: interpreter shutdown may abort a finished gloo rank
        exit_launched_process(0)
