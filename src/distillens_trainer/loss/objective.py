"""The DistillLens objective as a function of model outputs.

loss = ce_weight·CE + kd_weight·D_out(student, teacher) + lens_weight·mean_pairs D_lens(lens_s(h_s), lens_t(h_t))
       [+ feature_weight·mean_pairs MSE(W·h_t, h_s), the paper's feature baseline, off by default]

Every term is a sum over response tokens (labels ≠ -100 after the causal shift) divided by one
denominator: the number of response tokens in the whole gradient-accumulation window when the Trainer
provides it (``num_items_in_batch``), else in this batch. Tokens are selected per sample before any
vocabulary-sized tensor is built, so a sample's contribution never depends on its neighbours or on
padding, and only response positions ever reach the LM heads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.facts import forward_accepts, unwrap_model
from .feature_baseline import FeatureProjector, feature_pair_sum
from .forwards import ForwardRequest
from .fused import ChunkDivergence, FusedJob, fused_head_loss, resolve_chunk_size
from .heads import LinearHead, head_reproduces_logits, linear_head_refusal, output_linear_head
from .layer_map import LayerPair
from .lens import LogitLens
from .reference import divergence_sum, shared_columns
from .response_tokens import response_mask, select_response
from .spec import AUTO_CHUNK, ObjectiveOutput, ObjectiveSpec, lens_term_name
from .teacher_signals import ModelTeacher, TeacherOutputs, TeacherSignals, TeacherSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelOutputs:
    """The two fields the objective reads of a model's output (an HF ``ModelOutput`` has both).

    Attributes:
        logits: ``[B, T, V]``, or None where the output term runs fused.
        hidden_states: HF ``hidden_states`` tuple of ``[B, T, d]``, or None.
    """

    logits: torch.Tensor | None = None
    hidden_states: Sequence[torch.Tensor] | None = None


def distillens_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    spec: ObjectiveSpec,
    *,
    vocab_size: int | None = None,
    student_hidden_states: Sequence[torch.Tensor] | None = None,
    teacher_hidden_states: Sequence[torch.Tensor] | None = None,
    student_lens: LogitLens | None = None,
    teacher_lens: LogitLens | None = None,
    layer_map: Sequence[LayerPair] = (),
    num_items_in_batch: int | torch.Tensor | None = None,
    feature_projector: FeatureProjector | None = None,
    chunk_size: int | str = 0,
) -> ObjectiveOutput:
    """The weighted DistillLens loss of one micro-batch (a one-off :class:`DistillLensObjective`).

    Args:
        student_logits: ``[B, T, V_s]``.
        teacher_logits: ``[B, T, V_t]`` (no grad), or None for plain SFT (kd and lens weights 0).
        labels: ``[B, T]`` unshifted, -100 on prompt and padding.
        vocab_size: the shared real vocabulary; logits are compared on ``[..., :vocab_size]``.
        student_hidden_states / teacher_hidden_states: HF ``hidden_states`` tuples, each ``[B, T, d]``.
        layer_map: (student, teacher) ``hidden_states`` indices for the lens term.
        num_items_in_batch: response tokens in the whole accumulation window (and across devices).
        feature_projector: the learned maps of the feature baseline (needed when ``feature_weight > 0``).
        chunk_size: tokens per chunk of the fused lens, or ``"auto"`` (0: the straightforward computation).
    """
    teacher_model = teacher_lens.model if teacher_lens is not None else None
    objective = DistillLensObjective(
        spec,
        vocab_size=vocab_size or student_logits.shape[-1],
        student_lens=student_lens,
        teacher=ModelTeacher(teacher_model, teacher_lens) if teacher_model is not None else None,
        layer_map=layer_map,
        feature_projector=feature_projector,
        chunk_size=chunk_size,
    )
    teacher = None
    if teacher_logits is not None or teacher_hidden_states is not None:
        teacher = TeacherOutputs(
            response_mask(labels), teacher_logits, teacher_hidden_states, teacher_lens, teacher_model
        )
    student = ModelOutputs(student_logits, student_hidden_states)
    return objective(labels, student, teacher, num_items_in_batch=num_items_in_batch)


class DistillLensObjective:
    """The DistillLens objective with everything fixed for a run: spec, models, lenses, layer map, vocabulary,
    chunking.

    Built once by the trainer, then: :meth:`check_heads` once (the setup step that checks the fused output heads),
    :meth:`forward_request` for what each micro-batch's forwards must return, and the objective itself called on
    their outputs. With ``chunk_size > 0`` the lens term (and, as the request plans, the output CE + KD term from
    the last hidden states) goes through the fused chunked head (``fused.py``): no ``[N, V]`` tensor is ever built.
    Heads that are not a plain ``nn.Linear`` fall back to the straightforward computation, logged at setup.

    Args:
        spec: weights and divergences.
        vocab_size: the shared real vocabulary.
        student: the student model (its LM head for the fused path, its forward's ``logits_to_keep``), or None.
        teacher: the run's teacher (:class:`~distillens_trainer.loss.teacher_signals.TeacherSource`: an online
            :class:`~distillens_trainer.loss.teacher_signals.ModelTeacher` or a teacher cache), or None (no
            teacher terms).
        student_lens: the student's logit lens (needed for the lens term).
        layer_map: (student, teacher) ``hidden_states`` indices of the lens term.
        feature_projector: the learned maps of the feature baseline (``feature_weight > 0``).
        chunk_size: tokens per chunk of the fused path, or ``"auto"`` (from the vocabulary); 0 = straightforward.
        student_head: the student's output head for the fused path (default: read off the student, or its lens's
            model, when used, so it is always the module's current parameter: FSDP2 swaps sharded and gathered
            parameters on the module).
        compile_math: run the fused per-chunk divergence through ``torch.compile`` (eager on failure); the
            compiled kernel is this objective's (:class:`~distillens_trainer.loss.fused.ChunkDivergence`).
    """

    def __init__(
        self,
        spec: ObjectiveSpec,
        *,
        vocab_size: int,
        student: nn.Module | None = None,
        teacher: TeacherSource | None = None,
        student_lens: LogitLens | None = None,
        layer_map: Sequence[LayerPair] = (),
        feature_projector: FeatureProjector | None = None,
        chunk_size: int | str = 0,
        student_head: LinearHead | None = None,
        compile_math: bool = False,
    ) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.student = unwrap_model(student) if student is not None else None
        self.teacher = teacher
        self.student_lens = student_lens
        self.layer_map = list(layer_map)
        self.feature_projector = feature_projector
        self.chunk_size = resolve_chunk_size(chunk_size, vocab_size)
        self.kernel = ChunkDivergence(compile_math)
        self._given_student_head = student_head
        self.student_keeps_logits = self.student is not None and forward_accepts(
            self.student, "logits_to_keep"
        )
        # off once check_heads finds heads that do not reproduce the models' logits
        self.output_fusable = True
        self.heads_checked = False
        if chunk_size == AUTO_CHUNK:
            logger.info(
                "DistillLens: head_chunk_size=auto: %d tokens per chunk at V=%d.", self.chunk_size, vocab_size
            )
        if self.chunk_size and spec.uses_lens and self.layer_map and not self.fuses_lens:
            logger.info(
                "DistillLens: the lens term uses the straightforward computation: %s",
                self._head_refusal(True),
            )

    @property
    def compile_math(self) -> bool:
        return self.kernel.compile_math

    # ----------------------------------------------------------------------------------------- heads
    @property
    def student_head(self) -> LinearHead | None:
        """The student's output head for the fused path: as given, else its model's (or lens's) current head."""
        if self._given_student_head is not None:
            return self._given_student_head
        model = self.student if self.student is not None else getattr(self.student_lens, "model", None)
        return output_linear_head(model) if model is not None else None

    @student_head.setter
    def student_head(self, head: LinearHead | None) -> None:
        self._given_student_head = head

    def _head_refusal(self, needs_teacher: bool) -> str | None:
        """Why the fused path cannot run (``"student: ...; teacher: ..."``), None when both heads can."""
        reasons = []
        if self.student_head is None:
            model = self.student if self.student is not None else getattr(self.student_lens, "model", None)
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            reasons.append(f"student: {linear_head_refusal(head) or 'no plain linear head'}")
        if needs_teacher:
            refusal = (
                self.teacher.fused_refusal() if self.teacher is not None else "teacher: no teacher given"
            )
            if refusal is not None:
                reasons.append(refusal)
        return "; ".join(reasons) or None

    @property
    def fuses_lens(self) -> bool:
        """True when the lens term runs fused (chunking on and both sides feed the fused head loop)."""
        if self.chunk_size == 0 or not (self.spec.uses_lens and self.layer_map):
            return False
        return self._head_refusal(needs_teacher=True) is None

    @property
    def fuses_output(self) -> bool:
        """True when the output CE/KD term can be computed fused from the last hidden states (before
        :meth:`check_heads`: as far as the heads' kind tells)."""
        if self.chunk_size == 0 or not self.output_fusable:
            return False
        return self._head_refusal(needs_teacher=self.spec.needs_teacher) is None

    def check_heads(self) -> bool:
        """The setup step before a run's first :meth:`forward_request` (the trainer calls it once, FSDP2 groups
        gathered around it): whether the output term runs fused. Where it would, each model's head applied to its
        ``hidden_states[-1]`` must reproduce its own logits, checked with a short probe forward of each model (the
        teacher: :meth:`TeacherSource.check_head`); on a mismatch the output term uses the full logits from then
        on, with a warning. A head that cannot be fused is said here, once. Returns :attr:`fuses_output`."""
        if self.heads_checked:
            return self.fuses_output
        self.heads_checked = True
        if self.chunk_size == 0:
            return False
        refusal = self._head_refusal(needs_teacher=self.spec.needs_teacher)
        if refusal is not None:
            logger.info("DistillLens: the output term uses the models' full logits: %s", refusal)
            return False
        checks = {
            "student": lambda: (
                self.student is None
                or head_reproduces_logits(self.student, self.student_head, self.vocab_size)
            ),
            "teacher": lambda: self.teacher is None or self.teacher.check_head(self.vocab_size),
        }
        for role, check in checks.items():
            if not check():
                logger.warning(
                    "DistillLens: the %s's LM head applied to its last hidden state does not reproduce its logits; "
                    "the output term uses the full logits instead of the fused head.",
                    role,
                )
                self.output_fusable = False
                return False
        return True

    # ----------------------------------------------------------------------------------------- the forward contract
    def forward_request(self, *, full_logits: bool = False) -> ForwardRequest:
        """What the next forwards must return: hidden states, and logits for one position only when the output
        term runs fused (only once :meth:`check_heads` confirmed the heads). ``full_logits`` keeps the student's
        full logits for a caller that returns them (evaluation with ``compute_metrics``); the terms stay fused all
        the same and the teacher's logits stay unmaterialised. A query: no forward, no state changed."""
        return ForwardRequest(
            both_hidden_states=self.spec.uses_hidden_states and self.teacher is not None,
            fused_output=self.heads_checked and self.fuses_output,
            student_keeps_logits=self.student_keeps_logits,
            teacher_keeps_logits=self.teacher is not None and self.teacher.keeps_logits,
            student_full_logits=full_logits,
        )

    def __call__(
        self,
        labels: torch.Tensor,
        student_outputs: Any,
        teacher: TeacherSignals | None = None,
        *,
        request: ForwardRequest | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """The weighted loss of one micro-batch.

        Args:
            labels: ``[B, T]`` unshifted, -100 on prompt and padding.
            student_outputs: the student's output (``logits`` ``[B, T, V]`` and, as the terms need them,
                ``hidden_states``: an HF ``ModelOutput`` or :class:`ModelOutputs`).
            teacher: the teacher at this batch (:class:`TeacherSignals`: its model's outputs or a cache's
                signals), or None (no teacher terms).
            request: the plan the forwards followed (:meth:`forward_request`); with ``fused_output`` the output term
                is computed fused from ``hidden_states[-1]``; None: from the full logits.
            num_items_in_batch: response tokens in the whole accumulation window (and across devices).
        """
        mask = response_mask(labels)
        num_tokens = int(mask.sum())
        denominator = float(num_items_in_batch) if num_items_in_batch is not None else float(num_tokens)
        denominator = max(denominator, 1.0)
        spec, vocab_size = self.spec, self.vocab_size
        student_hidden_states = student_outputs.hidden_states
        if teacher is not None:
            teacher.check_layers({t for _, t in self.layer_map} if spec.uses_lens else ())
        targets = labels[:, 1:][mask]  # [N]
        terms: dict[str, torch.Tensor] = {}
        total: torch.Tensor = torch.zeros((), device=labels.device)
        jobs: list[FusedJob] = []

        if request is not None and request.fused_output:
            if student_hidden_states is None:
                raise ValueError("the fused output term needs both models' hidden_states.")
            student_input = select_response(student_hidden_states[-1], mask)
            jobs.append(
                FusedJob(
                    student_input,
                    teacher.fused_teacher(teacher.output_layer) if teacher is not None else None,
                    divergence=spec.kd_divergence,
                    weight=spec.kd_weight,
                    targets=targets,
                    ce_weight=spec.ce_weight,
                    name="kd_loss",
                    ce_name="ce_loss",
                )
            )
        else:
            total = self._output_terms(student_outputs.logits, teacher, mask, targets, terms)

        lens_pairs: list[str] = []
        if spec.uses_lens and self.layer_map:
            if student_hidden_states is None or teacher is None or self.student_lens is None:
                raise ValueError("the lens term needs both models' hidden_states and their LogitLens.")
            if self.fuses_lens:
                jobs += self._lens_jobs(student_hidden_states, teacher, mask)
                lens_pairs = [job.name for job in jobs[-len(self.layer_map) :]]
            else:
                total = total + self._straightforward_lens(student_hidden_states, teacher, mask, terms)

        if jobs:
            fused_total, sums = fused_head_loss(
                self.student_head,
                jobs,
                vocab_size=vocab_size,
                temperature=spec.temperature,
                beta=spec.jsd_beta,
                chunk_size=self.chunk_size,
                label_smoothing=spec.label_smoothing_factor,
                kernel=self.kernel,
            )
            total = total + fused_total
            terms.update(sums)
            if lens_pairs:
                terms["lens_loss"] = torch.stack([sums[name] for name in lens_pairs]).mean()

        if spec.feature_weight > 0 and self.layer_map:
            total = total + self._feature_term(student_hidden_states, teacher, mask, terms)

        term_sums = {name: value.detach() for name, value in terms.items()}
        return ObjectiveOutput(
            loss=total / denominator, term_sums=term_sums, num_tokens=num_tokens, denominator=denominator
        )

    # ----------------------------------------------------------------------------------------- terms
    def _output_terms(
        self,
        student_logits: torch.Tensor,
        teacher: TeacherSignals | None,
        mask: torch.Tensor,
        targets: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Straightforward CE and KD on full student logits (the teacher's output distribution at the response
        tokens); fills ``terms``, returns their weighted sum."""
        spec, vocab_size = self.spec, self.vocab_size
        teacher_distribution = teacher.output_distribution(vocab_size) if teacher is not None else None
        student_selected = shared_columns(select_response(student_logits, mask), vocab_size)  # [N, V]
        math_dtype = torch.promote_types(student_selected.dtype, torch.float32)  # fp32, fp64 for fp64 logits
        ce_sum = F.cross_entropy(
            student_selected.to(math_dtype),
            targets,
            reduction="sum",
            label_smoothing=spec.label_smoothing_factor,
        )
        terms["ce_loss"] = ce_sum
        total = spec.ce_weight * ce_sum if spec.ce_weight > 0 else ce_sum.new_zeros(())
        if teacher_distribution is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and spec.kd_weight > 0):
                kd_sum = divergence_sum(spec.kd_divergence, student_selected, teacher_distribution, spec)
            terms["kd_loss"] = kd_sum
            if spec.kd_weight > 0:
                total = total + spec.kd_weight * kd_sum
        return total

    def _lens_jobs(
        self, student_hidden_states: Sequence[torch.Tensor], teacher: TeacherSignals, mask: torch.Tensor
    ) -> list[FusedJob]:
        """One fused job per layer pair, weighted lens_weight / K (the mean over pairs)."""
        weight = self.spec.lens_weight / len(self.layer_map)
        jobs = []
        for student_layer, teacher_layer in self.layer_map:
            student_input = self.student_lens.to_head_input(
                select_response(student_hidden_states[student_layer], mask), student_layer
            )
            jobs.append(
                FusedJob(
                    student_input,
                    teacher.fused_teacher(teacher_layer),
                    divergence=self.spec.lens_divergence,
                    weight=weight,
                    name=lens_term_name(student_layer, teacher_layer),
                )
            )
        return jobs

    def _straightforward_lens(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        teacher: TeacherSignals,
        mask: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        pair_sums = []
        for student_layer, teacher_layer in self.layer_map:
            student_hidden = select_response(student_hidden_states[student_layer], mask)
            student_logits = shared_columns(self.student_lens(student_hidden, student_layer), self.vocab_size)
            teacher_distribution = teacher.distribution(teacher_layer, self.vocab_size)
            pair_sum = divergence_sum(
                self.spec.lens_divergence, student_logits, teacher_distribution, self.spec
            )
            terms[lens_term_name(student_layer, teacher_layer)] = pair_sum
            pair_sums.append(pair_sum)
        lens_sum = torch.stack(pair_sums).mean()
        terms["lens_loss"] = lens_sum
        return self.spec.lens_weight * lens_sum

    def _feature_term(
        self,
        student_hidden_states: Sequence[torch.Tensor] | None,
        teacher: TeacherSignals | None,
        mask: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        if student_hidden_states is None or teacher is None or self.feature_projector is None:
            raise ValueError("the feature term needs both models' hidden_states and a FeatureProjector.")
        feature_sums = []
        for student_layer, teacher_layer in self.layer_map:
            teacher_hidden = teacher.hidden_state(teacher_layer)
            projected = self.feature_projector(teacher_hidden, student_layer, teacher_layer)
            student_hidden = select_response(student_hidden_states[student_layer], mask)
            feature_sums.append(feature_pair_sum(student_hidden, teacher_hidden, projected))
        feature_sum = torch.stack(feature_sums).mean()
        terms["feature_loss"] = feature_sum
        return self.spec.feature_weight * feature_sum
