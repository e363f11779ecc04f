"""The one teacher interface of the objective: the teacher as the objective reads it, whatever it comes from.

:class:`TeacherSignals` is the teacher at one micro-batch's ``N`` response tokens (in the order
:func:`~distillens_trainer.loss.response_tokens.select_response` gives them: row by row, position by position). For
a teacher ``hidden_states`` index it gives the teacher side of a fused job (:meth:`~TeacherSignals.fused_teacher`,
a :class:`~distillens_trainer.loss.fused.FusedTeacher`) and the plain distribution of the straightforward terms
(:meth:`~TeacherSignals.distribution`, a :class:`~distillens_trainer.loss.reference.TeacherDistribution`). Its
implementations:

- :class:`TeacherOutputs`: a teacher model's own outputs (the online teacher), its hidden states through its logit
  lens and LM head;
- :class:`CachedHeadInputs`: a ``hidden`` teacher cache, the LM-head inputs and the cached head (the exact logits);
- :class:`CachedTopK`: a ``topk`` teacher cache, top-k buckets and a tail (:mod:`.topk`).

:class:`TeacherSource` is a run's teacher before any batch: whether its signals feed the fused head loop, the
one-off check of its head, and each micro-batch's signals. :class:`ModelTeacher` is the online teacher; a cache's
source is ``distillens_trainer.teacher.cached.CachedTeacher``. No teacher (``None``) means no teacher terms.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.facts import forward_accepts, unwrap_model, with_position_ids
from .forwards import ForwardRequest
from .fused import FusedTeacher, HeadTeacher
from .heads import LinearHead, gathered, head_reproduces_logits, linear_head_refusal, output_linear_head
from .lens import LogitLens
from .reference import TeacherDistribution, TeacherLogits, shared_columns
from .response_tokens import response_mask, select_response
from .topk import TopKDistribution

NamedTensors = Iterator[tuple[str, torch.Tensor]]


class TeacherSignals(ABC):
    """The teacher at one micro-batch's ``N`` response tokens, as the objective reads it.

    Attributes:
        output_layer: the teacher ``hidden_states`` index the output term reads (its last, already normed).
    """

    output_layer: int

    @abstractmethod
    def check_layers(self, layers: Iterable[int]) -> None:
        """ValueError (one line) unless the teacher can be read at every ``hidden_states`` index in ``layers``
        (the lens term's teacher layers) and at its output."""

    @abstractmethod
    def fused_teacher(self, layer: int) -> FusedTeacher:
        """The teacher side of a fused job at ``hidden_states[layer]`` (``N`` positions, no grad)."""

    @abstractmethod
    def distribution(self, layer: int, vocab_size: int) -> TeacherDistribution:
        """The teacher's distribution at ``hidden_states[layer]`` through its lens, for the straightforward lens
        term (``[N, vocab_size]``, no grad)."""

    def output_distribution(self, vocab_size: int) -> TeacherDistribution:
        """The teacher's output distribution, for the straightforward output term."""
        return self.distribution(self.output_layer, vocab_size)

    def hidden_state(self, layer: int) -> torch.Tensor:
        """``[N, d_t]`` residual stream at ``hidden_states[layer]`` (the feature baseline reads it)."""
        raise ValueError(
            "the feature term needs the teacher's hidden states, which a teacher cache does not hold: set "
            "feature_weight=0 or train with the teacher model."
        )

    @abstractmethod
    def named_tensors(self, attention_mask: torch.Tensor | None = None) -> NamedTensors:
        """Every tensor the teacher's values come from, named (what the non-finite guard checks); positions the
        ``[B, T]`` attention mask excludes are left out where a tensor has them."""

    @abstractmethod
    def source_phrase(self, names: str) -> str:
        """Where these values come from, for a one-line message: ``names`` lists the non-finite tensors."""


class TeacherSource(ABC):
    """A run's teacher before any batch: what the objective plans with, and each micro-batch's signals.

    Attributes:
        keeps_logits: its forward takes ``logits_to_keep`` (an online teacher's model).
    """

    keeps_logits: bool = False

    @abstractmethod
    def fused_refusal(self) -> str | None:
        """Why its signals cannot feed the fused head loop (``"teacher: ..."``), None when they can."""

    def check_head(self, vocab_size: int) -> bool:
        """The one-off setup check that the head its fused jobs use reproduces its own logits (a probe forward
        where there is a model; the caller gathers sharded heads first). True when there is nothing to check."""
        return True

    @abstractmethod
    def signals(self, inputs: Mapping[str, torch.Tensor], request: ForwardRequest) -> TeacherSignals:
        """The teacher at the response tokens of the micro-batch ``inputs`` (``input_ids``, ``attention_mask``,
        ``labels``, ...), as ``request`` asked of the forwards."""


# --------------------------------------------------------------------------------------------- the online teacher
@dataclass(frozen=True)
class TeacherOutputs(TeacherSignals):
    """A teacher model's outputs on a micro-batch (the online teacher).

    Attributes:
        mask: ``[B, T-1]`` response positions (:func:`~distillens_trainer.loss.response_tokens.response_mask`).
        logits: ``[B, T, V]`` (or one position when the output term runs fused), or None.
        hidden_states: HF ``hidden_states`` tuple of ``[B, T, d]``, or None.
        lens: the teacher's logit lens (the lens term), or None.
        model: the teacher whose LM head the fused jobs use, read when used (FSDP2 swaps sharded and gathered
            parameters on the module), or None.
    """

    mask: torch.Tensor
    logits: torch.Tensor | None = None
    hidden_states: Sequence[torch.Tensor] | None = None
    lens: LogitLens | None = None
    model: nn.Module | None = None

    @property
    def output_layer(self) -> int:  # type: ignore[override]
        if self.hidden_states is None:
            raise ValueError("the fused output term needs both models' hidden_states.")
        return len(self.hidden_states) - 1

    def check_layers(self, layers: Iterable[int]) -> None:
        if list(layers) and (self.hidden_states is None or self.lens is None):
            raise ValueError("the lens term needs both models' hidden_states and their LogitLens.")

    def _selected(self, layer: int) -> torch.Tensor:
        if self.hidden_states is None:
            raise ValueError("the teacher's terms need its hidden_states: ask its forward for them.")
        return select_response(self.hidden_states[layer], self.mask).detach()

    def fused_teacher(self, layer: int) -> FusedTeacher:
        head = output_linear_head(self.model) if self.model is not None else None
        if head is None:
            raise ValueError("the fused teacher terms need the teacher's plain linear LM head.")
        with torch.no_grad():
            head_input = self._selected(layer)
            if layer != self.output_layer:
                head_input = self.lens.to_head_input(head_input, layer)
        return HeadTeacher(head_input, head)

    def distribution(self, layer: int, vocab_size: int) -> TeacherDistribution:
        teacher_hidden = self._selected(layer)
        with torch.no_grad():
            return TeacherLogits(shared_columns(self.lens(teacher_hidden, layer), vocab_size))

    def output_distribution(self, vocab_size: int) -> TeacherDistribution:
        if self.logits is None:
            raise ValueError("the straightforward output term needs the teacher's logits.")
        return TeacherLogits(shared_columns(select_response(self.logits, self.mask), vocab_size).detach())

    def hidden_state(self, layer: int) -> torch.Tensor:
        if self.hidden_states is None:
            raise ValueError("the feature term needs both models' hidden_states and a FeatureProjector.")
        return self._selected(layer)

    def named_tensors(self, attention_mask: torch.Tensor | None = None) -> NamedTensors:
        named = [("logits", self.logits)] if torch.is_tensor(self.logits) else []
        named += [
            (f"hidden_states[{i}]", h) for i, h in enumerate(self.hidden_states or ()) if torch.is_tensor(h)
        ]
        for name, tensor in named:
            if attention_mask is not None and tensor.shape[:2] == attention_mask.shape:
                tensor = tensor[attention_mask.bool()]
            yield name, tensor

    def source_phrase(self, names: str) -> str:
        return f"the teacher's outputs ({names})"


class ModelTeacher(TeacherSource):
    """The online teacher: a frozen model run on every micro-batch (no grad, eval mode).

    Args:
        model: the teacher as it is called (possibly a DeepSpeed engine or an FSDP2 module).
        lens: its logit lens (the lens term), or None.
    """

    def __init__(self, model: nn.Module, lens: LogitLens | None = None) -> None:
        self.model = model
        self.module = unwrap_model(model)
        self.lens = lens
        self.keeps_logits = forward_accepts(self.module, "logits_to_keep")
        self.takes_position_ids = forward_accepts(model, "position_ids")

    def fused_refusal(self) -> str | None:
        if output_linear_head(self.module) is not None:
            return None
        head = self.module.get_output_embeddings() if hasattr(self.module, "get_output_embeddings") else None
        return f"teacher: {linear_head_refusal(head) or 'no plain linear head'}"

    def check_head(self, vocab_size: int) -> bool:
        head = output_linear_head(self.module)
        return head is not None and head_reproduces_logits(self.module, head, vocab_size)

    @torch.no_grad()
    def signals(self, inputs: Mapping[str, torch.Tensor], request: ForwardRequest) -> TeacherOutputs:
        self.model.eval()  # stays in eval mode whatever was called on the student
        model_inputs = with_position_ids(
            {key: value for key, value in inputs.items() if key != "labels"}, self.takes_position_ids
        )
        outputs = self.model(**model_inputs, **request.forward_kwargs("teacher"), use_cache=False)
        return self.outputs_signals(outputs, inputs["labels"])

    def outputs_signals(self, outputs: object, labels: torch.Tensor) -> TeacherOutputs:
        """The signals of this teacher's ``outputs`` (HF ``ModelOutput``) on a micro-batch with ``labels``."""
        return TeacherOutputs(
            response_mask(labels), outputs.logits, outputs.hidden_states, self.lens, self.module
        )


# --------------------------------------------------------------------------------------------- a teacher cache
def _check_held(held: Iterable[int], wanted: set[int]) -> None:
    held = set(held)
    missing = sorted(wanted - held)
    if missing:
        raise ValueError(
            f"the cached teacher signals lack teacher layers {missing} (held: {sorted(held)}): rebuild the cache "
            "with this layer map."
        )


@dataclass(frozen=True)
class CachedHeadInputs(TeacherSignals):
    """A ``hidden`` teacher cache at a batch's response tokens: ``head_inputs[layer]`` ``[N, d]`` per teacher layer
    held (the final norm applied), and the cached LM head that makes the exact logits.

    Attributes:
        output_layer: the teacher's ``num_layers`` (its last hidden state, the output term's input).
        head_inputs: teacher ``hidden_states`` index -> ``[N, d]`` head inputs.
        head: the cached teacher LM head (needed by every term that reads the teacher).
        where: the cache, as messages name it.
    """

    output_layer: int
    head_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    head: LinearHead | None = None
    where: str = "the teacher cache"

    @property
    def layers(self) -> set[int]:
        return set(self.head_inputs)

    def check_layers(self, layers: Iterable[int]) -> None:
        _check_held(self.head_inputs, set(layers) | {self.output_layer})

    def _head(self) -> LinearHead:
        if self.head is None:
            raise ValueError(
                "a hidden teacher cache needs the cached teacher head: pass TeacherCache.teacher_head()."
            )
        return self.head

    def fused_teacher(self, layer: int) -> FusedTeacher:
        return HeadTeacher(self.head_inputs[layer], self._head())

    def distribution(self, layer: int, vocab_size: int) -> TeacherDistribution:
        head = self._head()
        with torch.no_grad(), gathered([head]):
            return TeacherLogits(head.logits(self.head_inputs[layer], vocab_size))

    def named_tensors(self, attention_mask: torch.Tensor | None = None) -> NamedTensors:
        for layer, tensor in self.head_inputs.items():
            yield f"layer {layer} head inputs", tensor

    def source_phrase(self, names: str) -> str:
        return f"the teacher cache's signals ({self.where}: {names})"


@dataclass(frozen=True)
class CachedTopK(TeacherSignals):
    """A ``topk`` teacher cache at a batch's response tokens: ``topk[layer]`` buckets per teacher layer held
    (:class:`~distillens_trainer.loss.topk.TopKDistribution`: itself a fused teacher and a distribution).

    Attributes: as :class:`CachedHeadInputs`, with ``topk`` in place of ``head_inputs`` and no head.
    """

    output_layer: int
    topk: dict[int, TopKDistribution] = field(default_factory=dict)
    where: str = "the teacher cache"

    @property
    def layers(self) -> set[int]:
        return set(self.topk)

    def check_layers(self, layers: Iterable[int]) -> None:
        _check_held(self.topk, set(layers) | {self.output_layer})

    def fused_teacher(self, layer: int) -> FusedTeacher:
        return self.topk[layer]

    def distribution(self, layer: int, vocab_size: int) -> TeacherDistribution:
        return self.topk[layer]

    def named_tensors(self, attention_mask: torch.Tensor | None = None) -> NamedTensors:
        for layer, distribution in self.topk.items():
            yield f"layer {layer} top-k log-probabilities", distribution.log_probs[distribution.live]

    def source_phrase(self, names: str) -> str:
        return f"the teacher cache's signals ({self.where}: {names})"
