"""The offline teacher: top-k bucket divergences, building a cache, and training from it as from the teacher."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, models

from distillens_trainer import DistillLensConfig, DistillLensTrainer
from distillens_trainer.cli import main
from distillens_trainer.loss.divergences import DIVERGENCE_NAMES, token_divergence
from distillens_trainer.loss.fused import FusedJob, fused_head_loss
from distillens_trainer.loss.heads import LinearHead
from distillens_trainer.loss.topk import (
    TopKDistribution,
    stored_log_probs,
    topk_divergence,
    topk_of_logits,
)
from distillens_trainer.teacher.cache import writer as writer_module
from distillens_trainer.teacher.cache.format import MANIFEST_NAME, SHARD_GLOB, file_sha256, row_key
from distillens_trainer.teacher.cache.reader import TeacherCache
from distillens_trainer.teacher.cache.writer import teacher_cache_settings, write_teacher_cache

from conftest import (
    DATA_DIR,
    PAD_ID,
    TINY_VOCAB,
    pad_batch,
    shared_path,
    tiny_llama,
    token_rows,
)


# ============================================================================================ top-k buckets
def _logits_with_masked_entries(rows: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=generator) * 2
    teacher = torch.randn(rows, vocab, generator=generator) * 3
    student[0, 1] = teacher[1, 2] = -math.inf  # masked vocabulary entries
    student[2] = -math.inf  # a dead student row
    teacher[3] = -math.inf  # a dead teacher row
    return student, teacher


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize(("temperature", "beta"), [(1.0, 0.5), (2.0, 0.2)])
def test_top_k_over_the_whole_vocabulary_is_the_full_divergence(name, temperature, beta):
    student, teacher = _logits_with_masked_entries(6, 11)
    stored = topk_of_logits(teacher, k=11, temperature=temperature)
    buckets = TopKDistribution.from_stored(stored.ids, stored_log_probs(stored))
    bucketed_student = student.clone().requires_grad_(True)
    full_student = student.clone().requires_grad_(True)
    bucketed = topk_divergence(name, bucketed_student, buckets, temperature=temperature, beta=beta)
    full = token_divergence(name, full_student, teacher, temperature=temperature, beta=beta)
    bucketed.sum().backward()
    full.sum().backward()
    torch.testing.assert_close(bucketed, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bucketed_student.grad, full_student.grad, rtol=1e-5, atol=1e-6)
    assert bucketed[2] == 0 and bucketed[3] == 0  # dead rows on either side contribute nothing


def test_bucket_values_match_a_hand_computation_on_four_tokens():
    """Teacher t = (.5, .3, .15, .05), student uniform; k = 2 keeps tokens 0 and 1 and a tail of .2 (.5)."""
    teacher = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    student = torch.zeros(1, 4)
    buckets = topk_of_logits(teacher, k=2)
    assert buckets.ids.tolist() == [[0, 1]]
    torch.testing.assert_close(buckets.log_probs.exp(), torch.tensor([[0.5, 0.3, 0.2]]))
    t, s = [0.5, 0.3, 0.2], [0.25, 0.25, 0.5]
    m = [(a + b) / 2 for a, b in zip(t, s)]
    fkl = sum(a * math.log(a / b) for a, b in zip(t, s))
    rkl = sum(b * math.log(b / a) for a, b in zip(t, s))
    expected = {
        "fkl": fkl,
        "rkl": rkl,
        "skl": fkl + rkl,
        "jsd": 0.5 * sum(a * math.log(a / c) for a, c in zip(t, m))
        + 0.5 * sum(b * math.log(b / c) for b, c in zip(s, m)),
        "tvd": 0.5 * sum(abs(a - b) for a, b in zip(t, s)),
    }
    for name, value in expected.items():
        got = topk_divergence(name, student, buckets)
        assert got.item() == pytest.approx(value, rel=1e-5), name
    assert expected["tvd"] == pytest.approx(0.3)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_bucket_divergence_never_exceeds_the_full_one(name):
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(64, 20, generator=generator), torch.randn(64, 20, generator=generator) * 2
    for k in (1, 3, 10):
        bucketed = topk_divergence(name, student, topk_of_logits(teacher, k), beta=0.3)
        full = token_divergence(name, student, teacher, beta=0.3)
        assert bool((bucketed <= full + 1e-6).all()), (name, k)
        assert bool((bucketed >= -1e-7).all())


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_masked_tokens_inside_the_top_k_and_dead_rows_stay_finite(name):
    student, teacher = _logits_with_masked_entries(6, 11)
    teacher[4, 2:] = -math.inf  # only two finite tokens, but k = 4: masked tokens inside the top-k
    student[5, 4:] = -math.inf  # the student's tail bucket is empty
    buckets = topk_of_logits(teacher, k=4)
    buckets = TopKDistribution.from_stored(buckets.ids, stored_log_probs(buckets))
    assert buckets.live.tolist() == [True, True, True, False, True, True]
    logits = student.clone().requires_grad_(True)
    values = topk_divergence(name, logits, buckets, temperature=1.5)
    values.sum().backward()
    assert bool(torch.isfinite(values).all()) and bool(torch.isfinite(logits.grad).all())
    assert values[2] == 0 and values[3] == 0
    assert bool((logits.grad[2:4] == 0).all())


def test_stored_bf16_buckets_read_back_as_a_distribution():
    buckets = topk_of_logits(torch.randn(5, 40), k=8)
    rounded = stored_log_probs(buckets).to(torch.bfloat16)
    read = TopKDistribution.from_stored(buckets.ids.to(torch.int32), rounded)
    torch.testing.assert_close(read.log_probs.exp().sum(-1), torch.ones(5))
    torch.testing.assert_close(read.log_probs, buckets.log_probs, atol=2e-2, rtol=0)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize(("chunk", "scale", "softcap"), [(3, None, None), (64, 0.7, 4.0)])
def test_fused_top_k_job_equals_the_straightforward_bucket_divergence(name, chunk, scale, softcap):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(30, 8, generator=generator).requires_grad_(True)
    inputs = torch.randn(10, 8, generator=generator).requires_grad_(True)
    head = LinearHead(weight, None, scale, softcap)
    teacher = topk_of_logits(torch.randn(10, 30, generator=generator) * 2, k=5, temperature=1.3)
    fused_total, sums = fused_head_loss(
        head,
        [FusedJob(inputs, teacher, divergence=name, weight=0.7, name="kd")],
        vocab_size=30,
        temperature=1.3,
        beta=0.3,
        chunk_size=chunk,
    )
    fused_grads = torch.autograd.grad(fused_total, [weight, inputs])
    reference = topk_divergence(name, head.logits(inputs, 30), teacher, temperature=1.3, beta=0.3).sum()
    reference_grads = torch.autograd.grad(0.7 * reference, [weight, inputs])
    torch.testing.assert_close(sums["kd"], reference.detach(), rtol=1e-5, atol=1e-6)
    for fused, expected in zip(fused_grads, reference_grads):
        torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-6)


# ============================================================================================ building a cache
def _config(tmp_path, name: str = "out", **overrides) -> DistillLensConfig:
    settings = {
        "output_dir": str(tmp_path / name),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "lens_num_layers": 2,
        "seed": 0,
        "disable_tqdm": True,
    }
    return DistillLensConfig(**(settings | overrides))


def _online(tmp_path, student, teacher, rows, name="online", **overrides) -> DistillLensTrainer:
    dataset = Dataset.from_list(rows)
    return DistillLensTrainer(
        model=student,
        teacher_model=teacher,
        args=_config(tmp_path, name, **overrides),
        train_dataset=dataset,
        data_collator=pad_batch,
    )


def _cache(tmp_path, online: DistillLensTrainer, rows, name="cache", overwrite=False, **settings) -> str:
    """A cache of the online trainer's teacher for its layer map and vocabulary, over ``rows``."""
    settings = {
        "mode": "hidden",
        "dtype": "float32",
        "lens_final_norm": online.args.lens_final_norm,
    } | settings
    built = teacher_cache_settings(
        online.teacher_model, layer_map=online.layer_map, vocab_size=online.vocab_size, **settings
    )
    folder = tmp_path / name
    write_teacher_cache(
        online.teacher_model, [rows], built, folder, pad_token_id=PAD_ID, batch_size=5, rows_per_shard=7,
        overwrite=overwrite, show_progress=False,
    )  # fmt: skip
    return str(folder)


def _cached(tmp_path, student, cache, rows, name="cached", **overrides) -> DistillLensTrainer:
    return DistillLensTrainer(
        model=student,
        args=_config(tmp_path, name, teacher_cache=cache, **overrides),
        train_dataset=Dataset.from_list(rows),
        data_collator=pad_batch,
    )


def _loss_and_grads(trainer: DistillLensTrainer, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=1)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]


def assert_same_loss_and_grads(cached: DistillLensTrainer, online: DistillLensTrainer, batch) -> None:
    """The cached run's summed loss and every student gradient equal the online run's (fp32 round-off)."""
    online_loss, online_grads = _loss_and_grads(online, batch)
    cached_loss, cached_grads = _loss_and_grads(cached, batch)
    torch.testing.assert_close(cached_loss, online_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(cached_grads, online_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def _gemma2(layers: int, seed: int, vocab: int = TINY_VOCAB):
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(
        num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, vocab_size=vocab, final_logit_softcapping=5.0, pad_token_id=PAD_ID,
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(config)


def _tied_llama(layers: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    model = tiny_llama(num_layers=layers, hidden=hidden, seed=seed)
    config = model.config
    config.tie_word_embeddings = True
    return transformers.LlamaForCausalLM(config)


PAIRS = {  # name -> (student, teacher) builders
    "llama": lambda: (tiny_llama(3, 32, seed=1), tiny_llama(6, 48, seed=2)),
    "padded_teacher_vocabulary": lambda: (
        tiny_llama(3, 32, seed=1),
        tiny_llama(6, 48, vocab=TINY_VOCAB + 16, seed=2),
    ),
    "tied_heads": lambda: (_tied_llama(3, 32, seed=1), _tied_llama(6, 48, seed=2)),
    "soft_capping": lambda: (_gemma2(3, seed=1), _gemma2(6, seed=2)),
}


# every divergence on the llama pair; the paper's two (rkl output, jsd lens) on the others
EQUALITY_CASES = [("llama", name) for name in DIVERGENCE_NAMES] + [
    (pair, name) for pair in PAIRS if pair != "llama" for name in ("rkl", "jsd")
]


@pytest.mark.parametrize(("pair", "name"), EQUALITY_CASES)
def test_an_fp32_hidden_cache_gives_the_online_losses_and_gradients(tmp_path, pair, name):
    student, teacher = PAIRS[pair]()
    rows = token_rows(12, seed=4)
    weights = {
        "kd_divergence": name,
        "lens_divergence": name,
        "ce_weight": 0.5,
        "jsd_beta": 0.3,
        "temperature": 1.5,
    }
    online = _online(tmp_path, student, teacher, rows, **weights)
    cache = _cache(tmp_path, online, rows)
    cached = _cached(tmp_path, student, cache, rows, **weights)
    assert cached.teacher_model is None
    assert_same_loss_and_grads(cached, online, pad_batch(rows[:6]))


@pytest.mark.parametrize("head_chunk_size", [0, 5])
def test_the_straightforward_path_and_small_chunks_read_the_cache_too(tmp_path, head_chunk_size):
    student, teacher = PAIRS["llama"]()
    rows = token_rows(12, seed=4)
    online = _online(tmp_path, student, teacher, rows, head_chunk_size=head_chunk_size)
    cached = _cached(tmp_path, student, _cache(tmp_path, online, rows), rows, head_chunk_size=head_chunk_size)
    batch = pad_batch(rows[:6], padding_side="left")
    torch.testing.assert_close(
        _loss_and_grads(cached, batch)[0], _loss_and_grads(online, batch)[0], rtol=1e-5, atol=1e-6
    )


BF16_RELATIVE_TOLERANCE = 2e-2  # bf16 keeps 8 bits of mantissa: head inputs round by up to 2^-9 relative


def test_a_bf16_hidden_cache_is_within_the_stated_tolerance(tmp_path):
    student, teacher = PAIRS["llama"]()
    rows = token_rows(12, seed=4)
    online = _online(tmp_path, student, teacher, rows)
    cached = _cached(tmp_path, student, _cache(tmp_path, online, rows, dtype="bfloat16"), rows)
    batch = pad_batch(rows)
    online_loss, online_grads = _loss_and_grads(online, batch)
    cached_loss, cached_grads = _loss_and_grads(cached, batch)
    assert cached_loss.item() == pytest.approx(online_loss.item(), rel=BF16_RELATIVE_TOLERANCE)
    flat = torch.cat([g.reshape(-1) for g in cached_grads]), torch.cat([g.reshape(-1) for g in online_grads])
    assert float((flat[0] - flat[1]).norm() / flat[1].norm()) < BF16_RELATIVE_TOLERANCE


def test_a_top_k_cache_over_the_whole_vocabulary_gives_the_online_loss(tmp_path):
    student, teacher = PAIRS["llama"]()
    rows = token_rows(12, seed=4)
    online = _online(tmp_path, student, teacher, rows, kd_divergence="skl", temperature=2.0)
    cache = _cache(tmp_path, online, rows, mode="topk", top_k=TINY_VOCAB, temperature=2.0)
    cached = _cached(tmp_path, student, cache, rows, kd_divergence="skl", temperature=2.0)
    assert cached.cached_teacher.head is None  # no teacher weights at all
    assert_same_loss_and_grads(cached, online, pad_batch(rows[:6]))


def test_a_small_top_k_cache_trains_on_every_term(tmp_path):
    student, teacher = PAIRS["llama"]()
    rows = token_rows(12, seed=4)
    online = _online(tmp_path, student, teacher, rows)
    cache = _cache(tmp_path, online, rows, mode="topk", top_k=4, dtype="bfloat16")
    manifest = json.loads((tmp_path / "cache" / MANIFEST_NAME).read_text())
    assert manifest["bytes_per_token_per_layer"] == 4 * 2 + 5 * 2  # uint16 ids, bf16 log-probabilities
    cached = _cached(tmp_path, student, cache, rows)
    cached.train()
    logged = [entry for entry in cached.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(math.isfinite(entry["loss"]) for entry in logged)
    assert {"kd_loss", "lens_loss"} <= set(logged[0])


# ============================================================================================ rows and runs
def _losses(trainer: DistillLensTrainer) -> list[float]:
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_shuffled_and_filtered_data_trains_on_its_own_cached_rows_with_accumulation(tmp_path):
    rows = token_rows(24, seed=5)
    student, teacher = PAIRS["llama"]()
    builder = _online(tmp_path, student, teacher, rows, name="builder")
    cache = _cache(tmp_path, builder, rows)
    kept = [row for index, row in enumerate(rows) if index % 3 != 1]
    reordered = Dataset.from_list(kept).shuffle(seed=7)
    run = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 3}
    online = DistillLensTrainer(
        model=tiny_llama(3, 32, seed=1), teacher_model=teacher, args=_config(tmp_path, "a", **run),
        train_dataset=reordered, data_collator=pad_batch,
    )  # fmt: skip
    cached = DistillLensTrainer(
        model=tiny_llama(3, 32, seed=1), args=_config(tmp_path, "b", teacher_cache=cache, **run),
        train_dataset=reordered, data_collator=pad_batch,
    )  # fmt: skip
    assert _losses(cached) == pytest.approx(_losses(online), rel=1e-5)


def test_resuming_a_cached_run_continues_where_it_stopped(tmp_path):
    rows = token_rows(24, seed=5)
    student, teacher = PAIRS["llama"]()
    cache = _cache(tmp_path, _online(tmp_path, student, teacher, rows), rows)
    run = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    straight = _cached(tmp_path, tiny_llama(3, 32, seed=1), cache, rows, name="straight", **run)
    straight.train()
    stopped = _cached(tmp_path, tiny_llama(3, 32, seed=1), cache, rows, name="resumed", **run)
    stopped.train()
    resumed = _cached(tmp_path, tiny_llama(3, 32, seed=1), cache, rows, name="resumed", **run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for got, expected in zip(resumed.model.parameters(), straight.model.parameters()):
        torch.testing.assert_close(got, expected)


def test_every_evaluation_row_is_read_from_the_cache_too(tmp_path):
    rows, eval_rows = token_rows(12, seed=4), token_rows(5, seed=9)
    student, teacher = PAIRS["llama"]()
    online = _online(tmp_path, student, teacher, rows)
    only_train = _cache(tmp_path, online, rows, name="train_only")
    with pytest.raises(ValueError, match="5 of 5 evaluation rows"):
        DistillLensTrainer(
            model=student, args=_config(tmp_path, teacher_cache=only_train), train_dataset=Dataset.from_list(rows),
            eval_dataset=Dataset.from_list(eval_rows), data_collator=pad_batch,
        )  # fmt: skip
    both = _cache(tmp_path, online, rows + eval_rows, name="both")
    cached = DistillLensTrainer(
        model=student, args=_config(tmp_path, teacher_cache=both), train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(eval_rows), data_collator=pad_batch,
    )  # fmt: skip
    online.eval_dataset = Dataset.from_list(eval_rows)
    assert cached.evaluate()["eval_loss"] == pytest.approx(online.evaluate()["eval_loss"], rel=1e-5)


# ============================================================================================ refusals
def _word_tokenizer(words: list[str]) -> transformers.PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=words[0]))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=words[0], pad_token=words[2]
    )


@pytest.fixture
def built(tmp_path):
    """(rows, student, online trainer, hidden fp32 cache folder)."""
    rows = token_rows(12, seed=4)
    student, teacher = PAIRS["llama"]()
    online = _online(tmp_path, student, teacher, rows)
    return rows, student, online, _cache(tmp_path, online, rows)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"lens_student_layers": [1], "lens_teacher_layers": [3]},
            r"reads teacher layers \[3\], which the teacher cache .* lacks",
        ),
        ({"lens_final_norm": False}, "lens_final_norm=False, but the teacher cache"),
    ],
)
def test_a_cache_made_for_another_layer_map_or_lens_is_one_line(tmp_path, built, change, message):
    rows, student, _, cache = built
    with pytest.raises(ValueError, match=message) as error:
        _cached(tmp_path, student, cache, rows, **change)
    assert "\n" not in str(error.value)


def test_a_row_missing_from_the_cache_stops_before_any_step(tmp_path, built):
    rows, student, _, cache = built
    extra = token_rows(3, seed=99)
    with pytest.raises(
        ValueError, match=r"3 of 15 training rows \(the first: row 12\) are not in the teacher cache"
    ):
        _cached(tmp_path, student, cache, rows + extra)


def test_a_cache_made_with_another_tokenizer_is_refused(tmp_path):
    rows = token_rows(8, seed=4)
    words = [f"w{index}" for index in range(TINY_VOCAB)]
    student, teacher = PAIRS["llama"]()
    online = _online(tmp_path, student, teacher, rows)
    settings = teacher_cache_settings(
        teacher,
        mode="hidden",
        layer_map=online.layer_map,
        vocab_size=TINY_VOCAB,
        tokenizer=_word_tokenizer(words),
    )
    write_teacher_cache(teacher, [rows], settings, tmp_path / "c", pad_token_id=PAD_ID, show_progress=False)
    other = _word_tokenizer(list(reversed(words)))
    with pytest.raises(ValueError, match="made with another tokenizer"):
        DistillLensTrainer(
            model=student, args=_config(tmp_path, teacher_cache=str(tmp_path / "c")),
            train_dataset=Dataset.from_list(rows), data_collator=pad_batch, processing_class=other,
        )  # fmt: skip


def test_a_student_with_another_vocabulary_is_refused(tmp_path, built):
    rows, _, _, cache = built
    with pytest.raises(ValueError, match="compares 64 vocabulary columns, this student shares 48"):
        _cached(tmp_path, tiny_llama(3, 32, vocab=48, seed=1), cache, rows)


def test_a_top_k_cache_keeps_its_temperature(tmp_path, built):
    rows, student, online, _ = built
    cache = _cache(tmp_path, online, rows, name="topk", mode="topk", top_k=8)
    with pytest.raises(ValueError, match=r"temperature=2\.0, but the top-k teacher cache"):
        _cached(tmp_path, student, cache, rows, temperature=2.0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"lmbda": 0.5}, "cannot serve lmbda=0.5"),
        ({"seq_kd": True}, "cannot serve seq_kd=True"),
        ({"feature_weight": 1.0}, "cannot serve feature_weight > 0"),
        ({"lens_eval_profile": True}, "cannot serve lens_eval_profile=True"),
    ],
)
def test_what_a_cache_cannot_serve_is_refused_in_the_config(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, teacher_cache="c", **setting)


def test_a_teacher_model_and_a_cache_together_are_refused(tmp_path, built):
    rows, student, online, cache = built
    with pytest.raises(ValueError, match="either teacher_model or a teacher_cache"):
        DistillLensTrainer(
            model=student, teacher_model=online.teacher_model, args=_config(tmp_path, teacher_cache=cache),
            train_dataset=Dataset.from_list(rows), data_collator=pad_batch,
        )  # fmt: skip


def test_a_folder_that_is_no_cache_is_one_line(tmp_path, built):
    rows, student, _, _ = built
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no manifest\.json"):
        _cached(tmp_path, student, str(tmp_path / "empty"), rows)


# ============================================================================================ building, resuming
def _shard_digests(folder) -> dict[str, str]:
    return {path.name: file_sha256(path) for path in sorted(folder.glob(SHARD_GLOB))}


def test_an_interrupted_build_refuses_to_train_then_resumes_to_the_same_cache(tmp_path, monkeypatch, built):
    rows, student, online, _ = built
    real = writer_module.teacher_row_signals
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the second shard (7 rows per shard, 5 rows per batch)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "teacher_row_signals", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path, online, rows, name="resumed")
    assert len(_shard_digests(tmp_path / "resumed")) == 1
    with pytest.raises(ValueError, match="is incomplete"):
        _cached(tmp_path, student, str(tmp_path / "resumed"), rows)
    monkeypatch.setattr(writer_module, "teacher_row_signals", real)
    _cache(tmp_path, online, rows, name="resumed")
    assert _shard_digests(tmp_path / "resumed") == _shard_digests(tmp_path / "cache")
    assert not list((tmp_path / "resumed").glob(".*.tmp"))
    _cached(tmp_path, student, str(tmp_path / "resumed"), rows)


def test_a_cache_with_other_settings_is_refused_and_left_untouched(tmp_path, built):
    rows, _, online, cache = built
    before = _shard_digests(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"made with other settings \(settings.dtype differ\)"):
        _cache(tmp_path, online, rows, dtype="bfloat16")
    assert _shard_digests(tmp_path / "cache") == before
    _cache(tmp_path, online, rows, dtype="bfloat16", overwrite=True)
    assert TeacherCache.open(cache).settings.dtype == "bfloat16"


def test_rows_are_stored_once_keyed_by_content_and_open_with_datasets(tmp_path, built):
    rows, _, _, cache = built
    opened = TeacherCache.open(cache)
    assert len(opened) == len({row_key(row["input_ids"], row["labels"]) for row in rows}) == 12
    assert len(writer_module.unique_rows([rows, rows[:3]])) == 12  # a repeated example is cached once
    shard = sorted((tmp_path / "cache").glob(SHARD_GLOB))[0]
    table = Dataset.from_file(str(shard))
    assert {"row_key", "num_tokens", "h2", "h4", "h6"} <= set(table.column_names)
    first = table[0]
    assert len(first["h6"]) == first["num_tokens"] * 48 * 4  # [tokens, d] fp32 bytes


# ============================================================================================ the command line
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _data_flags() -> list[str]:
    return [
        "--train_file", str(shared_path(DATA_DIR / "dolly" / "dev_1000.jsonl")), "--max_train_samples", "24",
        "--max_length", "64", "--max_prompt_length", "48", "--use_cpu", "true", "--report_to", "none",
        "--disable_tqdm", "true", "--lens_num_layers", "1",
    ]  # fmt: skip


@pytest.mark.needs_shared
@pytest.mark.parametrize("mode", ["hidden", "topk"])
def test_cache_teacher_then_train_from_the_command_line(gpt2_cli_models, tmp_path, capsys, mode):
    cache = tmp_path / "cache"
    code, out, err = _cli(
        capsys, "cache-teacher", "--teacher_model_name_or_path", str(gpt2_cli_models / "teacher"),
        "--model_name_or_path", str(gpt2_cli_models / "student"), "--output_dir", str(cache), "--cache_mode", mode,
        "--top_k", "16", "--cache_dtype", "float32", "--rows_per_shard", "8", *_data_flags(),
    )  # fmt: skip
    assert code == 0, err
    assert f"train with --teacher_cache {cache}" in out
    written = [path.stat().st_size for path in cache.rglob("*") if path.is_file()]  # the head file too
    assert f"{sum(written) / 2**20:.1f} MiB in {len(written)} files in {cache}" in out
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["settings"]["mode"] == mode
    assert manifest["settings"]["layers"] == [2, 4]  # the mapped teacher layer and the output
    assert manifest["settings"]["prompt_format"]["max_length"] == 64
    common = [
        "--model_name_or_path", str(gpt2_cli_models / "student"), "--train_file",
        str(shared_path(DATA_DIR / "dolly" / "dev_1000.jsonl")), "--max_train_samples", "24", "--use_cpu", "true",
        "--report_to", "none", "--disable_tqdm", "true", "--lens_num_layers", "1", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--teacher_cache", str(cache), "--logging_steps", "1",
    ]  # fmt: skip
    code, out, err = _cli(capsys, "train", *common, "--output_dir", str(tmp_path / "student"))
    assert code == 0, err  # the length limits and the prompt format come from the cache
    log_history = json.loads((tmp_path / "student" / "trainer_state.json").read_text())["log_history"]
    assert any("lens_loss" in entry for entry in log_history)
    assert str(gpt2_cli_models / "teacher") in (tmp_path / "student" / "README.md").read_text()
    code, _, err = _cli(capsys, "train", *common, "--max_length", "300", "--output_dir", str(tmp_path / "s2"))
    assert code == 1
    assert "--max_length 300 differs from the teacher cache" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s2").exists()


@pytest.mark.needs_shared
def test_cache_teacher_refuses_a_folder_that_holds_something_else(gpt2_cli_models, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    code, _, err = _cli(
        capsys, "cache-teacher", "--teacher_model_name_or_path", str(gpt2_cli_models / "teacher"),
        "--model_name_or_path", str(gpt2_cli_models / "student"), "--output_dir", str(occupied), *_data_flags(),
    )  # fmt: skip
    assert code == 1 and "is not empty and holds no teacher cache" in err
    assert sorted(path.name for path in occupied.iterdir()) == ["notes.txt"]
