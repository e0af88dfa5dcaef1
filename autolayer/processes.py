"""Whether the process that left something behind (a trial, a run, a temp directory) is gone."""

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
