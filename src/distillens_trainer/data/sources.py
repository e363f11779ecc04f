"""Reading raw instruction data: local files, ``save_to_disk`` folders, hub datasets; splits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow
from datasets.exceptions import DatasetGenerationError

from .arguments import DataArguments
from .json_lines import json_file_problem, line_of_row
from .prompts import find_unusable_cell

# File extension -> `datasets` packaged builder.
FILE_BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Suffixes that mark a missing *file* (rather than a hub dataset id) when the path does not exist.
_FILE_LIKE_SUFFIXES = frozenset({*FILE_BUILDERS, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".xz", ".zst"})
# Extensions `datasets` reads as data files in a folder -> the builder: a folder must hold one kind only.
_FOLDER_DATA_BUILDERS: dict[str, str] = {
    **FILE_BUILDERS,
    ".ndjson": "json",
    ".tsv": "csv",
    ".arrow": "arrow",
    ".txt": "text",
}
# Fixed seed for carving a validation split from train, so the eval set does not move with --seed.
VALIDATION_SPLIT_SEED = 42


def load_raw_dataset(
    source: str, split: str = "train", config_name: str | None = None, *, field: str | None = None
) -> datasets.Dataset:
    """Load one split of raw rows from a local file, a local folder or the hub.

    - an existing ``.json``/``.jsonl``/``.csv``/``.parquet`` file: all its rows (`split` is ignored);
    - an existing ``save_to_disk`` folder: the stored ``Dataset``, or ``split`` of a stored ``DatasetDict``;
    - another existing folder: ``datasets.load_dataset(folder, config_name, split=split)`` (data files);
    - anything else that does not look like a file path: a hub dataset id, via ``datasets.load_dataset``.

    CSV cells are read as text: empty cells stay ``""`` and strings such as ``"NA"`` are not turned into nulls.
    A file or folder that cannot be read is a one-line ValueError naming it (and `field`, the flag that gave it),
    with the line number of the first bad line of a JSON Lines file.
    """
    path = Path(source).expanduser()
    label = f"{field}: " if field else ""
    if path.is_dir():
        return _load_directory(path, split, config_name, label)
    if path.is_file():
        return _load_file(path, label)
    if _looks_like_file_path(source):
        raise ValueError(f"Data file not found: {source!r} (relative paths resolve from {Path.cwd()}).")
    return datasets.load_dataset(source, config_name, split=split)


def _looks_like_file_path(source: str) -> bool:
    """True when a non-existent `source` was meant as a local path rather than a hub dataset id."""
    return source.startswith(("/", ".", "~")) or Path(source).suffix.lower() in _FILE_LIKE_SUFFIXES


def _load_file(path: Path, label: str = "") -> datasets.Dataset:
    """All rows of one local data file, picking the `datasets` builder from the extension."""
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        supported = ", ".join(sorted(FILE_BUILDERS))
        raise ValueError(
            f"Unsupported data file extension {path.suffix!r} for {str(path)!r}; use one of {supported} "
            "or a datasets.save_to_disk folder."
        )
    try:
        size = path.stat().st_size
        if size == 0 or (size < 4096 and not path.read_bytes().strip()):
            raise ValueError(f"Data file {str(path)!r} is empty: give a file with at least one example.")
    except OSError as error:
        raise ValueError(f"{label}{path}: cannot be read ({error.strerror}): make it readable.") from None
    options: dict[str, Any] = {"keep_default_na": False} if builder == "csv" else {}
    with _unreadable_data_named([path], builder, label):
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)


@contextlib.contextmanager
def _unreadable_data_named(files: list[Path], builder: str, label: str) -> Iterator[None]:
    """Turn a `datasets` failure to read `files` into one line naming the file (and, for JSON, the line)."""
    try:
        yield
    except (DatasetGenerationError, pyarrow.ArrowException, UnicodeDecodeError, ValueError) as error:
        if builder == "json":
            problem = next(filter(None, (json_file_problem(file, label) for file in files)), None)
            if problem is not None:
                raise ValueError(problem) from error
        cause = error.__cause__ or error
        where = files[0] if len(files) == 1 else files[0].parent
        reason = " ".join(str(cause).split()) or type(cause).__name__
        raise ValueError(
            f"{label}{where}: cannot be read as {builder} data ({reason}); check its format."
        ) from error


def _load_directory(path: Path, split: str, config_name: str | None, label: str = "") -> datasets.Dataset:
    """One split of a ``save_to_disk`` folder, or of a folder of data files (of one format)."""
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        files = folder_data_files(path)
        builders = sorted({_FOLDER_DATA_BUILDERS[file.suffix.lower()] for file in files})
        if len(builders) > 1:
            suffixes = ", ".join(sorted({file.suffix.lower() for file in files}))
            raise ValueError(
                f"{label}{path}: a folder of data files of several formats ({suffixes}), of which datasets would "
                "read one and skip the rest: keep one format in the folder, or give a single file."
            )
        if not builders:
            raise ValueError(
                f"{label}{path}: a folder without data files ({', '.join(sorted(_FOLDER_DATA_BUILDERS))}) "
                "or a datasets.save_to_disk folder: give the folder that holds them, or a single file."
            )
        with _unreadable_data_named(files, builders[0], label):
            return datasets.load_dataset(str(path), config_name, split=split)
    stored = datasets.load_from_disk(str(path))
    if isinstance(stored, datasets.Dataset):
        return stored
    if split not in stored:
        raise ValueError(
            f"Split {split!r} not found in {str(path)!r} (it has {', '.join(stored)}); "
            "set --train_split / --validation_split to one of those."
        )
    return stored[split]


def folder_data_files(path: Path) -> list[Path]:
    """The data files (by extension) in a folder and its subfolders, hidden ones left out, sorted."""
    files = (file for file in path.rglob("*") if file.is_file())
    return sorted(
        file
        for file in files
        if file.suffix.lower() in _FOLDER_DATA_BUILDERS
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )


def describe_row(source: str, index: int) -> str:
    """Where row `index` (0-based) of `source` is, for an error line: ``file:line`` for a JSON Lines file,
    else ``source row N``."""
    path = Path(source).expanduser()
    if path.is_file() and FILE_BUILDERS.get(path.suffix.lower()) == "json":
        line = line_of_row(path, index)
        if line is not None:
            return f"{path}:{line}"
    return f"{source} row {index + 1}"


def check_rows(dataset: datasets.Dataset, source: str, data_args: DataArguments, field: str) -> None:
    """ValueError (one line, ``<field>: <file>:<line>: ...``) for the first row of `dataset`, as read from
    `source`, whose cells cannot be trained on (:func:`~.prompts.find_unusable_cell`)."""
    problem = find_unusable_cell(dataset, data_args)
    if problem is not None:
        index, what = problem
        raise ValueError(f"{field}: {describe_row(source, index)}: {what}")


def load_raw_splits(data_args: DataArguments) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """The raw (untokenised) train and eval rows described by `data_args`, before any row limit.

    Eval rows come from, in order: --validation_file; --validation_split of the train source (a hub dataset or
    a save_to_disk folder); a --validation_split_percentage share of train carved with a fixed seed; else none.
    """
    train_source = data_args.train_file or data_args.dataset_name
    if train_source is None and data_args.validation_file is None:
        raise ValueError("No data given: set --train_file, --dataset_name or --validation_file.")
    for flag in ("train_file", "validation_file"):
        path = getattr(data_args, flag)
        if path is not None and not Path(path).expanduser().exists():
            raise ValueError(f"--{flag}: no such file or folder: {path!r}.")
    for path in data_args.decontaminate_files or ():
        if not Path(path).expanduser().is_file():
            raise ValueError(f"--decontaminate_files: no such file: {path!r}.")

    train = None
    if train_source is not None:
        train_field = "--train_file" if data_args.train_file else "--dataset_name"
        train = load_raw_dataset(
            train_source, data_args.train_split, data_args.dataset_config_name, field=train_field
        )
        check_rows(train, train_source, data_args, train_field)

    evaluation = None
    if data_args.validation_file is not None:
        evaluation = load_raw_dataset(
            data_args.validation_file, data_args.validation_split or "validation", field="--validation_file"
        )
        check_rows(evaluation, data_args.validation_file, data_args, "--validation_file")
    elif data_args.validation_split is not None:
        if train_source is None:
            raise ValueError(
                "--validation_split picks a split of --dataset_name or --train_file; set one of them."
            )
        if data_args.train_file is not None and Path(data_args.train_file).expanduser().is_file():
            raise ValueError(
                f"--validation_split cannot pick a split of the single file {data_args.train_file!r}; "
                "use --validation_file or --validation_split_percentage instead."
            )
        evaluation = load_raw_dataset(train_source, data_args.validation_split, data_args.dataset_config_name)
        check_rows(evaluation, train_source, data_args, "--validation_split")
    elif data_args.validation_split_percentage and train is not None:
        train, evaluation = carve_validation_split(train, data_args.validation_split_percentage)
    return train, evaluation


def carve_validation_split(
    dataset: datasets.Dataset, percentage: int, seed: int = VALIDATION_SPLIT_SEED
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, eval): a shuffled `percentage`% of rows (at least one) held out; deterministic for a given seed."""
    n_eval = max(1, round(len(dataset) * percentage / 100))
    if n_eval >= len(dataset):
        raise ValueError(
            f"--validation_split_percentage={percentage} leaves no training rows out of {len(dataset)}; "
            "lower it or give --validation_file."
        )
    parts = dataset.train_test_split(test_size=n_eval, shuffle=True, seed=seed)
    return parts["train"], parts["test"]


def first_rows(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` rows (all rows when `limit` is None or exceeds the length)."""
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.select(range(limit))
