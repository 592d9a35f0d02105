"""service/http/patches.py's transport: an answer's head leaves with its body, in one write (one TCP segment)."""

from __future__ import annotations

import asyncio

from service.http.patches import LingeringTransport


class RecordingTransport(asyncio.Transport):
    """The socket side of a connection, recording what reaches it (asyncio's transport interface)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        if data:  # as asyncio's socket transport: an empty write sends nothing
            self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


def test_a_head_and_its_body_go_out_in_one_write_and_the_next_answer_too() -> None:
    async def answer_twice() -> list[bytes]:
        sock = RecordingTransport()
        transport = LingeringTransport(sock, still_sending=lambda: False)
        for _ in range(2):
            transport.write(HEAD)
            transport.write(b"{}")
            transport.write(b"")  # uvicorn's end of message, empty for a sized body
            transport.hold_head = True  # what the protocol does when an answer is complete
        await asyncio.sleep(0)
        return sock.writes

    assert asyncio.run(answer_twice()) == [HEAD + b"{}", HEAD + b"{}"]


def test_a_head_whose_body_is_late_still_goes_out_in_the_same_turn_of_the_loop() -> None:
    async def head_alone() -> tuple[list[bytes], list[bytes]]:
        sock = RecordingTransport()
        transport = LingeringTransport(sock, still_sending=lambda: False)
        transport.write(HEAD)
        before = list(sock.writes)
        await asyncio.sleep(0)
        transport.write(b"{}")  # a body streamed later goes out on its own
        return before, sock.writes

    assert asyncio.run(head_alone()) == ([], [HEAD, b"{}"])


def test_closing_sends_a_held_head_first() -> None:
    async def head_then_close() -> RecordingTransport:
        sock = RecordingTransport()
        transport = LingeringTransport(sock, still_sending=lambda: False)
        transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n")
        transport.close()
        return sock

    sock = asyncio.run(head_then_close())
    assert sock.writes == [b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"] and sock.closed
