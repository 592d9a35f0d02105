"""Reading request bodies with limits: uploaded images (multipart or raw) and JSON.

BentoML's own request parsing is bypassed for our endpoints (see `RawRequest` in patches.py) because, in BentoML 1.4,
it answers some client mistakes with 500 (a malformed multipart body, a text field where a file is
expected, which it even tries to download as a URL) and wraps 4xx messages in a list. Reading the body
here keeps every client mistake a 4xx `{"error": ...}` and lets the byte limit act before the body is read.

Clients that are slow or gone are their own kind of mistake: a body that does not arrive within its time
gets 408 (not BentoML's 504, which says the server was slow), and a client that hangs up mid-body is
answered with 499, nginx's "client closed request": nobody receives it, but the access log and
bentoml_service_request_total count it as the client's doing instead of a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import multipart
from starlette.requests import ClientDisconnect, Request

from ..errors import ClientGone, RequestError

# Text fields are model names and flags: anything longer is a mistake, not a reason to buffer megabytes.
MAX_FIELD_BYTES = 1024
MAX_FIELDS = 16
IMAGE_TYPES = ("image/", "application/octet-stream")


@dataclass
class Upload:
    """Image files in request order plus the text fields (or query parameters) that came with them."""

    files: list[tuple[str, bytes]] = field(default_factory=list)  # (field/file name, bytes)
    fields: dict[str, str] = field(default_factory=dict)

    def flag(self, name: str) -> bool:
        value = self.fields.get(name, "false").strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
        raise RequestError(400, f"field {name!r} must be true or false, got {value!r}")


async def read_images(
    request: Request,
    *,
    field: str,
    max_files: int,
    max_bytes: int,
    too_many: str,
    allow_raw: bool = True,
    timeout_s: float | None = None,
) -> Upload:
    """The images sent in file field `field` (multipart), or the raw body sent as Content-Type image/*.

    `too_many` is the message for more than `max_files` files; `timeout_s` bounds the time to receive the
    body (None: no bound).

    Raises RequestError: 413 for more than `max_bytes` or `max_files`, 415 for other content types,
    400 for a malformed body, a missing field or a text field in place of a file, 408 for a body slower
    than `timeout_s`; ClientGone (499) when the client hangs up.
    """
    async with _receiving(timeout_s):
        return await _read_images(request, field, max_files, max_bytes, too_many, allow_raw)


async def _read_images(
    request: Request, field: str, max_files: int, max_bytes: int, too_many: str, allow_raw: bool
) -> Upload:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if allow_raw and content_type.startswith(IMAGE_TYPES):
        body = await read_body(request, max_bytes)
        return Upload(files=[("body", body)], fields=query_fields(request))
    if content_type != "multipart/form-data":
        raw = ", or the image itself with Content-Type image/png (or another image/*)" if allow_raw else ""
        raise RequestError(
            415,
            f"unsupported Content-Type {content_type or '(none)'!r}: send multipart/form-data with a file "
            f"field {field!r}{raw}",
        )
    body = await read_body(request, max_bytes)
    try:
        parts = parse_multipart(body, request.headers["content-type"], max_files=max_files)
    except TooManyFiles as exc:
        raise RequestError(413, too_many) from exc
    except MultipartError as exc:
        raise RequestError(400, f"malformed multipart body: {exc}") from exc
    upload = Upload(fields=query_fields(request))
    for part in parts:
        if part.filename is None:
            upload.fields[part.name] = part.text()
        elif part.name == field:
            upload.files.append((part.filename or part.name, part.data))
    if field in upload.fields:
        raise RequestError(400, f"field {field!r} must be a file upload, got a text value")
    if not upload.files:
        got = ", ".join(sorted({part.name for part in parts})) or "none"
        raise RequestError(400, f"missing file field {field!r} (fields received: {got})")
    return upload


def query_fields(request: Request) -> dict[str, str]:
    """The URL's query parameters (`?model=mnist-mlp`); most requests have none, and parsing nothing costs ~10 us."""
    return dict(request.query_params) if request.scope.get("query_string") else {}


class MultipartError(ValueError):
    """The body is not the multipart/form-data its Content-Type says; str(e) says where it breaks."""


class TooManyFiles(MultipartError):
    """More file parts than the caller allows (the parser stops at the first one too many)."""


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body: a file when it has a `filename` (even ""), else a text field."""

    name: str
    filename: str | None
    data: bytes

    def text(self) -> str:
        return _decode(self.data)


def parse_multipart(
    body: bytes,
    content_type: str,
    *,
    max_files: int,
    max_fields: int = MAX_FIELDS,
    max_field_bytes: int = MAX_FIELD_BYTES,
) -> list[Part]:
    """The parts of a whole multipart/form-data `body` (RFC 7578), in order, parsed by the `multipart` library.

    Its push parser, fed the whole body at once: our bodies are read whole anyway (the images are decoded in memory).
    Measured in process (docs/benchmarks.md, "Foundation"): ~8 us for a one-digit /predict body, where
    python-multipart's byte-by-byte header parser took ~24 us and Starlette's form parser around it ~200 us. Same
    rules and limits as Starlette's (tests/test_uploads.py runs both on the same bodies): a part needs a
    Content-Disposition with a `name`; text fields at most `max_field_bytes`; at most `max_files` files and
    `max_fields` fields; a part's headers at most 8 lines of 4 KiB; a body cut short is refused.
    """
    _, options = multipart.parse_options_header(content_type)
    boundary = options.get("boundary")
    if not boundary:
        raise MultipartError("no boundary in the Content-Type header")
    if not body.startswith(b"--" + boundary.encode("latin-1")):  # no preamble, as in Starlette's parser
        raise MultipartError("the body does not start with the boundary from the Content-Type header")
    parts: list[Part] = []
    files = fields = 0
    segment: multipart.MultipartSegment | None = None
    data: list[bytes] = []
    try:
        with multipart.PushMultipartParser(boundary, max_segment_count=max_files + max_fields + 1) as parser:
            for event in parser.parse(body):
                if isinstance(event, multipart.MultipartSegment):
                    if not event.name:
                        raise MultipartError('the Content-Disposition header field "name" must be provided')
                    segment, data = event, []
                elif event:
                    data.append(event)
                elif segment is not None:  # None: the segment is complete
                    if segment.filename is None:
                        fields += 1
                        if fields > max_fields:
                            raise MultipartError(f"Too many fields. Maximum number of fields is {max_fields}.")
                        if segment.size > max_field_bytes:
                            raise MultipartError(f"text field {segment.name!r} is longer than {max_field_bytes} bytes")
                    else:
                        files += 1
                        if files > max_files:
                            raise TooManyFiles(f"Too many files. Maximum number of files is {max_files}.")
                    parts.append(Part(segment.name, segment.filename, b"".join(data)))
            if not parser.closed:
                try:
                    parser.close()
                except multipart.ParserError:
                    raise MultipartError("the body ends inside a part (no closing boundary)") from None
    except multipart.ParserError as exc:
        raise MultipartError(str(exc)) from None
    return parts


def _decode(raw: bytes) -> str:
    """UTF-8, or Latin-1 where it is not (Starlette's rule for names and text fields)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


async def read_json(request: Request, *, max_bytes: int, timeout_s: float | None = None) -> dict[str, Any]:
    """The body as a JSON object; RequestError 400 for anything else (408, 499 as for read_images)."""
    async with _receiving(timeout_s):
        body = await read_body(request, max_bytes)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"invalid JSON body: {exc}") from exc
    except RecursionError:  # the C parser's guard against deep nesting ([[[[...]]]]): not a server fault
        raise RequestError(400, "invalid JSON body: nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the JSON body must be an object, got {type(data).__name__}")
    return data


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, at most `max_bytes`; RequestError 413 as soon as it is known to be longer."""
    _check_length(request, max_bytes)
    chunks = [chunk async for chunk in _limited(request.stream(), max_bytes)]
    body = b"".join(chunks)
    if not body:
        raise RequestError(400, "empty request body")
    return body


@contextlib.asynccontextmanager
async def _receiving(timeout_s: float | None) -> AsyncIterator[None]:
    """Turn a slow body into 408 and a hang-up into ClientGone, while the body is being received."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise RequestError(
            408,
            f"request body not received within {timeout_s:g} s (MNIST_BODY_TIMEOUT_S): the upload is too "
            "slow, or Content-Length promises more bytes than were sent",
            headers={"Connection": "close"},  # the rest of the body may still be on its way: don't parse it
        ) from None
    except ClientDisconnect:
        raise ClientGone("the client closed the connection while sending the body") from None


def _check_length(request: Request, max_bytes: int) -> None:
    """Reject by the Content-Length header, before a byte of the body is read."""
    length = request.headers.get("content-length")
    if length is None:
        return  # chunked: _limited counts while reading
    if not length.isdigit():
        raise RequestError(400, f"invalid Content-Length header {length!r}")
    if int(length) > max_bytes:
        raise RequestError(413, _too_large(f"{length} bytes", max_bytes))


async def _limited(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    size = 0
    async for chunk in stream:
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, _too_large(f"more than {max_bytes} bytes", max_bytes))
        yield chunk


def _too_large(size: str, limit: int) -> str:
    return f"request body too large: {size}; the limit is {limit} bytes (MNIST_MAX_BYTES)"
