"""DistillLensTrainer on tiny random Llama models: the loss, its normalisation, the teacher, logging."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from distillens_trainer import DistillLensConfig, DistillLensTrainer, LogitLens
from distillens_trainer.loss.divergences import token_divergence
from distillens_trainer.loss.objective import DistillLensObjective
from distillens_trainer.teacher import frozen as teacher_module

from conftest import TINY_VOCAB, pad_batch, tiny_llama, token_rows


def _config(tmp_path, **overrides) -> DistillLensConfig:
    settings = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 64,
        "learning_rate": 1e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "lens_num_layers": 2,
        "seed": 0,
        "disable_tqdm": True,
    }
    return DistillLensConfig(**(settings | overrides))


def _trainer(
    tmp_path,
    student=None,
    teacher="default",
    rows=32,
    processing_class=None,
    teacher_processing_class=None,
    **overrides,
) -> DistillLensTrainer:
    student = student if student is not None else tiny_llama(num_layers=3, hidden=32, seed=1)
    teacher = tiny_llama(num_layers=6, hidden=48, seed=2) if teacher == "default" else teacher
    dataset = Dataset.from_list(token_rows(rows))
    return DistillLensTrainer(
        model=student,
        teacher_model=teacher,
        args=_config(tmp_path, **overrides),
        train_dataset=dataset,
        eval_dataset=dataset.select(range(min(8, rows))),
        data_collator=pad_batch,
        processing_class=processing_class,
        teacher_processing_class=teacher_processing_class,
    )


def _word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=words[0]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=words[0], pad_token=words[2])


def _summed_loss(trainer: DistillLensTrainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """compute_loss with num_items_in_batch=1, i.e. the weighted token sum (no normalisation)."""
    trainer.model.train()
    return trainer.compute_loss(trainer.model, batch, num_items_in_batch=1)


# --------------------------------------------------------------------------------------- the loss itself
def test_loss_is_the_weighted_sum_of_token_means(tmp_path):
    trainer = _trainer(tmp_path, ce_weight=0.3, kd_weight=0.7, kd_divergence="fkl", lens_weight=2.0)
    student, teacher = trainer.model.eval(), trainer.teacher_model
    batch = pad_batch(token_rows(3, seed=5))
    loss = trainer.compute_loss(student, batch)

    # Independent reference: explicit per-sample loops over response positions.
    with torch.no_grad():
        s_out = student(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t_out = teacher(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    s_lens, t_lens = LogitLens(student), LogitLens(teacher)
    ce, kd, lens = [], [], []
    for b in range(3):
        for pos in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][b, pos + 1])
            if target == -100:
                continue
            ce.append(F.cross_entropy(s_out.logits[b, pos][None], torch.tensor([target])))
            kd.append(token_divergence("fkl", s_out.logits[b, pos], t_out.logits[b, pos]))
            pair_values = [
                token_divergence(
                    "jsd",
                    s_lens(s_out.hidden_states[i][b, pos], i),
                    t_lens(t_out.hidden_states[j][b, pos], j),
                )
                for i, j in trainer.layer_map
            ]
            lens.append(torch.stack(pair_values).mean())
    expected = 0.3 * torch.stack(ce).mean() + 0.7 * torch.stack(kd).mean() + 2.0 * torch.stack(lens).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_samples_contribution_ignores_neighbours_and_padding(tmp_path, padding_side):
    trainer = _trainer(tmp_path, ce_weight=0.5)
    rows = token_rows(3, seed=7)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def loss_and_grads(batch):
        trainer.model.zero_grad()
        loss = _summed_loss(trainer, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    singles = [loss_and_grads(pad_batch([row])) for row in rows]
    batched = loss_and_grads(pad_batch(rows, padding_side=padding_side, pad_to=20))
    torch.testing.assert_close(batched[0], sum(loss for loss, _ in singles), atol=1e-4, rtol=1e-5)
    for index, grad in enumerate(batched[1]):
        torch.testing.assert_close(grad, sum(g[index] for _, g in singles), atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_matches_a_large_batch(tmp_path):
    def params_after_one_step(batch_size, accumulation):
        trainer = _trainer(
            tmp_path,
            rows=4,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            ce_weight=0.5,
        )
        trainer.train()
        return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}, trainer

    large, large_trainer = params_after_one_step(4, 1)
    small, small_trainer = params_after_one_step(1, 4)
    for name in large:
        torch.testing.assert_close(small[name], large[name], atol=1e-5, rtol=1e-4, msg=name)
    log_large, log_small = large_trainer.state.log_history[0], small_trainer.state.log_history[0]
    for key in ("loss", "ce_loss", "kd_loss", "lens_loss"):
        assert log_small[key] == pytest.approx(log_large[key], rel=1e-4), key


def test_a_batch_without_response_tokens_gives_zero_loss(tmp_path):
    trainer = _trainer(tmp_path)
    batch = pad_batch(token_rows(2, seed=3))
    batch["labels"][:] = -100
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------- the teacher
def test_teacher_stays_frozen_and_in_eval_mode_through_training(tmp_path):
    teacher = tiny_llama(num_layers=6, hidden=48, seed=2)
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    trainer = _trainer(tmp_path, teacher=teacher)
    teacher.train()  # even if someone flips it, the trainer puts it back
    trainer.train()
    assert not any(module.training for module in trainer.teacher_model.modules())
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    for name, p in trainer.teacher_model.named_parameters():
        torch.testing.assert_close(p, before[name])


def test_teacher_dtype_and_device_follow_the_config(tmp_path):
    trainer = _trainer(tmp_path, teacher_dtype="bfloat16")
    parameter = next(trainer.teacher_model.parameters())
    assert parameter.dtype == torch.bfloat16
    assert parameter.device == trainer.args.device


def test_missing_teacher_is_an_error_at_construction(tmp_path):
    with pytest.raises(ValueError, match="need a teacher"):
        _trainer(tmp_path, teacher=None)


def test_plain_sft_needs_no_teacher_and_logs_only_ce(tmp_path):
    trainer = _trainer(tmp_path, teacher=None, ce_weight=1.0, kd_weight=0.0, lens_weight=0.0)
    assert trainer.teacher_model is None
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["ce_loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert "kd_loss" not in first and "lens_loss" not in first


def test_teacher_loads_from_a_local_folder_with_its_tokenizer(tmp_path):
    words = [f"w{i}" for i in range(TINY_VOCAB)]
    tokenizer = _word_tokenizer(words)
    teacher = tiny_llama(num_layers=6, hidden=48, seed=2)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    trainer = DistillLensTrainer(
        model=tiny_llama(num_layers=3, seed=1),
        args=_config(tmp_path, teacher_model_name_or_path=str(tmp_path / "teacher")),
        train_dataset=Dataset.from_list(token_rows(8)),
        data_collator=pad_batch,
        processing_class=tokenizer,
    )
    torch.testing.assert_close(trainer.teacher_model.lm_head.weight, teacher.lm_head.weight)


def test_checkpoints_and_saved_model_hold_no_teacher_weights(tmp_path):
    trainer = _trainer(tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    student_keys = set(trainer.model.state_dict())
    for folder in (tmp_path / "out" / "checkpoint-2", tmp_path / "out" / "checkpoint-4", tmp_path / "final"):
        saved = load_file(str(folder / "model.safetensors"))
        assert set(saved) <= student_keys
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 3


# --------------------------------------------------------------------------------------- vocabularies
def test_padded_teacher_vocabulary_is_compared_on_the_shared_columns(tmp_path):
    tokenizer = _word_tokenizer([f"w{i}" for i in range(TINY_VOCAB)])
    teacher = tiny_llama(num_layers=6, hidden=48, seed=2)
    padded = tiny_llama(num_layers=6, hidden=48, vocab=TINY_VOCAB + 16, seed=2)
    padded.load_state_dict(
        {
            name: torch.cat([value, torch.randn(16, value.shape[1]) * 10])
            if value.shape[0] == TINY_VOCAB
            else value
            for name, value in teacher.state_dict().items()
        }
    )
    batch = pad_batch(token_rows(3, seed=4))
    losses = []
    for candidate in (teacher, padded):
        trainer = _trainer(tmp_path, teacher=candidate, processing_class=tokenizer)
        assert trainer.vocab_size == TINY_VOCAB
        losses.append(trainer.compute_loss(trainer.model.eval(), batch))
    torch.testing.assert_close(losses[0], losses[1])


def test_different_tokenizers_are_an_error(tmp_path):
    student_tokenizer = _word_tokenizer([f"w{i}" for i in range(TINY_VOCAB)])
    teacher_tokenizer = _word_tokenizer([f"v{i}" for i in range(TINY_VOCAB)])
    with pytest.raises(ValueError, match="different tokenizers"):
        _trainer(tmp_path, processing_class=student_tokenizer, teacher_processing_class=teacher_tokenizer)


def test_teacher_with_fewer_logits_than_the_tokenizer_is_an_error(tmp_path):
    tokenizer = _word_tokenizer([f"w{i}" for i in range(TINY_VOCAB)])
    small_teacher = tiny_llama(num_layers=6, hidden=48, vocab=TINY_VOCAB - 8, seed=2)
    with pytest.raises(ValueError, match="teacher has only 56 logits"):
        _trainer(tmp_path, teacher=small_teacher, processing_class=tokenizer)


def test_plain_training_arguments_are_rejected_with_the_fix(tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="DistillLensConfig"):
        DistillLensTrainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path)))


# --------------------------------------------------------------------------------------- logging and training
def test_logs_hold_every_term_averaged_over_the_logging_window(tmp_path):
    trainer = _trainer(tmp_path, max_steps=6, logging_steps=3, gradient_accumulation_steps=2, ce_weight=0.5)
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 2
    pair_keys = {f"lens/s{s}_t{t}" for s, t in trainer.layer_map}
    for entry in train_logs:
        assert pair_keys <= entry.keys()
        # `loss` is the Trainer's own window average; the terms must average over the same window.
        recombined = 0.5 * entry["ce_loss"] + entry["kd_loss"] + entry["lens_loss"]
        assert recombined == pytest.approx(entry["loss"], rel=1e-4)
        assert entry["lens_loss"] == pytest.approx(
            sum(entry[k] for k in pair_keys) / len(pair_keys), rel=1e-4
        )


def test_evaluation_reports_every_term_with_the_eval_prefix(tmp_path):
    trainer = _trainer(tmp_path, ce_weight=0.5)
    metrics = trainer.evaluate()
    expected = {"eval_ce_loss", "eval_kd_loss", "eval_lens_loss"} | {
        f"eval_lens/s{s}_t{t}" for s, t in trainer.layer_map
    }
    assert expected <= metrics.keys()
    # One evaluation batch: eval_loss is exactly the weighted sum of the token-mean terms.
    recombined = 0.5 * metrics["eval_ce_loss"] + metrics["eval_kd_loss"] + metrics["eval_lens_loss"]
    assert recombined == pytest.approx(metrics["eval_loss"], rel=1e-5)


def test_bf16_autocast_training_stays_finite(tmp_path):
    trainer = _trainer(tmp_path, bf16=True, max_steps=3)
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 3, trainer.state.log_history  # logging_steps=1: one entry per step
    for entry in train_logs:
        assert {"loss", "kd_loss", "lens_loss"} <= entry.keys(), entry
        assert all(math.isfinite(entry[key]) for key in ("loss", "kd_loss", "lens_loss")), entry


def test_training_lowers_the_total_loss(tmp_path):
    trainer = _trainer(tmp_path, max_steps=40, logging_steps=5, learning_rate=3e-3, rows=64)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.7 * losses[0]


# --------------------------------------------------------------------------------------- feature baseline
def test_feature_baseline_trains_its_projection_and_saves_it(tmp_path):
    trainer = _trainer(
        tmp_path,
        kd_weight=0.0,
        lens_weight=0.0,
        feature_weight=1.0,
        max_steps=6,
        save_strategy="steps",
        save_steps=6,
    )
    before = {name: p.detach().clone() for name, p in trainer.feature_projector.named_parameters()}
    batch = pad_batch(token_rows(2, seed=9))
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        s_out = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        t_out = trainer.teacher_model(
            **{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True
        )
    mask = batch["labels"][:, 1:] != -100
    expected = torch.stack(
        [
            (
                (
                    trainer.feature_projector(t_out.hidden_states[t][:, :-1][mask], s, t)
                    - s_out.hidden_states[s][:, :-1][mask]
                )
                ** 2
            )
            .mean(-1)
            .mean()
            for s, t in trainer.layer_map
        ]
    ).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)

    trainer.train()
    assert "feature_loss" in trainer.state.log_history[0]
    assert any(not torch.equal(p, before[name]) for name, p in trainer.feature_projector.named_parameters())
    saved = torch.load(
        tmp_path / "out" / "checkpoint-6" / "distillens_feature_projector.pt", weights_only=True
    )
    for name, value in trainer.feature_projector.state_dict().items():
        torch.testing.assert_close(saved[name], value)


def test_a_lora_student_trains_only_its_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(num_layers=3, hidden=32, seed=1)
    student = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen_before = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen_before  # the base weights are frozen, so the check below compares something
    trainer = _trainer(tmp_path, student=student, max_steps=3, learning_rate=1e-2)
    trainer.train()
    assert "lens_loss" in trainer.state.log_history[0]
    for name, parameter in student.named_parameters():
        if name in frozen_before:
            torch.testing.assert_close(parameter, frozen_before[name])
    assert any("lora" in n and p.abs().sum() > 0 for n, p in student.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("head_chunk_size", [0, 16])
def test_divergences_stay_in_fp32_under_bf16_autocast(tmp_path, monkeypatch, head_chunk_size):
    trainer = _trainer(tmp_path, bf16=True, ce_weight=0.5, max_steps=1, head_chunk_size=head_chunk_size)
    head_output_dtypes, captured = [], []
    trainer.model.lm_head.register_forward_hook(
        lambda module, args, output: head_output_dtypes.append(output.dtype)
    )
    original = DistillLensObjective.__call__

    def spy(self, *args, **kwargs):
        captured.append(original(self, *args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(DistillLensObjective, "__call__", spy)
    trainer.train()
    assert (
        torch.bfloat16 in head_output_dtypes
    )  # the student's head (and the lens) ran under bf16 autocast ...
    assert captured[0].loss.dtype == torch.float32  # ... and every divergence was computed in fp32
    assert all(value.dtype == torch.float32 for value in captured[0].term_sums.values())


# --------------------------------------------------------------------------------------- what a swapped script sees
def test_a_bf16_student_under_bf16_mixed_precision_trains_fp32_master_weights(tmp_path):
    student = tiny_llama(num_layers=3, hidden=32, seed=1).to(torch.bfloat16)
    trainer = _trainer(
        tmp_path,
        student=student,
        bf16=True,
        learning_rate=5e-6,
        max_steps=1,
        weight_decay=0.0,
        lens_weight=0.0,
    )
    before = {name: p.detach().float().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    parameters = dict(trainer.model.named_parameters())
    for name, parameter in parameters.items():
        if "embed_tokens" not in name:  # rows of tokens absent from the batch get no gradient
            changed = (parameter.detach().float() != before[name]).float().mean().item()
            assert changed > 0.99, (name, changed)  # in bf16 a 5e-6 step rounds away for almost every weight
    assert {parameter.dtype for parameter in parameters.values()} == {torch.float32}


def test_a_data_parallel_token_count_tensor_is_one_count(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.model.eval()
    batch = pad_batch(token_rows(3, seed=4))
    replicated = torch.tensor([[7.0], [7.0]])  # what Trainer hands compute_loss under nn.DataParallel, 2 GPUs
    torch.testing.assert_close(
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=replicated),
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=7),
    )


def test_token_count_undoes_the_per_gpu_division_when_tokens_are_not_averaged():
    from distillens_trainer.trainer.inputs import token_count

    assert token_count(torch.tensor([[6], [6]]), n_gpu=2, averaged=True) == 6.0
    assert token_count(torch.tensor([[3], [3]]), n_gpu=2, averaged=False) == 6.0
    assert token_count(torch.tensor(5)) == 5.0 and token_count(None) is None


def test_label_smoothing_factor_smooths_the_ce_term(tmp_path):
    epsilon = 0.1
    trainer = _trainer(
        tmp_path, teacher=None, ce_weight=1.0, kd_weight=0.0, lens_weight=0.0, label_smoothing_factor=epsilon
    )
    student = trainer.model.eval()
    batch = pad_batch(token_rows(3, seed=5))
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = []
    for b in range(3):
        for pos in range(batch["labels"].shape[1] - 1):
            target = int(batch["labels"][b, pos + 1])
            if target == -100:
                continue
            neg_log_probs = -torch.log_softmax(logits[b, pos].float(), dim=-1)
            per_token.append((1 - epsilon) * neg_log_probs[target] + epsilon * neg_log_probs.mean())
    torch.testing.assert_close(loss.detach(), torch.stack(per_token).mean(), atol=1e-5, rtol=1e-5)


def test_a_compute_loss_func_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="compute_loss_func is not used"):
        DistillLensTrainer(
            model=tiny_llama(num_layers=3, seed=1),
            teacher_model=tiny_llama(num_layers=6, hidden=48, seed=2),
            args=_config(tmp_path),
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum(),
        )


def test_eval_loss_is_the_token_weighted_objective_whatever_the_batch_size(tmp_path):
    metrics = []
    for batch_size in (1, 3):
        trainer = _trainer(tmp_path, ce_weight=0.5, per_device_eval_batch_size=batch_size)
        metrics.append(trainer.evaluate())
    for metric in metrics:
        recombined = 0.5 * metric["eval_ce_loss"] + metric["eval_kd_loss"] + metric["eval_lens_loss"]
        assert metric["eval_loss"] == pytest.approx(recombined, rel=1e-6)
    assert metrics[0]["eval_loss"] == pytest.approx(metrics[1]["eval_loss"], rel=1e-5)


def test_a_student_too_shallow_for_the_lens_is_refused_before_the_teacher_loads(tmp_path, monkeypatch):
    def load_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the student's depth was checked")

    monkeypatch.setattr(teacher_module, "load_teacher", load_teacher)
    with pytest.raises(ValueError, match="too shallow for lens_num_layers=5"):
        DistillLensTrainer(
            model=tiny_llama(num_layers=2, seed=1),
            args=_config(tmp_path, lens_num_layers=5, teacher_model_name_or_path=str(tmp_path / "teacher")),
        )


def test_a_teacher_folder_without_tokenizer_files_is_checked_by_vocabulary_size(tmp_path, caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=32, n_head=2, vocab_size=TINY_VOCAB))
    teacher.save_pretrained(
        tmp_path / "teacher"
    )  # no tokenizer files: AutoTokenizer returns a 1-token tokenizer
    tokenizer = _word_tokenizer([f"w{i}" for i in range(TINY_VOCAB)])
    with caplog.at_level("WARNING", logger="distillens_trainer.teacher.frozen"):
        trainer = _trainer(tmp_path, teacher=str(tmp_path / "teacher"), processing_class=tokenizer)
    assert trainer.vocab_size == TINY_VOCAB
    assert "holds no vocabulary" in caplog.text


def test_label_smoothing_without_ce_warns_that_it_does_nothing(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="distillens_trainer.trainer"):
        _trainer(tmp_path, label_smoothing_factor=0.1)
    assert "ce_weight=0 leaves out: no effect" in caplog.text
