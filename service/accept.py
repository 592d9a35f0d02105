"""Spread keep-alive connections over the worker processes.

BentoML's workers share one listening socket. asyncio's accept handler takes up to `backlog` (BentoML:
2048) pending connections each time the socket is readable, so when clients open their connections
together (load balancers, connection pools, benchmark tools), the first worker to wake takes all of them
and the other workers idle for the connections' whole life (BentoML issue #5426). Measured on 2 cores,
8 keep-alive clients on /predict_batch: 2 workers served 62 requests/s, the same as 1 worker.

Accepting one connection per wake-up instead lets every worker's loop take its turn when connections arrive
in a burst: measured with wrk (8 connections opened at once), 2 workers then served 149 requests/s of 64
images instead of 62. It is a mitigation, not a balancer: connections that arrive one by one can still all
land on the worker that wakes first (the real fix, one SO_REUSEPORT socket per worker, belongs in BentoML).
Only asyncio's own event loop is patched (uvloop, if installed, has its own accept loop and is left alone).
"""

from __future__ import annotations

import functools
import logging
from asyncio import selector_events
from typing import Any

log = logging.getLogger(__name__)

_PATCHED = "_mnist_one_accept_per_wakeup"


def accept_one_connection_per_wakeup() -> None:
    """Patch asyncio's selector event loop so each readiness event accepts one connection (idempotent)."""
    loop_class = selector_events.BaseSelectorEventLoop
    original = loop_class._accept_connection
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def accept_one(
        self: Any, protocol_factory: Any, sock: Any, sslcontext: Any = None, server: Any = None,
        backlog: int = 100, *args: Any, **kwargs: Any,
    ) -> None:  # fmt: skip
        # `backlog` is only the number of accept() calls per wake-up here; the kernel's queue is unchanged.
        original(self, protocol_factory, sock, sslcontext, server, 1, *args, **kwargs)

    setattr(accept_one, _PATCHED, True)
    loop_class._accept_connection = accept_one
    log.debug("asyncio accepts one connection per wake-up")
