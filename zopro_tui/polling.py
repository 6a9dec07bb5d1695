"""The body of the TUI's polling workers: read and post, wait, again, until the worker is cancelled."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(
    read_and_post: Callable[[], None], seconds: float, cancelled: Callable[[], bool], nap: float = 0.1
) -> None:
    """Call `read_and_post` now and then every `seconds` until `cancelled()`, which is checked every `nap`."""
    while not cancelled():
        read_and_post()
        wait(seconds, cancelled, nap)


def wait(seconds: float, cancelled: Callable[[], bool], nap: float = 0.1) -> None:
    """Sleep `seconds`, waking every `nap` to return early once `cancelled()`."""
    deadline = time.monotonic() + seconds
    while not cancelled() and time.monotonic() < deadline:
        time.sleep(nap)
