"""Model and tokenizer facts read in one place (``distillens_trainer.models.facts``)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distillens_trainer.commands.shrink import ShrinkArguments
from distillens_trainer.config import DistillLensConfig
from distillens_trainer.models import facts as modeling
from distillens_trainer.models.loading import ModelArguments

from conftest import tiny_llama


def test_every_command_names_its_dtype_field_dtype_and_accepts_the_same_names():
    assert modeling.DTYPE_NAMES == ("auto", "bfloat16", "float16", "float32")
    # train and eval take the model's dtype from ModelArguments (EvalArguments has no model fields)
    for arguments in (ModelArguments, ShrinkArguments, DistillLensConfig):
        fields = {item.name: item for item in dataclasses.fields(arguments) if "dtype" in item.name}
        expected = {"teacher_dtype"} if arguments is DistillLensConfig else {"dtype"}
        assert set(fields) == expected, arguments.__name__
        for item in fields.values():
            assert tuple(item.metadata["choices"]) == modeling.DTYPE_NAMES, (arguments.__name__, item.name)
    assert modeling.torch_dtype("bfloat16") is torch.bfloat16
    assert modeling.torch_dtype("auto") == "auto"
    with pytest.raises(ValueError, match=r"^dtype='fp8' must be one of auto, bfloat16, float16, float32\.$"):
        modeling.check_dtype_name("dtype", "fp8")


def test_the_ignore_index_is_the_one_torch_and_transformers_skip_in_the_cross_entropy():
    assert torch.nn.CrossEntropyLoss().ignore_index == modeling.IGNORE_INDEX
    logits, labels = torch.randn(3, 5), torch.tensor([1, modeling.IGNORE_INDEX, 2])
    kept = torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, labels), kept)


def test_model_sizes_are_read_through_wrappers_and_text_configs():
    model = tiny_llama(num_layers=3, seed=0)
    wrapped = SimpleNamespace()  # no .module: not unwrapped
    assert modeling.num_hidden_layers(model) == 3
    assert modeling.hidden_size(model) == model.config.hidden_size
    assert modeling.model_vocab_size(model) == model.get_output_embeddings().weight.shape[0]

    class Wrapper(nn.Module):  # DDP / DeepSpeed style: the model is .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert modeling.unwrap_model(Wrapper(model)) is model
    assert modeling.hidden_size(wrapped) is None
    staged = nn.Module()
    staged.config = SimpleNamespace(hidden_sizes=[8, 32, 16])
    assert modeling.hidden_size(staged) == 32


def test_freeze_sets_eval_mode_and_stops_gradients():
    model = nn.Linear(2, 2).train()
    assert modeling.freeze(model) is model
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_the_pad_id_falls_back_to_eos_and_names_the_fix_when_both_are_missing():
    assert modeling.resolve_pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=5)) == 3
    assert modeling.resolve_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=5)) == 5
    with pytest.raises(ValueError, match=r"set tokenizer\.pad_token"):
        modeling.resolve_pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_left_truncation_keeps_a_leading_bos_even_at_length_one():
    assert modeling.truncate_left([0, 1, 2, 3], 2, bos_token_id=0) == [0, 3]
    assert modeling.truncate_left([0, 1, 2, 3], 1, bos_token_id=0) == [0]
    assert modeling.truncate_left([4, 1, 2, 3], 2, bos_token_id=0) == [2, 3]
    assert modeling.truncate_left([0, 1], 5, bos_token_id=0) == [0, 1]


def test_position_ids_count_real_tokens_under_left_padding():
    inputs = {"attention_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])}
    out = modeling.with_position_ids(inputs, accepts_position_ids=True)
    assert out["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    assert modeling.with_position_ids(inputs, accepts_position_ids=False) is inputs
