"""Launching ``tests/distributed/train_tiny.py`` on 2 CPU processes (torchrun or accelerate launch), shared by the
DeepSpeed and FSDP2 tests: the environment, a log per launch, a timeout that ends every worker, the result."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from conftest import TINY_TRAINING_SCRIPT

ROOT = Path(__file__).resolve().parents[1]
HELPER = TINY_TRAINING_SCRIPT
LAUNCH_TIMEOUT_S = 300  # each launch takes ~20-25 s on 2 CPU cores


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    env["PYTHONFAULTHANDLER"] = "1"  # a worker that crashes prints every thread's Python stack into the log
    return env


def run_logged(command: list[str], log: Path) -> None:
    """Run a launcher with its output in ``log``; fail with the log's last words if it fails or hangs."""
    with log.open("w") as handle:
        # A session of its own, so a hang (e.g. ranks out of lockstep under ZeRO-3) can be ended with
        # every worker process, not only the launcher.
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=launch_env(),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
    assert returncode == 0, f"{' '.join(command)} failed (exit {returncode}):\n{distinct_tail(log)}"


def launch(launcher: list[str], out: Path, models: Path, *extra: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [*launcher, str(HELPER), "train", "--models", str(models), "--out", str(out), *extra]
    run_logged(command, out / "launch.log")
    return json.loads((out / "result.json").read_text())


def distinct_tail(log: Path, lines: int = 60) -> str:
    """The log's last lines, each distinct line once: the ranks repeat the same warnings hundreds of times,
    which would push the worker's own last words (e.g. an abort at exit) out of a plain tail."""
    text = log.read_text(errors="replace")
    distinct = dict.fromkeys(line for line in text.splitlines() if line.strip())
    return "\n".join(list(distinct)[-lines:])


def torchrun_launcher() -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*launcher, "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def torchrun(out: Path, models: Path, *extra: str) -> dict:
    return launch(torchrun_launcher(), out, models, *extra)


def logged_steps(result: dict) -> list[dict]:
    return [entry for entry in result["log_history"] if "loss" in entry and "train_runtime" not in entry]


def cli_train_command(models: Path, teacher: str, folder: Path) -> tuple[list[str], Path]:
    """``distillens train`` under torchrun x 2 on 8 tiny instruction rows (written to ``folder``): the student of
    ``models`` against its ``teacher`` folder, 2 steps, DDP over gloo (``--use_cpu``); returns the command and its
    ``output_dir``."""
    rows = [{"instruction": f"Repeat w{i}", "input": "", "output": f"w{i} w{i + 1}"} for i in range(8)]
    train_file = folder / "train.jsonl"
    train_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = folder / "student"
    command = [*torchrun_launcher(), "-m", "distillens_trainer.cli", "train"]
    command += ["--model_name_or_path", str(models / "student"), "--output_dir", str(out)]
    command += ["--teacher_model_name_or_path", str(models / teacher), "--train_file", str(train_file)]
    command += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--lens_num_layers", "2"]
    command += ["--prompt_template", "plain", "--max_length", "32", "--max_prompt_length", "16"]
    command += ["--use_cpu", "true", "--report_to", "none"]
    return command, out
