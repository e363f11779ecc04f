"""The fused, chunked head + divergence against the straightforward computation (the reference)."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distillens_trainer import DistillLensConfig, DistillLensTrainer
from distillens_trainer.loss.divergences import token_divergence
from distillens_trainer.loss.fused import FusedJob, HeadTeacher, fused_head_loss
from distillens_trainer.loss.fused_math import divergence_chunk, postprocess
from distillens_trainer.loss.heads import LinearHead
from distillens_trainer.loss.lens import LogitLens

from conftest import TINY_VOCAB, assert_close_to_reference, pad_batch, tiny_llama, token_rows

N, D_S, D_T, V = 37, 8, 6, 50  # tokens, student / teacher head input sizes, shared vocabulary


def fused_divergence_sum(
    student_input, teacher_input, student_head, teacher_head, *, divergence, vocab_size, **settings
):
    """Σ over tokens of one divergence through the fused head: one job, its sum named ``divergence``."""
    job = FusedJob(student_input, HeadTeacher(teacher_input, teacher_head), divergence, 1.0)
    total, sums = fused_head_loss(student_head, [job], vocab_size=vocab_size, **settings)
    torch.testing.assert_close(sums["job0"], total.detach())
    return total


def fused_output_terms(
    student_input, teacher_input, targets, student_head, teacher_head, *, kd_divergence, ce_weight, kd_weight,
    vocab_size, **settings,
):  # fmt: skip
    """The output term's job (KD against the teacher and CE on ``targets``): weighted total and named sums."""
    teacher = HeadTeacher(teacher_input, teacher_head) if teacher_input is not None else None
    job = FusedJob(
        student_input, teacher, kd_divergence, kd_weight, targets, ce_weight,
        name="kd_loss", ce_name="ce_loss",
    )  # fmt: skip
    total, sums = fused_head_loss(student_head, [job], vocab_size=vocab_size, **settings)
    return total, sums


def _heads(
    *,
    student_rows=V + 3,
    teacher_rows=V + 6,
    bias=False,
    scale=None,
    softcap=None,
    dtype=torch.float32,
    seed=0,
):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(student_rows, D_S, generator=generator).to(dtype).requires_grad_()
    student_bias = torch.randn(student_rows, generator=generator).to(dtype).requires_grad_() if bias else None
    teacher_weight = (2 * torch.randn(teacher_rows, D_T, generator=generator)).to(dtype)
    student = LinearHead(weight, student_bias, scale, softcap)
    return student, LinearHead(teacher_weight, None, scale, softcap)


def _inputs(dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(N, D_S, generator=generator).to(dtype).requires_grad_()
    return student, torch.randn(N, D_T, generator=generator).to(dtype)


def _reference(student_input, teacher_input, student_head, teacher_head, name, temperature=1.0, beta=0.5):
    """The straightforward computation: full [N, V] logits, autograd through token_divergence."""
    student_logits = postprocess(
        F.linear(student_input, student_head.weight, student_head.bias),
        student_head.scale,
        student_head.softcap,
    )[:, :V]
    teacher_logits = postprocess(
        F.linear(teacher_input, teacher_head.weight, teacher_head.bias),
        teacher_head.scale,
        teacher_head.softcap,
    )[:, :V]
    return token_divergence(
        name, student_logits, teacher_logits.detach(), temperature=temperature, beta=beta
    ).sum()


def _grads(value, student_input, head):
    tensors = [student_input, head.weight] + ([head.bias] if head.bias is not None else [])
    return torch.autograd.grad(value, tensors, retain_graph=True)


# Tolerances: conftest.assert_close_to_reference (ROUNDING_ULPS · ε(dtype) · max|reference| per element).
_assert_close = assert_close_to_reference


def _assert_same(fused, reference, student_input, head):
    """Value and gradients (w.r.t. the student input, head weight and bias) of two computations on the same leaves."""
    _assert_close(fused, reference)
    for got, want in zip(_grads(fused, student_input, head), _grads(reference, student_input, head)):
        _assert_close(got, want)


def _float64_leaves(student_input, student_head, teacher_input, teacher_head):
    """fp64 copies, in :func:`_reference`'s order, of the inputs and heads (the student's as fresh leaves)."""

    def leaf(tensor):
        return None if tensor is None else tensor.detach().double().requires_grad_()

    student = LinearHead(
        leaf(student_head.weight), leaf(student_head.bias), student_head.scale, student_head.softcap
    )
    bias = None if teacher_head.bias is None else teacher_head.bias.double()
    teacher = LinearHead(teacher_head.weight.double(), bias, teacher_head.scale, teacher_head.softcap)
    return leaf(student_input), teacher_input.double(), student, teacher


def _assert_matches_float64_reference(
    fused, student_input, student_head, teacher_input, teacher_head, name, temperature=1.0, beta=0.5, eps=None
):  # fmt: skip
    """The fused value and its gradients against the straightforward computation in fp64 on the same values, at
    ``ROUNDING_ULPS · eps`` of the magnitude (``eps``: the fused computation's own dtype's)."""
    leaves = _float64_leaves(student_input, student_head, teacher_input, teacher_head)
    reference = _reference(*leaves, name, temperature, beta)
    _assert_close(fused, reference, eps=eps)
    got, want = _grads(fused, student_input, student_head), _grads(reference, leaves[0], leaves[2])
    for index, (g, w) in enumerate(zip(got, want)):
        _assert_close(g, w, eps=eps, msg=f"gradient {index}")


CASES = [  # divergence, β, temperature, chunk size, head bias, scale, softcap
    ("fkl", 0.5, 1.0, 8, False, None, None),
    ("rkl", 0.5, 2.0, N, True, None, None),
    ("skl", 0.5, 0.7, 100, False, 0.5, None),
    ("jsd", 0.5, 1.0, 5, True, None, 3.0),
    ("jsd", 0.1, 1.5, 16, False, 2.0, 5.0),
    ("jsd", 0.0, 1.0, 8, False, None, None),
    ("jsd", 1.0, 1.0, 8, False, None, None),
    ("tvd", 0.5, 1.0, 9, True, None, None),
]


# float64: the maths (the same code runs the fp64 and fp32 blocks); float32: the training path, at fp32's ε
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


@DTYPES
@pytest.mark.parametrize(("name", "beta", "temperature", "chunk", "bias", "scale", "softcap"), CASES)
def test_fused_divergence_equals_the_straightforward_one_with_its_gradients(
    name, beta, temperature, chunk, bias, scale, softcap, dtype
):
    student_head, teacher_head = _heads(bias=bias, scale=scale, softcap=softcap, dtype=dtype)
    student_input, teacher_input = _inputs(dtype=dtype)
    fused = fused_divergence_sum(
        student_input,
        teacher_input,
        student_head,
        teacher_head,
        divergence=name,
        vocab_size=V,
        temperature=temperature,
        beta=beta,
        chunk_size=chunk,
    )
    _assert_matches_float64_reference(
        fused, student_input, student_head, teacher_input, teacher_head, name, temperature, beta
    )


def test_padded_student_rows_get_zero_gradient_and_equal_vocabularies_work():
    for student_rows, teacher_rows in ((V + 7, V), (V, V)):
        student_head, teacher_head = _heads(
            student_rows=student_rows, teacher_rows=teacher_rows, bias=True, dtype=torch.float64
        )
        student_input, teacher_input = _inputs(dtype=torch.float64)
        fused = fused_divergence_sum(
            student_input,
            teacher_input,
            student_head,
            teacher_head,
            divergence="jsd",
            vocab_size=V,
            chunk_size=7,
        )
        weight_grad, bias_grad = torch.autograd.grad(
            fused, [student_head.weight, student_head.bias], retain_graph=True
        )
        assert weight_grad.shape == student_head.weight.shape
        assert not weight_grad[V:].any() and not bias_grad[V:].any()
        reference = _reference(student_input, teacher_input, student_head, teacher_head, "jsd")
        _assert_same(fused, reference, student_input, student_head)


@DTYPES
@pytest.mark.parametrize("name", ["fkl", "rkl", "skl", "jsd", "tvd"])
def test_minus_infinity_columns_stay_finite_and_match(name, dtype):
    student_head, teacher_head = _heads(bias=True, dtype=dtype)
    with torch.no_grad():
        student_head.bias[[3, 10]] = float("-inf")  # columns the student can never produce
    teacher_bias = torch.zeros(V + 6, dtype=dtype).index_fill(0, torch.tensor([10, 20]), float("-inf"))
    teacher_head = LinearHead(teacher_head.weight, teacher_bias)
    student_input, teacher_input = _inputs(dtype=dtype)
    fused = fused_divergence_sum(
        student_input, teacher_input, student_head, teacher_head, divergence=name, vocab_size=V, chunk_size=10
    )
    assert torch.isfinite(fused)
    _assert_matches_float64_reference(fused, student_input, student_head, teacher_input, teacher_head, name)
    assert all(torch.isfinite(g).all() for g in _grads(fused, student_input, student_head))


@pytest.mark.parametrize("name", ["fkl", "rkl", "skl", "jsd", "tvd"])
def test_dead_rows_and_minus_infinity_in_the_chunk_math_match_autograd(name):
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(6, 12, generator=generator, dtype=torch.float64)  # the maths: in fp64
    teacher = torch.randn(6, 12, generator=generator, dtype=torch.float64)
    student[1] = float("-inf")  # dead student row
    teacher[4] = float("-inf")  # dead teacher row
    student[2, :5] = float("-inf")
    teacher[3, 6:] = float("-inf")
    student.requires_grad_()
    value, grad = divergence_chunk(name, student.detach(), teacher, temperature=1.3, beta=0.3, need_grad=True)
    reference = token_divergence(name, student, teacher, temperature=1.3, beta=0.3).sum()
    (reference_grad,) = torch.autograd.grad(reference, student)
    assert value.dtype == grad.dtype == torch.float64
    _assert_close(value, reference)
    _assert_close(grad, reference_grad)
    assert not grad[1].any() and not grad[4].any()


@pytest.mark.parametrize("name", ["fkl", "rkl", "skl", "jsd"])
def test_gradcheck_in_float64(name):
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(9, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, generator=generator, dtype=torch.float64, requires_grad=True)
    student_input = torch.randn(5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    teacher_input = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    teacher_head = LinearHead(torch.randn(8, 3, generator=generator, dtype=torch.float64), softcap=4.0)

    def loss(x, w, b):
        head = LinearHead(w, b, scale=0.7, softcap=4.0)
        return fused_divergence_sum(
            x,
            teacher_input,
            head,
            teacher_head,
            divergence=name,
            vocab_size=7,
            temperature=1.5,
            beta=0.3,
            chunk_size=2,
        )

    assert torch.autograd.gradcheck(loss, (student_input, weight, bias), fast_mode=True)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_output_terms_share_one_head_product_and_match_ce_plus_kd(label_smoothing):
    student_head, teacher_head = _heads(dtype=torch.float64)  # the maths: in fp64
    student_input, teacher_input = _inputs(dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    student_logits = F.linear(student_input, student_head.weight)[:, :V]
    teacher_logits = F.linear(teacher_input, teacher_head.weight)[:, :V]
    ce = F.cross_entropy(student_logits, targets, reduction="sum", label_smoothing=label_smoothing)
    kd = token_divergence("rkl", student_logits, teacher_logits, temperature=2.0).sum()
    out = fused_output_terms(
        student_input,
        teacher_input,
        targets,
        student_head,
        teacher_head,
        kd_divergence="rkl",
        ce_weight=0.3,
        kd_weight=0.7,
        vocab_size=V,
        temperature=2.0,
        chunk_size=10,
        label_smoothing=label_smoothing,
    )
    weighted, sums = out
    assert set(sums) == {"ce_loss", "kd_loss"}
    _assert_close(sums["ce_loss"], ce)
    _assert_close(sums["kd_loss"], kd)
    assert not sums["ce_loss"].requires_grad and not sums["kd_loss"].requires_grad
    _assert_same(weighted, 0.3 * ce + 0.7 * kd, student_input, student_head)
    sft = fused_output_terms(
        student_input, None, targets, student_head, None, kd_divergence="rkl", ce_weight=1.0, kd_weight=0.0,
        vocab_size=V, chunk_size=16, label_smoothing=label_smoothing,
    )  # fmt: skip
    assert set(sft[1]) == {"ce_loss"}  # no teacher: no KD sum
    _assert_same(sft[0], ce, student_input, student_head)


def test_bf16_inputs_run_fp32_math_and_match_at_bf16_tolerance():
    student_head, teacher_head = _heads(dtype=torch.bfloat16)
    student_input, teacher_input = _inputs(dtype=torch.bfloat16)
    fused = fused_divergence_sum(
        student_input, teacher_input, student_head, teacher_head, divergence="jsd", vocab_size=V, chunk_size=8
    )
    assert fused.dtype == torch.float32
    weight_grad, input_grad = torch.autograd.grad(fused, [student_head.weight, student_input])
    assert weight_grad.dtype == input_grad.dtype == torch.bfloat16
    # against fp64 on the same bf16 values: what is left is bf16's own rounding. The logits are the bf16 head
    # product (½ ε_bf16 each, ε_bf16 = 2⁻⁷), which moves the fp32 sum by far less than an ε_bf16 of its size (0.04
    # measured): 1 ε_bf16 allowed. The gradients are rounded to bf16 before and after the two gradient products, a
    # few ε_bf16 of their size (≤ 1.8 measured): 16 ε_bf16 allowed, still 1/8 of the magnitude, where a wrong
    # formula is off by all of it.
    student_leaf, teacher_leaf, student64, teacher64 = _float64_leaves(
        student_input, student_head, teacher_input, teacher_head
    )
    reference = _reference(student_leaf, teacher_leaf, student64, teacher64, "jsd")
    want = torch.autograd.grad(reference, [student64.weight, student_leaf])
    bf16 = torch.finfo(torch.bfloat16).eps
    _assert_close(fused, reference, eps=bf16, ulps=1)
    _assert_close(weight_grad, want[0], eps=bf16, ulps=16)
    _assert_close(input_grad, want[1], eps=bf16, ulps=16)


def test_without_gradients_the_value_is_the_same():
    student_head, teacher_head = _heads()
    student_input, teacher_input = _inputs()
    kwargs = {"divergence": "skl", "vocab_size": V, "chunk_size": 6}
    with_grad = fused_divergence_sum(student_input, teacher_input, student_head, teacher_head, **kwargs)
    with torch.no_grad():
        without = fused_divergence_sum(student_input, teacher_input, student_head, teacher_head, **kwargs)
    assert not without.requires_grad
    _assert_close(without, with_grad)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_no_tensor_of_tokens_times_vocabulary_is_ever_built():
    tokens, vocab, hidden, chunk = 256, 120, 8, 16
    generator = torch.Generator().manual_seed(0)
    student_head = LinearHead(torch.randn(vocab, hidden, generator=generator, requires_grad=True))
    teacher_head = LinearHead(torch.randn(vocab, hidden, generator=generator))
    jobs = [
        FusedJob(torch.randn(tokens, hidden, generator=generator, requires_grad=True),
                 HeadTeacher(torch.randn(tokens, hidden, generator=generator), teacher_head), "jsd", 0.5)
        for _ in range(2)
    ]  # fmt: skip
    with _LargestTensor() as fused_mode:
        total, _ = fused_head_loss(student_head, jobs, vocab_size=vocab, chunk_size=chunk)
        total.backward()
    # chunk × V logits, or the [N, d] input gradients: never N × V
    assert fused_mode.largest <= max(chunk * vocab, tokens * hidden) < tokens * vocab
    with _LargestTensor() as reference_mode:  # the counter does see the straightforward [N, V] logits
        _reference_logits = F.linear(jobs[0].student_input, student_head.weight)
    assert reference_mode.largest == tokens * vocab


class _LiveLargeStorages(TorchDispatchMode):
    """Records the peak of the bytes held at once by the storages of ``min_bytes`` or more that operations return.

    A storage is live while any tensor an operation returned on it (the buffer, or a view of it) is alive.
    """

    def __init__(self, min_bytes: int) -> None:
        super().__init__()
        self.min_bytes = min_bytes
        self.storages: dict[int, tuple[int, list[weakref.ref]]] = {}
        self.peak = 0

    @staticmethod
    def _alive(refs: list[weakref.ref]) -> bool:
        return any(ref() is not None for ref in refs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().nbytes() >= self.min_bytes:
                storage = value.untyped_storage()
                known = self.storages.get(storage.data_ptr())
                if known is None or not self._alive(known[1]):  # a new storage (perhaps at a freed address)
                    known = self.storages[storage.data_ptr()] = (storage.nbytes(), [])
                known[1].append(weakref.ref(value))
        live = sum(nbytes for nbytes, refs in self.storages.values() if self._alive(refs))
        self.peak = max(self.peak, live)
        return out


@pytest.mark.parametrize(
    ("name", "dtype", "softcap", "bound"),
    [
        ("jsd", torch.float32, None, 4.0),
        ("rkl", torch.float32, None, 4.0),
        ("tvd", torch.float32, None, 4.0),
        ("fkl", torch.float32, None, 4.25),  # + the floor's bool mask
        ("skl", torch.float32, None, 4.25),
        ("jsd", torch.bfloat16, None, 4.5),  # + the bf16 head product
        ("jsd", torch.float32, 30.0, 5.0),  # + the soft-cap's derivative
    ],
)
def test_a_training_pass_holds_at_most_four_chunk_by_vocabulary_blocks(name, dtype, softcap, bound):
    tokens, vocab, hidden, chunk = 256, 1024, 4, 64
    block = (
        chunk * vocab * 4
    )  # bytes of one fp32 chunk × V block; the [V, d] and [N, d] tensors are far smaller
    generator = torch.Generator().manual_seed(0)
    student_head = LinearHead(
        torch.randn(vocab, hidden, generator=generator).to(dtype).requires_grad_(), softcap=softcap
    )
    teacher_head = LinearHead(torch.randn(vocab, hidden, generator=generator).to(dtype), softcap=softcap)
    student_input = torch.randn(tokens, hidden, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    jobs = [  # a lens pair and the output term (KD + CE: they share the student's softmax)
        FusedJob(student_input, HeadTeacher(torch.randn(tokens, hidden, generator=generator).to(dtype), teacher_head),
                 name, 0.5, name="lens"),
        FusedJob(student_input, HeadTeacher(torch.randn(tokens, hidden, generator=generator).to(dtype), teacher_head),
                 name, 1.0, targets, 0.3, name="kd", ce_name="ce"),
    ]  # fmt: skip
    with _LiveLargeStorages(block // 4) as probe:
        total, _ = fused_head_loss(student_head, jobs, vocab_size=vocab, chunk_size=chunk)
        total.backward()
    assert probe.peak <= bound * block, f"{probe.peak / block:.2f} blocks live at once"
    with _LiveLargeStorages(block // 4) as straightforward:  # the probe does see blocks that stay alive
        logits = [
            F.linear(student_input[:chunk].detach().float(), student_head.weight.float()) for _ in range(5)
        ]
    assert straightforward.peak >= 5 * block and len(logits) == 5


# --------------------------------------------------------------------------------------------- trainer level
def _tiny_gpt2(seed: int, layers: int):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=32, n_head=4, vocab_size=TINY_VOCAB, n_positions=64, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _step(tmp_path, student, teacher, batch, chunk, **overrides):
    """Loss, logged term sums and parameter gradients of one training micro-batch."""
    settings = {
        "output_dir": str(tmp_path / f"out{chunk}"), "per_device_train_batch_size": 4, "report_to": [],
        "use_cpu": True, "lens_num_layers": 2, "ce_weight": 0.5, "head_chunk_size": chunk, "disable_tqdm": True,
    }  # fmt: skip
    args = DistillLensConfig(**(settings | overrides))
    trainer = DistillLensTrainer(model=copy.deepcopy(student), args=args, teacher_model=teacher)
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(17))
    loss.backward()
    terms = {name: value.item() for name, value in trainer._term_logs.train_totals.items()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), terms, grads, trainer


MODELS = {
    "llama_untied": lambda: (tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=4, seed=2)),
    "gpt2_tied": lambda: (_tiny_gpt2(1, 3), _tiny_gpt2(2, 4)),
}
OBJECTIVES = {
    "distillens": {},
    "kd_only": {"lens_weight": 0.0, "ce_weight": 0.0},
    "ce_only": {"kd_weight": 0.0, "lens_weight": 0.0, "ce_weight": 1.0},
    "ce_smoothed_with_kd": {"lens_weight": 0.0, "ce_weight": 1.0, "label_smoothing_factor": 0.1},
    "fkl_temperature": {"kd_divergence": "fkl", "lens_divergence": "tvd", "temperature": 1.7},
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("models", list(MODELS))
def test_a_training_step_is_the_same_chunked_or_not(tmp_path, models, objective):
    student, teacher = MODELS[models]()
    batch = pad_batch(token_rows(4, seed=3))
    reference = _step(tmp_path, student, teacher, batch, 0, **OBJECTIVES[objective])
    fused = _step(tmp_path, student, teacher, batch, 5, **OBJECTIVES[objective])
    assert fused[3].objective.fuses_output
    # fp32 models (the training path): ROUNDING_ULPS of fp32's ε of each quantity's magnitude. A term's magnitude
    # is the largest term's (the CE, ~N·log V): a divergence sum near 0 is a difference of entropies of that size
    # (≤ 132 ε of its own value measured, ≤ 3 ε of the largest term's); a gradient's is its parameter's (≤ 20 ε).
    _assert_close(fused[0], reference[0])
    assert fused[1].keys() == reference[1].keys()
    names = sorted(reference[1])
    _assert_close(
        torch.tensor([fused[1][name] for name in names]),
        torch.tensor([reference[1][name] for name in names]),
        msg=f"term sums {names}",
    )
    assert fused[2].keys() == reference[2].keys()
    for name, grad in reference[2].items():
        _assert_close(fused[2][name], grad, msg=name)


def test_a_head_that_is_not_a_plain_linear_falls_back_and_says_why(tmp_path, caplog):
    student, teacher = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=4, seed=2)
    student.lm_head = torch.nn.Sequential(student.lm_head)
    student.get_output_embeddings = lambda: student.lm_head
    assert LogitLens(student).linear_head() is None
    batch = pad_batch(token_rows(4, seed=3))
    with caplog.at_level("INFO", logger="distillens_trainer.loss.objective"):
        fused = _step(tmp_path, student, teacher, batch, 5)
    reference = _step(tmp_path, student, teacher, batch, 0)
    torch.testing.assert_close(fused[0], reference[0])
    assert (
        sum("not a plain nn.Linear" in record.message for record in caplog.records) == 2
    )  # lens, output: once each


def test_a_last_hidden_state_that_is_not_the_head_input_switches_the_fused_output_off(tmp_path, caplog):
    student, teacher = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=4, seed=2)
    batch = pad_batch(token_rows(4, seed=3))
    args = DistillLensConfig(
        output_dir=str(tmp_path / "x"),
        use_cpu=True,
        report_to=[],
        lens_num_layers=2,
        ce_weight=0.5,
        head_chunk_size=5,
    )
    trainer = DistillLensTrainer(model=copy.deepcopy(student), args=args, teacher_model=teacher)
    head = trainer.objective.student_head
    trainer.objective.student_head = LinearHead(head.weight, scale=2.0)  # not what the model computes
    with caplog.at_level("WARNING"):
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(17))
    assert not trainer.objective.fuses_output
    assert any("does not reproduce its logits" in record.message for record in caplog.records)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_the_branch_free_chunk_math_used_under_compile_is_the_same(name):
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(5, 9, generator=generator, dtype=torch.float64)  # the maths: in fp64
    teacher = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    student[0] = float("-inf")
    for logits in (student, student[1:]):  # with and without a dead row
        eager = divergence_chunk(
            name, logits, teacher[: len(logits)], temperature=1.2, beta=0.4, need_grad=True
        )
        branch_free = divergence_chunk(
            name, logits, teacher[: len(logits)], temperature=1.2, beta=0.4, need_grad=True, branch_free=True
        )
        for got, want in zip(branch_free, eager):
            _assert_close(got, want)


def test_a_failing_compilation_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    import distillens_trainer.loss.fused as fused_module

    def broken_compile(*args, **kwargs):
        def compiled(*call_args, **call_kwargs):
            raise RuntimeError("no C++ compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    kernel = fused_module.ChunkDivergence(compile_math=True)  # the compile state of a run, kept across calls
    student_head, teacher_head = _heads()
    student_input, teacher_input = _inputs()
    kwargs = {"divergence": "jsd", "vocab_size": V, "chunk_size": 10}
    with caplog.at_level("WARNING", logger="distillens_trainer.loss.fused"):
        compiled = [
            fused_divergence_sum(
                student_input, teacher_input, student_head, teacher_head, kernel=kernel, **kwargs
            )
            for _ in range(2)
        ]
    eager = fused_divergence_sum(student_input, teacher_input, student_head, teacher_head, **kwargs)
    for value in compiled:
        _assert_same(value, eager, student_input, student_head)
    warnings = [record.message for record in caplog.records if "torch.compile" in record.message]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0]


class _RecordingForward:
    """Wraps a model's forward to record the keyword arguments of each call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[dict] = []
        self._forward = model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self._forward(*args, **kwargs)


def test_the_objective_asks_both_forwards_for_one_position_of_logits_when_the_output_term_is_fused(tmp_path):
    student, teacher = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=4, seed=2)
    args = DistillLensConfig(
        output_dir=str(tmp_path / "x"), use_cpu=True, report_to=[], lens_num_layers=2, head_chunk_size=5
    )
    trainer = DistillLensTrainer(model=copy.deepcopy(student), args=args, teacher_model=teacher)
    student_calls = _RecordingForward(trainer.model).calls
    teacher_calls = _RecordingForward(trainer.teacher_model).calls
    batch = pad_batch(token_rows(4, seed=3))
    trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(17))
    # the first request probes each model once (full logits of a few tokens), then the step itself
    assert [call.get("logits_to_keep") for call in student_calls] == [None, 1]
    assert [call.get("logits_to_keep") for call in teacher_calls] == [None, 1]
    assert all(call["output_hidden_states"] for call in student_calls + teacher_calls)
    trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(17))
    assert len(student_calls) == 3 and student_calls[-1]["logits_to_keep"] == 1  # probed once only


def test_return_outputs_always_gives_the_students_full_logits_and_the_same_loss(tmp_path):
    student, teacher = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=4, seed=2)
    batch = pad_batch(token_rows(4, seed=3))
    args = DistillLensConfig(
        output_dir=str(tmp_path / "x"), use_cpu=True, report_to=[], lens_num_layers=2, head_chunk_size=5
    )
    trainer = DistillLensTrainer(model=copy.deepcopy(student), args=args, teacher_model=teacher)
    fused_loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(17))
    loss, outputs = trainer.compute_loss(
        trainer.model, batch, return_outputs=True, num_items_in_batch=torch.tensor(17)
    )
    assert outputs.logits.shape == (*batch["input_ids"].shape, TINY_VOCAB)
    torch.testing.assert_close(loss, fused_loss, rtol=1e-5, atol=1e-6)
    assert trainer.objective.fuses_output  # full logits for the caller did not switch the fused path off


def test_evaluation_with_compute_metrics_keeps_the_output_term_fused_and_the_teacher_logits_unmade(tmp_path):
    from datasets import Dataset

    student, teacher = tiny_llama(num_layers=3, seed=1), tiny_llama(num_layers=4, seed=2)
    rows = Dataset.from_list(token_rows(6, seed=3))
    seen: list[tuple] = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"mean_logit": float(prediction.predictions.mean())}

    metrics = {}
    for chunk_size in (5, 0):
        args = DistillLensConfig(
            output_dir=str(tmp_path / str(chunk_size)), use_cpu=True, report_to=[], lens_num_layers=2,
            head_chunk_size=chunk_size, per_device_eval_batch_size=3, ce_weight=0.5,
            remove_unused_columns=False,  # the recording wrapper hides the forward's signature
        )  # fmt: skip
        trainer = DistillLensTrainer(
            model=copy.deepcopy(student), args=args, teacher_model=teacher, eval_dataset=rows,
            data_collator=pad_batch, compute_metrics=compute_metrics,
        )  # fmt: skip
        student_calls = _RecordingForward(trainer.model).calls
        teacher_calls = _RecordingForward(trainer.teacher_model).calls
        metrics[chunk_size] = trainer.evaluate()
        if chunk_size:
            # after the one-time head probe: the student's full logits for the metrics, the teacher's for one position
            assert [call.get("logits_to_keep") for call in student_calls[1:]] == [None, None]
            assert [call.get("logits_to_keep") for call in teacher_calls[1:]] == [1, 1]
    assert seen[0] == seen[1] and seen[0][-1] == TINY_VOCAB
    keys = ("eval_loss", "eval_kd_loss", "eval_ce_loss", "eval_lens_loss", "eval_mean_logit")
    # fp32, at the magnitude of the largest metric (a small divergence is a difference of entropies that size)
    _assert_close(
        torch.tensor([metrics[5][key] for key in keys]),
        torch.tensor([metrics[0][key] for key in keys]),
        msg=keys,
    )
