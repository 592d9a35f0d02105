"""Spread incoming connections over the worker processes, without starving the listen queue.

BentoML's workers share one listening socket. asyncio's accept handler takes up to `backlog` (BentoML:
2048) pending connections each time the socket is readable, so when clients open their connections
together (load balancers, connection pools, benchmark tools), the first worker to wake takes all of them
and the other workers idle for the connections' whole life (BentoML issue #5426). Measured on 2 cores,
8 keep-alive clients on /predict_batch: 2 workers served 62 requests/s, the same as 1 worker.

Accepting one connection per wake-up fixed that (149 requests/s), but starved a big burst: with 5,000
connections arriving at once, a busy worker's loop accepted one per turn and 1,150-1,830 of them sat in the
listen queue for the whole 20-30 s run: under that load one turn of a worker's loop serves every request
ready on its connections and lasts seconds. So a wake-up now looks at the queue's length (TCP_INFO of a
listening socket reports it): up to BURST connections waiting (a pool of keep-alive connections opened
together), it still takes one, so the workers take turns; beyond, it takes its share, queued / workers,
and the queue drains in a few turns (measured: docs/benchmarks.md, "Chaos"). Taking a share of a small queue
instead split a pool of 16 as 8, 4, 2, 1... to the worker that woke first (measured: 1 worker did all).

It is a mitigation, not a balancer: connections that arrive one by one can still all land on the worker
that wakes first (the real fix, one SO_REUSEPORT socket per worker, belongs in BentoML). Only asyncio's own
event loop is patched (uvloop, if installed, has its own accept loop and is left alone).
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import struct
from asyncio import selector_events
from typing import Any

log = logging.getLogger(__name__)

_PATCHED = "_mnist_fair_share_accept"
# Up to this many waiting connections, a wake-up accepts one; beyond, queued / workers.
BURST = 64
# struct tcp_info: eight one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked. On a listening socket
# Linux reports the accept queue's length in tcpi_unacked.
_TCPI_UNACKED = struct.Struct("=I")
_TCPI_UNACKED_OFFSET = 24
_TCP_INFO = getattr(socket, "TCP_INFO", None)


def queued_connections(sock: socket.socket) -> int:
    """Connections waiting in `sock`'s accept queue (Linux); 1 where the kernel does not say."""
    if _TCP_INFO is None:
        return 1
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCPI_UNACKED_OFFSET + 4)
        return _TCPI_UNACKED.unpack_from(info, _TCPI_UNACKED_OFFSET)[0]
    except OSError:
        return 1


def per_wakeup(queued: int, workers: int) -> int:
    """How many connections one wake-up accepts when `queued` wait and `workers` share the socket."""
    return 1 if queued <= BURST else queued // workers


def original_accept() -> Any:
    """asyncio's own accept handler, patched or not (the drain at shutdown wants every pending connection)."""
    accept = selector_events.BaseSelectorEventLoop._accept_connection
    return getattr(accept, "__wrapped__", accept)


def spread_accepts(workers: int) -> None:
    """Patch asyncio's selector event loop to accept a fair share per wake-up (idempotent)."""
    loop_class = selector_events.BaseSelectorEventLoop
    original = loop_class._accept_connection
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def accept_share(
        self: Any, protocol_factory: Any, sock: Any, sslcontext: Any = None, server: Any = None,
        backlog: int = 100, *args: Any, **kwargs: Any,
    ) -> None:  # fmt: skip
        # `backlog` is only the number of accept() calls per wake-up here; the kernel's queue is unchanged.
        share = min(backlog, per_wakeup(queued_connections(sock), workers))
        try:
            original(self, protocol_factory, sock, sslcontext, server, share, *args, **kwargs)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Another worker is shutting down and stopped the shared socket listening (connections.py): stop
            # watching it too, instead of logging this error on every turn of the loop until our own shutdown.
            self._remove_reader(sock.fileno())

    setattr(accept_share, _PATCHED, True)
    loop_class._accept_connection = accept_share
    log.debug("asyncio accepts a fair share of the listen queue per wake-up (%d workers)", workers)
