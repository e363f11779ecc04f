"""Lens diagnostics: the per-layer profile, ``lens.json``, its figures, ``distillens lens`` and the eval profile."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from distillens_demo.data.suite import format_example, generate_examples, train_suite_tokenizer
from distillens_trainer.cli import main
from distillens_trainer.diagnostics.figures import figure_pixels
from distillens_trainer.diagnostics.profile import LensProfileAccumulator
from distillens_trainer.diagnostics.report import SCHEMA, profile_models
from distillens_trainer.loss.divergences import token_divergence
from distillens_trainer.loss.lens import LogitLens
from distillens_trainer.loss.response_tokens import response_mask, select_response

from conftest import PAD_ID, TINY_VOCAB, pad_batch, tiny_llama, token_rows

TOKENIZER = SimpleNamespace(pad_token_id=PAD_ID)  # all DataCollatorForCompletionOnly needs of a tokenizer
DIVERGENCES = ("jsd", "rkl", "fkl", "skl", "tvd")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _peaked_llama(num_layers: int, seed: int, hidden: int = 32):
    """A tiny Llama whose head is scaled up, so lens distributions are far from uniform."""
    model = tiny_llama(num_layers=num_layers, hidden=hidden, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model.eval()


def _dataset(rows: int = 6, seed: int = 0) -> Dataset:
    return Dataset.from_list(token_rows(rows, seed=seed))


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


# ------------------------------------------------------------------------------------------- the profile
def test_a_model_against_itself_has_a_zero_diagonal_and_positive_off_diagonal():
    model = _peaked_llama(num_layers=3, seed=1)
    report = profile_models(
        model,
        model,
        _dataset(),
        TOKENIZER,
        vocab_size=TINY_VOCAB,
        divergences=DIVERGENCES,
        show_progress=False,
    )
    for name in DIVERGENCES:
        matrix = torch.tensor(report["matrix"][name])
        assert matrix.shape == (4, 4)
        assert matrix.diagonal().abs().max() <= 1e-6, name
        off_diagonal = matrix[~torch.eye(4, dtype=torch.bool)]
        assert off_diagonal.min() > 1e-4, name
        assert report["same_depth"][name] == pytest.approx([0.0] * 3, abs=1e-6)
    assert report["teacher"]["entropy"] == pytest.approx(report["student"]["entropy"])


def test_the_profile_matches_a_naive_full_tensor_reference():
    student, teacher = _peaked_llama(2, seed=1), _peaked_llama(4, seed=2, hidden=48)
    batch = pad_batch(token_rows(5, seed=3))
    max_tokens = 23  # cuts the batch inside a chunk
    accumulator = LensProfileAccumulator(
        LogitLens(student), LogitLens(teacher), TINY_VOCAB, divergences=("jsd", "rkl"), chunk_size=4
    )
    with torch.no_grad():
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        student_hidden = student(**inputs, output_hidden_states=True).hidden_states
        teacher_hidden = teacher(**inputs, output_hidden_states=True).hidden_states
        assert (
            accumulator.add(student_hidden, teacher_hidden, batch["labels"], max_tokens=max_tokens)
            == max_tokens
        )
        mask = response_mask(batch["labels"])
        student_logits = [
            LogitLens(student)(select_response(h, mask)[:max_tokens], i) for i, h in enumerate(student_hidden)
        ]
        teacher_logits = [
            LogitLens(teacher)(select_response(h, mask)[:max_tokens], i) for i, h in enumerate(teacher_hidden)
        ]
    means = accumulator.means()
    assert means["num_tokens"] == max_tokens
    for name in ("jsd", "rkl"):
        expected = [
            token_divergence(name, s, t).mean().item() for s in student_logits for t in teacher_logits
        ]
        assert means["pairs"][name] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    for logits, side in ((student_logits, "student"), (teacher_logits, "teacher")):
        probs = [torch.softmax(layer.float(), dim=-1) for layer in logits]
        entropy = [-(p * p.log()).sum(-1).mean().item() for p in probs]
        final_top1 = logits[-1].argmax(-1)
        agreement = [(layer.argmax(-1) == final_top1).float().mean().item() for layer in logits]
        assert means[side]["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert means[side]["top1_agreement"] == pytest.approx(agreement)
        assert means[side]["top1_agreement"][-1] == 1.0
        to_final = [token_divergence("jsd", layer, logits[-1]).mean().item() for layer in logits]
        assert means[side]["divergence_to_final"]["jsd"] == pytest.approx(to_final, rel=1e-5, abs=1e-7)


def test_the_final_ce_is_each_models_cross_entropy_on_the_response_targets():
    student, teacher = _peaked_llama(2, seed=1), _peaked_llama(3, seed=2, hidden=48)
    batch = pad_batch(token_rows(5, seed=3))
    max_tokens = 23  # cuts the batch inside a chunk
    with torch.no_grad():
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        student_out = student(**inputs, output_hidden_states=True)
        teacher_out = teacher(**inputs, output_hidden_states=True)
    mask = response_mask(batch["labels"])
    targets = batch["labels"][:, 1:][mask][:max_tokens]
    expected = {
        side: F.cross_entropy(select_response(out.logits, mask)[:max_tokens].float(), targets).item()
        for side, out in (("student", student_out), ("teacher", teacher_out))
    }
    assert expected["student"] != pytest.approx(expected["teacher"], rel=1e-3)

    accumulator = LensProfileAccumulator(LogitLens(student), LogitLens(teacher), TINY_VOCAB, chunk_size=4)
    accumulator.add(
        student_out.hidden_states, teacher_out.hidden_states, batch["labels"], max_tokens=max_tokens
    )
    assert accumulator.means()["final_ce"] == pytest.approx(expected, rel=1e-5)
    # the CE sums travel with the other sums in a cross-process reduction (num_tokens doubles too)
    accumulator.reduce_(lambda flat: 2 * flat)
    assert accumulator.means()["final_ce"] == pytest.approx(expected, rel=1e-5)

    alone = LensProfileAccumulator(LogitLens(student), None, TINY_VOCAB, chunk_size=4)
    alone.add(student_out.hidden_states, None, batch["labels"], max_tokens=max_tokens)
    assert alone.means()["final_ce"]["student"] == pytest.approx(expected["student"], rel=1e-5)
    assert alone.means()["final_ce"]["teacher"] is None

    too_small = LensProfileAccumulator(LogitLens(student), None, int(targets.max()))
    with pytest.raises(ValueError, match="outside the compared vocabulary"):
        too_small.add(student_out.hidden_states, None, batch["labels"])


def test_without_layer_statistics_only_the_paired_and_final_layers_are_read_and_the_sums_are_equal(
    monkeypatch,
):
    student, teacher = _peaked_llama(3, seed=1), _peaked_llama(6, seed=2, hidden=48)
    batch = pad_batch(token_rows(5, seed=3))
    with torch.no_grad():
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        student_hidden = student(**inputs, output_hidden_states=True).hidden_states
        teacher_hidden = teacher(**inputs, output_hidden_states=True).hidden_states
    pairs = [(1, 2), (2, 2), (2, 5), (3, 6)]
    read: list[int] = []
    original = LogitLens.to_head_input  # every read of a layer through the lens goes through it

    def counting_call(self, hidden, index):
        read.append(index)
        return original(self, hidden, index)

    monkeypatch.setattr(LogitLens, "to_head_input", counting_call)
    means = {}
    for statistics in (True, False):
        read.clear()
        accumulator = LensProfileAccumulator(
            LogitLens(student), LogitLens(teacher), TINY_VOCAB, pairs=pairs, divergences=("jsd", "rkl"),
            chunk_size=4, layer_statistics=statistics,
        )  # fmt: skip
        accumulator.add(student_hidden, teacher_hidden, batch["labels"])
        means[statistics] = accumulator.means()
        chunks = -(-means[statistics]["num_tokens"] // 4)
        assert len(read) == chunks * ((4 + 7) if statistics else (3 + 3))  # student 1,2,3; teacher 2,5,6
    full, reduced = means[True], means[False]
    assert reduced["pairs"] == full["pairs"]  # the same per-layer log-probs: equal bit for bit
    assert reduced["final_ce"] == full["final_ce"]
    assert reduced["num_tokens"] == full["num_tokens"]
    assert reduced["student"] is None and reduced["teacher"] is None
    assert full["student"]["entropy"] and full["teacher"]["entropy"]


def test_a_student_alone_is_compared_with_its_own_layers():
    student = _peaked_llama(3, seed=1)
    report = profile_models(student, None, _dataset(), TOKENIZER, vocab_size=TINY_VOCAB, show_progress=False)
    assert report["reference"] == "self"
    assert report["teacher"] is None and report["same_depth"] is None and report["mapped"] is None
    matrix = report["matrix"]["jsd"]
    assert [row[row_index] for row_index, row in enumerate(matrix)] == pytest.approx([0.0] * 4, abs=1e-6)
    # the last column is each layer against the model's own output distribution
    assert [row[-1] for row in matrix] == pytest.approx(
        report["student"]["divergence_to_final"]["jsd"], rel=1e-6
    )
    assert report["student"]["top1_agreement"][-1] == 1.0


def test_profiling_restores_the_models_training_mode():
    student, teacher = tiny_llama(2, seed=1).train(), tiny_llama(4, seed=2).eval()
    profile_models(student, teacher, _dataset(2), TOKENIZER, vocab_size=TINY_VOCAB, show_progress=False)
    assert student.training and not teacher.training


# ------------------------------------------------------------------------------------- distillens lens
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lens")
    examples = generate_examples(24, seed=0)
    tokenizer = train_suite_tokenizer([format_example(e) for e in examples], vocab_size=300)
    for name, layers, seed in (("student", 2, 1), ("teacher", 4, 2)):
        tiny_llama(num_layers=layers, vocab=len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{key: e[key] for key in ("instruction", "input", "output")} for e in examples]
    (root / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _lens_argv(
    root: Path, output_dir: Path, *extra: str, teacher: bool = True, student: str = "student"
) -> list[str]:
    argv = ["lens", "--model_name_or_path", str(root / student), "--data_file", str(root / "data.jsonl")]
    argv += ["--output_dir", str(output_dir), "--max_samples", "8", "--device", "cpu"]
    if teacher:
        argv += ["--teacher_model_name_or_path", str(root / "teacher")]
    return argv + list(extra)


def test_lens_command_writes_the_report_and_figures_of_the_expected_size(workspace, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    output_dir = tmp_path / "lens"
    assert main(_lens_argv(workspace, output_dir, "--divergences", "jsd", "skl", "--max_tokens", "50")) == 0
    report = json.loads((output_dir / "lens.json").read_text())
    assert report["schema"] == SCHEMA and report["reference"] == "teacher"
    assert report["num_tokens"] == 50 and report["num_examples"] == 8
    assert report["student"]["layers"] == [0, 1, 2] and report["teacher"]["layers"] == [0, 1, 2, 3, 4]
    for key in ("entropy", "top1_agreement", "relative_depth"):
        assert len(report["student"][key]) == 3 and len(report["teacher"][key]) == 5
    assert set(report["matrix"]) == {"jsd", "skl"}
    assert [len(row) for row in report["matrix"]["skl"]] == [5, 5, 5]
    assert report["same_depth"]["pairs"] == [[1, 2], [2, 4]]
    assert report["mapped"]["pairs"] == [[1, 2]]  # a 2-layer student has room for one paper-style pair
    assert report["mapped"]["jsd"] == [report["matrix"]["jsd"][1][2]]
    figures = ["lens_heatmap_jsd", "lens_heatmap_skl", "lens_layers", "lens_entropy"]
    for name in figures:
        assert _png_size(output_dir / f"{name}.png") == figure_pixels(name), name
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(
        ["lens.json", *(f"{n}.png" for n in figures)]
    )
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("distillens lens: report in ") and "lens.json" in last_line


def test_lens_command_profiles_a_student_alone(workspace, tmp_path):
    output_dir = tmp_path / "alone"
    assert main(_lens_argv(workspace, output_dir, "--lens_final_norm", "false", teacher=False)) == 0
    report = json.loads((output_dir / "lens.json").read_text())
    assert report["reference"] == "self" and report["teacher"] is None and not report["lens_final_norm"]
    assert [len(row) for row in report["matrix"]["jsd"]] == [3, 3, 3]


def test_lens_command_reads_the_data_in_the_prompt_format_recorded_with_the_student(workspace, tmp_path):
    import shutil

    from distillens_trainer.models.info import write_model_info

    shutil.copytree(workspace / "student", tmp_path / "student")
    write_model_info(tmp_path / "student", prompt_template="plain")
    argv = _lens_argv(workspace, tmp_path / "out", teacher=False)
    argv[argv.index("--model_name_or_path") + 1] = str(tmp_path / "student")
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "lens.json").read_text())["settings"]["prompt_template"] == "plain"


LENS_ERRORS = [
    ("unknown_divergence", ["--divergences", "kl"], {}, 2, "invalid choice"),
    ("zero_max_tokens", ["--max_tokens", "0"], {}, 1, "max_tokens=0"),
    (
        "layers_without_teacher",
        ["--lens_student_layers", "1"],
        {"teacher": False},
        1,
        "teacher_model_name_or_path",
    ),
    (
        "teacher_gguf_without_teacher",
        ["--teacher_gguf_file", "teacher.gguf"],
        {"teacher": False},
        1,
        "teacher_gguf_file needs --teacher_model_name_or_path",
    ),
    ("missing_gguf_file", ["--gguf_file", "missing.gguf"], {}, 1, "gguf_file='missing.gguf'"),
    ("layer_too_deep", ["--lens_student_layers", "3"], {}, 1, "1..2"),
    ("missing_data_file", ["--data_file", "nowhere.jsonl"], {}, 1, "nowhere.jsonl"),
    ("missing_student", [], {"student": "no_such_student"}, 1, "no_such_student"),
    (
        "shrunk_map_of_a_student_not_cut_by_shrink",
        ["--lens_layer_map", "shrunk"],
        {},
        1,
        "lens_layer_map='shrunk' needs a student written by 'distillens shrink'",
    ),
    (
        "shrunk_map_with_teacher_layers",
        ["--lens_layer_map", "shrunk", "--lens_student_layers", "1", "--lens_teacher_layers", "2"],
        {},
        1,
        "lens_layer_map='shrunk' derives the teacher layers",
    ),
    ("zero_lens_memory", ["--lens_memory_mib", "0"], {}, 1, "lens_memory_mib=0.0 must be > 0"),
    ("unknown_compile_choice", ["--torch_compile", "always"], {}, 2, "torch_compile"),
]


@pytest.mark.parametrize(
    ("extra", "overrides", "code", "words"), [c[1:] for c in LENS_ERRORS], ids=[c[0] for c in LENS_ERRORS]
)
def test_lens_bad_input_is_one_line_and_writes_nothing(
    workspace, tmp_path, capsys, extra, overrides, code, words
):
    output_dir = tmp_path / "lens"
    assert main(_lens_argv(workspace, output_dir, *extra, **overrides)) == code
    stderr = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in stderr if line.startswith("distillens lens: error:")]
    assert len(errors) == 1 and stderr[-1] == errors[0], stderr
    assert words in errors[0], errors[0]
    assert not output_dir.exists()


def test_lens_command_refuses_a_non_empty_output_dir(workspace, tmp_path, capsys):
    output_dir = tmp_path / "taken"
    output_dir.mkdir()
    (output_dir / "lens.json").write_text("keep me")
    assert main(_lens_argv(workspace, output_dir)) == 1
    assert "is not empty" in capsys.readouterr().err
    assert (output_dir / "lens.json").read_text() == "keep me"


# ---------------------------------------------------------------------------------- training: eval profile
def _trainer(tmp_path, **overrides):
    from distillens_trainer import DistillLensConfig, DistillLensTrainer

    dataset = Dataset.from_list(token_rows(12))
    args = DistillLensConfig(
        output_dir=str(tmp_path / "out"),
        per_device_eval_batch_size=4,
        report_to=[],
        use_cpu=True,
        lens_num_layers=1,
        disable_tqdm=True,
        **overrides,
    )
    return DistillLensTrainer(
        model=tiny_llama(num_layers=3, seed=1),
        teacher_model=tiny_llama(num_layers=6, hidden=48, seed=2),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        data_collator=pad_batch,
    )


@pytest.mark.parametrize("lens_weight", [1.0, 0.0])  # the KD-only student has no lens of its own in training
def test_eval_profile_logs_every_student_layer_against_the_same_depth_teacher_layer(tmp_path, lens_weight):
    trainer = _trainer(tmp_path, lens_eval_profile=True, lens_weight=lens_weight)
    metrics = trainer.evaluate()
    profile = {key: value for key, value in metrics.items() if key.startswith("eval_lens_profile/")}
    assert sorted(profile) == [f"eval_lens_profile/s{i}" for i in (1, 2, 3)]
    assert {f"eval_lens_entropy/s{i}" for i in range(4)} | {
        f"eval_lens_entropy/t{j}" for j in range(7)
    } <= set(metrics)
    report = profile_models(
        trainer.model, trainer.teacher_model, trainer.eval_dataset, TOKENIZER, vocab_size=TINY_VOCAB,
        show_progress=False,
    )  # fmt: skip
    assert [profile[f"eval_lens_profile/s{i}"] for i in (1, 2, 3)] == pytest.approx(
        report["same_depth"]["jsd"]
    )
    assert [metrics[f"eval_lens_entropy/t{j}"] for j in range(7)] == pytest.approx(
        report["teacher"]["entropy"]
    )
    assert trainer.state.log_history[-1]["eval_lens_profile/s2"] == pytest.approx(
        profile["eval_lens_profile/s2"]
    )


def test_eval_profile_is_off_by_default(tmp_path):
    metrics = _trainer(tmp_path).evaluate()
    assert not any("lens_profile" in key or "lens_entropy" in key for key in metrics)


# ------------------------------------------------------------------------ the reused-block path, the layer map
def _float64_reference(student, teacher, batch, max_tokens: int, beta: float) -> dict:
    """The profile's sums the naive way: every layer's lens logits in float64, every divergence of every pair
    through ``token_divergence`` (float64 for float64 logits), means over the first ``max_tokens`` tokens."""
    with torch.no_grad():
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        mask = response_mask(batch["labels"])
        sides = {}
        for side, model in (("student", student), ("teacher", teacher)):
            hidden = model(**inputs, output_hidden_states=True).hidden_states
            lens = LogitLens(model)
            sides[side] = [
                lens(select_response(h, mask)[:max_tokens], i).double() for i, h in enumerate(hidden)
            ]
    pairs = {
        name: [
            token_divergence(name, s, t, beta=beta).mean().item()
            for s in sides["student"]
            for t in sides["teacher"]
        ]
        for name in DIVERGENCES
    }
    statistics = {}
    final_ce = {}
    targets = batch["labels"][:, 1:][mask][:max_tokens]
    for side, logits in sides.items():
        log_p = [torch.log_softmax(layer, dim=-1) for layer in logits]
        statistics[side] = {
            "entropy": [-(lp.exp() * lp).sum(-1).mean().item() for lp in log_p],
            "top1_agreement": [
                (layer.argmax(-1) == logits[-1].argmax(-1)).double().mean().item() for layer in logits
            ],
            "divergence_to_final": {
                name: [token_divergence(name, layer, logits[-1], beta=beta).mean().item() for layer in logits]
                for name in DIVERGENCES
            },
        }
        final_ce[side] = -log_p[-1].gather(-1, targets[:, None]).mean().item()
    return {"pairs": pairs, "final_ce": final_ce, **statistics}


@pytest.mark.parametrize(
    ("beta", "divergences", "compile"),
    [
        (0.5, DIVERGENCES, False),  # the KL kinds read every layer's log-probabilities: all kept
        (0.3, DIVERGENCES, False),
        (0.5, ("jsd", "tvd"), False),  # only the final layers' log-probabilities kept
        (0.3, ("jsd",), True),  # the JSD pass through torch.compile
    ],
)
def test_the_reused_block_path_matches_a_float64_reference_for_every_pair_and_divergence(
    beta, divergences, compile
):
    student, teacher = _peaked_llama(2, seed=1), _peaked_llama(3, seed=2, hidden=48)
    batch = pad_batch(token_rows(5, seed=3))
    max_tokens = 21  # the last chunk is a partial one
    accumulator = LensProfileAccumulator(
        LogitLens(student),
        LogitLens(teacher),
        TINY_VOCAB,
        divergences=divergences,
        jsd_beta=beta,
        chunk_size=4,
        compile=compile,
    )
    with torch.no_grad():
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        accumulator.add(
            student(**inputs, output_hidden_states=True).hidden_states,
            teacher(**inputs, output_hidden_states=True).hidden_states,
            batch["labels"],
            max_tokens=max_tokens,
        )
    means = accumulator.means()
    expected = _float64_reference(student, teacher, batch, max_tokens, beta)
    assert len(means["pairs"][divergences[0]]) == 3 * 4  # every (student, teacher) pair
    for name in divergences:
        assert means["pairs"][name] == pytest.approx(expected["pairs"][name], rel=1e-5, abs=1e-6), name
        for side in ("student", "teacher"):
            assert means[side]["divergence_to_final"][name] == pytest.approx(
                expected[side]["divergence_to_final"][name], rel=1e-5, abs=1e-6
            ), (side, name)
    for side in ("student", "teacher"):
        assert means[side]["entropy"] == pytest.approx(expected[side]["entropy"], rel=1e-5)
        assert means[side]["top1_agreement"] == pytest.approx(expected[side]["top1_agreement"])
        assert means["final_ce"][side] == pytest.approx(expected["final_ce"][side], rel=1e-5)


@pytest.mark.parametrize("keep_every_layer", [True, False])
def test_the_block_softmax_matches_float64_with_masked_entries_and_dead_rows(keep_every_layer):
    from distillens_trainer.diagnostics.layer_blocks import softmax_statistics_

    generator = torch.Generator().manual_seed(5)
    logits = 20 * torch.randn(3, 5, 300, generator=generator, dtype=torch.float64)
    logits[0, 1, 7:40] = float("-inf")  # masked vocabulary entries
    logits[1, 2] = float("-inf")  # a dead row: made uniform
    logits[2, 0, :100] -= 500.0  # far below the top: exp's slow arguments
    logits[2, 3, 10] = logits[2, 3, 11] = logits[2, 3].max() + 1.0  # a tie for the top-1: the first wins
    live = logits.clone()
    live[1, 2] = 0.0
    expected_log_p = torch.log_softmax(live, dim=-1).clamp_min(-1.0e4)
    expected_p = expected_log_p.exp()
    block = logits.float()
    log_probs = torch.empty(3 if keep_every_layer else 1, 5, 300)
    negentropy, mass, top1 = softmax_statistics_(block, log_probs, torch.empty(2, 5, 300))
    kept = slice(None) if keep_every_layer else slice(-1, None)
    torch.testing.assert_close(log_probs.double(), expected_log_p[kept], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(block.double(), expected_p, atol=1e-6, rtol=1e-5)
    assert float(block[0, 1, 7:40].max()) <= 1e-31  # masked entries: no mass that any sum can see
    torch.testing.assert_close(
        negentropy.double(), (expected_p * expected_log_p).sum(-1), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(mass.double(), torch.ones(3, 5, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(top1, live.argmax(dim=-1)) and int(top1[2, 3]) == 10 and int(top1[1, 2]) == 0


@pytest.mark.parametrize("vocab_size", [7, 64, 300, 4097])
def test_first_max_index_is_argmax_with_ties_and_a_partial_last_block(vocab_size):
    from distillens_trainer.diagnostics.layer_blocks import first_max_index

    generator = torch.Generator().manual_seed(vocab_size)
    values = torch.randint(0, 4, (40, vocab_size), generator=generator).float()  # ties everywhere
    values[0] = float("-inf")
    values[1, -1] = 9.0  # the largest value in the last, partial block
    assert torch.equal(first_max_index(values), values.argmax(dim=-1))


def test_a_failing_compilation_of_the_profile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken_compile(*args, **kwargs):
        def compiled(*call_args, **call_kwargs):
            raise RuntimeError("no C++ compiler here")

        return compiled

    student, teacher = _peaked_llama(2, seed=1), _peaked_llama(3, seed=2)
    batch = pad_batch(token_rows(3, seed=4))
    with torch.no_grad():
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        hidden = [model(**inputs, output_hidden_states=True).hidden_states for model in (student, teacher)]
    means = {}
    for compile in (False, True):
        if compile:
            monkeypatch.setattr(torch, "compile", broken_compile)
        accumulator = LensProfileAccumulator(
            LogitLens(student), LogitLens(teacher), TINY_VOCAB, chunk_size=4, compile=compile
        )
        with caplog.at_level("WARNING"):
            for _ in range(2):
                accumulator.add(*hidden, batch["labels"])
        means[compile] = accumulator.means()
    assert means[True] == means[False]
    warnings = [record.message for record in caplog.records if "torch.compile" in record.message]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0]


def test_compiling_the_profile_pays_off_from_thirty_billion_pair_elements():
    from distillens_trainer.diagnostics.profile import compile_pays_off

    assert compile_pays_off(8192, 7 * 31, 49152)  # the SmolLM2 pair at the default 8,192 tokens: compiled
    assert not compile_pays_off(1024, 7 * 31, 49152)  # 1,024 tokens: compiling costs what it saves
    assert not compile_pays_off(8192, 3 * 4, 128)  # a tiny pair: eager


def test_the_chunk_size_follows_the_memory_budget():
    from distillens_trainer.diagnostics.layer_blocks import MAX_CHUNK_SIZE, chunk_size_for_budget

    # SmolLM2: 6 + 30 blocks, every hidden_states index read (7 + 31 layers), V = 49152
    assert chunk_size_for_budget(38 + 2 + 2, 49152, 1024) == 130  # JSD: probabilities, 2 final λ rows, 2 work
    assert chunk_size_for_budget(2 * 38 + 2, 49152, 1024) == 70  # a KL kind: every layer's λ too
    assert chunk_size_for_budget(2 * 38 + 2, 49152, 512) == 35
    assert chunk_size_for_budget(78, 49152, 1) == 1  # never below one token
    assert chunk_size_for_budget(6, TINY_VOCAB, 1024) == MAX_CHUNK_SIZE
    student, teacher = _peaked_llama(2, seed=1), _peaked_llama(3, seed=2)
    row = 4 * TINY_VOCAB / 2**20  # one fp32 row of V, in MiB
    rows_per_token = {
        ("jsd",): (3 + 4) + 2 + 2,  # 3 + 4 layers' probabilities, the final λ of each model, 2 work rows
        ("jsd", "fkl"): 2 * (3 + 4) + 2,  # the KL's cross terms read every layer's λ
        ("tvd",): (3 + 4) + 2 + 2,
    }
    for divergences, rows in rows_per_token.items():
        for tokens in (1, 2):
            accumulator = LensProfileAccumulator(
                LogitLens(student),
                LogitLens(teacher),
                TINY_VOCAB,
                divergences=divergences,
                memory_budget_mib=(tokens + 0.5) * rows * row,
            )
            assert accumulator.chunk_size == tokens, divergences
    assert LensProfileAccumulator(LogitLens(student), None, TINY_VOCAB, chunk_size=5).chunk_size == 5


def test_progress_advances_by_the_tokens_of_each_chunk():
    from distillens_trainer.diagnostics.profile import accumulate_batches

    student, teacher = _peaked_llama(2, seed=1), _peaked_llama(3, seed=2)
    accumulator = LensProfileAccumulator(LogitLens(student), LogitLens(teacher), TINY_VOCAB, chunk_size=4)
    updates: list[int] = []
    batches = [pad_batch(token_rows(3, seed=seed)) for seed in (3, 4)]
    accumulate_batches(
        accumulator, student, teacher, batches, progress=SimpleNamespace(update=updates.append)
    )
    per_batch = [int(response_mask(batch["labels"]).sum()) for batch in batches]
    assert sum(updates) == sum(per_batch) == accumulator.means()["num_tokens"]
    assert len(updates) == sum(-(-tokens // 4) for tokens in per_batch)  # one update per chunk, not per batch
    assert max(updates) == 4


class _RecordingBar:
    """Progress that records what it was told, in order."""

    def __init__(self, total, description, **kwargs):
        self.events: list[tuple[str, object]] = [("total", total)]
        _RecordingBar.made.append(self)

    def update(self, count):
        self.events.append(("update", count))

    def set_postfix_str(self, text):
        self.events.append(("note", text))

    def close(self):
        self.events.append(("close", None))


def test_the_progress_says_it_waits_for_the_compilation_until_the_first_chunk(monkeypatch):
    import distillens_trainer.diagnostics.report as report_module
    from distillens_trainer.diagnostics.report import COMPILING_NOTE

    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)  # compiled = eager, at once
    monkeypatch.setattr(report_module, "progress", _RecordingBar)
    _RecordingBar.made = []
    student, teacher = _peaked_llama(2, seed=1), _peaked_llama(3, seed=2)
    for compile in (True, False):
        profile_models(
            student, teacher, _dataset(2), TOKENIZER, vocab_size=TINY_VOCAB, chunk_size=4, compile=compile
        )
    compiled, eager = (bar.events for bar in _RecordingBar.made)
    assert compiled[:4] == [("total", 10), ("note", COMPILING_NOTE), ("note", ""), ("update", 4)]
    assert [kind for kind, _ in compiled[4:]] == ["update", "update", "close"]  # 10 tokens: 4 + 4 + 2
    assert eager == [("total", 10), ("update", 4), ("update", 4), ("update", 2), ("close", None)]


def _shrunk_student(workspace: Path, folder: Path, keep: list[int]) -> Path:
    """A student cut from the workspace's 4-block teacher with ``distillens_trainer.models.shrink.shrink_model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillens_trainer.models.shrink import shrink_model

    teacher = AutoModelForCausalLM.from_pretrained(workspace / "teacher")
    shrink_model(teacher, keep).save_pretrained(folder)
    AutoTokenizer.from_pretrained(workspace / "teacher").save_pretrained(folder)
    return folder


def test_lens_layer_map_shrunk_maps_the_pairs_a_shrunk_student_was_cut_from(workspace, tmp_path):
    from distillens_trainer.loss.layer_map import resolve_layer_map

    _shrunk_student(workspace, tmp_path / "shrunk", [0, 2, 3])
    argv = _lens_argv(workspace, tmp_path / "out", "--lens_layer_map", "shrunk", "--max_tokens", "20")
    argv[argv.index("--model_name_or_path") + 1] = str(tmp_path / "shrunk")
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "lens.json").read_text())
    shrunk = resolve_layer_map(3, 4, kept_layers=[0, 2, 3])
    assert shrunk == [(1, 1), (2, 3)] != resolve_layer_map(3, 4)  # the paper's map would pair (2, 2)
    assert report["mapped"]["pairs"] == [list(pair) for pair in shrunk]
    assert report["mapped"]["jsd"] == [report["matrix"]["jsd"][s][t] for s, t in shrunk]


def test_lens_defaults_to_the_layer_map_recorded_with_the_student_and_a_flag_overrides_it(
    workspace, tmp_path
):
    from distillens_trainer.commands.train import RESOLVED_CONFIG_NAME
    from distillens_trainer.diagnostics.profiled_models import RESOLVED_CONFIG_NAME as TRAINING_RECORD_NAME

    assert TRAINING_RECORD_NAME == RESOLVED_CONFIG_NAME
    student = _shrunk_student(workspace, tmp_path / "trained", [0, 2, 3])
    training = {"lens_weight": 1.0, "lens_layer_map": "shrunk", "lens_num_layers": None}
    (student / RESOLVED_CONFIG_NAME).write_text(json.dumps({"training": training}))
    mapped = {}
    for name, extra in (("recorded", []), ("paper", ["--lens_layer_map", "paper"])):
        argv = _lens_argv(workspace, tmp_path / name, *extra, "--max_tokens", "20")
        argv[argv.index("--model_name_or_path") + 1] = str(student)
        assert main(argv) == 0
        mapped[name] = json.loads((tmp_path / name / "lens.json").read_text())["mapped"]["pairs"]
    assert mapped == {"recorded": [[1, 1], [2, 3]], "paper": [[1, 1], [2, 2]]}
