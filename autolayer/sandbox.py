"""Run untrusted generated Python code outside the autolayer process, contained.

Every program runs in its own short-lived interpreter (`python -I -S -B`), never in autolayer's
process, with these layers of containment:

- its own session and process group, killed whole on a wall-clock timeout;
- resource limits: CPU seconds, address space, file size, open files, no core dumps;
- an empty temporary working directory (removed afterwards) and a clean environment: no inherited
  variable reaches it, so no token or secret either;
- where the OS allows (Linux as root, or with unprivileged user namespaces): a new network
  namespace with no interface up, so no connection leaves the machine, and a new PID namespace
  whose every process the kernel kills when the program's first process ends; as root, the
  program also drops to the `nobody` user with a process-count limit, where that user can read
  the Python installation;
- inside the interpreter, a PEP 578 audit hook that refuses sockets, subprocesses, fork/exec,
  `ctypes`, and opening for writing, removing or renaming anything outside the temporary directory.

Where namespaces are refused (`isolation()` says which layers are on), the audit hook is what
stops network use and writes outside the directory: that covers pure Python code, but not a
native extension written to evade it. Run searches on untrusted tasks where namespaces work.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from autolayer._sandbox_runner import EXIT_REFUSED  # the runner's code for a refused operation

RUNNER = Path(__file__).resolve().parent / "_sandbox_runner.py"
PROGRAM_FILE = "program.py"
EXIT_TIMEOUT = 124  # our code for a wall-clock timeout (as coreutils' `timeout`)
CACHE_SIZE = 65536  # programs whose outcome is kept: RL samples repeat the same program often


@dataclass(frozen=True)
class Limits:
    """Per-program limits; the defaults suit HumanEval-sized functions and their tests."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_bytes: int = 1 << 30  # address space; a Python interpreter needs ~40 MB of it
    file_bytes: int = 1 << 20  # largest file the program may write in its directory
    open_files: int = 64
    processes: int = 32  # only enforced where the program runs as a dedicated user (as root)


@dataclass(frozen=True)
class Outcome:
    """How one program ended: `passed` only when it exited 0."""

    passed: bool
    status: str  # passed, failed, timeout, refused
    detail: str = ""  # the last line of stderr, for failures


def workers() -> int:
    """Programs run at once: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def isolation() -> dict[str, bool]:
    """Which OS layers work here, probed once in throwaway children.

    network and pid: the namespaces can be entered. drop_user: we are root and the `nobody`
    user can still run this Python (not when the interpreter lives under a private /root).
    """
    return {
        "network": _probe(["--probe", "net"]),
        "pid": _probe(["--probe", "pid"]),
        "drop_user": os.geteuid() == 0 and _probe(["--probe", "user"]),
    }


def _probe(args: list[str]) -> bool:
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-B", str(RUNNER), *args],
            capture_output=True,
            timeout=10,
            env=_clean_env("/"),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _clean_env(workdir: str) -> dict[str, str]:
    """Nothing inherited: the program sees no token, key or proxy setting of the parent."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
    }


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` as a script in the sandbox; `passed` when it exits 0 within the limits."""
    layers = isolation()
    workdir = tempfile.mkdtemp(prefix="autolayer-sandbox-")
    try:
        Path(workdir, PROGRAM_FILE).write_text(source)
        if layers["drop_user"]:
            os.chown(workdir, 65534, 65534)  # nobody may write here and nowhere else of ours
            os.chown(Path(workdir, PROGRAM_FILE), 65534, 65534)
        argv = [
            sys.executable,
            "-I",
            "-S",
            "-B",
            str(RUNNER),
            workdir,
            ",".join(k for k, on in layers.items() if on),
            ",".join(
                str(v)
                for v in (
                    limits.cpu_seconds,
                    limits.memory_bytes,
                    limits.file_bytes,
                    limits.open_files,
                    limits.processes,
                )
            ),
        ]
        return _wait(argv, workdir, limits.wall_seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(argv: list[str], workdir: str, wall_seconds: float) -> Outcome:
    # stderr goes to an unnamed file, not a pipe: RLIMIT_FSIZE bounds it, so a program that
    # floods stderr cannot fill autolayer's memory
    with tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen(
            argv,
            cwd=workdir,
            env=_clean_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            start_new_session=True,  # its own process group, so the whole group can be killed
        )
        try:
            proc.wait(timeout=wall_seconds)
        except subprocess.TimeoutExpired:
            return Outcome(False, "timeout", f"no exit within {wall_seconds:g} s")
        finally:
            _kill_group(proc.pid)  # whatever it left in its group goes too
            proc.wait()
        err_file.seek(0, os.SEEK_END)
        err_file.seek(max(0, err_file.tell() - 4096))
        tail = err_file.read().decode(errors="replace").strip().splitlines()[-1:]
    detail = tail[0][:300] if tail else ""
    if proc.returncode == 0:
        return Outcome(True, "passed")
    if proc.returncode == EXIT_REFUSED:
        return Outcome(False, "refused", detail)
    if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return Outcome(False, "timeout", f"killed by signal {-proc.returncode}")
    return Outcome(False, "failed", detail)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class ProgramCache:
    """Outcomes of programs already run, by the hash of their source (bounded, thread-safe).

    Generated programs repeat: G samples of one prompt often agree, and greedy held-out scoring
    asks the same question every evaluation. Tests are assumed deterministic, as HumanEval's are.
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._items: OrderedDict[str, Outcome] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Outcome | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            return None

    def put(self, key: str, outcome: Outcome) -> None:
        if outcome.status == "timeout":
            return  # a timeout may be a loaded machine, not the program: try again next time
        with self._lock:
            self._items[key] = outcome
            while len(self._items) > self.size:
                self._items.popitem(last=False)


_CACHE = ProgramCache()


def run_programs(
    sources: Sequence[str], limits: Limits = Limits(), cache: ProgramCache | None = _CACHE
) -> list[Outcome]:
    """Run many programs in parallel across the cores; identical sources run once."""
    keys = [hashlib.sha256(s.encode()).hexdigest() for s in sources]
    results: dict[str, Outcome] = {}
    todo: dict[str, str] = {}
    for key, source in zip(keys, sources, strict=True):
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            results[key] = hit
        else:
            todo.setdefault(key, source)
    if todo:
        with ThreadPoolExecutor(max_workers=min(workers(), len(todo))) as pool:
            outcomes = pool.map(lambda s: run_program(s, limits), todo.values())
            for key, outcome in zip(todo, outcomes, strict=True):
                results[key] = outcome
                if cache is not None:
                    cache.put(key, outcome)
    return [results[key] for key in keys]
