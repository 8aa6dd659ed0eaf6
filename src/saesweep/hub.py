"""Fail fast when the Hugging Face hub cannot be reached, instead of minutes of client retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from saesweep.errors import SaesweepError

_CONNECT_TIMEOUT_S = 5.0


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_reachable() -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def require_hub(what: str, hint: str, error: type[SaesweepError]) -> None:
    """Raise `error` at once when `what` would have to come from an unreachable hub.

    In offline mode (HF_HUB_OFFLINE=1) the hub clients read their local cache and fail fast
    themselves, so nothing is checked here.
    """
    if offline_mode() or hub_reachable():
        return
    raise error(
        f"{what} could not be downloaded: the Hugging Face hub is not reachable. "
        f"To work offline, {hint} (or set HF_HUB_OFFLINE=1 to use what is already in the local cache)"
    )
