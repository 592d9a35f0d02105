"""service/accept.py: each wake-up takes a fair share of the listen queue: one connection while a few wait (so
other workers get their turn), many while thousands wait (so the queue drains)."""

from __future__ import annotations

import asyncio
import socket
from asyncio import selector_events

import pytest

from service.accept import BURST, per_wakeup, queued_connections, spread_accepts

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
