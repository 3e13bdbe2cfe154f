"""train/fsutil.write_atomic: the one atomic, fsynced whole-file write (checkpoints, data cache, run files, caches)."""
import errno
import os
import re

import pytest

from train import checkpoint as ck
from train import fsutil
from train.data import shards
from train.errors import CheckpointError, DataError, UserError


def test_writes_bytes_and_text_and_replaces_the_old_file(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(fsutil, "fsync_dir", lambda path: synced.append(path))
    path = tmp_path / "f.json"
    fsutil.write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    fsutil.write_atomic(str(path), "ünïcödé\n")
    assert path.read_text(encoding="utf-8") == "ünïcödé\n"
    assert synced == [tmp_path, tmp_path]  # the folder is fsynced after each rename
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_the_temp_file_is_named_for_the_stale_file_cleanup(tmp_path):
    tmp = fsutil.temp_path(tmp_path / "meta.json")
    assert tmp.parent == tmp_path and tmp.name == f".meta.json.tmp-{os.getpid()}"
    assert re.search(r"\.tmp-(\d+)", tmp.name).group(1) == str(os.getpid())  # as shards._remove_stale_temp_files


def disk_full(path, data):
    with open(path, "wb") as f:
        f.write(data[:1])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("error, expected", [
    (fsutil.write_error(), UserError), (fsutil.write_error(CheckpointError), CheckpointError), (None, OSError)])
def test_a_failed_write_keeps_the_old_file_removes_the_temp_file_and_names_the_path(tmp_path, error, expected):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(expected) as info:
        fsutil.write_atomic(path, "new", error=error, write=disk_full)
    if expected is not OSError:
        assert str(info.value) == f"cannot write {path}: No space left on device"
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_an_interrupt_mid_write_removes_the_temp_file(tmp_path):
    def interrupted(path, data):
        path.write_bytes(data[:1])
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        fsutil.write_atomic(tmp_path / "f.txt", "new", write=interrupted)
    assert list(tmp_path.iterdir()) == []


def test_callers_keep_their_error_types(tmp_path, monkeypatch):
    missing = tmp_path / "missing" / "f.txt"  # its folder does not exist: the temp file cannot be created
    with pytest.raises(CheckpointError, match=f"cannot write {re.escape(str(missing))}: No such file"):
        ck.write_atomic(missing, "x")
    with pytest.raises(DataError, match=f"cannot write {re.escape(str(missing))}: No such file.*data.cache_dir"):
        shards._atomic_write_bytes(missing, b"x")
    from train import tracking
    with pytest.raises(CheckpointError, match="cannot write"):
        tracking.write_samples(tmp_path / "missing", [], 1)

    seen = []  # checkpoint's write goes through ck._write_bytes (fault tests swap it)
    monkeypatch.setattr(ck, "_write_bytes",
                        lambda path, data: (seen.append(path.name), fsutil.write_fsynced(path, data)))
    ck.write_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert seen == [f".config.yaml.tmp-{os.getpid()}"] and (tmp_path / "config.yaml").read_text() == "a: 1\n"
