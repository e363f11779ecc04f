"""The logit lens: read an intermediate residual stream through the model's own final norm and LM head."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed.fsdp import call_unhooked
from ..models.facts import logit_postprocessing, num_hidden_layers, text_config, unwrap_model
from .fused_math import postprocess
from .heads import LinearHead, output_linear_head

# Attribute paths (from the causal-LM wrapper) of the final norm, most common first.
_FINAL_NORM_PATHS: tuple[str, ...] = (
    "model.norm",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo, Granite, Cohere, ...
    "transformer.ln_f",  # GPT-2, GPT-J, Falcon, Bloom, CodeGen
    "gpt_neox.final_layer_norm",  # GPT-NeoX, Pythia
    "model.decoder.final_layer_norm",  # OPT, XGLM
    "model.final_layernorm",  # Phi-1/2
    "model.final_layer_norm",
    "transformer.norm_f",  # MPT
    "model.embed_layer_norm",
)
# Optional projection after the norm (OPT-350m maps hidden size to the embedding size).
_POST_NORM_PROJECTION_PATHS: tuple[str, ...] = ("model.decoder.project_out",)


def _get_path(root: nn.Module, path: str) -> object | None:
    obj: object | None = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


class LogitLens:
    """``lens(hidden_state, layer_index) -> logits`` through the model's own norm and head.

    For ``layer_index < num_layers`` the state is passed through the final norm (unless
    ``final_norm=False``, the reference code's choice), any post-norm projection, then the LM head
    and the model's own logit post-processing (Gemma-2 soft-capping, Granite/Cohere scaling). For
    ``layer_index == num_layers`` HF has already normed the state, so only the head is applied and the
    result equals the model's own logits.

    The norm and head are called as modules, so DeepSpeed ZeRO-3 gathers their partitioned weights; under FSDP2
    they are called without FSDP's hooks, on the parameters gathered for the objective
    (:func:`~distillens_trainer.distributed.fsdp.gather_for_objective`).
    """

    def __init__(self, model: nn.Module, final_norm: bool = True) -> None:
        self.model = unwrap_model(model)
        self.final_norm = final_norm
        self.num_layers = num_hidden_layers(self.model)
        self.head = (
            self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        )
        if not isinstance(self.head, nn.Module):
            raise ValueError(
                f"{type(self.model).__name__} has no output embeddings (LM head): the logit lens needs a causal "
                "language model (AutoModelForCausalLM)."
            )
        self.norm = self._find_module(_FINAL_NORM_PATHS)
        if self.norm is None and not self._has_no_final_norm():
            raise ValueError(
                f"cannot find the final norm of {type(self.model).__name__}; known locations are "
                f"{', '.join(_FINAL_NORM_PATHS)}. Set lens_final_norm=False to read the lens without it."
            )
        self.post_norm_projection = self._find_module(_POST_NORM_PROJECTION_PATHS)
        self.logit_scale, self.logit_softcap = logit_postprocessing(self.model)

    def _find_module(self, paths: tuple[str, ...]) -> nn.Module | None:
        for path in paths:
            module = _get_path(self.model, path)
            if isinstance(module, nn.Module):
                return module
        return None

    def _has_no_final_norm(self) -> bool:
        # OPT with do_layer_norm_before=False (opt-350m) has final_layer_norm = None by design.
        config = text_config(self.model.config)
        return getattr(config, "do_layer_norm_before", True) is False

    def to_head_input(self, hidden_state: torch.Tensor, layer_index: int) -> torch.Tensor:
        """``[..., d_model] -> [..., d_head_in]``: norm and projection, as the model applies them."""
        if not 0 <= layer_index <= self.num_layers:
            raise ValueError(f"layer index {layer_index} is outside 0..{self.num_layers} for this model.")
        if layer_index == self.num_layers:
            return hidden_state  # HF's last hidden state is already normed (and projected).
        if self.final_norm and self.norm is not None:
            hidden_state = call_unhooked(self.norm, hidden_state)
        if self.post_norm_projection is not None:
            hidden_state = call_unhooked(self.post_norm_projection, hidden_state)
        return hidden_state

    def head_logits(self, head_input: torch.Tensor) -> torch.Tensor:
        """``[..., d_head_in] -> [..., V]`` fp32: the LM head and the model's logit post-processing."""
        return postprocess(call_unhooked(self.head, head_input), self.logit_scale, self.logit_softcap)

    def modules(self) -> list[nn.Module]:
        """The modules the lens calls: the final norm, any post-norm projection, the head."""
        return [m for m in (self.norm, self.post_norm_projection, self.head) if m is not None]

    def linear_head(self) -> LinearHead | None:
        """The head as a :class:`LinearHead` for the fused path, or None when it is not a plain ``nn.Linear``.

        A LoRA-wrapped, quantized or otherwise custom head (see :func:`linear_head_refusal`) has no closed
        form here: the caller falls back to :meth:`__call__`.
        """
        return output_linear_head(self.model)

    def __call__(self, hidden_state: torch.Tensor, layer_index: int) -> torch.Tensor:
        """``[..., d_model] -> [..., V]`` logits of ``hidden_states[layer_index]``."""
        return self.head_logits(self.to_head_input(hidden_state, layer_index))
