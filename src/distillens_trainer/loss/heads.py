"""The LM head and its logit post-processing: one home for both.

:class:`LinearHead` is a plain linear head plus the model's post-processing (Granite/Cohere scaling, Gemma-2
soft-capping), the form the fused path computes with; :func:`output_linear_head` reads it off a model, and
:func:`linear_head_refusal` says why a head cannot take that form; :func:`gathered` gathers a head's ZeRO-3
partitioned weights and :func:`head_reproduces_logits` checks a head against its model's own logits. The post-processing itself is
:func:`~distillens_trainer.loss.fused_math.postprocess` (its closed-form gradient sits beside it), which the logit
lens applies too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.facts import logit_postprocessing, module_class, unwrap_model
from .fused_math import postprocess, postprocess_

HEAD_PROBE_TOKENS = 8  # tokens of the one-off forward that checks a fused output head


@dataclass(frozen=True)
class LinearHead:
    """A plain linear LM head and the model's logit post-processing: ``z = c·tanh(scale·(x Wᵀ + b) / c)``.

    Attributes:
        weight: ``[V_full, d]`` (possibly padded beyond the real vocabulary; possibly a ZeRO-3 parameter).
        bias: ``[V_full]`` or None.
        scale: one multiplier folding Granite's ``1/logits_scaling`` and Cohere's ``logit_scale``; None = 1.
        softcap: Gemma-2's ``final_logit_softcapping``; None = off.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float | None = None
    softcap: float | None = None

    def raw_logits(self, head_input: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``[n, d] -> [n, vocab_size]`` head product in the weight's dtype (before post-processing)."""
        bias = self.bias[:vocab_size] if self.bias is not None else None
        return F.linear(head_input.to(self.weight.dtype), self.weight[:vocab_size], bias)

    def logits(self, head_input: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """``[n, d] -> [n, vocab_size]`` fp32 post-processed logits."""
        return postprocess(self.raw_logits(head_input, vocab_size), self.scale, self.softcap)

    def logits_into(
        self, head_input: torch.Tensor, out: torch.Tensor, raw: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[n, d]`` -> post-processed logits written into ``out`` (``[n, V']`` fp32 or fp64, ``V'`` = its width).

        ``raw``: an ``[n, V']`` buffer in the weight's dtype, for the product when that differs from ``out``'s
        (a bf16 head). Nothing ``[n, V']`` is allocated.
        """
        vocab_size = out.shape[-1]
        weight = self.weight[:vocab_size]
        product = out if weight.dtype == out.dtype else raw
        head_input = head_input.to(weight.dtype)
        if self.bias is None:
            torch.mm(head_input, weight.t(), out=product)
        else:
            torch.addmm(self.bias[:vocab_size].to(weight.dtype), head_input, weight.t(), out=product)
        if product is not out:
            out.copy_(product)
        return postprocess_(out, self.scale, self.softcap)

    def parameters(self) -> list[torch.Tensor]:
        return [p for p in (self.weight, self.bias) if p is not None]


def linear_head_refusal(head: nn.Module | None) -> str | None:
    """Why an LM head cannot be fused (one line), or None when it is a plain floating-point ``nn.Linear``."""
    if head is None or module_class(head) is not nn.Linear:
        return f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    if not head.weight.is_floating_point():
        return f"the LM head's weight is {head.weight.dtype}, not floating point"
    return None


def output_linear_head(model: nn.Module) -> LinearHead | None:
    """The model's LM head and logit post-processing as a :class:`LinearHead`; None when it cannot be fused.

    Post-processing, in the model's order: Granite divides by ``logits_scaling``, Cohere multiplies by
    ``logit_scale`` (folded into one ``scale``), Gemma-2 soft-caps with ``final_logit_softcapping``.
    """
    model = unwrap_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if linear_head_refusal(head) is not None:
        return None
    scale, softcap = logit_postprocessing(model)
    return LinearHead(head.weight, head.bias, scale, softcap)


@contextlib.contextmanager
def gathered(heads: Sequence[LinearHead | None]) -> Iterator[None]:
    """Gather the heads' ZeRO-3 partitioned weights for the duration (a no-op without DeepSpeed)."""
    params = [p for head in heads if head is not None for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@torch.no_grad()
def head_reproduces_logits(model: nn.Module, head: LinearHead, vocab_size: int) -> bool:
    """Whether ``head`` applied to the model's ``hidden_states[-1]`` reproduces its own logits, on a short probe
    forward (:data:`HEAD_PROBE_TOKENS` tokens) in eval mode (no dropout, no random numbers drawn); under FSDP2 the
    caller gathers the head's parameters first (they are read after the forward)."""
    device = next(model.parameters()).device
    probe = torch.arange(min(HEAD_PROBE_TOKENS, vocab_size), device=device)[None]
    was_training = model.training
    model.eval()
    try:
        outputs = model(input_ids=probe, output_hidden_states=True, use_cache=False)
    finally:
        model.train(was_training)
    own = outputs.logits[0, :, :vocab_size].float()
    with gathered([head]):
        recomputed = head.logits(outputs.hidden_states[-1][0], vocab_size)
    tolerance = 1e-3 + 2e-2 * float(own.abs().amax())
    return bool(((recomputed - own).abs() <= tolerance).all())
