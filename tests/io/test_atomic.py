"""d2prune.io.atomic: temp + fsync + rename, for files and folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from d2prune.errors import UserError
from d2prune.io import atomic
from d2prune.io.atomic import (
    atomic_folder,
    atomic_path,
    publish_folder,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    """Count os.fsync calls (they still happen)."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_writers_leave_no_temp_and_write_the_bytes(tmp_path):
    target = tmp_path / "sub" / "a.bin"  # the parent is created
    assert write_bytes_atomic(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    write_text_atomic(tmp_path / "b.txt", "héllo\n")
    assert (tmp_path / "b.txt").read_bytes() == "héllo\n".encode()
    write_json_atomic(tmp_path / "c.json", {"x": 1, "p": Path("/a")})
    assert (tmp_path / "c.json").read_text() == json.dumps({"x": 1, "p": "/a"}, indent=2) + "\n"
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "sub") == []


def test_atomic_path_replaces_and_can_set_the_mode(tmp_path):
    target = tmp_path / "f"
    target.write_text("old")
    with atomic_path(target, mode=0o640) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".f.tmp-")
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert (target.stat().st_mode & 0o777) == 0o640
    assert _leftovers(tmp_path) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"v": object()}, default=None)
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert json.loads(target.read_text()) == {"v": 1}
    assert _leftovers(tmp_path) == []


def test_file_and_folder_are_fsynced(tmp_path, fsyncs):
    write_text_atomic(tmp_path / "a.txt", "x")
    assert len(fsyncs) >= 2  # the file, then the folder holding the new name
    fsyncs.clear()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "one").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "two").write_text("2")
    assert len(fsyncs) >= 5  # two files, two temp folders, the parent after the rename


def test_atomic_folder_publishes_whole_and_replaces(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    with atomic_folder(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert _leftovers(tmp_path) == []


def test_atomic_folder_keeps_the_old_folder_when_the_writer_raises(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "half").write_text("?")
            raise RuntimeError("save failed")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert _leftovers(tmp_path) == []


def test_atomic_folder_without_replace_keeps_a_filled_target(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "theirs").write_text("x")
    with atomic_folder(out, replace=False) as tmp:
        (tmp / "ours").write_text("y")
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert _leftovers(tmp_path) == []


def test_atomic_folder_cleans_up_after_dead_processes(tmp_path, monkeypatch):
    out = tmp_path / "out"
    dead_tmp = tmp_path / ".out.tmp-999999"
    dead_tmp.mkdir()
    old = tmp_path / ".out.old-999998"  # a complete earlier result moved aside, never put back
    old.mkdir()
    (old / "kept").write_text("1")
    monkeypatch.setattr(atomic, "_pid_alive", lambda pid: False)
    atomic.clean_stale_temps(out)
    assert not dead_tmp.exists() and (out / "kept").is_file()


def test_atomic_folder_refuses_a_file_target(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        with atomic_folder(tmp_path / "f"):
            pass


def test_publish_folder_moves_a_long_lived_temp_folder_into_place(tmp_path, fsyncs):
    work = tmp_path / ".out.work"
    work.mkdir()
    (work / "shard").write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("old")
    publish_folder(work, out)
    assert sorted(p.name for p in out.iterdir()) == ["shard"] and not work.exists()
    assert len(fsyncs) >= 3 and _leftovers(tmp_path) == []
