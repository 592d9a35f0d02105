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

This module is the policy and the shared table, plain code with no server internals; the accept handler that
applies it is a patch of asyncio's, and lives with every other patch in patches.py. Only asyncio's own event loop
is patched (uvloop, if installed, has its own accept loop: then nothing here runs, and the worker says so).
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
# One worker's slot: its open connections (-1: it stopped accepting) and its process id, by which the others see
# that a worker killed outright (SIGKILL, the OOM killer), which never wrote -1, is gone.
_SLOT = struct.Struct("=qq")
GONE = -1
# How long a worker's liveness, once checked, is trusted (a killed worker is deferred to for at most this long).
LIVENESS_S = 1.0


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
    """Each worker's open connections, one slot per worker in a file every worker maps. No lock: a worker writes
    only its own slot (aligned 8-byte stores), and a count read a moment late only shifts one accept."""

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
        self.pid = os.getpid()
        self._liveness: dict[int, tuple[float, bool]] = {}  # pid -> (when checked, alive)
        self.publish(0)

    @classmethod
    def for_socket(cls, sock: socket.socket, workers: int, index: int, server_pid: int) -> ConnectionTable:
        """The table of the workers that share `sock` (named by the server process and the socket's inode)."""
        folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        remove_orphans(folder)
        return cls(folder / f"{TABLE_PREFIX}{server_pid}-{os.fstat(sock.fileno()).st_ino}", workers, index)

    def publish(self, count: int) -> None:
        if not self.left:  # connections closing in the drain do not bring a stopped worker back
            _SLOT.pack_into(self._map, self.index * _SLOT.size, count, self.pid)

    def counts(self) -> list[int]:
        """Every worker's count, as published (a dead worker's last count included: see `alive_counts`)."""
        return [_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self.workers)]

    def alive_counts(self, counts: Sequence[int], below: int) -> list[int]:
        """`counts` (the others') with GONE for each worker this one would defer to (holding fewer than `below`)
        whose process no longer runs. A slot never written (pid 0) is a worker that has not accepted yet: alive.
        Liveness is cached for LIVENESS_S per pid: a deferral looks again every millisecond."""
        others = [i for i in range(self.workers) if i != self.index]
        out = list(counts)
        for k, (i, count) in enumerate(zip(others, counts, strict=True)):
            if 0 <= count < below:
                pid = _SLOT.unpack_from(self._map, i * _SLOT.size)[1]
                if pid and not self._alive(pid):
                    out[k] = GONE
        return out

    def _alive(self, pid: int) -> bool:
        now = time.monotonic()
        checked = self._liveness.get(pid)
        if checked is None or now - checked[0] > LIVENESS_S:
            checked = self._liveness[pid] = (now, process_alive(pid))
        return checked[1]

    def mine_and_others(self) -> tuple[int, list[int]]:
        counts = self.counts()
        return counts.pop(self.index), counts

    def leave(self) -> None:
        """This worker accepts no more: the others stop deferring to it; the file goes with the last of them."""
        self.cancel()
        self.publish(GONE)
        self.left = True
        others = self.mine_and_others()[1]
        if all(count == GONE for count in self.alive_counts(others, below=max(others, default=0) + 1)):
            self.path.unlink(missing_ok=True)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")


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
