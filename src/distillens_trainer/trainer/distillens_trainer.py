"""``DistillLensTrainer``: a drop-in ``transformers.Trainer`` that distils a frozen teacher into the model."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, TrainOutput

from ..config import DistillLensConfig
from ..diagnostics.profile import evaluation_lens_profile
from ..distributed.fsdp import fsdp_owners, fsdp_version, gather_for_objective, release
from ..distributed.quiet import hide_deepspeed_cpu_notice
from ..loss.feature_baseline import FeatureProjector
from ..loss.layer_map import (
    LayerPair,
    resolve_student_layers,
)
from ..loss.lens import LogitLens
from ..loss.objective import DistillLensObjective
from ..loss.spec import ObjectiveOutput
from ..loss.teacher_signals import TeacherSignals, TeacherSource
from ..models.facts import (
    forward_accepts,
    num_hidden_layers,
    unwrap_model,
    with_position_ids,
)
from ..models.loading import drop_gguf_quantization
from ..teacher.cached import CachedTeacher, open_cached_teacher
from ..teacher.frozen import resolve_teacher
from ..version import __version__
from .checkpoints import forget_completion, resolve_resume_from_checkpoint
from .completions import (
    SamplingSettings,
    check_room_for_completions,
    sample_completions,
    sampling_settings,
)
from .inputs import (
    refuse_compute_loss_func,
    token_count,
    tokenizer_of,
    upcast_half_trainable_parameters,
)
from .model_card import model_card_text, summary_from_config, write_model_card
from .nonfinite import (
    NonFiniteEvent,
    NonFiniteTrainingError,
    StepCounts,
    all_finite,
    drop_update,
    nonfinite_sources,
    nonfinite_tensors,
    nonfinite_terms,
    refuse_nonfinite_weights,
)
from .on_policy import (
    WindowStats,
    completion_batch,
    completion_until_eos,
    has_responses,
    prompts_of,
    sampling_seed,
    window_is_on_policy,
)
from .setup import set_up_distillation
from .term_logs import TermLogs

logger = logging.getLogger(__name__)

FEATURE_PROJECTOR_NAME = "distillens_feature_projector.pt"


class NonFiniteGuard(TrainerCallback):
    """Runs the trainer's non-finite guard just before every ``optimizer.step()`` (a callback, the one hook every
    ``transformers`` 5.x release calls there)."""

    def __init__(self, trainer: DistillLensTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._guard_step()
        return control


class DistillLensTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the DistillLens objective against a frozen teacher.

    Use it in place of ``Trainer`` with a :class:`DistillLensConfig` and a teacher::

        trainer = DistillLensTrainer(model=student, teacher_model=teacher, args=DistillLensConfig(...),
                                     train_dataset=..., processing_class=tokenizer)

    Args:
        model: the student (any HF causal LM, optionally PEFT-wrapped).
        args: a :class:`DistillLensConfig`.
        teacher_model: a causal LM, or a local folder / hub id; defaults to
            ``args.teacher_model_name_or_path``. Not needed when ``kd_weight == lens_weight == 0`` (SFT).
        teacher_processing_class: the teacher's tokenizer, to check that both models share one; loaded from
            the teacher's folder when the teacher is given as a path.
        Every other ``Trainer`` argument (positional after ``args`` or by keyword) is passed through.
    """

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: DistillLensConfig | None = None,
        *trainer_args: Any,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        teacher_processing_class: Any | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        if args is None:
            args = DistillLensConfig(output_dir="tmp_trainer")
        if not isinstance(args, DistillLensConfig):
            raise ValueError(
                f"args is a {type(args).__name__}; DistillLensTrainer needs a DistillLensConfig (TrainingArguments "
                "plus the distillation fields): convert it with DistillLensConfig.from_training_arguments(args, "
                "kd_weight=..., ...), which keeps its TrainingArguments fields and drops the others (such as "
                "SFTConfig's max_length: apply those when you tokenise)."
            )
        self.objective_spec = args.objective_spec
        refuse_compute_loss_func(trainer_args, trainer_kwargs)
        if self.objective_spec.label_smoothing_factor > 0 and self.objective_spec.ce_weight == 0:
            logger.warning(
                "label_smoothing_factor smooths the CE term, which ce_weight=0 leaves out: no effect."
            )
        if model is not None:
            self._check_student_before_loading(model, args)
        self._teacher_name = (
            teacher_model if isinstance(teacher_model, str) else args.teacher_model_name_or_path
        )
        if args.teacher_cache and teacher_model is not None:
            raise ValueError(
                "pass either teacher_model or a teacher_cache in the config, not both: the cache replaces the teacher."
            )
        if not args.teacher_cache:
            teacher_model, teacher_processing_class = resolve_teacher(
                args, teacher_model, teacher_processing_class, needs_teacher=self.objective_spec.needs_teacher
            )
        if model is not None:
            drop_gguf_quantization(unwrap_model(model))  # a GGUF-loaded student trains and saves as usual
        # Trainer.__init__ imports an installed DeepSpeed, even unused: its CPU notice only for a DeepSpeed run
        hide_deepspeed_cpu_notice(not args.deepspeed)
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        # 2 under FSDP2, 1 under FSDP v1 (refused with the teacher), None otherwise; FSDP asked for but not running
        # (DDP on a machine without GPUs) is refused here.
        self.fsdp_version = fsdp_version(self.args, self.accelerator)
        self._fsdp_owners: dict[str, list[nn.Module]] | None = None

        cached_teacher = None
        if args.teacher_cache:
            datasets = {"training": self.train_dataset, "evaluation": self.eval_dataset}
            cached_teacher = open_cached_teacher(
                args, self.model, tokenizer_of(self.processing_class), datasets, args.device
            )
        distillation = set_up_distillation(
            args,
            self.model,
            teacher_model,
            cached_teacher,
            processing_class=self.processing_class,
            teacher_processing_class=teacher_processing_class,
            accelerator=self.accelerator,
            distributed=self.args.world_size > 1
            or self.is_deepspeed_enabled
            or self.fsdp_version is not None,
            teacher_name=self._teacher_name,
        )
        self.teacher_model: nn.Module | None = distillation.teacher_model
        self.cached_teacher: CachedTeacher | None = cached_teacher
        self.teacher: TeacherSource | None = distillation.teacher
        self.student_lens: LogitLens | None = distillation.student_lens
        self.teacher_lens: LogitLens | None = distillation.teacher_lens
        self.layer_map: list[LayerPair] = distillation.layer_map
        self.vocab_size: int | None = distillation.vocab_size
        self.feature_projector: FeatureProjector | None = distillation.feature_projector
        self.objective: DistillLensObjective = distillation.objective
        self._feature_params_added = False  # the feature projector's parameter group is in the optimizer
        self._student_takes_position_ids = forward_accepts(self.model, "position_ids")
        # compute_loss normalises by the accumulation window's response-token count (num_items_in_batch), counted
        # over shifted labels, so the Trainer must neither rescale by the accumulation steps nor count position 0.
        self.model_accepts_loss_kwargs = True
        if hasattr(self, "_loss_shifts_labels"):
            self._loss_shifts_labels = True

        self._term_logs = TermLogs(self.args.device, self.objective_spec.term_weights)
        self._window_stats = WindowStats()
        # The non-finite guard (nonfinite.py): the first non-finite micro-batch of the current optimizer step, and
        # the steps taken / skipped since the last training log and in this train() call.
        self._nonfinite_event: NonFiniteEvent | None = None
        self._step_counts = StepCounts()
        self.add_callback(NonFiniteGuard(self))
        self.sampling: SamplingSettings | None = None
        if args.generates_completions:
            self.sampling = sampling_settings(
                args,
                self.model,
                tokenizer_of(self.processing_class),
                has_teacher=self.teacher_model is not None,
                train_columns=getattr(self.train_dataset, "column_names", None) or (),
            )

    def _check_student_before_loading(self, model: nn.Module, args: DistillLensConfig) -> None:
        """Checks that need only the student, run before the teacher loads: lens depth, finite weights and master
        weights."""
        refuse_nonfinite_weights(
            unwrap_model(model),
            "the student",
            "check the checkpoint it was loaded from (model_name_or_path), or the code that built it",
        )
        if self.objective_spec.needs_teacher and self.objective_spec.uses_hidden_states:
            resolve_student_layers(num_hidden_layers(model), args.lens_student_layers, args.lens_num_layers)
        if (args.bf16 or args.fp16) and not args.deepspeed:
            converted = upcast_half_trainable_parameters(model)
            if converted:
                logger.info(
                    "Mixed precision: %d trainable bf16/fp16 parameters of the student upcast to fp32 master "
                    "weights (the forward pass still runs in %s).",
                    converted,
                    "bf16" if args.bf16 else "fp16",
                )

    # ----------------------------------------------------------------------------------------- on-policy windows
    def get_batch_samples(
        self, epoch_iterator: Iterator, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | int | None]:
        """The micro-batches of one optimizer window and their response-token count; on an on-policy window (or a
        ``seq_kd`` one) their rows are the prompts completed by the student (teacher), decided and generated once
        for the whole window, and the count is recounted from the generated tokens (across ranks as well)."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.sampling is None or not batches:
            return batches, num_items_in_batch
        on_policy = window_is_on_policy(self.args.lmbda, self.args.seed, self.state.global_step)
        self._window_stats.count_window(on_policy)
        if not on_policy and not self.args.seq_kd:
            if not all(has_responses(batch) for batch in batches):
                raise ValueError(
                    "an off-policy window holds rows without responses (prompt-only data): set lmbda=1 (every "
                    "window on-policy) or seq_kd=True."
                )
            return batches, num_items_in_batch
        started = time.perf_counter()
        generator = self.model if on_policy else self.teacher_model
        prompts = [prompts_of(batch) for batch in batches]
        flat = [prompt for batch_prompts in prompts for prompt in batch_prompts]
        check_room_for_completions(self.model, flat, self.sampling.max_new_tokens)
        eos_ids = self.sampling.eos_token_ids
        completions = iter(
            completion_until_eos(tokens, eos_ids) for tokens in self.generate_completions(generator, flat)
        )
        batches = [
            completion_batch(
                batch_prompts, [next(completions) for _ in batch_prompts], self.sampling.pad_token_id
            )
            for batch_prompts in prompts
        ]
        self._window_stats.count_completions(flat, batches, time.perf_counter() - started)
        return batches, self._get_num_items_in_batch(batches, device)

    def generate_completions(self, model: nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """``model``'s continuation of each prompt ``[P_i]`` (token ids), sampled with :attr:`sampling`. The seam for
        on-policy training: override it to make completions another way (a deterministic stand-in in tests, a
        server elsewhere). The window trains on what it returns up to and including the first EOS token."""
        seed = sampling_seed(self.args.seed, self.state.global_step, self.args.process_index)
        return sample_completions(
            model, prompts, self.sampling, self.args.gradient_checkpointing_kwargs, seed
        )

    # ----------------------------------------------------------------------------------------- model card
    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write the distilled student's model card (``README.md`` in ``output_dir``): the teacher, the objective
        (weights, divergences, layer map), the data and the paper's citation, tagged ``distillation`` and
        ``distillens``. ``push_to_hub`` calls it, so the tags reach the hub. ``tasks``, ``dataset_tags`` and
        ``dataset_args`` are accepted for ``Trainer`` compatibility and not used."""
        if not self.is_world_process_zero():
            return
        student_name = getattr(unwrap_model(self.model).config, "_name_or_path", "") or "student"
        teacher_name = self._teacher_name
        if teacher_name is None and self.teacher_model is not None:
            teacher_name = getattr(unwrap_model(self.teacher_model).config, "_name_or_path", None) or None
        if self.cached_teacher is not None:
            teacher_name = self.cached_teacher.cache.settings.teacher.name_or_path
        summary = summary_from_config(
            self.args,
            student=student_name,
            teacher=teacher_name
            if self.teacher_model is not None or self.cached_teacher is not None
            else None,
            layer_map=self.layer_map,
            datasets=dataset or (),
            version=__version__,
            training_steps=self.state.global_step or None,
        )
        text = model_card_text(
            summary,
            model_name=model_name or Path(self.args.output_dir).name,
            base_model=finetuned_from or student_name,
            tags=tags,
            hub_model_id=self.args.hub_model_id,
            license=license,
            language=language,
        )
        write_model_card(self.args.output_dir, text)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.feature_projector is not None and not self._feature_params_added:
            optimizer.add_param_group(
                {"params": list(self.feature_projector.parameters()), "weight_decay": 0.0}
            )
            self._feature_params_added = True
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)
        if self.feature_projector is not None:
            path = os.path.join(output_dir or self.args.output_dir, FEATURE_PROJECTOR_NAME)
            torch.save(self.feature_projector.state_dict(), path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, FEATURE_PROJECTOR_NAME)
        if self.feature_projector is not None and os.path.isfile(path):
            self.feature_projector.load_state_dict(
                torch.load(path, map_location=self.args.device, weights_only=True)
            )

    # ----------------------------------------------------------------------------------------- FSDP2
    def _objective_owners(self, model: nn.Module) -> dict[str, list[nn.Module]]:
        """FSDP2 groups holding the norm and head each model's objective reads outside its forward (found once)."""
        if self._fsdp_owners is None:
            owners = {}
            for role, wrapped, lens in (
                ("student", model, self.student_lens),
                ("teacher", self.teacher_model, self.teacher_lens),
            ):
                if wrapped is None:
                    continue
                module = unwrap_model(wrapped)
                head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
                owners[role] = fsdp_owners(module, [head, *(lens.modules() if lens is not None else [])])
            if not owners["student"]:
                return (
                    owners  # not sharded yet (before accelerate prepares the student): look again next time
                )
            self._fsdp_owners = owners
        return self._fsdp_owners

    def _gather_objective_parameters(self, model: nn.Module) -> None:
        if self.fsdp_version == 2:
            owners = self._objective_owners(model)
            gather_for_objective([owner for group in owners.values() for owner in group])

    def _release_objective_parameters(self, model: nn.Module, *, training: bool) -> None:
        """The teacher's gathered norm and head back to shards (and the student's outside training: in training
        FSDP reduce-scatters their gradient after the backward and reshards them then)."""
        if self.fsdp_version == 2:
            owners = self._objective_owners(model)
            release(owners.get("teacher", []) + ([] if training else owners["student"]))

    # ----------------------------------------------------------------------------------------- loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """The DistillLens objective on one micro-batch; with ``return_outputs`` also the student's full logits."""
        if not self.objective.heads_checked:  # the objective's one setup step, on the first micro-batch
            if self.objective.fuses_output:
                # FSDP2: the probe reads the heads after its forwards
                self._gather_objective_parameters(model)
            self.objective.check_heads()
        request = self.objective.forward_request(full_logits=return_outputs)
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        student_inputs = with_position_ids(model_inputs, self._student_takes_position_ids)
        student_outputs = model(**student_inputs, **request.forward_kwargs("student"), use_cache=False)
        teacher_signals = self.teacher.signals(inputs, request) if self.teacher is not None else None
        window_tokens = token_count(
            num_items_in_batch, n_gpu=self.args.n_gpu, averaged=self.args.average_tokens_across_devices
        )
        self._gather_objective_parameters(model)  # FSDP2: once for every pair and chunk of this micro-batch
        result = self.objective(
            inputs["labels"],
            student_outputs,
            teacher_signals,
            request=request,
            num_items_in_batch=window_tokens,
        )
        self._release_objective_parameters(model, training=model.training)
        # Same convention as Trainer.compute_loss: with a token count taken across devices, undo the
        # data-parallel gradient averaging so every device's tokens weigh the same.
        scale = 1
        if self.args.average_tokens_across_devices and window_tokens is not None:
            scale = self.accelerator.num_processes
        loss = result.loss * scale if scale != 1 else result.loss
        skipped = model.training and self._check_finite(
            result, model, student_outputs, teacher_signals, inputs.get("attention_mask")
        )
        if not skipped:
            self._term_logs.record(result, training=model.training, step=self.state.global_step, scale=scale)
        if return_outputs:
            return loss, CausalLMOutputWithPast(loss=loss, logits=student_outputs.logits)
        return loss

    # ----------------------------------------------------------------------------------------- non-finite guard
    def _check_finite(
        self,
        result: ObjectiveOutput,
        model: nn.Module,
        student_outputs: Any,
        teacher_signals: TeacherSignals | None,
        attention_mask: torch.Tensor | None,
    ) -> bool:
        """Whether this training micro-batch's loss or a term is non-finite (one host sync); the step's first such
        micro-batch is recorded with where its values came from, for the step's end (:meth:`_guard_step`)."""
        terms = nonfinite_terms(result.loss, result.term_sums)
        if not terms:
            return False
        if self._nonfinite_event is None:
            sources, student_weights = nonfinite_sources(
                student=unwrap_model(model),
                student_outputs=student_outputs,
                teacher=teacher_signals,
                attention_mask=attention_mask,
            )
            self._nonfinite_event = NonFiniteEvent(
                self.state.global_step + 1, terms, sources, student_weights
            )
        return True

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """``Trainer.training_step``; a micro-batch whose loss is non-finite returns 0, so the Trainer never replaces
        a NaN by the running mean (its ``logging_nan_inf_filter``: a ``loss`` of 0.0 at the first step); its step
        then stops training or, under ``nonfinite_policy="skip"``, is dropped and left out of the logged means."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nonfinite_event is not None and not torch.isfinite(loss).all():
            return torch.zeros_like(loss)
        return loss

    def _guard_step(self) -> None:
        """Just before each ``optimizer.step()`` (the :class:`NonFiniteGuard` callback): stop (NonFiniteTrainingError)
        or drop this step's update when one of its micro-batches or its gradients (after clipping, which turns a
        non-finite norm into non-finite gradients) were non-finite, the same way on every process. Under fp16 loss
        scaling non-finite gradients are the scaler's overflow, which it skips on its own."""
        event, self._nonfinite_event = self._nonfinite_event, None
        gradients = [
            p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        scaled = self.accelerator.scaler is not None
        gradients_bad = not scaled and not all_finite(gradients)
        flags = torch.tensor(
            [event is not None or gradients_bad, event is not None and event.student_weights]
        )
        if self.accelerator.num_processes > 1:  # every process takes the same decision
            flags = self.accelerator.reduce(flags.float().to(self.args.device), reduction="sum").cpu() > 0
        self._step_counts.count_step()
        if not flags[0]:
            return
        event = event or NonFiniteEvent(self.state.global_step + 1)
        named = [(name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
        line = event.describe(nonfinite_tensors(named) if not event.terms else [])
        if self.args.nonfinite_policy == "stop" or flags[1]:
            why = (
                "the student's weights are non-finite, so skipping cannot help; "
                if self.args.nonfinite_policy == "skip"
                else ""
            )
            raise NonFiniteTrainingError(
                f"training stopped at {line}; {why}its update was not applied and no final model is saved; the "
                f"checkpoints already in {self.args.output_dir} are kept (set nonfinite_policy='skip' to skip such "
                "steps instead)."
            )
        if not (
            scaled and not all_finite(gradients)
        ):  # the scaler skips a step with non-finite gradients itself
            drop_update(self.optimizer)
        self._step_counts.count_skip()
        logger.warning("nonfinite_policy='skip': skipped %s (no update applied).", line)

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """``Trainer.train``; ``resume_from_checkpoint=True`` (or ``"true"``) resumes from the newest *complete*
        checkpoint in ``output_dir``, and a named incomplete checkpoint is refused in one line naming the file."""
        resume_from_checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, self.args.output_dir)
        self._term_logs.clear_train()  # terms of an earlier, unlogged tail must not leak into this run
        self._window_stats.clear()
        self._nonfinite_event = None
        self._step_counts = StepCounts()
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        if self._step_counts.run_skipped:  # train_loss over the applied steps (StepCounts.correct_logs)
            output = TrainOutput(
                output.global_step, output.metrics.get("train_loss", math.nan), output.metrics
            )
        return output

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # trainer_state.json, written last, marks a whole checkpoint: drop a stale one before saving over a folder.
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            forget_completion(folder)
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the terms averaged over the same window as `loss`
            logs.update(
                self._term_logs.pop_train(lambda totals: self.accelerator.reduce(totals, reduction="mean"))
            )
            logs.update(self._window_stats.pop())
        if self.args.nonfinite_policy == "skip":
            self._step_counts.correct_logs(logs)
        super().log(logs, start_time)

    def evaluation_loop(
        self,
        dataloader: DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> EvalLoopOutput:
        """``Trainer.evaluation_loop``, with the terms' means over every response token and, under
        ``lens_eval_profile``, the per-layer lens metrics."""
        self._term_logs.clear_eval()
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        output.metrics.update(
            self._term_logs.pop_eval(
                metric_key_prefix, lambda sums: self.accelerator.reduce(sums, reduction="sum")
            )
        )
        if self.args.lens_eval_profile and self.teacher_model is not None:
            output.metrics.update(self._lens_profile(dataloader, metric_key_prefix))
        return output

    def _lens_profile(self, dataloader: DataLoader, prefix: str) -> dict[str, float]:
        """``lens_eval_profile``'s metrics on the evaluation set; under FSDP2 each batch's forwards leave the norm and
        head groups gathered for the lenses to read, released here after the last batch."""
        args = self.args
        try:
            return evaluation_lens_profile(
                self.model,
                self.teacher_model,
                self.student_lens or LogitLens(self.model, final_norm=args.lens_final_norm),
                self.teacher_lens or LogitLens(self.teacher_model, final_norm=args.lens_final_norm),
                (self._prepare_inputs(batch) for batch in dataloader),
                vocab_size=self.vocab_size,
                divergence=args.lens_divergence,
                jsd_beta=args.jsd_beta,
                reduce_sum=lambda flat: self.accelerator.reduce(flat, reduction="sum"),
                prefix=prefix,
            )
        finally:
            self._release_objective_parameters(self.model_wrapped, training=False)
