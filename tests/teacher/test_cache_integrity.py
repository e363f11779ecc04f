"""A teacher cache is used only as its manifest records it: every shard and the head match their sha256, the
manifest its own checksum, a named teacher the recorded fingerprint; a rebuild repairs what does not match."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from test_teacher_cache import (
    _cache,
    _cached,
    _cli,
    _data_flags,
    _online,
    _shard_digests,
)

from distillens_trainer.teacher.cache import writer as writer_module
from distillens_trainer.teacher.cache.format import (
    HEAD_NAME,
    MANIFEST_NAME,
    SHARD_GLOB,
    CacheSettings,
    batch_row_keys,
    file_sha256,
)
from distillens_trainer.teacher.cache.reader import TeacherCache

from conftest import DATA_DIR, PAD_ID, pad_batch, shared_path, tiny_llama, token_rows


def _flip_byte(path, offset_from_end: int = 40) -> None:
    """Change one byte inside ``path``, keeping its size (a byte of the last row's tensor data)."""
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


def _built(tmp_path, **settings):
    rows = token_rows(12, seed=4)
    student, teacher = tiny_llama(3, 32, seed=1), tiny_llama(6, 48, seed=2)
    online = _online(tmp_path, student, teacher, rows)
    return rows, student, online, _cache(tmp_path, online, rows, **settings)


@pytest.fixture
def built(tmp_path):
    """(rows, student, online trainer, hidden fp32 cache folder with two shards)."""
    return _built(tmp_path)


def _count_teacher_batches(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    real = writer_module.teacher_row_signals

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "teacher_row_signals", counted)
    return calls


# ============================================================================================ refused before training
def test_a_shard_changed_in_place_is_refused_before_training(tmp_path, built):
    rows, student, _, cache = built
    shard = sorted((tmp_path / "cache").glob(SHARD_GLOB))[1]
    size = shard.stat().st_size
    _flip_byte(shard)
    assert shard.stat().st_size == size
    with pytest.raises(ValueError) as error:
        _cached(tmp_path, student, cache, rows)
    message = str(error.value)
    assert (
        f"'{shard.name}' in {cache} does not match its sha256 in manifest.json (damaged or changed)"
        in message
    )
    assert f"rebuild it with distillens cache-teacher --output_dir {cache}" in message
    assert "\n" not in message


def test_a_truncated_shard_is_refused_naming_its_size(tmp_path, built):
    rows, student, _, cache = built
    shard = sorted((tmp_path / "cache").glob(SHARD_GLOB))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=rf"'{shard.name}' in .* has \d+ bytes, but manifest.json records \d+"
    ):
        _cached(tmp_path, student, cache, rows)


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_changed_or_missing_teacher_head_is_refused_before_training(tmp_path, built, damage):
    rows, student, _, cache = built
    head = tmp_path / "cache" / HEAD_NAME
    if damage == "changed":
        _flip_byte(head, offset_from_end=8)
        expected = f"'{HEAD_NAME}' in {cache} does not match its sha256"
    else:
        head.unlink()
        expected = f"'{HEAD_NAME}' in {cache} is missing"
    with pytest.raises(ValueError, match=expected):
        _cached(tmp_path, student, cache, rows)
    opened = TeacherCache.open(cache, verify=False)  # read without the check, the head is still one line
    if damage == "missing":
        with pytest.raises(ValueError, match=f"'{HEAD_NAME}' in {cache} is missing"):
            opened.teacher_head("cpu")


def test_an_edited_manifest_is_refused(tmp_path, built):
    rows, student, _, cache = built
    path = tmp_path / "cache" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["settings"]["lens_final_norm"] = not manifest["settings"]["lens_final_norm"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"'manifest\.json' in .* does not match its own checksum"):
        _cached(tmp_path, student, cache, rows)


def test_a_cache_of_an_older_format_names_the_rebuild(tmp_path, built):
    rows, student, _, cache = built
    path = tmp_path / "cache" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=r"format_version 1; .* --overwrite_output_dir true"):
        _cached(tmp_path, student, cache, rows)


def test_corrupted_top_k_ids_are_one_line_naming_the_shard(tmp_path):
    rows, _, _, cache = _built(tmp_path, mode="topk", top_k=8)
    shard = sorted((tmp_path / "cache").glob(SHARD_GLOB))[0]
    table = Dataset.from_file(str(shard))
    ids = bytes(table[0]["ids6"])
    data = shard.read_bytes()
    assert data.count(ids) == 1
    shard.write_bytes(data.replace(ids, b"\xff\xff" + ids[2:]))  # token id 65535 in a vocabulary of 64
    with pytest.raises(ValueError, match="does not match its sha256"):
        TeacherCache.open(cache)
    opened = TeacherCache.open(cache, verify=False)  # a damage the sha256 did not see (e.g. a writer's bug)
    batch = pad_batch([row for row in rows if batch_row_keys(pad_batch([row]))[0] == table[0]["row_key"]])
    with pytest.raises(
        ValueError, match=rf"'{shard.name}' in .* holds top-k token id 65535, outside the vocabulary"
    ):
        opened.signals(batch, "cpu")


# ============================================================================================ the named teacher
def test_a_named_teacher_must_be_the_one_the_cache_was_made_from(tmp_path, built):
    rows, student, online, cache = built
    online.teacher_model.save_pretrained(tmp_path / "teacher")
    tiny_llama(6, 48, seed=3).save_pretrained(tmp_path / "other")
    with pytest.raises(
        ValueError, match=r"is not the teacher the teacher cache .* their weights fingerprints differ"
    ):
        _cached(tmp_path, student, cache, rows, teacher_model_name_or_path=str(tmp_path / "other"))
    trainer = _cached(tmp_path, student, cache, rows, teacher_model_name_or_path=str(tmp_path / "teacher"))
    assert trainer.cached_teacher is not None and trainer.teacher_model is None


# ============================================================================================ rebuilding
def test_a_rebuild_keeps_matching_shards_and_rebuilds_changed_truncated_or_missing_ones(
    tmp_path, built, monkeypatch
):
    rows, student, online, cache = built
    folder = tmp_path / "cache"
    whole = _shard_digests(folder)
    manifest = (folder / MANIFEST_NAME).read_bytes()
    first, second = sorted(folder.glob(SHARD_GLOB))
    calls = _count_teacher_batches(monkeypatch)
    _cache(tmp_path, online, rows)  # a whole cache: every shard kept, nothing runs through the teacher
    assert calls["n"] == 0 and (folder / MANIFEST_NAME).read_bytes() == manifest
    for damage in (
        lambda: _flip_byte(first),
        lambda: first.write_bytes(first.read_bytes()[:-50]),
        first.unlink,
    ):
        kept = second.stat().st_mtime_ns
        damage()
        calls["n"] = 0
        _cache(tmp_path, online, rows)
        assert calls["n"] == 2  # the 7 rows of the first shard, 5 per batch: only it was rebuilt
        assert second.stat().st_mtime_ns == kept
        assert _shard_digests(folder) == whole and (folder / MANIFEST_NAME).read_bytes() == manifest
    assert not list(folder.glob("*.sha256")) and not list(folder.glob(".*.tmp"))
    _cached(tmp_path, student, cache, rows)


def test_an_interrupted_build_rebuilds_a_shard_changed_since_it_was_written(tmp_path, built, monkeypatch):
    rows, student, online, _ = built
    real = writer_module.teacher_row_signals
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # inside the second shard
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(writer_module, "teacher_row_signals", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path, online, rows, name="resumed")
    folder = tmp_path / "resumed"
    (shard,) = folder.glob(SHARD_GLOB)
    assert (folder / f"{shard.name}.sha256").read_text().strip() == file_sha256(shard)
    _flip_byte(shard)  # changed after its sha256 was recorded: not kept, not recorded
    monkeypatch.setattr(writer_module, "teacher_row_signals", real)
    _cache(tmp_path, online, rows, name="resumed")
    assert _shard_digests(folder) == _shard_digests(tmp_path / "cache")
    _cached(tmp_path, student, str(folder), rows)


def test_a_shard_without_a_recorded_sha256_is_rebuilt_not_recorded(tmp_path, built, monkeypatch):
    rows, _, online, _ = built
    folder = tmp_path / "cache"
    whole = _shard_digests(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    body = {"settings": manifest["settings"], "plan": manifest["plan"]}
    unfinished = writer_module._manifest(body, complete=False)  # the same build, no record of its shards
    (folder / MANIFEST_NAME).write_text(json.dumps(unfinished))
    calls = _count_teacher_batches(monkeypatch)
    _cache(tmp_path, online, rows)
    assert calls["n"] == 3  # both shards (7 + 5 rows) ran through the teacher again
    assert _shard_digests(folder) == whole


def test_overwrite_output_dir_with_fresh_starts_afresh(tmp_path, built, monkeypatch):
    rows, _, online, _ = built
    folder = tmp_path / "cache"
    whole = _shard_digests(folder)
    calls = _count_teacher_batches(monkeypatch)
    _cache(tmp_path, online, rows, overwrite=True)
    assert calls["n"] == 0  # overwrite alone keeps a cache with the same settings (the demo relies on it)
    (folder / "shard-00007.arrow.sha256").write_text("stale\n")
    settings = CacheSettings.from_json(json.loads((folder / MANIFEST_NAME).read_text())["settings"])
    writer_module.write_teacher_cache(
        online.teacher_model, [rows], settings, folder, pad_token_id=PAD_ID, batch_size=5, rows_per_shard=7,
        overwrite=True, fresh=True, show_progress=False,
    )  # fmt: skip
    assert calls["n"] == 3 and _shard_digests(folder) == whole
    assert not (folder / "shard-00007.arrow.sha256").exists()


# ============================================================================================ the command line
def _build_cli_cache(gpt2_cli_models, capsys, cache, *extra: str) -> tuple[int, str, str]:
    return _cli(
        capsys, "cache-teacher", "--teacher_model_name_or_path", str(gpt2_cli_models / "teacher"),
        "--model_name_or_path", str(gpt2_cli_models / "student"), "--output_dir", str(cache), "--cache_dtype", "float32",
        "--rows_per_shard", "8", *_data_flags(), *extra,
    )  # fmt: skip


def _train_flags(gpt2_cli_models, cache) -> list[str]:
    return [
        "--model_name_or_path", str(gpt2_cli_models / "student"), "--train_file",
        str(shared_path(DATA_DIR / "dolly" / "dev_1000.jsonl")), "--max_train_samples", "24", "--use_cpu", "true",
        "--report_to", "none", "--disable_tqdm", "true", "--lens_num_layers", "1", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--teacher_cache", str(cache),
    ]  # fmt: skip


@pytest.mark.needs_shared
def test_train_on_a_shard_changed_in_place_exits_in_one_line_and_writes_no_model(
    gpt2_cli_models, tmp_path, capsys
):
    """The contract of issue 33: same-size damage inside a shard written by cache-teacher stops train."""
    cache = tmp_path / "cache"
    code, _, err = _build_cli_cache(gpt2_cli_models, capsys, cache)
    assert code == 0, err
    shard = sorted(cache.glob(SHARD_GLOB))[1]
    size = shard.stat().st_size
    _flip_byte(shard, offset_from_end=200)
    assert shard.stat().st_size == size
    student = tmp_path / "student"
    code, out, err = _cli(
        capsys, "train", *_train_flags(gpt2_cli_models, cache), "--output_dir", str(student)
    )
    assert code == 1
    assert err.strip().splitlines() == [
        f"distillens train: error: teacher_cache: '{shard.name}' in {cache} does not match its sha256 in "
        f"manifest.json (damaged or changed): rebuild it with distillens cache-teacher --output_dir {cache} and "
        "the same arguments (files that match are kept)."
    ]
    assert "Traceback" not in out + err
    assert not (student / "model.safetensors").exists() and not (student / "config.json").exists()


@pytest.mark.needs_shared
def test_verify_then_rebuild_repairs_a_damaged_cache_without_a_traceback(gpt2_cli_models, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, _, err = _build_cli_cache(gpt2_cli_models, capsys, cache)
    assert code == 0, err
    code, out, err = _cli(capsys, "cache-teacher", "--verify", "--output_dir", str(cache))
    assert code == 0 and err == ""
    assert out.startswith(
        f"distillens cache-teacher: {cache} is whole: manifest.json and the 4 files it records"
    )
    whole = _shard_digests(cache)
    first, second, _ = sorted(cache.glob(SHARD_GLOB))
    _flip_byte(first)
    second.write_bytes(second.read_bytes()[:-64])  # truncated
    (cache / HEAD_NAME).unlink()
    code, out, err = _cli(capsys, "cache-teacher", "--verify", "--output_dir", str(cache))
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 3
    assert f"'{HEAD_NAME}' in {cache} is missing" in lines[0]
    assert f"'{first.name}' in {cache} does not match its sha256" in lines[1]
    assert f"'{second.name}' in {cache} has" in lines[2] and "(truncated or changed)" in lines[2]
    # the same command as the build (plus --verify) checks too
    code, _, _ = _build_cli_cache(gpt2_cli_models, capsys, cache, "--verify", "true")
    assert code == 1
    code, out, err = _build_cli_cache(
        gpt2_cli_models, capsys, cache
    )  # the rebuild: no traceback, the same cache
    assert code == 0, err
    assert "Traceback" not in out + err
    assert _shard_digests(cache) == whole
    code, _, _ = _cli(capsys, "cache-teacher", "--verify", "--output_dir", str(cache))
    assert code == 0
    # another teacher named beside the cache: refused in one line after comparing its weights fingerprint
    code, out, err = _cli(
        capsys, "train", *_train_flags(gpt2_cli_models, cache), "--output_dir", str(tmp_path / "s2"),
        "--teacher_model_name_or_path", str(gpt2_cli_models / "student"),
    )  # fmt: skip
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 1 and len(errors) == 1 and "Traceback" not in out + err
    assert "is not the teacher the teacher cache" in errors[0]
    code, _, err = _cli(capsys, "cache-teacher", "--verify", "--output_dir", str(tmp_path / "nowhere"))
    assert code == 1 and "is not a folder" in err and len(err.strip().splitlines()) == 1
