"""Hugging Face hub access: go offline at once when the hub cannot be reached, and name the
download command of the installed huggingface_hub (2.x ships ``hf``, not ``huggingface-cli``).

Without a network, the hub client retries each file for about a minute before a missing cache
entry surfaces as an error; with ``HF_HUB_OFFLINE`` it answers from the cache immediately.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def reachable(url: str, timeout: float = 2.0) -> bool:
    """True if a TCP connection to ``url``'s host opens within ``timeout`` seconds (DNS included)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


@functools.cache
def offline() -> bool:
    """Whether hub calls must stay in the local cache: ``HF_HUB_OFFLINE`` is set, or the hub is unreachable
    (then set it, for libraries imported later and for an already imported huggingface_hub)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    if reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co")):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    return True


def download_hint(repo: str) -> str:
    """The command that fills the cache with ``repo``."""
    return f"`hf download {repo}`"
