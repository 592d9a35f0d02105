"""Stopping work whose answer nobody will read: a flag per worker thread, checked between images.

The HTTP layer (http/work.py) runs each request's blocking work in a thread with `stopping_on(event)` and sets
the event when the client hangs up or the request times out; the work calls `raise_if_abandoned()` between its
steps, so a batch of big images stops at the next one instead of decoding them all for no one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from ..errors import ClientGone

_local = threading.local()


def raise_if_abandoned() -> None:
    """In a worker thread: stop here if the request's client is gone or its answer was already sent."""
    stop: threading.Event | None = getattr(_local, "stop", None)
    if stop is not None and stop.is_set():
        raise ClientGone("the request was abandoned (client gone or timed out) while its images were decoded")


@contextlib.contextmanager
def stopping_on(stop: threading.Event) -> Iterator[None]:
    """Within the block, in this thread, `raise_if_abandoned()` raises once `stop` is set."""
    _local.stop = stop
    try:
        yield
    finally:
        _local.stop = None
