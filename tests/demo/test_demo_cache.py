"""The demo's cache methods: ``distillens`` trained from a teacher cache built once in the demo's cache folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distillens_demo import DemoArguments, get_student_init, get_teacher, train_student
from distillens_demo.arguments import METHOD_DESCRIPTIONS, METHODS
from distillens_demo.models import training
from distillens_demo.models.training import get_teacher_signals, method_objective

CACHE_METHODS = ("distillens_hidden", "distillens_topk8", "distillens_topk32", "distillens_topk128")


def test_the_cache_methods_are_distillens_with_a_teacher_cache(tmp_path):
    args = DemoArguments(output_dir=str(tmp_path), preset="smoke")
    for method in CACHE_METHODS:
        assert method_objective(method, args) == method_objective("distillens", args)  # the same loss
        assert METHOD_DESCRIPTIONS[method].startswith(METHOD_DESCRIPTIONS["distillens"])
    assert METHODS["distillens_hidden"]["teacher_cache"] == {"mode": "hidden", "dtype": "float32"}
    for k in (8, 32, 128):
        assert METHODS[f"distillens_topk{k}"]["teacher_cache"] == {
            "mode": "topk",
            "top_k": k,
            "dtype": "bfloat16",
        }
    assert all("teacher_cache" not in METHODS[method] for method in METHODS if method not in CACHE_METHODS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A few-step teacher, a random initial student and the suite, cached in a folder of their own."""
    root = tmp_path_factory.mktemp("demo_cache")
    args = DemoArguments(
        output_dir=str(root / "out"), preset="smoke", cache_dir=str(root / "cache"), tasks=["copy_text"],
        num_train=48, num_eval=8, num_test=8, teacher_max_steps=4, student_warmup_steps=0, student_max_steps=4,
        batch_size=8, logging_steps=2, methods=["distillens", *CACHE_METHODS],
    )  # fmt: skip
    teacher, suite, _ = get_teacher(args, root / "out" / "data", root / "work")
    initial, _ = get_student_init(args, suite, root / "work")
    return args, teacher, suite, initial, root


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.parameters()]


@pytest.mark.slow
def test_an_fp32_hidden_cache_trains_the_same_student_as_the_teacher_model(tiny, monkeypatch):
    args, teacher, suite, initial, root = tiny
    online, online_run = train_student("distillens", initial, teacher, suite, args, root / "distillens")
    cached, cached_run = train_student("distillens_hidden", initial, teacher, suite, args, root / "hidden")

    for got, expected in zip(_params(cached), _params(online), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(_params(online)[0], _params(initial)[0])  # it did train
    assert cached_run.final_lens_loss == pytest.approx(online_run.final_lens_loss, rel=1e-4)
    assert cached_run.layer_map == online_run.layer_map
    recorded = cached_run.objective.pop("teacher_cache")
    assert recorded["mode"] == "hidden" and recorded["dtype"] == "float32"
    assert Path(recorded["path"]).parent == root / "cache"
    assert Path(recorded["path"]).name.startswith("teacher-signals-")
    assert cached_run.objective == online_run.objective

    # a method trained after a cache method is the same as before: building a cache draws no random numbers
    again, _ = train_student("distillens", initial, teacher, suite, args, root / "distillens-again")
    assert all(torch.equal(a, b) for a, b in zip(_params(again), _params(online), strict=True))

    # the second use of a cache reuses it: nothing is built
    monkeypatch.setattr(training, "write_teacher_cache", pytest.fail)
    cache = METHODS["distillens_hidden"]["teacher_cache"]
    assert str(get_teacher_signals(cache, teacher, initial, suite, args)) == recorded["path"]


@pytest.mark.slow
def test_a_top_k_cache_method_trains_from_its_own_cache_without_the_teacher(tiny):
    args, teacher, suite, initial, root = tiny
    student, run = train_student("distillens_topk8", initial, teacher, suite, args, root / "topk8")
    assert run.objective["teacher_cache"]["top_k"] == 8
    assert run.final_kd_loss is not None and run.final_lens_loss is not None
    assert not torch.equal(_params(student)[0], _params(initial)[0])
    other = get_teacher_signals(METHODS["distillens_topk32"]["teacher_cache"], teacher, initial, suite, args)
    assert other.parent == root / "cache" and str(other) != run.objective["teacher_cache"]["path"]  # one each
