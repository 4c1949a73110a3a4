"""Whether the Hugging Face Hub can be reached now, and reading only the local cache when it cannot: a machine
without network gets a clear error at once rather than after ``datasets``' retries (27 s, each warning twice)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_PROBE_SECONDS = 2.0


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face Hub cannot be reached now, or None: offline mode is set (read from the environment now,
    not when ``huggingface_hub`` was imported), or no connection to the Hub (or to the HTTPS proxy) opens within
    ``timeout`` seconds, name lookup included."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{variable} is set"
    from huggingface_hub import constants

    hub = urlparse(constants.ENDPOINT)
    host, port = hub.hostname or "huggingface.co", hub.port or (443 if hub.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(hub.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname or host, via.port or 80
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: a name lookup that hangs does not honour the socket's timeout
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot connect to {host}: {exc}")

    thread = threading.Thread(target=connect, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no connection to {host} within {timeout:g} s"


@contextlib.contextmanager
def cache_only(offline: bool) -> Iterator[None]:
    """While active (when ``offline``), ``datasets`` and ``huggingface_hub`` read their caches and never try the
    network, as with ``HF_HUB_OFFLINE=1`` set before they were imported."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = before
