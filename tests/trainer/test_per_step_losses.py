"""A fixed tiny training run logs the same per-step losses as before the package restructure.

The expected values (``per_step_losses.json``) were recorded before the library was split into packages. The
runs use float64 models, so the only machine-dependent rounding is far below the float32 the Trainer logs in:
on the machine that recorded them the losses are bit-identical; elsewhere they may differ by the last bit
of a float32 when a float64 value falls next to a rounding boundary, which the 2-ulp allowance covers. Any change
to the loss, the token normalisation, the layer pairs, the data order or the optimizer step moves them by far more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from distillens_trainer import DistillLensConfig, DistillLensTrainer

from conftest import pad_batch, tiny_llama, token_rows

EXPECTED = json.loads((Path(__file__).with_name("per_step_losses.json")).read_text(encoding="utf-8"))["runs"]
RUNS = {
    "paper_defaults": {},
    "ce_kd_fkl_lens_skl_accumulated": {
        "ce_weight": 0.5,
        "kd_divergence": "fkl",
        "lens_divergence": "skl",
        "gradient_accumulation_steps": 2,
    },
    "unfused_tvd": {"kd_divergence": "tvd", "lens_divergence": "jsd", "head_chunk_size": 0},
}
FLOAT32_ULP = 2.0**-23


class _LoggedLosses(TrainerCallback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.values.append(float(logs["loss"]))


def _per_step_losses(tmp_path: Path, overrides: dict) -> list[float]:
    student = tiny_llama(num_layers=3, hidden=32, seed=1).to(torch.float64)
    teacher = tiny_llama(num_layers=6, hidden=48, seed=2).to(torch.float64)
    args = DistillLensConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=5,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        lens_num_layers=2,
        seed=0,
        disable_tqdm=True,
        **overrides,
    )
    losses = _LoggedLosses()
    trainer = DistillLensTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(token_rows(40)),
        data_collator=pad_batch,
        callbacks=[losses],
    )
    trainer.train()
    return losses.values


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_fixed_tiny_run_logs_the_recorded_per_step_losses(tmp_path, name):
    got = _per_step_losses(tmp_path, RUNS[name])
    want = EXPECTED[name]
    assert len(got) == len(want) == 5
    for step, (value, recorded) in enumerate(zip(got, want, strict=True), start=1):
        assert abs(value - recorded) <= 2 * FLOAT32_ULP * abs(recorded), (
            name,
            step,
            value.hex(),
            recorded.hex(),
        )
