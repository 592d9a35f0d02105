"""A request ID on every answer, in every JSON error body and in the log lines about the request.

The client's `X-Request-ID` is kept when it is sane (1 to 128 printable ASCII characters, no spaces), so an ID
a load balancer or client set ties its logs to ours; otherwise a fresh one is made. The ID goes back in the
answer's `X-Request-ID` header, into the body of every JSON error answer (`"request_id"`), and into our log lines
(the access line, with MNIST_ACCESS_LOG=1, and one line per 5xx, and per 4xx at INFO). Inside the request,
`current()` returns it.

Two places do it, sharing the helpers here: the fast path (fastpath.py) for the API routes, on the response objects
it already holds (no extra ASGI layer on the hot path), and `RequestIds`, a pure ASGI middleware, for everything
else (BentoML's dispatch with MNIST_FAST_PATH=0, health, metrics, the pages). BentoML's own middlewares sit outside
every user middleware; the one answer they could make for one of our routes, the 504 of BentoML's request timeout,
is made by our own deadline first (fastpath.py).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

HEADER = b"x-request-id"
MAX_LENGTH = 128
# An error body larger than this is passed on untouched (ours are a line; BentoML's are short too).
MAX_ERROR_BODY = 64 * 1024

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def current() -> str | None:
    """The ID of the request being answered (None outside a request)."""
    return _current.get()


def sane(value: bytes) -> bool:
    """Whether a client's ID can be echoed and logged as it is: 1-128 visible ASCII characters."""
    return 0 < len(value) <= MAX_LENGTH and all(0x21 <= byte <= 0x7E for byte in value)


def request_id(scope: Scope) -> str:
    """The client's sane X-Request-ID, else a fresh one (32 random hex digits)."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            if sane(value):
                return value.decode("ascii")
            break
    return os.urandom(16).hex()


def begin(scope: Scope) -> tuple[str, contextvars.Token[str | None]]:
    """The request's ID, made current (`current()`) until `end(token)`."""
    rid = request_id(scope)
    return rid, _current.set(rid)


def end(token: contextvars.Token[str | None]) -> None:
    _current.reset(token)


def log_answer(scope: Scope, status: int, seconds: float, rid: str) -> None:
    """One line about an answer, with its ID: 5xx (and no answer at all) at ERROR, 503 at WARNING, else INFO."""
    level = logging.INFO  # the access log, and the client's mistakes
    if status == 503:
        level = logging.WARNING
    elif status >= 500 or status == 0:  # 0: the app raised before it answered
        level = logging.ERROR
    client = scope.get("client") or ("-", 0)
    log.log(
        level, "%s %s %s -> %s in %.1f ms [request_id=%s]",
        client[0], scope["method"], scope["path"], status or "no answer", seconds * 1000, rid,
    )  # fmt: skip


class RequestIds:
    """ASGI middleware: see the module docstring. `access_log`: one INFO line per request, with its ID."""

    def __init__(self, app: ASGIApp, access_log: bool = False) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid, token = begin(scope)
        header = (HEADER, rid.encode("ascii"))
        start = time.perf_counter()
        status = 0
        held: Message | None = None  # an error answer's start, until its body has the ID
        chunks: list[bytes] = []

        async def send_with_id(message: Message) -> None:
            nonlocal status, held
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
                if status >= 400 and _is_json(message["headers"]):
                    held = message  # until its body is whole: the ID goes into it
                    return
            elif held is not None and message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
                if more and sum(map(len, chunks)) <= MAX_ERROR_BODY:
                    return
                start_message, held = held, None
                body = b"".join(chunks)
                if not more:  # whole: add the ID, and set the length to the new body's
                    body = _with_id(body, rid)
                    start_message["headers"] = [
                        (k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                        for k, v in start_message["headers"]
                    ]
                # else: too large to hold; sent on as it is
                await send(start_message)
                message = {**message, "body": body}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            end(token)
            if self.access_log or status >= 400 or status == 0:
                log_answer(scope, status, time.perf_counter() - start, rid)


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"application/json") for k, v in headers)


def _with_id(body: bytes, rid: str) -> bytes:
    """A JSON object's body with "request_id" added; anything else as it is."""
    if len(body) > MAX_ERROR_BODY:
        return body
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    return json.dumps({**data, "request_id": rid}).encode()
