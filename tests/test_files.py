"""Atomic writes: whole or absent, never half, and nothing left behind."""

import os
import subprocess
from pathlib import Path

import pytest

from autolayer.files import atomic_dir, atomic_file, remove_stale, write_text_atomic


def test_a_text_file_is_written_whole_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "run.sh"
    write_text_atomic(path, "echo hi\n", 0o755)
    assert path.read_text() == "echo hi\n" and path.stat().st_mode & 0o777 == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["run.sh"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_stale_copies_of_killed_writers_are_removed_at_the_next_write(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])  # its pid is free once it exits
    proc.wait()
    dead = proc.pid
    out = tmp_path / "out"
    stale = [tmp_path / f".out.tmp-{dead}-abcd1234", tmp_path / f".out.old-{dead}-abcd1234"]
    live = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    for path in [*stale, live]:
        path.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert not any(p.exists() for p in stale) and live.exists()  # a live writer's stays
    assert (out / "f").read_text() == "x" and remove_stale(out) == []
