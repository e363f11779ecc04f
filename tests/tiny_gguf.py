"""Writing a tiny random Llama, with a character-level tokenizer, as an F32 GGUF file (the ``gguf`` writer).

The layout is llama.cpp's: ``token_embd`` / ``blk.N.*`` / ``output*`` tensors, query and key rows permuted the way
its converter does (transformers undoes the permutation on load), and a byte-level BPE vocabulary without merges
whose tokens are single characters, so every lowercase sentence tokenises to one token per character.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

SPECIAL_TOKENS = (
    "<s>",
    "</s>",
    "<pad>",
    "<|endoftext|>",
)  # bos, eos, pad, and the byte-level BPE unknown token
CHARACTERS = "abcdefghijklmnopqrstuvwxyz" + "ĠĊ.,?:"  # Ġ / Ċ: the byte-level forms of space and newline
VOCAB = [*SPECIAL_TOKENS, *CHARACTERS]


def tiny_gguf_llama(num_layers: int = 2, hidden: int = 32, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A tiny random Llama whose vocabulary is :data:`VOCAB` (bos 0, eos 1, pad 2)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(VOCAB),
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def _permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's rotary-half permutation of query / key rows."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def write_gguf(model: transformers.LlamaForCausalLM, path: Path) -> Path:
    """``model`` (built by :func:`tiny_gguf_llama`) as an F32 GGUF file at ``path``."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(VOCAB)
    writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * len(CHARACTERS))
    writer.add_token_scores([0.0] * len(VOCAB))
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(2)
    weights = {name: value.detach().float().numpy() for name, value in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        query, key = weights[prefix + "self_attn.q_proj.weight"], weights[prefix + "self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{index}.attn_q.weight", _permute(query, config.num_attention_heads))
        writer.add_tensor(f"blk.{index}.attn_k.weight", _permute(key, config.num_key_value_heads))
        for gguf_name, hf_name in _BLOCK_TENSORS.items():
            writer.add_tensor(f"blk.{index}.{gguf_name}.weight", weights[f"{prefix}{hf_name}.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
