"""Shared fixtures: tiny random causal LMs and token datasets (no network, CPU, seconds).

Tests that read ``../shared`` (the GPT-2 tokenizer and the MiniLLM data kept beside the checkout, read-only)
carry the ``needs_shared`` marker and reach their files through :func:`shared_path` (or a fixture that
does), never by testing ``Path.exists()`` themselves. One mechanism decides what happens:

* ``../shared`` absent (a clean clone): every ``needs_shared`` test is skipped before its fixtures run, all
  with the same reason from the same place, so the run reports it once (a report-header line and one
  folded ``SKIPPED [n]`` line), not once per test. With ``CI`` set they fail instead: CI has the folder.
* ``../shared`` present but a file a test asks for missing: with the environment variable ``CI`` set (as
  ``.ci/run`` does) the test FAILS; otherwise it is skipped naming the file, and the end of the run says
  so in a ``needs_shared`` section: never silently.
* a test that calls :func:`shared_path` without the marker fails, so a clean clone cannot break.

``DISTILLENS_SHARED_DIR`` overrides where ``shared`` is looked for (default: ``../shared`` beside the
checkout); point it at a folder that does not exist to see what a clean clone sees, e.g.
``DISTILLENS_SHARED_DIR=/nonexistent python -m pytest -q tests/data/test_data.py``, or at a copy with a file
removed, plus ``CI=true``, to see the failure.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest
import torch
import transformers

SHARED_DIR = Path(
    os.environ.get("DISTILLENS_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared"
).resolve()
GPT2_TOKENIZER_DIR = SHARED_DIR / "tokenizers" / "gpt2"
DATA_DIR = SHARED_DIR / "data"

NEEDS_SHARED = "needs_shared"
SHARED_ABSENT_REASON = (
    f"{NEEDS_SHARED}: {SHARED_DIR} does not exist (a clean clone); "
    "put the shared tokenizers and data there or set DISTILLENS_SHARED_DIR"
)
SHARED_FILE_MISSING = "is missing although"  # in the skip reason of a test whose shared file is missing
_running: list[pytest.Item] = []  # [the test being set up or run], for shared_path()


def in_ci() -> bool:
    """``CI`` is set (``.ci/run`` and most CI services set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def shared_path(path: Path | str) -> Path:
    """``path`` (absolute, or relative to the shared folder) for a ``needs_shared`` test: returned when it
    exists, otherwise skipped or failed as the module docstring says."""
    path = Path(path) if Path(path).is_absolute() else SHARED_DIR / path
    test = _running[0] if _running else None
    if test is not None and test.get_closest_marker(NEEDS_SHARED) is None:
        pytest.fail(f"{test.nodeid} reads {path}: mark it @pytest.mark.{NEEDS_SHARED}", pytrace=False)
    if path.exists():
        return path
    if not SHARED_DIR.is_dir():  # not a marked test's setup or call: the hook below skips those first
        pytest.fail(f"{path}: {SHARED_DIR} is absent; only {NEEDS_SHARED} tests may read it", pytrace=False)
    if in_ci():
        pytest.fail(f"{NEEDS_SHARED}: {path} is missing although {SHARED_DIR} exists (CI)", pytrace=False)
    pytest.skip(f"{NEEDS_SHARED}: {path} {SHARED_FILE_MISSING} {SHARED_DIR} exists")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _running[:] = [item]
    if item.get_closest_marker(NEEDS_SHARED) is not None and not SHARED_DIR.is_dir():
        if in_ci():  # CI has the shared folder beside its clone: a test skipped there would hide a failure
            pytest.fail(f"{SHARED_ABSENT_REASON} (CI is set: it must be there)", pytrace=False)
        pytest.skip(SHARED_ABSENT_REASON)  # one place, one reason: folded into one line by `-ra`


def pytest_report_header(config: pytest.Config) -> str:
    state = "present" if SHARED_DIR.is_dir() else f"ABSENT: tests marked {NEEDS_SHARED} are skipped"
    return f"shared resources: {SHARED_DIR} ({state}){'; CI is set' if in_ci() else ''}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Skips for a file missing from a present shared folder are said again at the end, loudly."""
    reasons = [
        report.longrepr[2].removeprefix("Skipped: ")
        for report in terminalreporter.stats.get("skipped", [])
        if isinstance(report.longrepr, tuple) and SHARED_FILE_MISSING in report.longrepr[2]
    ]
    if reasons:
        terminalreporter.section(f"{NEEDS_SHARED}: files missing from {SHARED_DIR}", sep="-", yellow=True)
        terminalreporter.line(f"{len(reasons)} test(s) skipped; with CI set they fail instead:", yellow=True)
        for reason in sorted(set(reasons)):
            terminalreporter.line(f"  {reason}", yellow=True)


# Numerical tolerances, one rule for any x86-64 CPU and thread count.
#
# A value or gradient compared in a test is usually a sum over many terms, and the two sides sum in different
# orders (chunked or not, and in whatever blocks the CPU's matrix product and reduction kernels choose for its
# vector width and thread count), so they differ by a few ε of the LARGEST magnitude involved, which an
# element-wise rtol does not see: a gradient element near 0 amid elements of ~1,700 is off by ~300 ε of itself
# (tests/loss/test_fused.py failed so on an AVX-512 EPYC at 2 threads). Comparisons allow ROUNDING_ULPS · ε(dtype) ·
# max|reference| per element: 256 ε is > 10× the worst measured in tests/loss/test_fused.py (≤ 20 ε, fp32 and fp64, 1 and
# 2 threads), and in fp64, where the tests of the maths run, it is ~6e-14 relative: no error in the maths hides in
# it. Only tests of the fp32 and bf16 paths themselves compare at their own ε.
ROUNDING_ULPS = 256


def assert_close_to_reference(
    got: torch.Tensor,
    want: torch.Tensor,
    *,
    eps: float | None = None,
    ulps: float = ROUNDING_ULPS,
    msg: str | None = None,
) -> None:
    """``got`` ≈ ``want`` within ``ulps · eps · max|want|`` per element (``eps``: that of ``got``'s dtype)."""
    eps = torch.finfo(got.dtype).eps if eps is None else eps
    want = torch.as_tensor(want).detach().double()
    atol = ulps * eps * float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.detach().double(), want, rtol=0, atol=atol, msg=msg)


TINY_TRAINING_SCRIPT = Path(__file__).resolve().parent / "distributed" / "train_tiny.py"

TINY_VOCAB = 64
PAD_ID, EOS_ID = 2, 1


def tiny_llama(
    num_layers: int = 4, hidden: int = 32, vocab: int = TINY_VOCAB, seed: int = 0, max_positions: int = 2048
):
    """A tiny random Llama causal LM (eager attention, fp32) with a context of `max_positions`."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        bos_token_id=0,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        max_position_embeddings=max_positions,
    )
    return transformers.LlamaForCausalLM(config)


def token_rows(num_rows: int, seed: int = 0, vocab: int = TINY_VOCAB, min_len: int = 6, max_len: int = 14):
    """Random sequences with a masked prompt: dicts of input_ids / attention_mask / labels lists."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        length = rng.randint(min_len, max_len)
        ids = [rng.randint(3, vocab - 1) for _ in range(length)]
        prompt_length = rng.randint(1, length - 2)
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * length,
                "labels": [-100] * prompt_length + ids[prompt_length:],
            }
        )
    return rows


def pad_batch(
    rows: list[dict], padding_side: str = "right", pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Collate rows into padded LongTensors (pad id, mask 0, label -100)."""
    length = max(pad_to or 0, *(len(row["input_ids"]) for row in rows))
    batch = {}
    for key, pad in (("input_ids", PAD_ID), ("attention_mask", 0), ("labels", -100)):
        padded = []
        for row in rows:
            filler = [pad] * (length - len(row[key]))
            padded.append(filler + row[key] if padding_side == "left" else row[key] + filler)
        batch[key] = torch.tensor(padded)
    return batch


@pytest.fixture
def gpt2_tokenizer():
    """The shared GPT-2 tokenizer: for tests marked ``needs_shared``."""
    return transformers.AutoTokenizer.from_pretrained(str(shared_path(GPT2_TOKENIZER_DIR)))


def import_script(path: Path, name: str):
    """A script that is not part of the package (a benchmark, a torchrun target) imported as a module."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def load_tiny_training_script():
    """``tests/distributed/train_tiny.py`` (the script torchrun launches) imported as a module."""
    return import_script(TINY_TRAINING_SCRIPT, "distillens_train_tiny")


@pytest.fixture(scope="session")
def tiny_run_models(tmp_path_factory) -> Path:
    """The teachers (Llama, Qwen2) and the student of ``tests/distributed/train_tiny.py``, saved once per session."""
    directory = tmp_path_factory.mktemp("tiny_models")
    load_tiny_training_script().make_models(directory)
    return directory


@pytest.fixture(scope="session")
def gpt2_cli_models(tmp_path_factory) -> Path:
    """A 4-block GPT-2 teacher and a 2-block student folder with the shared GPT-2 tokenizer (for CLI tests)."""
    root = tmp_path_factory.mktemp("gpt2_cli_models")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(shared_path(GPT2_TOKENIZER_DIR)))
    for name, layers in (("teacher", 4), ("student", 2)):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=len(tokenizer))
        transformers.GPT2LMHeadModel(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root
