"""service/accept.py: asyncio takes one pending connection per wake-up, so other workers get their turn."""

from __future__ import annotations

import asyncio
import socket
from asyncio import selector_events

import pytest

from service.accept import accept_one_connection_per_wakeup

PENDING = 5


def tasks_after_one_wakeup() -> int:
    """Queue PENDING connections on a listening socket, run the loop's accept handler once, count accepts."""
    loop = asyncio.new_event_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(PENDING)]
    try:
        # What the loop calls when the socket is readable; each accepted connection becomes a task.
        loop._accept_connection(asyncio.Protocol, listener, None, None, 100)
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


def test_patched_loop_accepts_one_per_wakeup_and_patching_twice_is_harmless(restore_asyncio) -> None:
    accept_one_connection_per_wakeup()
    accept_one_connection_per_wakeup()
    assert selector_events.BaseSelectorEventLoop._accept_connection.__wrapped__ is restore_asyncio
    assert tasks_after_one_wakeup() == 1
