"""Atomic writes: a file or directory appears whole under its name, or not at all.

Everything is written beside its target under a hidden temporary name and renamed into place,
so a reader (or a process killed mid-write) never leaves or sees half an artifact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from autolayer.errors import AutolayerError
from autolayer.processes import pid_alive


@contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path` and rename it over `path` when the block ends.

    On error the temporary file is removed and `path` is untouched. `mode` replaces the
    temporary file's 0600 so the result is readable like any other written file.
    """
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write `text` to `path` atomically, flushed to disk before the rename."""
    with atomic_file(path, mode) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary and replaced copies of `out` left by processes that were killed
    (their pid, in the name, no longer runs here); returns what was removed."""
    removed = []
    for path in out.parent.glob(f".{out.name}.*-*-*"):
        kind, _, rest = path.name.removeprefix(f".{out.name}.").partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir` and rename it into place when the block ends.

    On error the temporary directory is removed and `out_dir` is untouched. An existing non-empty
    `out_dir` is refused unless `overwrite`; then it is replaced only after the new one is whole.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise AutolayerError(f"{out} already exists; choose a new directory or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
