"""LogitLens: the model's own final norm then its own head, never the norm twice.

The models are float64: the lens must compute what the model computes, so values are compared at float64's
rounding (``conftest.assert_close_to_reference``), on any CPU and thread count."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from distillens_trainer import LogitLens
from distillens_trainer.models.facts import unwrap_model

from conftest import assert_close_to_reference

VOCAB = 101
_COMMON = {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": VOCAB}
_GQA = {**_COMMON, "intermediate_size": 64, "num_key_value_heads": 2}

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=VOCAB),
    "llama": lambda: transformers.LlamaConfig(**_GQA),
    "qwen2": lambda: transformers.Qwen2Config(**_GQA),
    "mistral": lambda: transformers.MistralConfig(**_GQA),
    "gemma": lambda: transformers.GemmaConfig(**_GQA, head_dim=8),
    "gemma2_softcap": lambda: transformers.Gemma2Config(**_GQA, head_dim=8, final_logit_softcapping=5.0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_COMMON, intermediate_size=64),
    "opt": lambda: transformers.OPTConfig(**_COMMON, ffn_dim=64, word_embed_proj_dim=32),
    "opt_project_out": lambda: transformers.OPTConfig(
        **_COMMON, ffn_dim=64, word_embed_proj_dim=16, do_layer_norm_before=False
    ),
    "phi": lambda: transformers.PhiConfig(**_COMMON, intermediate_size=64),
    "phi3": lambda: transformers.Phi3Config(**_GQA, pad_token_id=0),
}


def _model_with_distinct_norm(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).double().eval()
    lens = LogitLens(model)
    if lens.norm is not None:  # random affine parameters so that normalising twice is visible
        with torch.no_grad():
            for parameter in lens.norm.parameters():
                parameter.copy_(torch.rand_like(parameter) * 2.0 + 0.5)
    return model


def _forward(model: nn.Module):
    ids = torch.randint(0, VOCAB - 1, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids, output_hidden_states=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_lens_at_last_layer_equals_the_models_logits(name):
    model = _model_with_distinct_norm(name)
    outputs = _forward(model)
    lens = LogitLens(model)
    assert lens.num_layers == len(outputs.hidden_states) - 1 == 3
    assert outputs.logits.dtype == torch.float64
    assert_close_to_reference(lens(outputs.hidden_states[-1], lens.num_layers), outputs.logits)


@pytest.mark.parametrize("name", [n for n in sorted(CONFIGS) if n != "opt_project_out"])
def test_lens_does_not_normalise_the_last_state_twice(name):
    model = _model_with_distinct_norm(name)
    outputs = _forward(model)
    lens = LogitLens(model)
    normed_twice = lens.head_logits(lens.norm(outputs.hidden_states[-1]))
    assert not torch.allclose(normed_twice, outputs.logits, atol=1e-3)


def test_lens_on_intermediate_layer_is_final_norm_then_head():
    model = _model_with_distinct_norm("llama")
    hidden = _forward(model).hidden_states[1]
    expected = model.lm_head(model.model.norm(hidden))
    assert_close_to_reference(LogitLens(model)(hidden, 1), expected)


def test_lens_without_final_norm_skips_it_on_intermediate_layers_only():
    model = _model_with_distinct_norm("gpt2")
    outputs = _forward(model)
    lens = LogitLens(model, final_norm=False)
    assert_close_to_reference(lens(outputs.hidden_states[1], 1), model.lm_head(outputs.hidden_states[1]))
    assert_close_to_reference(lens(outputs.hidden_states[-1], 3), outputs.logits)


def test_lens_applies_opt_projection_after_the_norm():
    model = _model_with_distinct_norm("opt_project_out")
    hidden = _forward(model).hidden_states[1]
    expected = model.lm_head(model.model.decoder.project_out(hidden))  # no final norm in this OPT variant
    assert_close_to_reference(LogitLens(model)(hidden, 1), expected)


def test_lens_applies_gemma2_soft_capping():
    model = _model_with_distinct_norm("gemma2_softcap")
    hidden = _forward(model).hidden_states[1]
    logits = LogitLens(model)(hidden, 1)
    assert logits.abs().max() <= 5.0


def test_lens_reads_through_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = _model_with_distinct_norm("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lens = LogitLens(wrapped)
    assert lens.head is model.lm_head and lens.norm is model.model.norm
    assert unwrap_model(wrapped) is model


def test_lens_rejects_a_model_without_lm_head():
    model = transformers.LlamaModel(CONFIGS["llama"]())
    with pytest.raises(ValueError, match="causal language model"):
        LogitLens(model)


def test_lens_rejects_an_unreadable_architecture():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(**_GQA)
            self.head = nn.Linear(32, VOCAB)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ValueError, match=r"final norm.*lens_final_norm=False"):
        LogitLens(Odd())


def test_lens_rejects_out_of_range_layer():
    model = _model_with_distinct_norm("llama")
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        LogitLens(model)(torch.zeros(1, 32), 4)
