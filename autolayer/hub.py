"""One quick look at the Hugging Face hub before anything asks it for a model or a dataset.

Without a network, transformers and datasets retry for one to two minutes before they fail. A
single TCP connection with a short timeout tells the same in seconds. `HF_HUB_OFFLINE=1` skips
the look: the libraries then read their local cache only, which is the way to run offline.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from autolayer.errors import AutolayerError

TIMEOUT = 3.0  # seconds for the TCP connection to the hub


@functools.lru_cache(maxsize=4)
def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT):
            return True
    except OSError:
        return False


def require_hub(what: str) -> None:
    """Fail in seconds when `what` (a hub id) would need a hub this machine cannot reach."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    if not _reachable(host, endpoint.port or (443 if endpoint.scheme == "https" else 80)):
        raise AutolayerError(
            f"cannot reach the Hugging Face hub ({host}) to fetch {what}; connect, or set "
            "HF_HUB_OFFLINE=1 to use the local cache, or give a local path"
        )
