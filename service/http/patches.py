"""Every patch of a private internal of asyncio, uvicorn, h11 or BentoML that the service relies on, in one place.

Nothing here is applied at import: `install(settings, worker_index)` applies the patches, and service.py calls it
only in a serving worker process (BentoML's worker sets `bentoml.server_context.worker_index` before it imports the
service; the `bentoml serve` supervisor, `bentoml build` and the tests import the service without it). It has to
be at that import: the worker builds uvicorn's config and resolves its protocol class right after it, before any
hook of ours would run. Each patch logs one line at start-up, and tests/test_patches.py fails if a patched
attribute disappears or changes its signature. What each one is worth, measured against the same server without
it, is in docs/benchmarks.md ("What the patches earn").

- **fair-share accept**: asyncio's `BaseSelectorEventLoop._accept_connection` and `loop._add_reader/_remove_reader`;
  connections split evenly over the workers (the policy and the shared table: balance.py).
- **guarded protocol**: uvicorn's `H11Protocol` (subclassed: `conn`, `cycle`, `server_state`) and
  `uvicorn.config.HTTP_PROTOCOLS`; header timeout (slowloris), lingering close, a gentler shutdown, an answer's head
  and body in one TCP segment.
- **draining shutdown**: `uvicorn.Server.shutdown`, asyncio `Server._loop/_protocol_factory/_ssl_context`; no
  connection reset at SIGTERM.
- **raw request bodies**: BentoML's undocumented `IODescriptor.from_http_request`, overridden in subclasses (BentoML
  itself is not changed); with MNIST_FAST_PATH=0 the bodies reach our parser, not BentoML's (which answers some
  mistakes with 500).

What a public option does is not patched: uvicorn's keep-alive and graceful-shutdown timeouts and default headers are
set as uvicorn's own `Config` options (`timeout_keep_alive`, `timeout_graceful_shutdown`, `headers`), which BentoML
builds without them; the one hook for that is a wrapper of uvicorn's public `Config.load`, installed in every worker
whatever MNIST_PATCHES says (`configure`).

The connection-level patches (uvicorn's H11Protocol, Server.shutdown):
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
  Accepting "until the queue is empty" and then shutting down still left a gap: a handshake that
  completed between the last accept() and the shutdown, or was still under way at the shutdown (its last
  ACK then meets no listener), was reset. The gap is microseconds, longer when the worker is preempted
  there; a bare socket drained and shut down that way reset 11 clients in 40 runs here (2 cores, 4
  clients connecting in a loop), and a client of the SIGTERM test saw ECONNRESET once in CI. So new
  handshakes are stopped first: a socket filter (SO_ATTACH_FILTER, Linux) drops each new SYN, the
  handshakes under way complete, and only then is the queue drained and the socket shut down (0 resets
  in 40 runs). A client whose SYN was dropped sends it again a second later and is refused.
- **No orphans.** Workers ask the kernel for SIGTERM when their parent dies (PR_SET_PDEATHSIG), so a
  `kill -9` of `bentoml serve` no longer leaves them serving on the port: they drain and exit.
- **nosniff on every answer**, BentoML's and uvicorn's own errors included, as one of uvicorn's default
  headers (no per-request work).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import inspect
import logging
import os
import signal
import socket
import struct
import sys
import time
from asyncio import selector_events
from collections.abc import Callable
from typing import Any, ClassVar

import h11
import uvicorn.config
from bentoml import IODescriptor
from starlette.requests import Request
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import Server

from ..settings import PATCHES, Settings
from .balance import BURST, DEFER_S, ConnectionTable, per_wakeup, queued_connections, should_defer

log = logging.getLogger(__name__)

_PATCHED = "_mnist_fair_share_accept"
# The settings `install` was called with (read by the patched code at run time).
_settings: Settings | None = None

# Headers uvicorn adds to every response it sends (its `headers` option).
DEFAULT_HEADERS = [("x-content-type-options", "nosniff")]
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"x-content-type-options: nosniff\r\ncontent-length: %d\r\n\r\n%s"
)
# Time for connections accepted in the drain to be set up before uvicorn asks them to shut down.
_DRAIN_SETTLE_S = 0.05
# Time for the handshakes under way when new SYNs start being dropped to complete (one round trip: microseconds on
# loopback, well under this from a proxy or load balancer on the same network).
_HANDSHAKE_SETTLE_S = 0.05
# A classic BPF socket filter, (code, jt, jf, k) each, run on a TCP socket's packets from the TCP header on: drop a
# packet whose flags have SYN without ACK (a new connection), keep every other one (a handshake's last ACK, data).
_DROP_NEW_SYNS = (
    (0x30, 0, 0, 13),  # ldb [13]: the TCP flags
    (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
    (0x15, 0, 1, 0x02),  # jeq #SYN: the next instruction, else skip it
    (0x06, 0, 0, 0),  # ret #0: drop
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep all of it
)
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)  # Python does not name it; 26 in Linux's socket.h
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

    def __init__(self, config: uvicorn.config.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaited_after: Any = None  # the cycle before the request whose headers we wait for
        self._draining = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = LingeringTransport(transport, self._client_may_be_sending)  # type: ignore[assignment]
        self._await_headers()
        publish_connections(len(self.server_state.connections), opened=True)  # for the others' accepts (balance.py)

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


def configure(config: uvicorn.config.Config) -> None:
    """Set uvicorn's own public options that BentoML's worker does not pass: the keep-alive timeout, the bound on
    a graceful shutdown (without it uvicorn waits for in-flight requests for ever, and BentoML's supervisor waits
    a day for the worker) and a header on every answer. Called by `Config.load` (see `install`), before uvicorn
    derives anything from them.

    `bentoml serve --timeout-graceful-shutdown` wins over MNIST_SHUTDOWN_TIMEOUT_S; `--timeout-keep-alive` does not,
    because BentoML always passes uvicorn a keep-alive of its own and MNIST_KEEPALIVE_TIMEOUT_S is ours."""
    if _settings is None:
        return
    config.timeout_keep_alive = _settings.keepalive_timeout_s  # type: ignore[assignment]  # uvicorn takes floats
    if config.timeout_graceful_shutdown is None:
        config.timeout_graceful_shutdown = _settings.shutdown_timeout_s  # type: ignore[assignment]
    have = {name.lower() for name, _ in config.headers}
    config.headers = [*config.headers, *((k, v) for k, v in DEFAULT_HEADERS if k not in have)]


def _configuring_load(self: uvicorn.config.Config) -> None:
    """uvicorn's Config.load, after our options are set on the config (public attributes, read by load)."""
    configure(self)
    _uvicorn_load(self)


_uvicorn_load = uvicorn.config.Config.load


async def _draining_shutdown(self: Server, sockets: list[socket.socket] | None = None) -> None:
    """uvicorn's Server.shutdown, preceded by the drain of the listen queue (module docstring)."""
    accept = original_accept()
    # asyncio's Server keeps what its accept handler needs; uvloop (not installed here) has its own accept loop, and
    # gets uvicorn's plain shutdown.
    listeners = [
        (server, listener)
        for server in self.servers
        if isinstance(server._loop, selector_events.BaseSelectorEventLoop)
        for listener in server.sockets
    ]
    refusing = [refuse_new_handshakes(listener) for _, listener in listeners]
    if any(refusing):
        await asyncio.sleep(_HANDSHAKE_SETTLE_S)  # meanwhile this loop accepts as usual
    for server, listener in listeners:
        loop = server._loop
        sock = socket.socket(fileno=os.dup(listener.fileno()))  # the same kernel socket
        try:
            sock.setblocking(False)
            # Every connection the kernel already completed becomes ours, then no more are taken in. With new SYNs
            # dropped, none can complete in between; without (not Linux), no await keeps the gap short.
            accept(loop, server._protocol_factory, sock, server._ssl_context, server, _DRAIN_MAX)
            sock.shutdown(socket.SHUT_RD)
        except OSError as exc:
            log.debug("listen queue not drained: %s", exc)  # another worker shut it down first
        finally:
            sock.close()
        stop_accepting(loop, listener)  # uvicorn closes it below
    await asyncio.sleep(_DRAIN_SETTLE_S)  # the accepted connections get their protocols
    await _uvicorn_shutdown(self, sockets)


def refuse_new_handshakes(sock: socket.socket) -> bool:
    """Have the kernel drop the SYN of each new connection to the listening TCP socket `sock` (shared: for every
    worker), while the handshakes under way complete and queue as usual; False where it cannot (not Linux, not TCP).

    Dropped, not refused (a socket filter cannot answer): the client sends its SYN again a second later, by when the
    socket is shut down and refuses it. Only the SYNs of the drain's short wait are dropped."""
    if not sys.platform.startswith("linux") or sock.type != socket.SOCK_STREAM:
        return False
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False  # a Unix socket's filter would see the request bytes, not TCP headers
    program = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *op) for op in _DROP_NEW_SYNS))
    fprog = struct.pack("@HP", len(_DROP_NEW_SYNS), ctypes.addressof(program))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)  # the kernel copies the program
    except OSError as exc:
        log.warning("new connections not held off during the drain (SO_ATTACH_FILTER: %s): some may be reset", exc)
        return False
    return True


_uvicorn_shutdown = Server.shutdown


def exit_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux; elsewhere the supervisor's
    duty, docs/api.md "Settings")."""
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


# This worker process's table, once its first connection is accepted (see spread_accepts).
_table: ConnectionTable | None = None
_table_failed = False


def publish_connections(count: int, opened: bool) -> None:
    """Tell the other workers how many connections this one holds now (GuardedH11Protocol, on each open and close).

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
            waited = now - (table.waiting_since or now)
            # Only to a live worker: one killed outright never marked its slot GONE (checked only here, the rare case).
            if should_defer(mine, others, waited) and should_defer(
                mine, table.alive_counts(others, below=mine), waited
            ):
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
            # Another worker is shutting down and stopped the shared socket listening (the draining shutdown): stop
            # watching it too, instead of logging this error on every turn of the loop until our own shutdown.
            self._remove_reader(sock.fileno())

    setattr(accept_share, _PATCHED, True)
    loop_class._accept_connection = accept_share


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


class RawRequest(IODescriptor):
    """An input spec that tells BentoML to leave the body alone: the endpoint reads `ctx.request` (uploads.py).

    Only with MNIST_FAST_PATH=0: the fast path answers the API routes before BentoML's dispatch. Overrides BentoML's
    undocumented `IODescriptor.from_http_request` in a subclass; BentoML itself is not changed."""

    @classmethod
    async def from_http_request(cls, request: Request, serde: object) -> RawRequest:  # type: ignore[override]
        return cls()


class MultipartRequest(RawRequest):
    media_type: ClassVar[str | None] = "multipart/form-data"


class JSONAnswer(IODescriptor):
    """An output spec for endpoints that return a ready JSONResponse: BentoML sends it as it is, and
    skips the per-response JSON-schema work it does for a `dict` return type."""

    media_type: ClassVar[str | None] = "application/json"


def install(settings: Settings, worker_index: int) -> None:
    """Apply the patches named in settings.patches (MNIST_PATCHES: all by default) in this serving worker
    (`worker_index`: 1 to settings.workers), before uvicorn starts."""
    global _settings
    _settings = settings
    # Not switchable: it only sets public options (keep-alive, the shutdown's bound, nosniff) on the Config that
    # BentoML builds, through the one public method that sees it before the server starts.
    uvicorn.config.Config.load = _configuring_load  # type: ignore[method-assign]
    if "protocol" in settings.patches:
        GuardedH11Protocol.header_timeout_s = settings.header_timeout_s
        protocol = f"{GuardedH11Protocol.__module__}:{GuardedH11Protocol.__qualname__}"
        # BentoML lets uvicorn pick ("auto": httptools if installed, else h11); pin ours, which is h11. (uvicorn's
        # HTTP/2 path is taken only with Config(http2=True), which BentoML never sets.)
        uvicorn.config.HTTP_PROTOCOLS["auto"] = protocol
        uvicorn.config.HTTP_PROTOCOLS["h11"] = protocol
    if "drain" in settings.patches:
        Server.shutdown = _draining_shutdown  # type: ignore[method-assign]
    if "accept" in settings.patches and settings.workers > 1:
        spread_accepts(settings.workers, worker_index)
    exit_with_parent()  # not a patch: a plain Linux call


def report(loop: asyncio.AbstractEventLoop) -> None:
    """Log, once the worker's loop runs, which patches are active: one line each, and one for those turned off; a
    warning when the accept and drain patches cannot act on this loop (uvloop has its own accept loop: connections
    are then not split evenly, and SIGTERM does not drain the listen queue). Not at `install`: BentoML names a
    worker's log lines only after it has imported the service."""
    if _settings is None:
        return  # not a serving worker: nothing was patched
    settings = _settings
    if "protocol" in settings.patches:
        log.info(
            "patch active: uvicorn's h11 protocol (header timeout %gs, lingering close, one-segment answers), "
            "keep-alive %gs",
            settings.header_timeout_s, settings.keepalive_timeout_s,
        )  # fmt: skip
    if "drain" in settings.patches:
        log.info("patch active: draining shutdown (the listen queue is drained, then the socket refuses)")
    selector_loop = isinstance(loop, selector_events.BaseSelectorEventLoop)
    if not selector_loop and {"accept", "drain"} & set(settings.patches):
        log.warning(
            "event loop %s is not asyncio's selector loop: the fair-share accept and the shutdown drain are off "
            "(uninstall uvloop to have them)",
            type(loop).__name__,
        )
    elif "accept" in settings.patches and settings.workers > 1:
        log.info(
            "patch active: asyncio's accept takes a fair share (connections split over %d workers)", settings.workers
        )
    log.info(
        "uvicorn options set: keep-alive %gs, graceful shutdown bounded at %gs, X-Content-Type-Options: nosniff",
        settings.keepalive_timeout_s, settings.shutdown_timeout_s,
    )  # fmt: skip
    if "drain" in settings.patches and "protocol" not in settings.patches:
        log.warning("MNIST_PATCHES: drain without protocol: connections drained at SIGTERM are closed unanswered")
    off = [name for name in PATCHES if name not in settings.patches]
    if off:
        log.warning("patches off (MNIST_PATCHES): %s; uvicorn and asyncio as shipped there", ", ".join(off))


# What the guard test checks: each patched attribute, and the parameters our replacement relies on.
PATCHED_SIGNATURES: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "asyncio BaseSelectorEventLoop._accept_connection": (
        selector_events.BaseSelectorEventLoop._accept_connection,
        ("self", "protocol_factory", "sock", "sslcontext", "server", "backlog"),
    ),
    "uvicorn Server.shutdown": (Server.shutdown, ("self", "sockets")),
    "uvicorn H11Protocol.__init__": (H11Protocol.__init__, ("self", "config", "server_state", "app_state")),
    "uvicorn Config.load": (uvicorn.config.Config.load, ("self",)),
}


def signature_of(func: Callable[..., Any]) -> tuple[str, ...]:
    """The parameter names of `func` (the original, if it is one of our wrappers)."""
    return tuple(inspect.signature(getattr(func, "__wrapped__", func)).parameters)
