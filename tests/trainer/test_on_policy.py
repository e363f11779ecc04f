"""On-policy DistillLens: windows trained on the student's own completions, with exact normalisation."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from distillens_trainer import DistillLensConfig, DistillLensTrainer
from distillens_trainer.trainer.on_policy import (
    WindowStats,
    completion_batch,
    completion_until_eos,
    prompts_of,
    window_is_on_policy,
)

from conftest import EOS_ID, PAD_ID, TINY_VOCAB, assert_close_to_reference, pad_batch, tiny_llama, token_rows


# --------------------------------------------------------------------------------------------- the helpers
def test_the_window_coin_depends_only_on_seed_and_window_and_lands_on_policy_lmbda_of_the_time():
    draws = [window_is_on_policy(0.3, 7, window) for window in range(4000)]
    assert draws == [window_is_on_policy(0.3, 7, window) for window in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws != [window_is_on_policy(0.3, 8, window) for window in range(4000)]
    assert not any(window_is_on_policy(0.0, 7, window) for window in range(100))
    assert all(window_is_on_policy(1.0, 7, window) for window in range(100))


def test_window_stats_log_the_on_policy_share_and_the_mean_completion_length_then_start_again():
    stats = WindowStats()
    assert stats.pop() == {}
    prompts = [torch.tensor([5, 6]), torch.tensor([7])]  # 3 prompt tokens
    rows = completion_batch(
        prompts, [torch.tensor([8, 9, EOS_ID]), torch.tensor([EOS_ID])], PAD_ID
    )  # 4 generated
    stats.count_window(on_policy=True)
    stats.count_completions(prompts, [rows], seconds=3.0)
    stats.count_window(on_policy=False)
    assert stats.pop() == {
        "on_policy_fraction": 0.5,
        "completion_length": 2.0,  # 4 generated tokens over 2 completions
        "generation_seconds_per_window": 1.5,
    }
    stats.count_window(on_policy=False)
    assert stats.pop() == {"on_policy_fraction": 0.0}


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompts_are_the_real_tokens_before_the_first_response_label(side):
    rows = [
        {"input_ids": [5, 6, 7, 8], "attention_mask": [1] * 4, "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10], "attention_mask": [1, 1], "labels": [-100, 10]},
        {"input_ids": [11, 12, 13], "attention_mask": [1] * 3, "labels": [-100] * 3},  # prompt-only
    ]
    prompts = prompts_of(pad_batch(rows, padding_side=side))
    assert [prompt.tolist() for prompt in prompts] == [[5, 6], [9], [11, 12, 13]]
    no_labels = {key: value for key, value in pad_batch(rows, padding_side=side).items() if key != "labels"}
    assert [prompt.tolist() for prompt in prompts_of(no_labels)] == [[5, 6, 7, 8], [9, 10], [11, 12, 13]]


def test_a_row_whose_first_token_is_a_response_has_no_prompt_and_is_refused():
    batch = pad_batch([{"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [5, 6]}])
    with pytest.raises(ValueError, match="no prompt tokens"):
        prompts_of(batch)


def test_a_completion_ends_at_its_first_eos_token_which_it_keeps():
    assert completion_until_eos(torch.tensor([4, 5, EOS_ID, 6, EOS_ID]), [EOS_ID]).tolist() == [4, 5, EOS_ID]
    assert completion_until_eos(torch.tensor([4, 5, 6]), [EOS_ID]).tolist() == [4, 5, 6]
    assert completion_until_eos(torch.tensor([9, 4]), [EOS_ID, 9]).tolist() == [9]


def test_completion_rows_train_on_the_completion_only_and_on_an_eos_that_is_also_the_pad_token():
    batch = completion_batch(
        [torch.tensor([5, 6]), torch.tensor([7])], [torch.tensor([8, EOS_ID]), torch.tensor([9])], EOS_ID
    )
    assert batch["input_ids"].tolist() == [[5, 6, 8, EOS_ID], [7, 9, EOS_ID, EOS_ID]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 8, EOS_ID], [-100, 9, -100, -100]]


# --------------------------------------------------------------------------------------------- the trainer
def scripted_completion(prompt: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for sampling: tokens from the prompt; odd-length prompts get an EOS in the middle
    followed by tokens that must not be trained on."""
    base = int(prompt.sum())
    tokens = [3 + (base + 7 * k) % (TINY_VOCAB - 3) for k in range(2 + len(prompt) % 4)]
    if len(prompt) % 2:
        tokens = [*tokens[:2], EOS_ID, 5, 6]
    return torch.tensor(tokens)


class ScriptedTrainer(DistillLensTrainer):
    """Completions come from :func:`scripted_completion` (the trainer's generation seam)."""

    def generate_completions(self, model, prompts):
        self.seen_prompts = [*getattr(self, "seen_prompts", []), *(p.tolist() for p in prompts)]
        return [scripted_completion(prompt) for prompt in prompts]


def _rows_with_prompts(num_rows: int, seed: int = 3) -> list[dict]:
    """Rows of different prompt lengths; their own responses are random (on-policy must never read them)."""
    return token_rows(num_rows, seed=seed)


def _reference_rows(rows: list[dict]) -> list[dict]:
    """The same prompts with the scripted completions as the dataset's responses (off-policy training)."""
    out = []
    for row in rows:
        prompt_length = next(i for i, label in enumerate(row["labels"]) if label != -100)
        prompt = row["input_ids"][:prompt_length]
        completion = completion_until_eos(scripted_completion(torch.tensor(prompt)), [EOS_ID]).tolist()
        ids = prompt + completion
        out.append(
            {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + completion}
        )
    return out


def _train(
    tmp_path,
    name,
    rows,
    *,
    trainer_class=DistillLensTrainer,
    padding_side="right",
    pad_is_eos=False,
    dtype=torch.float32,
    **overrides,
):
    student, teacher = tiny_llama(num_layers=3, seed=1).to(dtype), tiny_llama(num_layers=4, seed=2).to(dtype)
    if pad_is_eos:
        student.generation_config.pad_token_id = EOS_ID
    settings = {
        "output_dir": str(tmp_path / name), "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": 3,
        "logging_steps": 1, "save_strategy": "no", "report_to": [], "use_cpu": True, "lens_num_layers": 2,
        "seed": 0, "disable_tqdm": True, "ce_weight": 0.5, "head_chunk_size": 5,
    }  # fmt: skip
    trainer = trainer_class(
        model=student,
        teacher_model=teacher,
        args=DistillLensConfig(**(settings | overrides)),
        train_dataset=Dataset.from_list(rows),
        data_collator=lambda batch: pad_batch(batch, padding_side=padding_side),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


# Adam divides every gradient element by its own running RMS, so an element small beside the largest terms of its
# sums carries their rounding (ε · max|g| / |g| of itself) into its update: after 3 steps, parameters of runs that
# sum in different orders differ by up to ~340 ε(fp64) · max|parameter| (measured, 1 thread). 2**16 ε(fp64) ≈ 1.5e-11
# of the magnitude is still ~10^9 below what a wrong token or mask changes (updates of ~lr = 1e-2).
TRAINED_ULPS = 2**16


def _assert_same_training(got, want):
    """Two float64 runs that are the same maths: equal logged losses and parameters, up to float64 rounding."""
    assert len(got[1]) == len(want[1]) == 3
    for name, value in want[2].items():
        assert value.dtype == torch.float64
        assert_close_to_reference(got[2][name], value, ulps=TRAINED_ULPS, msg=name)
    got_losses, want_losses = (torch.tensor(run[1], dtype=torch.float64) for run in (got, want))
    assert_close_to_reference(got_losses, want_losses)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_on_policy_training_equals_off_policy_training_on_the_completions(tmp_path, padding_side, pad_is_eos):
    rows = _rows_with_prompts(12)
    reference = _train(
        tmp_path, "reference", _reference_rows(rows), pad_is_eos=pad_is_eos, dtype=torch.float64
    )
    on_policy = _train(
        tmp_path, "on", rows, trainer_class=ScriptedTrainer, padding_side=padding_side, pad_is_eos=pad_is_eos,
        lmbda=1.0, dtype=torch.float64,
    )  # fmt: skip
    _assert_same_training(on_policy, reference)
    assert len(on_policy[0].seen_prompts) == 12  # one generation per window: 3 windows of 4 prompts
    logged = [entry for entry in on_policy[0].state.log_history if "loss" in entry]
    assert all(entry["on_policy_fraction"] == 1.0 and entry["completion_length"] > 0 for entry in logged)
    assert all("lens_loss" in entry for entry in logged)


def test_a_window_of_two_micro_batches_trains_like_one_batch_of_four(tmp_path):
    rows = _rows_with_prompts(12)
    one = _train(tmp_path, "one", rows, trainer_class=ScriptedTrainer, lmbda=1.0, dtype=torch.float64)
    two = _train(
        tmp_path, "two", rows, trainer_class=ScriptedTrainer, lmbda=1.0, dtype=torch.float64,
        per_device_train_batch_size=2, gradient_accumulation_steps=2,
    )  # fmt: skip
    _assert_same_training(two, one)


def test_lmbda_zero_is_the_off_policy_trainer_bit_for_bit(tmp_path):
    rows = _rows_with_prompts(12)
    default = _train(tmp_path, "default", rows)
    zero = _train(tmp_path, "zero", rows, trainer_class=ScriptedTrainer, lmbda=0.0)
    assert zero[1] == default[1]
    for name, value in default[2].items():
        assert torch.equal(zero[2][name], value), name
    assert not hasattr(zero[0], "seen_prompts")


def test_mixed_windows_follow_the_coin_and_log_the_on_policy_share(tmp_path):
    rows = _rows_with_prompts(24)
    trainer, _, _ = _train(tmp_path, "mixed", rows, trainer_class=ScriptedTrainer, lmbda=0.5, max_steps=6)
    expected = [window_is_on_policy(0.5, 0, window) for window in range(6)]
    assert len(trainer.seen_prompts) == 4 * sum(expected)
    shares = [entry["on_policy_fraction"] for entry in trainer.state.log_history if "loss" in entry]
    assert shares == [float(on) for on in expected]


class RecordingTrainer(DistillLensTrainer):
    """Real sampling; records each on-policy window's rebuilt micro-batches."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.windows = [*getattr(self, "windows", []), (batches, count)]
        return batches, count


def test_real_sampling_trains_on_completions_that_end_at_eos_with_the_prompt_masked(tmp_path):
    rows = _rows_with_prompts(8)
    trainer, losses, _ = _train(
        tmp_path, "sampled", rows, trainer_class=RecordingTrainer, lmbda=1.0, max_new_tokens=6, max_steps=2
    )
    prompts = [row["input_ids"][: next(i for i, x in enumerate(row["labels"]) if x != -100)] for row in rows]
    assert all(torch.isfinite(torch.tensor(losses)))
    seen_prompts = []
    for batches, count in trainer.windows:
        assert int(count) == sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
        for batch in batches:
            for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
                real = int(mask.sum())
                trained = labels[labels != -100]
                prompt_length = real - len(trained)
                seen_prompts.append(ids[:prompt_length].tolist())
                assert 1 <= len(trained) <= 6
                assert torch.equal(trained, ids[prompt_length:real])  # the completion, right after the prompt
                assert EOS_ID not in trained[:-1].tolist()  # nothing after the first EOS is trained on
                assert trained[-1] == EOS_ID or len(trained) == 6
                assert bool((labels[real:] == -100).all()) and bool((mask[real:] == 0).all())
    assert sorted(seen_prompts) == sorted(prompts)  # 2 windows of 4 rows: every prompt once
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(
        ("completion_length" in entry and "lens/s1_t1" in "".join(entry)) or "lens_loss" in entry
        for entry in logged
    )
    assert all(
        0 < entry["completion_length"] <= 6 and entry["generation_seconds_per_window"] > 0 for entry in logged
    )


def test_the_student_generates_in_eval_mode_with_gradient_checkpointing_off_and_gets_both_back(tmp_path):
    states = []

    class Watching(DistillLensTrainer):
        def generate_completions(self, model, prompts):
            module = self.model
            original = module.generate

            def generate(*args, **kwargs):
                states.append(
                    (
                        module.training,
                        module.is_activation_checkpointing,
                        kwargs["generation_config"].use_cache,
                    )
                )
                return original(*args, **kwargs)

            module.generate = generate
            try:
                return super().generate_completions(model, prompts)
            finally:
                module.generate = original

    trainer, _, _ = _train(
        tmp_path, "modes", _rows_with_prompts(8), trainer_class=Watching, lmbda=1.0, max_new_tokens=3,
        max_steps=2, gradient_checkpointing=True,
    )  # fmt: skip
    assert states == [(False, False, True)] * 2  # one generate call per window (4 prompts, batch size 4)
    assert trainer.model.training and trainer.model.is_activation_checkpointing


def test_prompt_only_rows_train_with_lmbda_one_through_the_python_api(tmp_path):
    rows = [{"input_ids": row["input_ids"][:4], "attention_mask": [1] * 4} for row in _rows_with_prompts(8)]
    student, teacher = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=4, seed=2)
    args = DistillLensConfig(
        output_dir=str(tmp_path / "p"), per_device_train_batch_size=4, max_steps=2, report_to=[], use_cpu=True,
        lens_num_layers=2, lmbda=1.0, max_new_tokens=4, save_strategy="no", logging_steps=1,
    )  # fmt: skip

    def collate(batch):
        return {
            key: value
            for key, value in pad_batch([{**row, "labels": [-100] * 4} for row in batch]).items()
            if key != "labels"
        }

    trainer = DistillLensTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        data_collator=collate,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(entry["completion_length"] > 0 for entry in logged)


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lmbda": 1.5}, r"^lmbda=1\.5 must lie in \[0, 1\]"),
        ({"lmbda": -0.1}, r"^lmbda=-0\.1 must lie in \[0, 1\]"),
        ({"max_new_tokens": 0}, r"^max_new_tokens=0 must be >= 1"),
        ({"generation_temperature": 0.0}, r"^generation_temperature=0\.0 must be > 0"),
        ({"generation_top_p": 0.0}, r"^generation_top_p=0\.0 must lie in \(0, 1\]"),
        ({"generation_top_k": -1}, r"^generation_top_k=-1 must be >= 0"),
        ({"seq_kd": True, "kd_weight": 0.0, "lens_weight": 0.0, "ce_weight": 1.0}, r"^seq_kd=True samples"),
    ],
)
def test_bad_on_policy_settings_are_one_line_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        DistillLensConfig(output_dir=str(tmp_path), use_cpu=True, **overrides)
    assert "\n" not in str(error.value)


def test_prompt_only_data_with_off_policy_windows_is_refused_before_training(tmp_path):
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}] * 4
    with pytest.raises(ValueError, match=r"no labels \(prompt-only rows\).*set lmbda=1"):
        _train(tmp_path, "x", rows, lmbda=0.5)


def test_a_model_without_an_eos_token_cannot_sample_completions(tmp_path):
    student = tiny_llama(num_layers=3, seed=1)
    student.generation_config.eos_token_id = None
    args = DistillLensConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], lmbda=1.0, lens_num_layers=2
    )
    with pytest.raises(ValueError, match=r"tokenizer has none: set tokenizer\.eos_token"):
        DistillLensTrainer(model=student, teacher_model=tiny_llama(num_layers=4, seed=2), args=args)


def test_a_prompt_that_leaves_no_room_for_max_new_tokens_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match=r"plus max_new_tokens=60 exceeds the student's context of 16 positions"
    ):
        student = tiny_llama(num_layers=3, seed=1, max_positions=16)
        teacher = tiny_llama(num_layers=4, seed=2, max_positions=16)
        args = DistillLensConfig(
            output_dir=str(tmp_path), use_cpu=True, report_to=[], lmbda=1.0, lens_num_layers=2, max_new_tokens=60,
            per_device_train_batch_size=4, max_steps=1,
        )  # fmt: skip
        DistillLensTrainer(
            model=student, teacher_model=teacher, args=args,
            train_dataset=Dataset.from_list(_rows_with_prompts(4)), data_collator=pad_batch,
        ).train()  # fmt: skip


def test_seq_kd_trains_off_policy_windows_on_the_teachers_completions(tmp_path):
    class Which(ScriptedTrainer):
        def generate_completions(self, model, prompts):
            self.generators = [*getattr(self, "generators", []), model is self.teacher_model]
            return super().generate_completions(model, prompts)

    trainer, _, _ = _train(
        tmp_path, "seq", _rows_with_prompts(8), trainer_class=Which, seq_kd=True, max_steps=2
    )
    assert trainer.generators == [True, True]  # lmbda=0: every window off-policy, completed by the teacher


def test_a_resumed_run_continues_the_same_sequence_of_window_decisions(tmp_path):
    rows = _rows_with_prompts(24)
    full, _, _ = _train(tmp_path, "full", rows, trainer_class=ScriptedTrainer, lmbda=0.5, max_steps=6)
    decisions = [entry["on_policy_fraction"] for entry in full.state.log_history if "loss" in entry]
    assert 0 < sum(decisions) < 6  # both kinds of window, so the test can tell them apart
    _train(tmp_path, "first", rows, trainer_class=ScriptedTrainer, lmbda=0.5, max_steps=6, save_strategy="steps",
           save_steps=3)  # fmt: skip
    student, teacher = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=4, seed=2)
    args = DistillLensConfig(
        output_dir=str(tmp_path / "first"), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, lens_num_layers=2, seed=0,
        disable_tqdm=True, ce_weight=0.5, head_chunk_size=5, lmbda=0.5,
    )  # fmt: skip
    resumed = ScriptedTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
        data_collator=pad_batch,
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-3"))
    after = [entry["on_policy_fraction"] for entry in resumed.state.log_history if "loss" in entry]
    assert after[-3:] == decisions[3:]


def test_sampling_has_its_own_seeded_stream_per_rank_and_window_and_leaves_the_training_rng_alone():
    from distillens_trainer.trainer.completions import SamplingSettings, sample_completions
    from distillens_trainer.trainer.on_policy import sampling_seed

    model = tiny_llama(num_layers=2, seed=1)
    settings = SamplingSettings(
        max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=PAD_ID, eos_token_ids=(EOS_ID,),
        batch_size=4,
    )  # fmt: skip
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = sample_completions(model, prompts, settings, seed=sampling_seed(0, 3, 0))
    assert torch.equal(torch.random.get_rng_state(), before)  # dropout and data order see no sampling
    again = sample_completions(model, prompts, settings, seed=sampling_seed(0, 3, 0))
    other_rank = sample_completions(model, prompts, settings, seed=sampling_seed(0, 3, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other_rank))
    assert len({sampling_seed(0, window, rank) for window in range(50) for rank in range(4)}) == 200


def test_distillens_train_runs_on_policy_from_the_command_line(tmp_path, capsys):
    import json

    from distillens_demo.data.suite import format_example, generate_examples, train_suite_tokenizer
    from distillens_trainer.cli import main

    examples = generate_examples(24, seed=0)
    tokenizer = train_suite_tokenizer([format_example(e) for e in examples], vocab_size=300)
    assert tokenizer.eos_token_id is not None
    for name, layers in (("student", 2), ("teacher", 3)):
        tiny_llama(num_layers=layers, vocab=len(tokenizer), seed=layers).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows = [{"instruction": e["instruction"], "input": e["input"], "output": e["output"]} for e in examples]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    argv = [
        "train", "--model_name_or_path", str(tmp_path / "student"), "--teacher_model_name_or_path",
        str(tmp_path / "teacher"), "--train_file", str(tmp_path / "train.jsonl"), "--output_dir", str(out),
        "--lmbda", "1", "--max_new_tokens", "5", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--lens_num_layers", "1", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true",
        "--save_strategy", "no", "--prompt_template", "plain",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    logged = [
        entry
        for entry in json.loads((out / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert len(logged) == 2
    assert all(entry["on_policy_fraction"] == 1.0 and 0 < entry["completion_length"] <= 5 for entry in logged)
    assert json.loads((out / "distillens_config.json").read_text())["training"]["lmbda"] == 1.0


def test_a_checkpoints_own_generation_defaults_do_not_bend_the_students_samples():
    from distillens_trainer.trainer.completions import SamplingSettings, sample_completions

    model = tiny_llama(num_layers=2, seed=1)
    model.generation_config.suppress_tokens = list(range(3, TINY_VOCAB))  # would leave only special tokens
    model.generation_config.repetition_penalty = 5.0
    own = model.generation_config
    settings = SamplingSettings(
        max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=PAD_ID, eos_token_ids=(EOS_ID,),
        batch_size=4,
    )  # fmt: skip
    prompts = [torch.tensor([5 + row, 6, 7]) for row in range(8)]
    completions = sample_completions(model, prompts, settings, seed=0)
    assert any(int(token) >= 3 for completion in completions for token in completion)
    assert model.generation_config is own and own.repetition_penalty == 5.0  # put back afterwards
