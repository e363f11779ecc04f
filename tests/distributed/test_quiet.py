"""Other libraries' notices about features not in use stay off the console."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

from distillens_trainer.distributed.quiet import (
    ACCELERATE_DEEPSPEED_VARIABLE,
    DEEPSPEED_CPU_NOTICE,
    DropDeepSpeedCpuNotice,
    hide_deepspeed_cpu_notice,
    mentions_deepspeed,
)

NOTICE = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, message, None, None)


def test_only_deepspeeds_cpu_notice_is_dropped():
    drop = DropDeepSpeedCpuNotice()
    assert not drop.filter(_record(NOTICE))
    assert drop.filter(_record("DeepSpeed info: version=0.19"))


def test_hiding_is_installed_once_and_undone_for_a_deepspeed_run():
    deepspeed_logger = logging.getLogger("DeepSpeed")
    before = list(deepspeed_logger.filters)
    try:
        hide_deepspeed_cpu_notice()
        hide_deepspeed_cpu_notice()
        assert sum(isinstance(item, DropDeepSpeedCpuNotice) for item in deepspeed_logger.filters) == 1
        hide_deepspeed_cpu_notice(False)
        assert not any(isinstance(item, DropDeepSpeedCpuNotice) for item in deepspeed_logger.filters)
    finally:
        deepspeed_logger.filters[:] = before


def test_a_process_accelerate_launched_with_deepspeed_keeps_the_notice(monkeypatch):
    deepspeed_logger = logging.getLogger("DeepSpeed")
    monkeypatch.setattr(deepspeed_logger, "filters", [])
    monkeypatch.setenv(ACCELERATE_DEEPSPEED_VARIABLE, "true")
    hide_deepspeed_cpu_notice()
    assert not any(isinstance(item, DropDeepSpeedCpuNotice) for item in deepspeed_logger.filters)
    monkeypatch.setenv(ACCELERATE_DEEPSPEED_VARIABLE, "false")
    hide_deepspeed_cpu_notice()
    assert any(isinstance(item, DropDeepSpeedCpuNotice) for item in deepspeed_logger.filters)


def test_a_command_line_asks_for_deepspeed_by_flag_or_in_its_config_file(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("deepspeed: examples/deepspeed/zero2.json\n")
    assert mentions_deepspeed(["--deepspeed", "ds.json"]) and mentions_deepspeed(
        [str(config), "--max_steps", "1"]
    )
    assert not mentions_deepspeed(["--model_name_or_path", "m", "--output_dir", "o"])


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed prints its CPU notice only without a GPU")
@pytest.mark.parametrize("uses_deepspeed", [False, True])
def test_importing_the_package_keeps_an_unused_deepspeed_quiet(uses_deepspeed):
    code = "import distillens_trainer\n"
    if uses_deepspeed:  # what the entry point and DistillLensTrainer do for a run that sets deepspeed
        code += "distillens_trainer.distributed.quiet.hide_deepspeed_cpu_notice(False)\n"
    code += "import deepspeed\n"
    # DS_ACCELERATOR (set by tests/launching.py for launched runs) makes DeepSpeed skip the detection that warns
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DS_ACCELERATOR", ACCELERATE_DEEPSPEED_VARIABLE)
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True, env=env
    )
    assert (DEEPSPEED_CPU_NOTICE in done.stdout + done.stderr) is uses_deepspeed
