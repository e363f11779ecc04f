"""Device placement without a device: the loss core, the top-k path, the on-policy helpers and the teacher-cache
reader run with every input on a simulated accelerator (``tests/device_harness.py``), no op mixes host and device
tensors (a 0-dim host scalar aside), every result stays on the device and equals the plain CPU run."""

from __future__ import annotations

import pytest
import torch
from device_harness import (
    DEVICE,
    HostDeviceMix,
    SimulatedDevice,
    assert_on_device,
    on_device,
    tensors_in,
    to_host,
)

from distillens_trainer.loss.divergences import DIVERGENCE_NAMES, token_divergence
from distillens_trainer.loss.fused import FusedJob, HeadTeacher, fused_head_loss
from distillens_trainer.loss.heads import LinearHead
from distillens_trainer.loss.topk import (
    TopKDistribution,
    stored_log_probs,
    topk_divergence,
    topk_of_logits,
)
from distillens_trainer.teacher.cache.reader import TeacherCache
from distillens_trainer.teacher.cache.writer import teacher_cache_settings, write_teacher_cache
from distillens_trainer.trainer import on_policy

from conftest import EOS_ID, PAD_ID, TINY_VOCAB, pad_batch, tiny_llama, token_rows

N, D_S, D_T, V = 37, 8, 6, 50  # tokens, student / teacher head input sizes, shared vocabulary


def _run_both(compute, inputs: dict[str, torch.Tensor]):
    """``compute(**inputs)`` on the host, then inside :class:`SimulatedDevice` on device copies of ``inputs``:
    (the device run's results, the host run's, the ops that ran on the device)."""
    on_host = compute(**inputs)
    with SimulatedDevice() as device:
        on_the_device = compute(**{name: on_device(value) for name, value in inputs.items()})
    return on_the_device, on_host, device.device_ops


def _assert_same_values(got, want) -> None:
    """The device run's tensors equal the host run's (the same host kernels ran on the same values)."""
    got, want = [to_host(tensor) for tensor in tensors_in(got)], list(tensors_in(want))
    assert len(got) == len(want)
    for got_tensor, want_tensor in zip(got, want):
        torch.testing.assert_close(got_tensor, want_tensor, rtol=0, atol=0)


def _masked_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Random logits with masked (``-inf``) entries and one dead row, as a padded or masked vocabulary gives."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    logits[:, vocab - 3 :] = -float("inf")
    logits[rows // 2] = -float("inf")
    return logits


# -------------------------------------------------------------------------------------------------- the harness
def test_the_harness_refuses_an_op_that_mixes_host_and_device_tensors():
    head = LinearHead(torch.randn(V, D_S))
    with SimulatedDevice():
        device_head = LinearHead(on_device(head.weight))
        host_input = torch.randn(N, D_S)
        with pytest.raises(HostDeviceMix, match="mixes device tensors with host tensors"):
            fused_head_loss(device_head, [FusedJob(host_input, targets=None)], vocab_size=V)
        scaled = device_head.weight * torch.tensor(2.0)  # a 0-dim host scalar is allowed, as on CUDA
    assert_on_device(scaled)


def test_a_host_tensor_among_the_results_is_noticed():
    with SimulatedDevice():
        results = (on_device(torch.ones(3)), on_device(torch.ones(3)).cpu())
    with pytest.raises(AssertionError, match="is on cpu"):
        assert_on_device(results)


# -------------------------------------------------------------------------------------------------- loss core
def _fused_inputs(
    seed: int = 0, bias: bool = True, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "student_weight": torch.randn(V + 3, D_S, generator=generator, dtype=dtype).requires_grad_(),
        "student_input": torch.randn(N, D_S, generator=generator, dtype=dtype).requires_grad_(),
        "teacher_weight": torch.randn(V + 6, D_T, generator=generator, dtype=dtype),
        "teacher_input": torch.randn(N, D_T, generator=generator, dtype=dtype),
        "targets": torch.randint(0, V, (N,), generator=generator),
    }
    if bias:
        inputs["student_bias"] = torch.randn(V + 3, generator=generator, dtype=dtype).requires_grad_()
    return inputs


def _fused_loss_and_grads(temperature, scale, softcap, chunk_size, **tensors):
    """The lens term (JSD) and the output term (reverse KL + CE) through one fused pass, and the gradient of the
    total w.r.t. the student input, head weight and bias."""
    student_head = LinearHead(tensors["student_weight"], tensors.get("student_bias"), scale, softcap)
    teacher_head = LinearHead(tensors["teacher_weight"])
    jobs = [
        FusedJob(tensors["student_input"], HeadTeacher(tensors["teacher_input"], teacher_head), "jsd", 0.5, name="lens"),
        FusedJob(
            tensors["student_input"], HeadTeacher(tensors["teacher_input"], teacher_head), "rkl", 1.0, tensors["targets"], 0.3,
            name="kd", ce_name="ce",
        ),
        FusedJob(tensors["student_input"], targets=tensors["targets"], ce_weight=1.0, ce_name="ce_only"),
    ]  # fmt: skip
    total, sums = fused_head_loss(
        student_head, jobs, vocab_size=V, temperature=temperature, chunk_size=chunk_size
    )
    leaves = [tensors["student_input"], *student_head.parameters()]
    return total, sums, torch.autograd.grad(total, leaves)


@pytest.mark.parametrize(
    ("temperature", "scale", "softcap", "chunk_size", "dtype"),
    [
        (1.0, None, None, 8, torch.float32),  # the in-place chunk math
        (2.0, 0.5, 30.0, 5, torch.float32),  # CE beside a tempered KD: the general form; post-processing
        (1.0, None, 30.0, "auto", torch.bfloat16),  # a bf16 head: the raw product's own buffer
    ],
    ids=["in-place", "general", "bf16"],
)
def test_the_fused_head_loss_and_its_gradients_stay_on_the_device(
    temperature, scale, softcap, chunk_size, dtype
):
    def compute(**tensors):
        return _fused_loss_and_grads(temperature, scale, softcap, chunk_size, **tensors)

    got, want, ops = _run_both(compute, _fused_inputs(dtype=dtype))
    assert_on_device(got)
    _assert_same_values(got, want)
    assert {"aten.mm", "aten.addmm"} & ops  # the head products ran on the device


def test_the_fused_head_loss_without_gradients_stays_on_the_device():
    def compute(student_weight, student_input, teacher_weight, teacher_input, targets):
        job = FusedJob(
            student_input, HeadTeacher(teacher_input, LinearHead(teacher_weight)), "fkl", 1.0, targets, 1.0
        )
        with torch.no_grad():
            return fused_head_loss(LinearHead(student_weight), [job], vocab_size=V, chunk_size=8)

    got, want, _ = _run_both(compute, _fused_inputs(bias=False))
    assert_on_device(got)
    _assert_same_values(got, want)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_every_divergence_and_its_gradient_stay_on_the_device(name):
    def compute(student_logits, teacher_logits):
        per_token = token_divergence(name, student_logits, teacher_logits, temperature=1.5)
        (grad,) = torch.autograd.grad(per_token.sum(), student_logits)
        return per_token, grad

    inputs = {
        "student_logits": _masked_logits(N, V, seed=1).requires_grad_(),
        "teacher_logits": _masked_logits(N, V, seed=2),
    }
    got, want, _ = _run_both(compute, inputs)
    assert_on_device(got)
    _assert_same_values(got, want)


# -------------------------------------------------------------------------------------------------- top-k path
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_the_top_k_path_stays_on_the_device(name):
    def compute(student_logits, teacher_logits, student_input, student_weight, targets):
        teacher = topk_of_logits(teacher_logits, 5, temperature=2.0)
        stored = stored_log_probs(teacher)
        read_back = TopKDistribution.from_stored(teacher.ids.int(), stored.bfloat16())
        per_token = topk_divergence(name, student_logits, read_back, temperature=2.0)
        (logits_grad,) = torch.autograd.grad(per_token.sum(), student_logits)
        job = FusedJob(student_input, read_back, divergence=name, targets=targets, ce_weight=1.0)
        total, sums = fused_head_loss(LinearHead(student_weight), [job], vocab_size=V, chunk_size=8)
        head_grads = torch.autograd.grad(total, [student_input, student_weight])
        return teacher, stored, read_back, per_token, logits_grad, total, sums, head_grads

    inputs = _fused_inputs(bias=False)
    inputs = {
        "student_logits": _masked_logits(N, V, seed=1).requires_grad_(),
        "teacher_logits": _masked_logits(N, V, seed=2),
        "student_input": inputs["student_input"],
        "student_weight": inputs["student_weight"],
        "targets": inputs["targets"],
    }
    got, want, ops = _run_both(compute, inputs)
    assert_on_device(got)
    _assert_same_values(got, want)
    assert "aten.topk" in ops


# -------------------------------------------------------------------------------------------------- on-policy
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_the_on_policy_helpers_keep_prompts_and_completions_on_the_device(padding_side):
    generated = torch.tensor(
        [[7, 8, EOS_ID, 9, 9], [7, EOS_ID, PAD_ID, 5, 5], [9, 8, 7, 6, 5]]
    )  # the last: no EOS

    def compute(input_ids, attention_mask, labels, generated):
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        prompts = on_policy.prompts_of(batch)
        completions = [on_policy.completion_until_eos(row, [EOS_ID, PAD_ID]) for row in generated]
        rows = on_policy.completion_batch(prompts, completions, PAD_ID)
        return on_policy.has_responses(batch), on_policy.has_responses(rows), prompts, completions, rows

    batch = pad_batch(token_rows(3, seed=2), padding_side=padding_side)
    got, want, _ = _run_both(compute, batch | {"generated": generated})
    assert got[:2] == want[:2] == (True, True)
    assert [len(completion) for completion in want[3]] == [3, 2, 5]
    assert_on_device(got[2:])
    _assert_same_values(got[2:], want[2:])


# -------------------------------------------------------------------------------------------------- cache reader
@pytest.fixture(scope="module")
def teacher_caches(tmp_path_factory) -> dict[str, TeacherCache]:
    """A hidden fp32 cache and a top-k bf16 cache of a tiny teacher over five rows, both opened."""
    teacher, rows = tiny_llama(num_layers=4, seed=1), token_rows(5, seed=2)
    caches = {}
    for mode, dtype in (("hidden", "float32"), ("topk", "bfloat16")):
        settings = teacher_cache_settings(
            teacher, mode=mode, layer_map=[(1, 2)], vocab_size=TINY_VOCAB, dtype=dtype, top_k=4
        )
        folder = tmp_path_factory.mktemp(f"{mode}_cache")
        write_teacher_cache(
            teacher, [rows], settings, folder, pad_token_id=PAD_ID, batch_size=5, rows_per_shard=3,
            overwrite=True, show_progress=False,
        )  # fmt: skip
        caches[mode] = TeacherCache.open(folder)
    return caches


@pytest.mark.parametrize("mode", ["hidden", "topk"])
def test_the_teacher_cache_reader_puts_the_signals_and_the_head_on_the_device(teacher_caches, mode):
    cache = teacher_caches[mode]
    batch = pad_batch(token_rows(5, seed=2))
    want = cache.signals(batch, "cpu")
    with SimulatedDevice():
        got = cache.signals({name: on_device(value) for name, value in batch.items()}, DEVICE)
        head = cache.teacher_head(DEVICE) if mode == "hidden" else None
    assert got.layers == want.layers and got.layers
    field = "head_inputs" if mode == "hidden" else "topk"  # the per-layer tensors each kind of cache holds
    assert_on_device(getattr(got, field))
    _assert_same_values(getattr(got, field), getattr(want, field))
    if head is not None:
        assert_on_device(head.parameters())
        _assert_same_values(head.parameters(), cache.teacher_head("cpu").parameters())
