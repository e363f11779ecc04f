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
from .fused import FusedJob, fused_head_loss, gathered, resolve_chunk_size
from .heads import LinearHead, linear_head_refusal, output_linear_head
from .layer_map import LayerPair
from .lens import LogitLens
from .reference import divergence_sum, lens_pair_sum, shared_columns
from .response_tokens import response_mask, select_response
from .spec import (
    AUTO_CHUNK,
    ObjectiveOutput,
    ObjectiveSpec,
    check_chunk_size,
    lens_term_name,
)
from .teacher_signals import TeacherSignals
from .topk import TopKDistribution

logger = logging.getLogger(__name__)

HEAD_PROBE_TOKENS = 8  # tokens of the one-off forward that checks the fused output heads


@dataclass(frozen=True)
class ForwardRequest:
    """What the objective needs from the two forwards of one micro-batch (see
    :meth:`DistillLensObjective.forward_request`).

    Attributes:
        hidden_states: the teacher must return ``hidden_states`` (the lens or feature term reads them).
        fused_output: the output CE/KD term is computed from ``hidden_states[-1]`` through the fused head, so
            both models return hidden states and, where their forward takes it, logits for one position only.
        student_keeps_logits / teacher_keeps_logits: the model's forward takes ``logits_to_keep``.
        student_full_logits: the caller keeps the student's full logits (evaluation with ``compute_metrics``):
            the student's forward returns them even where the output term runs fused; the loss never reads them.
    """

    hidden_states: bool
    fused_output: bool
    student_keeps_logits: bool = False
    teacher_keeps_logits: bool = False
    student_full_logits: bool = False

    def forward_kwargs(self, role: str) -> dict[str, Any]:
        """Keyword arguments for the ``role`` (``"student"`` or ``"teacher"``) model's forward."""
        if role == "student":
            keeps_logits = self.student_keeps_logits and not self.student_full_logits
        else:
            keeps_logits = self.teacher_keeps_logits
        kwargs: dict[str, Any] = {"output_hidden_states": self.hidden_states or self.fused_output}
        if self.fused_output and keeps_logits:
            kwargs["logits_to_keep"] = 1
        return kwargs


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
    objective = DistillLensObjective(
        spec,
        vocab_size=vocab_size or student_logits.shape[-1],
        student_lens=student_lens,
        teacher_lens=teacher_lens,
        layer_map=layer_map,
        feature_projector=feature_projector,
        chunk_size=chunk_size,
    )
    return objective(
        labels,
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        student_hidden_states=student_hidden_states,
        teacher_hidden_states=teacher_hidden_states,
        num_items_in_batch=num_items_in_batch,
    )


class DistillLensObjective:
    """The DistillLens objective with everything fixed for a run: spec, lenses, layer map, vocabulary, chunking.

    Built once by the trainer. With ``chunk_size > 0`` the lens term (and, when the caller passes no
    logits, the output CE + KD term from the last hidden states) goes through the fused chunked head
    (``fused.py``): no ``[N, V]`` tensor is ever built. Heads that are not a plain ``nn.Linear`` fall back
    to the straightforward computation, logged once.

    Args:
        spec: weights and divergences.
        vocab_size: the shared real vocabulary.
        student_lens / teacher_lens: the models' logit lenses (needed for the lens term).
        layer_map: (student, teacher) ``hidden_states`` indices of the lens term.
        feature_projector: the learned maps of the feature baseline (``feature_weight > 0``).
        chunk_size: tokens per chunk of the fused path, or ``"auto"`` (from the vocabulary); 0 = straightforward.
        compile_math: run the fused per-chunk divergence through ``torch.compile`` (eager on failure).
        student_head / teacher_head: the output heads for the fused output term (default: the lenses'); for a
            ``hidden`` teacher cache, ``teacher_head`` is the cached head.
        cached_teacher: the teacher comes from a cache of this mode (``hidden`` or ``topk``; see
            :class:`TeacherSignals`); a ``topk`` teacher needs no teacher head.
    """

    def __init__(
        self,
        spec: ObjectiveSpec,
        *,
        vocab_size: int,
        student_lens: LogitLens | None = None,
        teacher_lens: LogitLens | None = None,
        layer_map: Sequence[LayerPair] = (),
        feature_projector: FeatureProjector | None = None,
        chunk_size: int | str = 0,
        student_head: LinearHead | None = None,
        teacher_head: LinearHead | None = None,
        compile_math: bool = False,
        cached_teacher: str | None = None,
    ) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.student_lens = student_lens
        self.teacher_lens = teacher_lens
        self.layer_map = list(layer_map)
        self.feature_projector = feature_projector
        self.chunk_size = resolve_chunk_size(chunk_size, vocab_size)  # "auto": from the vocabulary, said once
        if check_chunk_size(chunk_size) == AUTO_CHUNK:
            logger.info(
                "DistillLens: lens_chunk_size=auto: %d tokens per chunk at V=%d.", self.chunk_size, vocab_size
            )
        self.compile_math = compile_math
        self.cached_teacher = cached_teacher
        # Heads given here are used as they are; otherwise each is read off its model when used, so it is always
        # the module's current parameter (FSDP2 swaps sharded and gathered parameters on the module).
        self._given_heads = {"student": student_head, "teacher": teacher_head}
        self.output_fusable = True  # off when the heads do not reproduce the models' logits
        self._models: dict[str, nn.Module] = {}  # role -> model whose forward this objective reads
        self._keeps_logits: dict[str, bool] = {}  # role -> its forward takes logits_to_keep
        self._heads_checked = False
        self._logged: set[str] = set()

    @classmethod
    def for_models(
        cls, spec: ObjectiveSpec, student: nn.Module, teacher: nn.Module | None, **kwargs
    ) -> DistillLensObjective:
        """An objective for these models (``teacher=None`` with ``cached_teacher`` and, for a hidden cache, the
        cached ``teacher_head``: a teacher read from a cache): its fused output term uses their own heads, and
        :meth:`forward_request` asks their forwards for what it reads (checking the heads once)."""
        cached_head = kwargs.pop("teacher_head", None)
        objective = cls(spec, teacher_head=None if teacher is not None else cached_head, **kwargs)
        objective._models = {"student": unwrap_model(student)}
        if teacher is not None:
            objective._models["teacher"] = unwrap_model(teacher)
        objective._keeps_logits = {
            role: forward_accepts(model, "logits_to_keep") for role, model in objective._models.items()
        }
        return objective

    def _head(self, role: str) -> LinearHead | None:
        given = self._given_heads[role]
        if given is not None:
            return given
        lens = self.student_lens if role == "student" else self.teacher_lens
        model = self._models.get(role, lens.model if lens is not None else None)
        return output_linear_head(model) if model is not None else None

    @property
    def student_head(self) -> LinearHead | None:
        """The student's output head for the fused path: as given, else its model's (or lens's) current head."""
        return self._head("student")

    @student_head.setter
    def student_head(self, head: LinearHead | None) -> None:
        self._given_heads["student"] = head

    @property
    def teacher_head(self) -> LinearHead | None:
        """The teacher's output head: as given (a cached head), else its model's (or lens's) current head."""
        return self._head("teacher")

    def _log_once(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            logger.info(message)

    @property
    def fuses_lens(self) -> bool:
        """True when the lens term runs fused (chunking on and both lens heads are plain linear heads)."""
        if self.chunk_size == 0 or not (self.spec.uses_lens and self.layer_map):
            return False
        if self.student_head is None or (self.teacher_head is None and self.cached_teacher != "topk"):
            self._log_once(
                "DistillLens: the lens term uses the straightforward computation: "
                + _refusal(self.student_lens, self.teacher_lens)
            )
            return False
        return True

    @property
    def fuses_output(self) -> bool:
        """True when the output CE/KD term can be computed fused from the last hidden states."""
        if self.chunk_size == 0 or not self.output_fusable:
            return False
        needs_teacher_head = self.spec.needs_teacher and self.cached_teacher != "topk"
        if self.student_head is None or (needs_teacher_head and self.teacher_head is None):
            self._log_once(
                "DistillLens: the output term uses the models' full logits: "
                + _refusal(self.student_lens, self.teacher_lens)
            )
            return False
        return True

    @property
    def probes_heads_next(self) -> bool:
        """True when the next :meth:`forward_request` runs the one-off head probe (forwards of both models, then
        their heads read outside the forward)."""
        return self.fuses_output and not self._heads_checked

    # ----------------------------------------------------------------------------------------- the forward contract
    def forward_request(self, *, full_logits: bool = False) -> ForwardRequest:
        """What the next forwards must return: hidden states, and logits for one position only when the output
        term runs fused. ``full_logits`` keeps the student's full logits for a caller that returns them (evaluation
        with ``compute_metrics``); the terms stay fused all the same and the teacher's logits stay unmaterialised.

        The first request that would fuse the output term checks, with a short probe forward of each model, that
        its head applied to ``hidden_states[-1]`` reproduces its logits; if not, the output term uses the full
        logits from then on (one warning).
        """
        fused_output = self.fuses_output
        if fused_output and not self._heads_checked:
            self._heads_checked = True
            fused_output = self._output_heads_match()
        return ForwardRequest(
            hidden_states=self.spec.uses_hidden_states
            and ("teacher" in self._models or self.cached_teacher is not None),
            fused_output=fused_output,
            student_keeps_logits=self._keeps_logits.get("student", False),
            teacher_keeps_logits=self._keeps_logits.get("teacher", False),
            student_full_logits=full_logits,
        )

    def loss(
        self,
        labels: torch.Tensor,
        student_outputs: Any,
        teacher_outputs: Any | None,
        request: ForwardRequest,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
        teacher_signals: TeacherSignals | None = None,
    ) -> ObjectiveOutput:
        """The weighted loss from the two models' outputs (HF ``ModelOutput`` with ``logits`` and, as
        ``request`` asked, ``hidden_states``), computed as ``request`` planned: see :meth:`__call__`. A teacher
        read from a cache comes as ``teacher_signals`` (and ``teacher_outputs=None``)."""
        online = teacher_outputs is not None
        return self(
            labels,
            student_logits=None if request.fused_output else student_outputs.logits,
            teacher_logits=teacher_outputs.logits if online and not request.fused_output else None,
            student_hidden_states=student_outputs.hidden_states,
            teacher_hidden_states=teacher_outputs.hidden_states if online else None,
            num_items_in_batch=num_items_in_batch,
            with_teacher=online or teacher_signals is not None,
            teacher_signals=teacher_signals,
        )

    @torch.no_grad()
    def _output_heads_match(self) -> bool:
        """Once: does each model's fused head on ``hidden_states[-1]`` reproduce its own logits?

        Guards the fused output term against a model whose last hidden state is not its head's input (e.g. an
        extra transform before the head): a probe forward of a few tokens per model, in eval mode (no dropout,
        no random numbers drawn). On a mismatch the fused output term is switched off for good, with a warning.
        """
        heads = {"student": self.student_head, "teacher": self.teacher_head}
        for role, model in self._models.items():
            head = heads[role]
            device = next(model.parameters()).device
            probe = torch.arange(min(HEAD_PROBE_TOKENS, self.vocab_size), device=device)[None]
            was_training = model.training
            model.eval()
            try:
                outputs = model(input_ids=probe, output_hidden_states=True, use_cache=False)
            finally:
                model.train(was_training)
            own = outputs.logits[0, :, : self.vocab_size].float()
            with gathered([head]):
                recomputed = head.logits(outputs.hidden_states[-1][0], self.vocab_size)
            tolerance = 1e-3 + 2e-2 * float(own.abs().amax())
            if not bool(((recomputed - own).abs() <= tolerance).all()):
                logger.warning(
                    "DistillLens: the %s's LM head applied to its last hidden state does not reproduce its logits; "
                    "the output term uses the full logits instead of the fused head.",
                    role,
                )
                self.output_fusable = False
                return False
        return True

    def __call__(
        self,
        labels: torch.Tensor,
        *,
        student_logits: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        student_hidden_states: Sequence[torch.Tensor] | None = None,
        teacher_hidden_states: Sequence[torch.Tensor] | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        with_teacher: bool | None = None,
        teacher_signals: TeacherSignals | None = None,
    ) -> ObjectiveOutput:
        """The weighted loss of one micro-batch.

        Args:
            labels: ``[B, T]`` unshifted, -100 on prompt and padding.
            student_logits / teacher_logits: ``[B, T, V]`` full logits; pass ``student_logits=None`` to
                compute the output term fused from ``hidden_states[-1]`` (needs ``fuses_output``).
            student_hidden_states / teacher_hidden_states: HF ``hidden_states`` tuples of ``[B, T, d]``.
            num_items_in_batch: response tokens in the whole accumulation window (and across devices).
            with_teacher: whether a teacher is present (default: teacher logits, hidden states or signals given).
            teacher_signals: the teacher read from a cache, at this batch's response tokens, in place of
                ``teacher_logits`` and ``teacher_hidden_states`` (a ``hidden`` cache also needs the teacher head
                this objective was built with).
        """
        mask = response_mask(labels)
        num_tokens = int(mask.sum())
        denominator = float(num_items_in_batch) if num_items_in_batch is not None else float(num_tokens)
        denominator = max(denominator, 1.0)
        if with_teacher is None:
            with_teacher = any(
                x is not None for x in (teacher_logits, teacher_hidden_states, teacher_signals)
            )
        teacher = _TeacherSide(self, teacher_logits, teacher_hidden_states, teacher_signals, mask)
        spec, vocab_size = self.spec, self.vocab_size
        targets = labels[:, 1:][mask]  # [N]
        terms: dict[str, torch.Tensor] = {}
        total: torch.Tensor = torch.zeros((), device=labels.device)
        jobs: list[FusedJob] = []

        if student_logits is None:
            if student_hidden_states is None or (with_teacher and not teacher.has_output_inputs):
                raise ValueError("the fused output term needs both models' hidden_states.")
            jobs.append(
                FusedJob(
                    select_response(student_hidden_states[-1], mask),
                    targets=targets,
                    divergence=spec.kd_divergence,
                    weight=spec.kd_weight,
                    ce_weight=spec.ce_weight,
                    name="kd_loss",
                    ce_name="ce_loss",
                    **(teacher.fused_fields(teacher.output_layer) if with_teacher else {}),
                )
            )
        else:
            teacher_tokens = teacher.output_tokens() if with_teacher else None
            total = self._output_terms(student_logits, teacher_tokens, mask, targets, terms)

        lens_pairs: list[str] = []
        if spec.uses_lens and self.layer_map:
            if student_hidden_states is None or not teacher.has_lens_inputs or self.student_lens is None:
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
                compile_math=self.compile_math,
            )
            total = total + fused_total
            terms.update(sums)
            if lens_pairs:
                terms["lens_loss"] = torch.stack([sums[name] for name in lens_pairs]).mean()

        if spec.feature_weight > 0 and self.layer_map:
            total = total + self._feature_term(student_hidden_states, teacher_hidden_states, mask, terms)

        term_sums = {name: value.detach() for name, value in terms.items()}
        return ObjectiveOutput(
            loss=total / denominator, term_sums=term_sums, num_tokens=num_tokens, denominator=denominator
        )

    # ----------------------------------------------------------------------------------------- terms
    def _output_terms(
        self,
        student_logits: torch.Tensor,
        teacher_tokens: torch.Tensor | TopKDistribution | None,
        mask: torch.Tensor,
        targets: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Straightforward CE and KD on full student logits (the teacher as ``[N, V]`` logits or top-k buckets at
        the response tokens); fills ``terms``, returns their weighted sum."""
        spec, vocab_size = self.spec, self.vocab_size
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
        if teacher_tokens is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and spec.kd_weight > 0):
                kd_sum = divergence_sum(spec.kd_divergence, student_selected, teacher_tokens, spec)
            terms["kd_loss"] = kd_sum
            if spec.kd_weight > 0:
                total = total + spec.kd_weight * kd_sum
        return total

    def _lens_jobs(
        self, student_hidden_states: Sequence[torch.Tensor], teacher: _TeacherSide, mask: torch.Tensor
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
                    divergence=self.spec.lens_divergence,
                    weight=weight,
                    name=lens_term_name(student_layer, teacher_layer),
                    **teacher.fused_fields(teacher_layer),
                )
            )
        return jobs

    def _straightforward_lens(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        teacher: _TeacherSide,
        mask: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        pair_sums = []
        for student_layer, teacher_layer in self.layer_map:
            student_hidden = select_response(student_hidden_states[student_layer], mask)
            if teacher.signals is None:
                pair_sum = lens_pair_sum(
                    student_hidden,
                    select_response(teacher.hidden_states[teacher_layer], mask).detach(),
                    student_layer,
                    teacher_layer,
                    self.student_lens,
                    self.teacher_lens,
                    self.vocab_size,
                    self.spec,
                )
            else:
                student_logits = shared_columns(
                    self.student_lens(student_hidden, student_layer), self.vocab_size
                )
                teacher_tokens = teacher.cached_tokens(teacher_layer)
                pair_sum = divergence_sum(
                    self.spec.lens_divergence, student_logits, teacher_tokens, self.spec
                )
            terms[lens_term_name(student_layer, teacher_layer)] = pair_sum
            pair_sums.append(pair_sum)
        lens_sum = torch.stack(pair_sums).mean()
        terms["lens_loss"] = lens_sum
        return self.spec.lens_weight * lens_sum

    def _feature_term(
        self,
        student_hidden_states: Sequence[torch.Tensor] | None,
        teacher_hidden_states: Sequence[torch.Tensor] | None,
        mask: torch.Tensor,
        terms: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        if student_hidden_states is None or teacher_hidden_states is None or self.feature_projector is None:
            raise ValueError("the feature term needs both models' hidden_states and a FeatureProjector.")
        feature_sums = []
        for student_layer, teacher_layer in self.layer_map:
            teacher_hidden = select_response(teacher_hidden_states[teacher_layer], mask).detach()
            projected = self.feature_projector(teacher_hidden, student_layer, teacher_layer)
            student_hidden = select_response(student_hidden_states[student_layer], mask)
            feature_sums.append(feature_pair_sum(student_hidden, teacher_hidden, projected))
        feature_sum = torch.stack(feature_sums).mean()
        terms["feature_loss"] = feature_sum
        return self.spec.feature_weight * feature_sum


class _TeacherSide:
    """The teacher's side of one micro-batch, online (model outputs) or cached (:class:`TeacherSignals`), as the
    terms read it: head inputs and head for a fused job, ``[N, V]`` logits or top-k buckets otherwise."""

    def __init__(
        self,
        objective: DistillLensObjective,
        logits: torch.Tensor | None,
        hidden_states: Sequence[torch.Tensor] | None,
        signals: TeacherSignals | None,
        mask: torch.Tensor,
    ) -> None:
        self.objective, self.logits, self.hidden_states, self.signals, self.mask = (
            objective, logits, hidden_states, signals, mask,
        )  # fmt: skip
        if signals is not None:
            lens_layers = (
                {teacher_layer for _, teacher_layer in objective.layer_map}
                if objective.spec.uses_lens
                else set()
            )
            signals.check_layers(lens_layers | {signals.output_layer})

    @property
    def output_layer(self) -> int:
        """The teacher ``hidden_states`` index the output term reads (its last, already normed)."""
        return self.signals.output_layer if self.signals is not None else len(self.hidden_states) - 1

    @property
    def has_output_inputs(self) -> bool:
        return self.signals is not None or self.hidden_states is not None

    @property
    def has_lens_inputs(self) -> bool:
        return self.signals is not None or (
            self.hidden_states is not None and self.objective.teacher_lens is not None
        )

    def fused_fields(self, layer: int) -> dict[str, Any]:
        """``FusedJob`` fields for the teacher at ``hidden_states[layer]``: its head input and head, or its top-k."""
        if self.signals is not None and layer in self.signals.topk:
            return {"teacher_topk": self.signals.topk[layer]}
        if self.signals is not None:
            teacher_input = self.signals.head_inputs[layer]
        else:
            with torch.no_grad():
                teacher_input = select_response(self.hidden_states[layer], self.mask).detach()
                if layer != self.output_layer:
                    teacher_input = self.objective.teacher_lens.to_head_input(teacher_input, layer)
        return {"teacher_input": teacher_input, "teacher_head": self.objective.teacher_head}

    def cached_tokens(self, layer: int) -> torch.Tensor | TopKDistribution:
        """The cached teacher at ``hidden_states[layer]`` as ``[N, V]`` fp32 logits (hidden) or top-k buckets."""
        if layer in self.signals.topk:
            return self.signals.topk[layer]
        if self.objective.teacher_head is None:
            raise ValueError(
                "a hidden teacher cache needs the cached teacher head: build the objective with it."
            )
        with torch.no_grad(), gathered([self.objective.teacher_head]):
            return self.objective.teacher_head.logits(
                self.signals.head_inputs[layer], self.objective.vocab_size
            )

    def output_tokens(self) -> torch.Tensor | TopKDistribution:
        """The teacher at the output, for the straightforward output term: ``[N, V]`` logits or top-k buckets."""
        if self.signals is not None:
            return self.cached_tokens(self.output_layer)
        if self.logits is None:
            raise ValueError("the straightforward output term needs the teacher's logits.")
        return shared_columns(select_response(self.logits, self.mask), self.objective.vocab_size).detach()


def _refusal(student_lens: LogitLens | None, teacher_lens: LogitLens | None) -> str:
    reasons = []
    for role, lens in (("student", student_lens), ("teacher", teacher_lens)):
        reason = linear_head_refusal(lens.head) if lens is not None else None
        if reason is not None:
            reasons.append(f"{role}: {reason}")
    return "; ".join(reasons) or "no plain linear head"
