"""X-Request-ID on every answer, in every JSON error body and in the log line (service/http/requestid.py)."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import EXPORTED, Digit, Server
from PIL import Image

from loadtest.server import LocalServer
from service.http.requestid import MAX_LENGTH, RequestIds, request_id, sane

FRESH = re.compile(r"[0-9a-f]{32}")
TIMEOUT = 60


def scope_with(value: bytes | None) -> dict:
    headers = [(b"host", b"x")] + ([(b"x-request-id", value)] if value is not None else [])
    return {"type": "http", "headers": headers}


def test_a_sane_client_id_is_kept_and_anything_else_replaced() -> None:
    assert request_id(scope_with(b"abc-123")) == "abc-123"
    assert request_id(scope_with(b"x" * MAX_LENGTH)) == "x" * MAX_LENGTH
    for bad in (b"", b"x" * (MAX_LENGTH + 1), b"two words", b"tab\there", b"caf\xc3\xa9", b"new\r\nline"):
        assert not sane(bad), bad
        assert FRESH.fullmatch(request_id(scope_with(bad))), bad
    assert FRESH.fullmatch(request_id(scope_with(None)))
    assert request_id(scope_with(None)) != request_id(scope_with(None))  # fresh each time


def post(url: str, path: str, files: dict, rid: str | None = None) -> requests.Response:
    headers = {"X-Request-ID": rid} if rid else {}
    return requests.post(f"{url}{path}", files=files, headers=headers, timeout=TIMEOUT)


def number_png(digits: list[Digit]) -> bytes:
    """Three MNIST digits side by side, black on white, as a scanned number."""
    row = np.hstack([d.pixels for d in digits[:3]])
    out = io.BytesIO()
    Image.fromarray(np.rint(255 - row * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow
def test_every_api_answer_carries_an_id_and_echoes_the_clients(server: Server, mnist_digits: list[Digit]) -> None:
    digit = mnist_digits[0]
    one = {"image": (digit.name, digit.png, "image/png")}
    calls = {
        "/predict": one,
        "/predict_batch": [("images", (d.name, d.png, "image/png")) for d in mnist_digits[:3]],
        "/read": {"image": ("n.png", number_png(mnist_digits), "image/png")},
    }
    for path, files in calls.items():
        fresh = post(server.url, path, files)
        assert fresh.status_code == 200, (path, fresh.text)
        assert FRESH.fullmatch(fresh.headers["X-Request-ID"]), path
        echoed = post(server.url, path, files, rid=f"client-{path.strip('/')}-1")
        assert echoed.headers["X-Request-ID"] == f"client-{path.strip('/')}-1", path
    # Not only the API routes: health and the model cards too.
    for path in ("/readyz", "/model"):
        assert FRESH.fullmatch(requests.get(f"{server.url}{path}", timeout=TIMEOUT).headers["X-Request-ID"]), path


@pytest.mark.slow
def test_a_client_error_has_the_id_in_its_header_body_and_log_line(server: Server, mnist_digits: list[Digit]) -> None:
    digit = mnist_digits[0]
    bad = post(server.url, "/predict", {"image": ("x.png", b"not an image", "image/png")}, rid="bad-upload-42")
    assert bad.status_code == 400
    assert bad.headers["X-Request-ID"] == "bad-upload-42"
    assert bad.json() == {"error": bad.json()["error"], "request_id": "bad-upload-42"}
    assert int(bad.headers["Content-Length"]) == len(bad.content)  # the body grew: its length was set again
    unknown = post(server.url, "/predict?model=mnist-xl", {"image": (digit.name, digit.png, "image/png")})
    assert unknown.status_code == 404
    assert unknown.json()["request_id"] == unknown.headers["X-Request-ID"]
    insane = post(server.url, "/predict", {"image": ("x.png", b"nope", "image/png")}, rid="has spaces")
    assert (
        FRESH.fullmatch(insane.headers["X-Request-ID"])
        and insane.json()["request_id"] == insane.headers["X-Request-ID"]
    )
    deadline = time.monotonic() + 10
    while "request_id=bad-upload-42" not in server.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the 400 was not logged with its request ID"
        time.sleep(0.1)
    line = next(x for x in server.log.read_text(errors="replace").splitlines() if "request_id=bad-upload-42" in x)
    assert "POST /predict -> 400" in line


@pytest.mark.slow
def test_the_503_and_the_access_log_carry_the_id(tmp_path: Path, mnist_digits: list[Digit]) -> None:
    """One decoding thread and room for one big image at a time: a burst of big uploads queues past its 2 s wait
    and gets 503 with Retry-After; each 503 carries its own ID, and the access log names every request's."""
    big = 4096 * 4096
    env = {
        "MNIST_EXPORTED_DIR": str(EXPORTED), "MNIST_MODELS": "mnist-cnn", "MNIST_WORKERS": "1",
        "MNIST_THREADS": "1", "MNIST_MAX_PIXELS": str(big), "MNIST_MAX_REQUEST_PIXELS": str(big),
        "MNIST_MAX_INFLIGHT_PIXELS": str(big), "MNIST_ACCESS_LOG": "1", "BENTOML_HOME": str(tmp_path / "home"),
    }  # fmt: skip
    seven = next(d for d in mnist_digits if d.label == 7)
    image = Image.fromarray(np.rint(seven.pixels * 255).astype(np.uint8)).resize((4096, 4096), Image.NEAREST)
    out = io.BytesIO()
    Image.fromarray(np.asarray(image).astype(np.uint16) * 257).save(out, format="PNG")  # slow to decode
    png = out.getvalue()
    with LocalServer(env=env, log_path=tmp_path / "bentoml.log") as server:

        def upload(i: int) -> requests.Response:
            return post(server.url, "/predict", {"image": ("big.png", png, "image/png")}, rid=f"burst-{i}")

        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(upload, range(16)))
        busy = [r for r in responses if r.status_code == 503]
        assert busy, sorted(r.status_code for r in responses)
        for i, response in enumerate(responses):
            assert response.headers["X-Request-ID"] == f"burst-{i}"
            if response.status_code == 503:
                assert response.headers["Retry-After"] == "1"
                assert response.json()["request_id"] == f"burst-{i}"
        time.sleep(0.5)
        log = (tmp_path / "bentoml.log").read_text(errors="replace")
    for i, response in enumerate(responses):
        assert re.search(rf"POST /predict -> {response.status_code} in [\d.]+ ms \[request_id=burst-{i}\]", log), i


@pytest.mark.slow
def test_the_504_of_the_request_deadline_carries_the_id(tmp_path: Path, mnist_digits: list[Digit]) -> None:
    """Our deadline answers before BentoML's timeout middleware (which sits outside every middleware of ours and
    could add no ID): eight 4096x4096 images take seconds to decode, the deadline is 1 s."""
    images = 8
    big = 4096 * 4096
    env = {
        "MNIST_EXPORTED_DIR": str(EXPORTED), "MNIST_MODELS": "mnist-cnn", "MNIST_WORKERS": "1",
        "MNIST_REQUEST_TIMEOUT_S": "1", "MNIST_BODY_TIMEOUT_S": "0.5", "MNIST_MAX_REQUEST_PIXELS": str(images * big),
        "MNIST_MAX_INFLIGHT_PIXELS": str(images * big), "BENTOML_HOME": str(tmp_path / "home"),
    }  # fmt: skip
    seven = next(d for d in mnist_digits if d.label == 7)
    image = Image.fromarray(np.rint(seven.pixels * 255).astype(np.uint8)).resize((4096, 4096), Image.NEAREST)
    out = io.BytesIO()
    Image.fromarray(np.asarray(image).astype(np.uint16) * 257).save(out, format="PNG")
    files = [("images", (f"{i}.png", out.getvalue(), "image/png")) for i in range(images)]
    with LocalServer(env=env, log_path=tmp_path / "bentoml.log") as server:
        response = post(server.url, "/predict_batch", files, rid="too-slow-1")
    assert response.status_code == 504, response.text[:300]
    assert response.headers["X-Request-ID"] == "too-slow-1"
    assert response.json() == {
        "error": "not able to process the request in 1 seconds (MNIST_REQUEST_TIMEOUT_S)",
        "request_id": "too-slow-1",
    }


def run_asgi(app_messages: list[dict], access_log: bool = False) -> list[dict]:
    """What RequestIds sends for an app that sends `app_messages`."""
    sent: list[dict] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        for message in app_messages:
            await send(dict(message))  # type: ignore[operator]

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": [(b"x-request-id", b"rid-1")]}
    asyncio.run(RequestIds(app, access_log=access_log)(scope, receive, send))
    return sent


def start(status: int, length: int | None) -> dict:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}


def test_an_error_body_in_chunks_gets_the_id_and_its_new_length() -> None:
    body = b'{"error": "bad"}'
    sent = run_asgi([
        start(400, len(body)),
        {"type": "http.response.body", "body": body[:5], "more_body": True},
        {"type": "http.response.body", "body": body[5:]},
    ])  # fmt: skip
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b'{"error": "bad", "request_id": "rid-1"}'
    assert (b"content-length", str(len(sent[1]["body"])).encode()) in sent[0]["headers"]
    assert (b"x-request-id", b"rid-1") in sent[0]["headers"]


def test_an_error_body_too_large_to_hold_passes_unchanged() -> None:
    chunk = b"x" * 40_000
    messages = [start(400, 3 * len(chunk))] + [
        {"type": "http.response.body", "body": chunk, "more_body": i < 2} for i in range(3)
    ]
    sent = run_asgi(messages)
    assert (b"content-length", str(3 * len(chunk)).encode()) in sent[0]["headers"]
    assert b"".join(m.get("body", b"") for m in sent[1:]) == 3 * chunk


def test_server_errors_are_logged_as_errors_even_with_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="service.http.requestid"):
        run_asgi([start(500, 2), {"type": "http.response.body", "body": b"{}"}], access_log=True)
        run_asgi([start(200, 2), {"type": "http.response.body", "body": b"{}"}], access_log=True)
    levels = [(r.levelname, r.getMessage().split(" -> ")[1].split(" ")[0]) for r in caplog.records]
    assert levels == [("ERROR", "500"), ("INFO", "200")]
