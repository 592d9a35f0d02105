"""Locust scenario of benchmarks/rollout.py: loadtest/locustfile.py's uploaders, unchanged (the same tasks, the same
checks, its calibration), plus a tally of every request, written when Locust quits to the file ROLLOUT_TALLY names.

A row per request: [start (epoch seconds), response time (ms), name, outcome, version]. The outcome is "ok" or the
kind of failure, from what the client saw (locustfile.py's own checks turn a connection error into "HTTP 0", which
would hide a reset): "reset" (the connection was reset or closed before the whole answer came), "refused",
"timeout", another exception's class name, "HTTP <status>", or "wrong answer" (any failed check of a 200). The
version is the answer's "version" field (every answer of /predict, /predict_batch and /read carries one), or "".
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from geventhttpclient.response import HTTPConnectionClosed
from locust import events

from loadtest.locustfile import DigitUploader  # noqa: F401 - the user class Locust runs; its calibration comes along

TALLY = os.environ.get("ROLLOUT_TALLY")
ROWS: list[list[Any]] = []
EXAMPLES: dict[str, str] = {}  # the first message of each kind of failure
# A connection reset, or closed by the other end without an answer (a keep-alive connection closed while a request
# went out on it): what a client sees when a server or proxy drops a connection under it.
RESETS = (ConnectionResetError, BrokenPipeError, HTTPConnectionClosed)


def outcome(response: Any, exception: BaseException | None) -> str:
    if exception is None:
        return "ok"
    error = getattr(response, "error", None) or exception
    if isinstance(error, RESETS):
        return "reset"
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, socket.timeout | TimeoutError):
        return "timeout"
    if isinstance(error, OSError):
        return type(error).__name__
    status = getattr(response, "status_code", 0) or 0
    return f"HTTP {status}" if status not in (0, 200) else "wrong answer"


def version_of(response: Any) -> str:
    if getattr(response, "status_code", 0) != 200:
        return ""
    try:
        answer = response.json()
    except ValueError:
        return ""
    return str(answer.get("version") or "") if isinstance(answer, dict) else ""


@events.request.add_listener
def on_request(
    name: str,
    response_time: float,
    response: Any = None,
    exception: BaseException | None = None,
    start_time: float = 0.0,
    **_: object,
) -> None:
    kind = outcome(response, exception)
    if kind != "ok":
        EXAMPLES.setdefault(kind, f"{name}: {getattr(response, 'error', None) or exception}"[:300])
    ROWS.append([start_time, round(response_time, 2), name, kind, version_of(response)])


@events.quit.add_listener
def on_quit(**_: object) -> None:
    """After the runner has stopped every user (their last requests answered or given up)."""
    if TALLY:
        with open(TALLY, "w") as f:
            json.dump({"rows": ROWS, "examples": EXAMPLES}, f)
