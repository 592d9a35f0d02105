"""What BentoML's server (uvicorn, h11) leaves to us about connections: timeouts, shutdown, orphaned workers.

Installed in each worker process by `harden_worker()` (service.py), before uvicorn starts serving:

- **Header timeout** (slowloris). uvicorn times out only an idle keep-alive connection, and any byte
  resets its timer; a connection that trickles its headers, or never sends any, stays open for good.
  Here every connection must deliver a request's headers within MNIST_HEADER_TIMEOUT_S of its start or
  of the end of its previous answer, or it is closed (with 408 if part of a request came).
- **Keep-alive timeout** MNIST_KEEPALIVE_TIMEOUT_S (BentoML passes uvicorn a fixed 5 s).
- **Lingering close.** When a connection is closed while its client may still be sending (headers cut off by
  the header timeout, a body refused or timed out, a malformed request), closing the socket at once with
  bytes unread, or arriving afterwards, makes the kernel answer with a reset, and the client's next send or
  read fails before it has read our 408 or 400 (seen in CI: a slowloris test client lost its 408). Such a
  connection is half-closed instead: the answer is sent and followed by a FIN, whatever else arrives is
  discarded, and the socket is closed when the client closes its side, or after LINGER_S.
- **Graceful drain** on SIGTERM. uvicorn stops accepting and closes every connection without a request in
  progress, so a connection accepted a moment earlier, whose request was still on the wire, was reset;
  and the supervisor kept the shared listening socket open ~0.4 s longer, so the kernel kept queueing
  connections that nobody would accept and reset them all when it closed. Now the worker first accepts
  whatever is queued, then shuts the shared socket's listening down (new connections are refused, which
  a client can retry safely, instead of reset after sending), and lets every accepted connection finish
  one request within the header timeout before it closes.
- **No orphans.** Workers ask the kernel for SIGTERM when their parent dies (PR_SET_PDEATHSIG), so a
  `kill -9` of `bentoml serve` no longer leaves them serving on the port: they drain and exit.
- **nosniff on every answer**, BentoML's and uvicorn's own errors included, as one of uvicorn's default
  headers (no per-request work).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
from asyncio import selector_events
from collections.abc import Callable
from typing import Any

import h11
import uvicorn.config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import Server

from .accept import original_accept, publish_connections, stop_accepting
from .settings import Settings

log = logging.getLogger(__name__)

# Headers uvicorn adds to every response it sends.
DEFAULT_HEADERS = [(b"x-content-type-options", b"nosniff")]
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"x-content-type-options: nosniff\r\ncontent-length: %d\r\n\r\n%s"
)
# Time for connections accepted in the drain to be set up before uvicorn asks them to shut down.
_DRAIN_SETTLE_S = 0.05
_DRAIN_MAX = 65536  # connections accepted at most in the drain (the kernel's queue holds at most somaxconn)
_PR_SET_PDEATHSIG = 1
# How long a half-closed connection discards what its client still sends before it is closed (nginx's
# lingering_timeout is 5 s; a client that has read its answer closes in well under a second).
LINGER_S = 2.0


class LingeringTransport:
    """A connection's transport as uvicorn sees it: `close()` lingers while the client may still be sending
    (module docstring), and an answer's head goes out with its body; everything else is the transport's own.

    uvicorn writes an answer's status line and headers, then its body: two `send` calls, two TCP segments (the
    socket has TCP_NODELAY), and the client wakes twice. The head is held until the next write, or the end of
    the loop's turn, whichever comes first: a whole JSON answer leaves in one segment.
    """

    def __init__(self, transport: asyncio.Transport, still_sending: Callable[[], bool]) -> None:
        self._transport = transport
        self._still_sending = still_sending
        self._timer: asyncio.TimerHandle | None = None
        self._head: bytes | None = None  # an answer's head, written with what follows it
        self.hold_head = True  # the next write is an answer's head (GuardedH11Protocol sets it for each answer)
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif self.hold_head and data:
            self.hold_head = False
            self._head = data
            asyncio.get_running_loop().call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now (its body did not follow in the same turn of the loop)."""
        if self._head is not None:
            head, self._head = self._head, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        transport = self._transport
        if self.lingering or transport.is_closing() or not transport.can_write_eof() or not self._still_sending():
            self.cancel()
            transport.close()
            return
        self.lingering = True
        transport.write_eof()  # after what is buffered: the client reads our answer, then end of stream
        transport.resume_reading()  # read and discard, so that nothing is left unread at the close
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, transport.close)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and a gentler shutdown."""

    header_timeout_s = 5.0
    keepalive_timeout_s: float | None = None

    def __init__(self, config: uvicorn.config.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        if self.keepalive_timeout_s is not None:
            self.timeout_keep_alive = self.keepalive_timeout_s
        if not getattr(config, "_mnist_headers", False):
            # uvicorn copies these into server_state.default_headers once a second; the first second too.
            config.encoded_headers = [*config.encoded_headers, *DEFAULT_HEADERS]
            self.server_state.default_headers = [*self.server_state.default_headers, *DEFAULT_HEADERS]
            config._mnist_headers = True
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaited_after: Any = None  # the cycle before the request whose headers we wait for
        self._draining = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = LingeringTransport(transport, self._client_may_be_sending)  # type: ignore[assignment]
        self._await_headers()
        publish_connections(len(self.server_state.connections), opened=True)  # for the others' accepts (accept.py)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self.transport.cancel()
        super().connection_lost(exc)
        publish_connections(len(self.server_state.connections), opened=False)

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # a half-closed connection's bytes are discarded
            super().data_received(data)

    def _client_may_be_sending(self) -> bool:
        """Part of a request came and not all of it (or it was malformed): closing now would reset the
        connection under the client's feet."""
        return bool(self.conn.trailing_data[0]) or self.conn.their_state in (h11.SEND_BODY, h11.ERROR)

    def handle_events(self) -> None:
        super().handle_events()
        if self._header_timer is not None and self.cycle is not self._awaited_after:
            self._cancel_header_timer()  # a new request's headers are complete
            if self._draining:
                self.cycle.keep_alive = False  # answer it, then close

    def on_response_complete(self) -> None:
        self.transport.hold_head = True  # the next answer's head
        if not self.transport.is_closing():
            self._await_headers()  # before super(): it may start a pipelined request, which disarms this
        super().on_response_complete()

    def shutdown(self) -> None:
        """Server shutdown: close idle keep-alive connections at once, as uvicorn does, but let a connection
        that has not sent its first request yet (accepted just before, its request on the wire) or is
        midway through a request's headers send it and get its answer."""
        first_request = self.cycle is None
        partial = bool(self.conn.trailing_data[0])
        if self._header_timer is not None and (first_request or partial) and not self.transport.is_closing():
            self._draining = True
            return
        super().shutdown()

    def _await_headers(self) -> None:
        self._cancel_header_timer()
        self._awaited_after = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.cycle is not self._awaited_after:
            return
        if self.conn.trailing_data[0] and self.conn.our_state in (h11.IDLE, h11.DONE):
            body = b'{"error": "request headers not received within %g s (MNIST_HEADER_TIMEOUT_S)"}' % (
                self.header_timeout_s
            )
            self.transport.write(_REQUEST_TIMEOUT % (len(body), body))
        self.transport.close()


async def _draining_shutdown(self: Server, sockets: list[socket.socket] | None = None) -> None:
    """uvicorn's Server.shutdown, preceded by the drain of the listen queue (module docstring)."""
    accept = original_accept()
    for server in self.servers:
        loop = server._loop  # asyncio's Server keeps what its accept handler needs
        if not isinstance(loop, selector_events.BaseSelectorEventLoop):
            continue  # uvloop (not installed here) has its own accept loop: uvicorn's plain shutdown
        for listener in server.sockets:
            sock = socket.socket(fileno=os.dup(listener.fileno()))  # the same kernel socket
            try:
                sock.setblocking(False)
                # Every connection the kernel already completed becomes ours, then no more are taken in.
                # No await in between: the window for a connection to slip into the queue is microseconds.
                accept(loop, server._protocol_factory, sock, server._ssl_context, server, _DRAIN_MAX)
                sock.shutdown(socket.SHUT_RD)
            except OSError as exc:
                log.debug("listen queue not drained: %s", exc)  # another worker shut it down first
            finally:
                sock.close()
            stop_accepting(loop, listener)  # uvicorn closes it below
    await asyncio.sleep(_DRAIN_SETTLE_S)  # the accepted connections get their protocols
    await _uvicorn_shutdown(self, sockets)


_uvicorn_shutdown = Server.shutdown


def exit_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux; elsewhere the supervisor's
    duty, README "Settings")."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        log.warning("prctl unavailable: workers will outlive a killed `bentoml serve`")
        return
    parent = os.getppid()
    if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("PR_SET_PDEATHSIG failed (errno %d)", ctypes.get_errno())
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def harden_worker(settings: Settings) -> None:
    """Install all of the above in this worker process (call before uvicorn loads its config)."""
    GuardedH11Protocol.header_timeout_s = settings.header_timeout_s
    GuardedH11Protocol.keepalive_timeout_s = settings.keepalive_timeout_s
    protocol = f"{GuardedH11Protocol.__module__}:{GuardedH11Protocol.__qualname__}"
    # BentoML lets uvicorn pick ("auto": httptools if installed, else h11); pin ours, which is h11.
    uvicorn.config.HTTP_PROTOCOLS["auto"] = protocol
    uvicorn.config.HTTP_PROTOCOLS["h11"] = protocol
    Server.shutdown = _draining_shutdown  # type: ignore[method-assign]
    exit_with_parent()
