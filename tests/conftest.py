"""Shared fixtures: tiny random causal LMs and token datasets (no network, CPU, seconds)."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
GPT2_TOKENIZER_DIR = SHARED_DIR / "tokenizers" / "gpt2"
DATA_DIR = SHARED_DIR / "data"

TINY_TRAINING_SCRIPT = Path(__file__).resolve().parent / "distributed" / "train_tiny.py"

TINY_VOCAB = 64
PAD_ID, EOS_ID = 2, 1


def tiny_llama(
    num_layers: int = 4, hidden: int = 32, vocab: int = TINY_VOCAB, seed: int = 0, max_positions: int = 2048
):
    """A tiny random Llama causal LM (eager attention, fp32) with a context of `max_positions`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        max_position_embeddings=max_positions,
    )
    return transformers.LlamaForCausalLM(config)


def token_rows(num_rows: int, seed: int = 0, vocab: int = TINY_VOCAB, min_len: int = 6, max_len: int = 14):
    """Random sequences with a masked prompt: dicts of input_ids / attention_mask / labels lists."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        length = rng.randint(min_len, max_len)
        ids = [rng.randint(3, vocab - 1) for _ in range(length)]
        prompt_length = rng.randint(1, length - 2)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * length,
                "labels": [-100] * prompt_length + ids[prompt_length:],
            }
        )
    return rows


def pad_batch(
    rows: list[dict], padding_side: str = "right", pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Collate rows into padded LongTensors (pad id, mask 0, label -100)."""
    length = max(pad_to or 0, *(len(row["input_ids"]) for row in rows))
    batch = {}
    for key, pad in (("input_ids", PAD_ID), ("attention_mask", 0), ("labels", -100)):
        padded = []
        for row in rows:
            filler = [pad] * (length - len(row[key]))
            padded.append(filler + row[key] if padding_side == "left" else row[key] + filler)
        batch[key] = torch.tensor(padded)
    return batch


@pytest.fixture
def gpt2_tokenizer():
    if not GPT2_TOKENIZER_DIR.is_dir():
        pytest.skip("the shared GPT-2 tokenizer is not available beside the checkout")
    return transformers.AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER_DIR))


def import_script(path: Path, name: str):
    """A script that is not part of the package (a benchmark, a torchrun target) imported as a module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_tiny_training_script():
    """``tests/distributed/train_tiny.py`` (the script torchrun launches) imported as a module."""
    return import_script(TINY_TRAINING_SCRIPT, "distillens_train_tiny")
