"""The client's mistakes, as exceptions every layer may raise: each carries the HTTP status it is answered with.

A leaf module (it imports nothing of ours), so that the image pipeline and the model runtime can name a client's
mistake without knowing about HTTP; the HTTP layer turns any `ClientError` into a 4xx `{"error": ...}`.
"""

from __future__ import annotations

# nginx's status for a request whose client went away; it never reaches the wire.
CLIENT_CLOSED_REQUEST = 499


class ClientError(ValueError):
    """A request the client got wrong; str(e) names the problem, `status` is its 4xx (or 503 for "busy").

    `headers` go into the answer (Retry-After, Connection: close).
    """

    status: int = 400

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class RequestError(ClientError):
    """The request itself is wrong (size, encoding, fields)."""


class ClientGone(RequestError):
    """The client hung up (mid-body, or while its images were being worked on): 499, answered to no one."""

    def __init__(self, message: str = "the client closed the connection before the answer") -> None:
        super().__init__(CLIENT_CLOSED_REQUEST, message)
