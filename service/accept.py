"""Spread incoming connections over the worker processes, evenly, without starving the listen queue.

BentoML's workers share one listening socket. asyncio's accept handler takes up to `backlog` (BentoML:
2048) pending connections each time the socket is readable, so when clients open their connections
together (load balancers, connection pools, benchmark tools), the first worker to wake takes all of them
and the other workers idle for the connections' whole life (BentoML issue #5426). Measured on 2 cores,
8 keep-alive clients on /predict_batch: 2 workers served 62 requests/s, the same as 1 worker.

Accepting one connection per wake-up fixed that (149 requests/s), but starved a big burst: with 5,000
connections arriving at once, a busy worker's loop accepted one per turn and 1,150-1,830 of them sat in the
listen queue for the whole 20-30 s run: under that load one turn of a worker's loop serves every request
ready on its connections and lasts seconds. So a wake-up looks at the queue's length (TCP_INFO of a
listening socket reports it): up to BURST connections waiting (a pool of keep-alive connections opened
together), it takes one, so the workers take turns; beyond, it takes its share, queued / workers, and the
queue drains in a few turns (measured: docs/benchmarks.md, "Chaos"). Taking a share of a small queue instead
split a pool of 16 as 8, 4, 2, 1... to the worker that woke first (measured: 1 worker did all).

Taking turns is still a race: whichever worker the kernel wakes first wins it. Measured, 2 workers, wrk's 16
keep-alive connections, 8 runs: splits of 16/0 (twice: half the throughput), 13/3, 11/5, 9/7 (twice) and 8/8
(twice); the worker with more connections sets the p99. So the workers also publish how many connections each
holds (`ConnectionTable`, one slot per worker in a small shared file), and a worker that holds more than
another lets a small queue's connection go to it: it stops watching the socket for DEFER_S, then looks again
(8 runs with it: 8/8 or 9/7. The 9/7s came from a worker's count set back by its protocols' lagging count
while it was still accepting, see publish_connections; without that, 7 runs of 8 split 8/8, one 9/7).
A worker never defers a connection for longer than MAX_WAIT_S, so a busy, stuck or dead worker delays new
connections by at most that. And a worker that holds BURST connections or more (a burst of thousands: each
turn of its loop lasts long) neither defers nor takes one at a time, but takes the whole small queue: one
accept per turn left the end of a 5,000-connection burst queued for 13-16 s on 2 workers (measured, 2026-12-02,
docs/benchmarks.md "Chaos"; 0.2 s now). nginx's `accept_disabled` is the same idea as the table, per worker.

Only asyncio's own event loop is patched (uvloop, if installed, has its own accept loop and is left alone).
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import socket
import struct
import tempfile
import time
from asyncio import selector_events
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PATCHED = "_mnist_fair_share_accept"
# Up to this many waiting connections, a wake-up accepts one; beyond, queued / workers.
BURST = 64
# A worker with more connections than another stops watching the socket this long, so the other accepts...
DEFER_S = 0.001
# ...but a connection it could take waits at most this long for the other worker: then it is taken anyway.
MAX_WAIT_S = 0.02
# struct tcp_info: eight one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked. On a listening socket
# Linux reports the accept queue's length in tcpi_unacked.
_TCPI_UNACKED = struct.Struct("=I")
_TCPI_UNACKED_OFFSET = 24
_TCP_INFO = getattr(socket, "TCP_INFO", None)
TABLE_PREFIX = "mnist-connections-"  # then the server's pid and the listening socket's inode
_SLOT = struct.Struct("=q")  # one worker's open connections; -1: the worker stopped accepting
GONE = -1


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


def should_defer(mine: int, others: Sequence[int], waited_s: float) -> bool:
    """Whether a worker holding `mine` connections leaves a waiting one to the others (their counts; GONE for a
    worker that stopped accepting), when that connection has waited `waited_s` already. Not under a burst
    (BURST held or more), when each turn of the others' loops lasts long."""
    return mine < BURST and waited_s < MAX_WAIT_S and any(0 <= other < mine for other in others)


class ConnectionTable:
    """Each worker's open connections, one 8-byte slot per worker in a file every worker maps. No lock: a worker
    writes only its own slot (an aligned 8-byte store), and a count read a moment late only shifts one accept."""

    def __init__(self, path: Path, workers: int, index: int) -> None:
        self.path, self.workers, self.index = path, workers, index
        size = workers * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:  # the first worker to get here; extending keeps others' slots
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.waiting_since: float | None = None  # when this worker first deferred the connection now queued
        self.timer: Any = None  # the pending look again, while the socket is not watched
        self.left = False  # stopped accepting (shutdown): its slot stays GONE
        self.publish(0)

    @classmethod
    def for_socket(cls, sock: socket.socket, workers: int, index: int, server_pid: int) -> ConnectionTable:
        """The table of the workers that share `sock` (named by the server process and the socket's inode)."""
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        remove_orphans(folder)
        return cls(folder / f"{TABLE_PREFIX}{server_pid}-{os.fstat(sock.fileno()).st_ino}", workers, index)

    def publish(self, count: int) -> None:
        if not self.left:  # connections closing in the drain do not bring a stopped worker back
            _SLOT.pack_into(self._map, self.index * _SLOT.size, count)

    def counts(self) -> list[int]:
        return [_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self.workers)]

    def mine_and_others(self) -> tuple[int, list[int]]:
        counts = self.counts()
        return counts.pop(self.index), counts

    def leave(self) -> None:
        """This worker accepts no more: the others stop deferring to it; the file goes with the last of them."""
        self.cancel()
        self.publish(GONE)
        self.left = True
        if all(count == GONE for count in self.counts()):
            self.path.unlink(missing_ok=True)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def remove_orphans(folder: Path) -> None:
    """Delete the tables of servers that are gone. The last worker to stop deletes its table, but a server killed
    outright (SIGKILL, a crash) leaves its small file behind: the next server to start removes it."""
    for path in folder.glob(f"{TABLE_PREFIX}*-*"):
        try:
            os.kill(int(path.name[len(TABLE_PREFIX) :].split("-")[0]), 0)
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's


# This worker process's table, once its first connection is accepted (see spread_accepts).
_table: ConnectionTable | None = None
_table_failed = False


def publish_connections(count: int, opened: bool) -> None:
    """Tell the other workers how many connections this one holds now (connections.py, on each open and close).

    An accept counts its connection at once (spread_accepts), but the connection's protocol starts a turn or two of
    the loop later: while a pool is accepted, the protocols' count lags the accepts, and publishing it on an open
    made this worker look emptier than it was, so it took more (wrk's 16 split 9/7 in half the runs). So an open
    never lowers the count; a close sets it (every closed connection had its protocol)."""
    if _table is not None:
        _table.publish(max(count, _table.mine_and_others()[0]) if opened else count)


def stop_accepting(loop: Any, sock: socket.socket) -> None:
    """Stop this worker's loop from accepting on `sock`, and any deferred look again with it (shutdown)."""
    if _table is not None:
        _table.leave()
    loop._remove_reader(sock.fileno())


def original_accept() -> Any:
    """asyncio's own accept handler, patched or not (the drain at shutdown wants every pending connection)."""
    accept = selector_events.BaseSelectorEventLoop._accept_connection
    return getattr(accept, "__wrapped__", accept)


def spread_accepts(workers: int, worker_index: int | None = None) -> None:
    """Patch asyncio's selector event loop to accept a fair share per wake-up (idempotent); in worker
    `worker_index` (1 to `workers`, BentoML's numbering) also to leave connections to a worker holding fewer."""
    loop_class = selector_events.BaseSelectorEventLoop
    original = loop_class._accept_connection
    if getattr(original, _PATCHED, False):
        return
    # The server process, read now: a worker whose server was killed is adopted by init (pid 1) before it stops,
    # and a table named after pid 1 would never be seen as orphaned.
    server_pid = os.getppid()

    @functools.wraps(original)
    def accept_share(
        self: Any, protocol_factory: Any, sock: Any, sslcontext: Any = None, server: Any = None,
        backlog: int = 100, *args: Any, **kwargs: Any,
    ) -> None:  # fmt: skip
        # `backlog` is only the number of accept() calls per wake-up here; the kernel's queue is unchanged.
        queued = queued_connections(sock)
        table = _joined(sock, workers, worker_index, server_pid)
        if table is not None and 0 < queued <= BURST:
            mine, others = table.mine_and_others()
            now = time.monotonic()
            if should_defer(mine, others, now - (table.waiting_since or now)):
                table.waiting_since = table.waiting_since or now
                self._remove_reader(sock.fileno())
                table.timer = self.call_later(
                    DEFER_S, _look_again, self, table, protocol_factory, sock, sslcontext, server, backlog, *args
                )
                return
            table.waiting_since = None
            # One, so that the workers take turns; but a worker already holding many (a burst's) takes all: one
            # accept per turn of a loop that then lasts seconds would leave the rest waiting for many turns,
            # and a few more connections are nothing against those held.
            share = min(backlog, queued if mine >= BURST else 1)
            # Counted now, not when their protocols start (a turn of the loop later): else this worker, woken
            # again before then, would still look as empty as a moment ago. The protocols' count replaces it.
            table.publish(mine + share)
        else:
            share = min(backlog, per_wakeup(queued, workers))
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


def _joined(sock: socket.socket, workers: int, worker_index: int | None, server_pid: int) -> ConnectionTable | None:
    """This worker's connection table, made on the first accept (when the shared socket is known); None outside
    a worker, or where the table cannot be made (then the workers only take turns, as before)."""
    global _table, _table_failed
    if _table is None and not _table_failed and worker_index is not None and 1 <= worker_index <= workers:
        try:
            _table = ConnectionTable.for_socket(sock, workers, worker_index - 1, server_pid)
        except OSError as exc:
            _table_failed = True
            log.warning("connections are not balanced over the workers (no shared table: %s)", exc)
    return _table


def _look_again(loop: Any, table: ConnectionTable, *accept_args: Any) -> None:
    """After a deferral: watch the socket again; a connection still waiting then wakes this worker at once."""
    table.timer = None
    sock, server = accept_args[1], accept_args[3]
    if sock.fileno() < 0 or (server is not None and not server.is_serving()):
        return  # closed or shut down meanwhile
    if queued_connections(sock) == 0:
        table.waiting_since = None  # another worker took it: the next connection gets its own wait
    loop._add_reader(sock.fileno(), loop._accept_connection, *accept_args)
