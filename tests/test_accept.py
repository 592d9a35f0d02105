"""service/http/balance.py and the accept patch in service/http/patches.py: each wake-up takes a fair share of the
listen queue: one connection while a few wait (so other workers get their turn), many while thousands wait (so the
queue drains); a worker holding more connections than another leaves a waiting one to it, so a pool of keep-alive
connections ends up evenly split."""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import subprocess
import sys
import time
from asyncio import selector_events
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import Server

from service.http import patches
from service.http.balance import (
    BURST,
    GONE,
    LIVENESS_S,
    MAX_WAIT_S,
    TABLE_PREFIX,
    ConnectionTable,
    per_wakeup,
    process_alive,
    queued_connections,
    remove_orphans,
    should_defer,
)
from service.http.patches import spread_accepts

_SLOT_SIZE = 16  # one slot: count and pid, two 8-byte integers

PENDING = 5


def tasks_after_one_wakeup(pending: int = PENDING) -> int:
    """Queue `pending` connections on a listening socket, run the loop's accept handler once, count accepts."""
    loop = asyncio.new_event_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=pending + 16)
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(pending)]
    try:
        # What the loop calls when the socket is readable; each accepted connection becomes a task.
        loop._accept_connection(asyncio.Protocol, listener, None, None, 2048)  # BentoML's backlog
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:  # gather() of nothing would belong to another loop
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        return len(tasks)
    finally:
        for client in clients:
            client.close()
        listener.close()
        loop.close()


@pytest.fixture
def restore_asyncio():
    original = selector_events.BaseSelectorEventLoop._accept_connection
    yield original
    selector_events.BaseSelectorEventLoop._accept_connection = original


def test_asyncio_alone_accepts_every_pending_connection_at_once(restore_asyncio) -> None:
    selector_events.BaseSelectorEventLoop._accept_connection = restore_asyncio
    assert tasks_after_one_wakeup() == PENDING


def test_a_few_queued_connections_are_taken_one_per_wakeup_and_patching_twice_is_harmless(restore_asyncio) -> None:
    spread_accepts(workers=2)
    spread_accepts(workers=2)
    assert selector_events.BaseSelectorEventLoop._accept_connection.__wrapped__ is restore_asyncio
    assert tasks_after_one_wakeup() == 1


def test_a_burst_is_taken_in_shares_so_the_queue_drains(restore_asyncio) -> None:
    spread_accepts(workers=2)
    # 400 queued, 2 workers: half of them per wake-up, not one...
    assert tasks_after_one_wakeup(400) == per_wakeup(400, workers=2) == 200
    # ...but a pool that connects together (up to BURST) still goes one by one, so each worker gets its turn.
    assert per_wakeup(BURST, workers=2) == per_wakeup(0, workers=2) == 1


def test_the_kernel_reports_the_listen_queue() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=32)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(7)]
    try:
        assert queued_connections(listener) == 7
        listener.accept()[0].close()
        assert queued_connections(listener) == 6
    finally:
        for client in clients:
            client.close()
        listener.close()


def test_a_worker_leaves_a_connection_to_one_that_holds_fewer_but_not_for_long() -> None:
    assert should_defer(mine=5, others=[4], waited_s=0.0)
    assert not should_defer(mine=4, others=[4], waited_s=0.0)  # even: take it
    assert not should_defer(mine=3, others=[4, 9], waited_s=0.0)
    assert should_defer(mine=3, others=[9, 2], waited_s=0.0)
    assert not should_defer(mine=5, others=[GONE], waited_s=0.0)  # that worker stopped accepting
    assert not should_defer(mine=5, others=[0], waited_s=MAX_WAIT_S)  # the other is busy or stuck: take it
    assert not should_defer(mine=BURST, others=[3], waited_s=0.0)  # under a burst: no waiting on the others


def test_workers_see_each_others_counts_and_the_last_to_leave_removes_the_table(tmp_path: Path) -> None:
    path = tmp_path / "table"
    first = ConnectionTable(path, workers=2, index=0)
    first.publish(7)
    second = ConnectionTable(path, workers=2, index=1)  # joining keeps the first worker's count
    second.publish(3)
    assert first.mine_and_others() == (7, [3])
    assert second.mine_and_others() == (3, [7])
    first.leave()
    first.publish(2)  # a connection closing in the drain
    assert second.mine_and_others() == (3, [GONE]) and path.exists()
    second.leave()
    assert not path.exists()


@pytest.fixture
def first_of_two_workers(restore_asyncio):
    """This process as worker 1 of 2; yields a table slot standing for worker 2."""
    spread_accepts(workers=2, worker_index=1)
    tasks_after_one_wakeup(1)  # the table is made on the first accept
    table = patches._table
    yield table, ConnectionTable(table.path, workers=2, index=1)
    table.leave()
    patches._table = None


def test_a_worker_leaves_a_small_queue_to_one_holding_fewer_and_takes_all_of_it_under_a_burst(
    first_of_two_workers,
) -> None:
    mine, other = first_of_two_workers
    accepted = {}
    for name, (held, other_held) in {
        "even": (3, 3), "more than the other": (4, 3), "a burst's worth": (BURST, 3), "the other stopped": (4, GONE)
    }.items():  # fmt: skip
        mine.publish(held)
        other.publish(other_held)
        mine.waiting_since = None
        accepted[name] = tasks_after_one_wakeup(PENDING)
    assert accepted == {"even": 1, "more than the other": 0, "a burst's worth": PENDING, "the other stopped": 1}


def test_an_open_never_lowers_the_count_its_accept_published_and_a_close_sets_it(first_of_two_workers) -> None:
    mine, _ = first_of_two_workers
    mine.publish(5)  # five accepted; the protocols of two of them not made yet
    patches.publish_connections(3, opened=True)
    assert mine.mine_and_others()[0] == 5
    patches.publish_connections(6, opened=True)
    assert mine.mine_and_others()[0] == 6
    patches.publish_connections(4, opened=False)
    assert mine.mine_and_others()[0] == 4


def test_the_tables_of_servers_that_are_gone_are_removed(tmp_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid names no process now
    gone = tmp_path / f"{TABLE_PREFIX}{finished.pid}-1"
    alive = tmp_path / f"{TABLE_PREFIX}{os.getpid()}-1"
    other = tmp_path / f"{TABLE_PREFIX}notes-1"
    for path in (gone, alive, other):
        path.write_bytes(b"")
    remove_orphans(tmp_path)
    assert (gone.exists(), alive.exists(), other.exists()) == (False, True, True)


def connections_per_worker(port: int) -> collections.Counter[int]:
    """Established connections to `port` by the server process that holds them."""
    return collections.Counter(
        c.pid for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_a_pool_of_keep_alive_connections_is_split_evenly_between_the_two_workers(server: Server) -> None:
    # Before the connection table, the same 16 connections split 16/0, 13/3 or 11/5 in most runs (the first worker
    # to wake took them); now each worker ends up with about half.
    port = urlsplit(server.url).port
    before = connections_per_worker(port)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(16)]
    try:
        for client in clients:  # one request each: answered, so accepted by a worker
            client.sendall(b"POST /ping HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
        for client in clients:
            assert client.recv(4096).startswith(b"HTTP/1.1 200")
        added = connections_per_worker(port) - before
        assert len(added) == 2 and all(6 <= count <= 10 for count in added.values()), added
    finally:
        for client in clients:
            client.close()


def test_a_worker_killed_outright_is_not_deferred_to(first_of_two_workers) -> None:
    """SIGKILL (or the OOM killer) gives a worker no chance to mark its slot GONE: its last count, 0, stays in the
    table, and the others must not keep leaving connections to it."""
    mine, _ = first_of_two_workers
    code = (
        "import sys, time; from pathlib import Path; from service.http.balance import ConnectionTable; "
        "ConnectionTable(Path(sys.argv[1]), workers=2, index=1); print('joined', flush=True); time.sleep(60)"
    )
    dead = subprocess.Popen([sys.executable, "-c", code, str(mine.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert dead.stdout.readline().strip() == "joined"
        mine.publish(4)
        mine.waiting_since = None
        assert tasks_after_one_wakeup(PENDING) == 0  # alive, holding none: this worker leaves it the connection
        dead.kill()
        dead.wait()
        assert not process_alive(dead.pid)
        assert mine.mine_and_others() == (4, [0])  # its last count is still there...
        time.sleep(LIVENESS_S)  # (liveness, once checked, is trusted this long)
        mine.waiting_since = None
        assert tasks_after_one_wakeup(PENDING) == 1  # ...but nobody waits on it
    finally:
        dead.kill()
        dead.wait()


def test_a_worker_that_has_not_accepted_yet_is_deferred_to(first_of_two_workers) -> None:
    """A slot nobody has written yet (a worker starting, or restarted after a kill) holds count 0 and no pid: that
    worker is alive and empty, and a fresh server's first pool must be split with it."""
    mine, _ = first_of_two_workers
    mine._map[_SLOT_SIZE : 2 * _SLOT_SIZE] = bytes(_SLOT_SIZE)  # worker 2's slot, never written
    mine.publish(3)
    mine.waiting_since = None
    assert mine.mine_and_others() == (3, [0])
    assert tasks_after_one_wakeup(PENDING) == 0  # left to the worker holding none
