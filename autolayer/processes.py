"""Processes: whether one that left something behind is gone, and which rank this one is."""

from __future__ import annotations

import os
import socket


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def died_here(host: object, pid: object) -> bool:
    """A process recorded as `host`/`pid` ran on this machine and no longer exists (another
    host's pid means nothing here, and this process is alive)."""
    return (
        host == socket.gethostname()
        and isinstance(pid, int)
        and pid != os.getpid()
        and not pid_alive(pid)
    )


def process_rank() -> tuple[int, int]:
    """(this process's rank, the number of processes) as a distributed launcher set them:
    torchrun, `accelerate launch` and SLURM jobs through either export RANK and WORLD_SIZE.
    A plain process is (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process writes the outputs, tracks and prints: rank 0."""
    return process_rank()[0] == 0
