"""``distillens shrink``: a shrunk model equals one built by hand from the kept blocks, in several families."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import transformers

from distillens_trainer import DistillLensConfig, DistillLensTrainer
from distillens_trainer.cli import main
from distillens_trainer.loss.layer_map import resolve_layer_map
from distillens_trainer.models.info import MODEL_INFO_NAME, recorded_prompt_template, write_model_info
from distillens_trainer.models.shrink import BLOCK_PATHS, evenly_spaced_layers, shrink_model

from conftest import tiny_llama

VOCAB = 64
_COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def _tiny(family: str, num_layers: int = 5, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random causal LM of ``family`` (eager attention, fp32)."""
    torch.manual_seed(seed)
    if family == "llama":
        return tiny_llama(num_layers=num_layers, seed=seed)
    configs = {
        "qwen2": lambda: transformers.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
            tie_word_embeddings=True, **_COMMON,
        ),
        "gpt2": lambda: transformers.GPT2Config(n_embd=32, n_layer=num_layers, n_head=4, n_positions=64, **_COMMON),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4, **_COMMON
        ),
        "opt": lambda: transformers.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=num_layers, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=64, **_COMMON,
        ),
        "phi": lambda: transformers.PhiConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4, **_COMMON
        ),
    }  # fmt: skip
    config = configs[family]()
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _hand_built(model: transformers.PreTrainedModel, keep: list[int]) -> transformers.PreTrainedModel:
    """The reference: a fresh model with len(keep) blocks, block k's weights copied from block keep[k]."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [model.config.layer_types[index] for index in keep]
    config._attn_implementation = "eager"
    reference = type(model)(config).eval()
    prefix = BLOCK_PATHS[model.config.model_type] + "."
    source = model.state_dict()
    state = {}
    for name in reference.state_dict():
        if name.startswith(prefix):
            new_index, rest = name[len(prefix) :].split(".", 1)
            name_in_source = f"{prefix}{keep[int(new_index)]}.{rest}"
        else:
            name_in_source = name
        state[name] = source[name_in_source]
    reference.load_state_dict(state)
    return reference


IDS = torch.tensor([[0, 5, 9, 17, 33, 12, 40, 8], [0, 7, 7, 21, 3, 60, 11, 4]])


@pytest.mark.parametrize("family", sorted({"llama", "qwen2", "gpt2", "gpt_neox", "opt", "phi"}))
def test_a_shrunk_model_equals_the_hand_built_one_and_keeping_every_block_changes_nothing(family):
    model = _tiny(family)
    keep = [0, 2, 4]
    shrunk = shrink_model(model, keep)
    torch.testing.assert_close(shrunk(IDS).logits, _hand_built(model, keep)(IDS).logits)
    assert shrunk.config.num_hidden_layers == 3 and shrunk.config.distillens_kept_layers == keep
    assert model.config.num_hidden_layers == 5  # the original is untouched
    every = shrink_model(model, list(range(5)))
    torch.testing.assert_close(every(IDS).logits, model(IDS).logits)


def test_a_shrunk_model_generates_like_the_hand_built_one_with_its_kv_cache():
    model = _tiny("qwen2")
    shrunk, reference = shrink_model(model, [1, 3, 4]), _hand_built(model, [1, 3, 4])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 2}
    assert torch.equal(shrunk.generate(IDS[:1], **kwargs), reference.generate(IDS[:1], **kwargs))


def test_per_layer_config_lists_follow_the_kept_blocks():
    model = _tiny("qwen2")  # max_window_layers=2: blocks 0, 1 full attention, 2.. sliding
    assert model.config.layer_types[:3] == ["full_attention", "full_attention", "sliding_attention"]
    shrunk = shrink_model(model, [1, 2])
    assert shrunk.config.layer_types == ["full_attention", "sliding_attention"]


def test_a_student_cut_from_a_frozen_teacher_is_trainable():
    teacher = _tiny("llama").requires_grad_(False)
    assert all(p.requires_grad for p in shrink_model(teacher, [0, 4]).parameters())


def test_tied_embeddings_stay_tied():
    shrunk = shrink_model(_tiny("qwen2"), [0, 4])
    assert shrunk.lm_head.weight.data_ptr() == shrunk.model.embed_tokens.weight.data_ptr()


def test_evenly_spaced_layers_keep_the_first_and_the_last_block():
    assert evenly_spaced_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_layers(5, 3) == [0, 2, 4]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]


def test_the_shrunk_lens_map_pairs_each_student_layer_with_its_source_block():
    kept = evenly_spaced_layers(30, 10)
    pairs = resolve_layer_map(10, 30, num_layers=5, kept_layers=kept)
    assert pairs == [(2, 4), (3, 7), (5, 14), (7, 20), (8, 24)]  # s -> kept[s-1] + 1 (hidden_states indices)
    assert resolve_layer_map(10, 30, [10], kept_layers=kept) == [(10, 30)]


def test_the_kept_layers_are_read_back_from_the_students_config():
    from distillens_trainer.models.shrink import recorded_kept_layers

    assert recorded_kept_layers(shrink_model(_tiny("llama", num_layers=6), [0, 3, 5]).config) == [0, 3, 5]
    assert recorded_kept_layers(_tiny("llama", num_layers=3).config) is None


def test_the_trainer_uses_the_shrunk_map_and_refuses_it_for_an_uncut_student(tmp_path):
    teacher = _tiny("llama", num_layers=6)
    student = shrink_model(teacher, [0, 3, 5])
    args = DistillLensConfig(
        output_dir=str(tmp_path), lens_layer_map="shrunk", lens_num_layers=2, report_to="none", use_cpu=True
    )
    trainer = DistillLensTrainer(model=student, args=args, teacher_model=teacher)
    assert trainer.layer_map == [(1, 1), (2, 4)]  # paper student layers 1, 2 (of 3) <- blocks 0, 3
    with pytest.raises(ValueError, match="distillens_kept_layers"):
        DistillLensTrainer(model=_tiny("llama", num_layers=3), args=args, teacher_model=teacher)
    with pytest.raises(ValueError, match="lens_layer_map='shrunk' derives the teacher layers"):
        DistillLensConfig(
            output_dir=str(tmp_path),
            lens_layer_map="shrunk",
            lens_student_layers=[1],
            lens_teacher_layers=[1],
        )


def _shrink_argv(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["shrink", "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir), *extra]


@pytest.fixture
def qwen2_folder(tmp_path, gpt2_tokenizer) -> Path:
    model = _tiny("qwen2", num_layers=6)
    model.save_pretrained(tmp_path / "teacher")
    gpt2_tokenizer.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


@pytest.mark.needs_shared
def test_the_command_writes_a_loadable_model_with_tokenizer_and_recorded_blocks(
    qwen2_folder, tmp_path, capsys
):
    out = tmp_path / "student"
    assert main(_shrink_argv(qwen2_folder, out, "--num_layers", "3")) == 0
    assert "kept blocks [0, 3, 5]" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["distillens_kept_layers"] == [0, 3, 5]
    assert len(config["layer_types"]) == 3
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    teacher = transformers.AutoModelForCausalLM.from_pretrained(qwen2_folder)
    student = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(student(IDS).logits, _hand_built(teacher, [0, 3, 5])(IDS).logits)


@pytest.mark.needs_shared
@pytest.mark.parametrize(
    ("recorded", "chat_template", "expected"),
    [
        ("plain", None, "plain"),
        (None, "{{ messages }}", "chat"),
        ("alpaca", "{{ messages }}", "alpaca"),
        (None, None, None),
    ],
)
def test_the_shrunk_model_inherits_the_prompt_format(
    qwen2_folder, tmp_path, recorded, chat_template, expected
):
    if recorded is not None:
        write_model_info(qwen2_folder, prompt_template=recorded)
    if chat_template is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(qwen2_folder)
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(qwen2_folder)
    out = tmp_path / "student"
    assert main(_shrink_argv(qwen2_folder, out, "--num_layers", "2")) == 0
    assert recorded_prompt_template(out) == expected
    assert (out / MODEL_INFO_NAME).is_file() == (expected is not None)


@pytest.mark.needs_shared
@pytest.mark.parametrize(
    ("extra", "code", "words"),
    [
        (["--num_layers", "3", "--keep_layers", "0", "1"], 1, "exactly one"),
        ([], 1, "exactly one"),
        (["--keep_layers", "0", "6"], 1, "keep_layers holds 6, but the model has 6 blocks"),
        (["--keep_layers", "3", "1"], 1, "strictly increasing"),
        (["--num_layers", "7"], 1, "num_layers=7 must lie in 2..6"),
        (["--num_layers", "3", "--dtype", "int8"], 2, "invalid choice"),
    ],
)
def test_bad_shrink_input_is_one_line_and_writes_nothing(qwen2_folder, tmp_path, capsys, extra, code, words):
    out = tmp_path / "student"
    assert main(_shrink_argv(qwen2_folder, out, *extra)) == code
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("distillens shrink: error:") and words in error, error
    assert not out.exists()


def test_a_model_it_cannot_cut_is_refused_in_one_line(tmp_path, capsys):
    config = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **_COMMON)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    argv = ["shrink", "--model_name_or_path", str(tmp_path / "bloom"), "--num_layers", "2"]
    assert main([*argv, "--output_dir", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "model_type 'bloom' cannot be cut: distillens shrink supports" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.needs_shared
def test_a_non_empty_output_dir_is_refused_and_kept(qwen2_folder, tmp_path, capsys):
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(_shrink_argv(qwen2_folder, out, "--num_layers", "2")) == 1
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_shrink_creates_its_folder_and_files_with_the_user_umask(tmp_path):
    source = tmp_path / "teacher"
    _tiny("llama", num_layers=4).save_pretrained(source)
    write_model_info(source, prompt_template="plain")  # inherited: written through the atomic JSON writer
    out = tmp_path / "student"
    previous = os.umask(0o027)
    try:
        assert main(_shrink_argv(source, out, "--num_layers", "2")) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # not mkdtemp's private 0o700
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert MODEL_INFO_NAME in modes and set(modes.values()) == {0o640}, modes
