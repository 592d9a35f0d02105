"""Hostile and unlucky clients against a real `bentoml serve` over real sockets (issue 13).

Deep JSON, hang-ups mid-body, bodies and headers that never finish, requests too big to decode, a burst of
big decodes, the supervisor killed or stopped mid-traffic, and the security headers. Every case must end
in a 4xx naming the problem (or a documented 503), never a 5xx, and the server must still answer real
digits correctly afterwards.

Most cases use one server with short timeouts (`faults`), so that waiting for a timeout takes a second or
two; the 503, 504, kill and stop tests start their own servers, and the default-settings checks use conftest's.
Every server has a BENTOML_HOME of its own (loadtest.server.LocalServer, conftest.serve), so each one's metrics are
its own. Each test runs alone as well as in the file: none relies on what an earlier one did.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from conftest import EXPORTED, TEST_MAX_BYTES, Digit, Server, metric
from PIL import Image

from loadtest.server import LocalServer

pytestmark = pytest.mark.slow  # real servers

TIMEOUT = 60
BODY_TIMEOUT_S = 1.5
HEADER_TIMEOUT_S = 1.5
ALLOWED_ORIGIN = "https://app.example"
BIG = 4096 * 4096
FAULTS_ENV = {
    "MNIST_EXPORTED_DIR": str(EXPORTED),
    "MNIST_MODELS": "mnist-cnn",
    "MNIST_WORKERS": "2",
    "MNIST_MAX_BYTES": str(TEST_MAX_BYTES),
    "MNIST_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "MNIST_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "MNIST_KEEPALIVE_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    # Two full-size images per request and per worker: small enough for the budget tests to reach it.
    "MNIST_MAX_REQUEST_PIXELS": str(2 * BIG),
    "MNIST_MAX_INFLIGHT_PIXELS": str(2 * BIG),
    "MNIST_CORS_ORIGINS": ALLOWED_ORIGIN,
    "MNIST_ACCESS_LOG": "1",  # the line of every answer, with its status (499 for a client gone)
}


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    folder = tmp_path_factory.mktemp("faults")
    with LocalServer(env=FAULTS_ENV, log_path=folder / "bentoml.log") as server:
        yield server


# -- helpers ---------------------------------------------------------------------------------------------


def big_png(digit: Digit, side: int) -> bytes:
    """A real MNIST digit blown up to side x side, 16-bit grey: tens of kB that decode to side² pixels."""
    image = Image.fromarray(np.rint(digit.pixels * 255).astype(np.uint8)).resize((side, side), Image.NEAREST)
    out = io.BytesIO()
    Image.fromarray(np.asarray(image).astype(np.uint16) * 257).save(out, format="PNG")
    return out.getvalue()


def responses_by_status(url: str) -> dict[int, float]:
    """bentoml_service_request_total summed per status code over every endpoint."""
    out: dict[int, float] = {}
    for line in requests.get(f"{url}/metrics", timeout=TIMEOUT).text.splitlines():
        found = re.match(r'bentoml_service_request_total\{.*http_response_code="(\d+)".*\} (\S+)', line)
        if found:
            out[int(found[1])] = out.get(int(found[1]), 0.0) + float(found[2])
    return out


def wait_for(condition, what: str, limit_s: float = 30.0) -> None:
    """Poll `condition()` until true; fail naming `what` after `limit_s` (a bound, not a speed target)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {limit_s:.0f} s: {what}")
        time.sleep(0.1)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def read_all(sock: socket.socket, limit_s: float = TIMEOUT) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(limit_s)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def multipart(fields: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(body, content type) of a multipart form of files (field, file name, bytes)."""
    prepared = requests.Request(
        "POST", "http://x/", files=[(f, (n, data, "image/png")) for f, n, data in fields]
    ).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def request_head(path: str, content_type: str, length: int | None) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n{size}\r\n".encode()


def assert_still_answers(url: str, digits: list[Digit]) -> None:
    """Real MNIST digits answered: every one with 200, and (nearly) every one with its label."""
    right = 0
    with requests.Session() as session:
        for digit in digits[:20]:
            files = {"image": (digit.name, digit.png, "image/png")}
            response = session.post(f"{url}/predict", files=files, timeout=TIMEOUT)
            assert response.status_code == 200, response.text
            right += response.json()["digit"] == digit.label
    assert right >= 18  # the shipped CNN reads 99.5 % of MNIST's test digits; these 20 are not the hard ones


# -- 1. deep JSON ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_a_400(server: Server, mnist_digits: list[Digit], depth: int) -> None:
    body = '{"pixels": ' + "[" * depth + "]" * depth + "}"
    response = requests.post(
        f"{server.url}/predict_pixels", data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT
    )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": "invalid JSON body: nested too deeply",
        "request_id": response.headers["x-request-id"],
    }
    assert_still_answers(server.url, mnist_digits)


# -- 2. hang-ups are the client's, not 500s ---------------------------------------------------------------


def test_client_hangups_mid_body_are_counted_as_499_not_500(faults: LocalServer, mnist_digits: list[Digit]) -> None:
    png = mnist_digits[0].png
    form, form_type = multipart([("image", "d.png", png)])
    batch, batch_type = multipart([("images", "d.png", png)] * 4)
    partial = [  # (head, the part of the body sent before hanging up)
        (request_head("/predict", "image/png", len(png)), png[: len(png) // 2]),
        (request_head("/predict", form_type, len(form)), form[: len(form) // 2]),
        (request_head("/predict_pixels", "application/json", 5000), b'{"pixels": [[0.0, 0.0'),
        (request_head("/predict_batch", batch_type, len(batch)), batch[: len(batch) // 2]),
    ]
    before = responses_by_status(faults.url)
    for head, body in partial:
        with socket.create_connection(("127.0.0.1", faults.port)) as sock:
            sock.sendall(head + body)
            time.sleep(0.3)  # the request reaches the endpoint, which waits for the rest
    # An invalid chunk size: the server answers 400 itself and closes; the endpoint sees the client gone.
    with socket.create_connection(("127.0.0.1", faults.port)) as sock:
        sock.sendall(request_head("/predict", "image/png", None) + b"zz\r\nnot hex\r\n")
        assert read_all(sock).startswith(b"HTTP/1.1 400 ")

    def counted() -> bool:
        return responses_by_status(faults.url).get(499, 0) - before.get(499, 0) >= 5

    wait_for(counted, "five hang-ups counted as 499")
    after = responses_by_status(faults.url)
    assert {s: n for s, n in after.items() if s >= 500 and n > before.get(s, 0)} == {}
    # ... and in the access log (MNIST_ACCESS_LOG=1), each under its route, with its request ID.
    logged = re.compile(
        r"POST (/predict|/predict_pixels|/predict_batch) -> 499 in [\d.]+ ms \[request_id=[0-9a-f]{32}\]"
    )
    wait_for(lambda: len(logged.findall(Path(faults.log_path).read_text(errors="replace"))) >= 5, "five 499s logged")
    routes = logged.findall(Path(faults.log_path).read_text(errors="replace"))
    assert {"/predict", "/predict_pixels", "/predict_batch"} <= set(routes), routes
    log = Path(faults.log_path).read_text(errors="replace")
    assert "ClientDisconnect" not in log and "Traceback" not in log
    assert_still_answers(faults.url, mnist_digits)


# -- 3. a slow body is the client's 408, not the server's 504 ---------------------------------------------


def test_a_body_shorter_than_its_content_length_gets_408(faults: LocalServer, mnist_digits: list[Digit]) -> None:
    with socket.create_connection(("127.0.0.1", faults.port)) as sock:
        sock.sendall(request_head("/predict", "image/png", 1000) + mnist_digits[0].png[:100])
        answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"content-type: application/json" in head.lower()
    assert b"request body not received within 1.5 s (MNIST_BODY_TIMEOUT_S)" in body
    assert_still_answers(faults.url, mnist_digits)


def test_a_body_trickling_in_gets_408(faults: LocalServer, mnist_digits: list[Digit]) -> None:
    png = mnist_digits[0].png
    with socket.create_connection(("127.0.0.1", faults.port)) as sock:
        sock.sendall(request_head("/predict", "image/png", len(png)))
        answer = b""
        for byte in png:  # one byte every 0.1 s: the whole body would take over a minute
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # the server answered and closed
                break
            if select.select([sock], [], [], 0.1)[0]:
                answer = read_all(sock)
                break
        else:
            pytest.fail("the server took the whole trickled body")
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert_still_answers(faults.url, mnist_digits)


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(b"POST /predict HTTP/1.1\r\nHost: test\r\n", id="headers cut off"),
        pytest.param(request_head("/predict", "image/png", 1000) + b"\x89PNG", id="body cut off"),
    ],
)
def test_a_client_still_sending_after_its_408_reads_it_and_gets_a_clean_close(
    faults: LocalServer, mnist_digits: list[Digit], start: bytes
) -> None:
    """Closed at once, the connection would be reset by the bytes that arrive after the close, and the
    client's next send or read would fail before it had read its 408 (a CI run lost one so)."""
    with socket.create_connection(("127.0.0.1", faults.port), timeout=TIMEOUT) as sock:
        sock.sendall(start)
        time.sleep(max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 0.5)  # the timeout passes; the 408 waits unread
        for _ in range(3):  # what a slow client still had on the wire
            sock.sendall(b"more")
            time.sleep(0.1)
        answer = b""
        while chunk := sock.recv(65536):  # a reset raises ConnectionResetError here
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b"connection: close" in answer.lower()
    assert_still_answers(faults.url, mnist_digits)


# -- 4. work is bounded up front, and stops when its client is gone ---------------------------------------


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(
    faults: LocalServer, mnist_digits: list[Digit]
) -> None:
    three = [("images", (f"{i}.png", big_png(mnist_digits[0], 4096), "image/png")) for i in range(3)]
    assert_still_answers(faults.url, mnist_digits)  # something decoded, so that "nothing more" means something
    decoded = metric(faults.url, "mnist_preprocess_seconds_count")
    response = requests.post(f"{faults.url}/predict_batch", files=three, timeout=TIMEOUT)
    assert response.status_code == 413, response.text
    assert response.json()["error"].startswith("too many pixels in one request: its 3 image(s) decode to 50331648")
    assert "MNIST_MAX_REQUEST_PIXELS" in response.json()["error"]
    assert metric(faults.url, "mnist_preprocess_seconds_count") == decoded > 0  # not one image was decoded
    assert_still_answers(faults.url, mnist_digits)


def test_work_stops_when_the_client_hangs_up(faults: LocalServer, mnist_digits: list[Digit]) -> None:
    seven = next(d for d in mnist_digits if d.label == 7)
    count = 32  # 32 x 1024² = the request budget; each takes tens of milliseconds or more to decode
    body, content_type = multipart([("images", f"{i}.png", big_png(seven, 1024)) for i in range(count)])
    decoded = metric(faults.url, "mnist_preprocess_seconds_count")
    sevens = metric(faults.url, "mnist_predictions_total", digit="7")
    with socket.create_connection(("127.0.0.1", faults.port)) as sock:
        sock.sendall(request_head("/predict_batch", content_type, len(body)) + body)
        wait_for(lambda: metric(faults.url, "mnist_preprocess_seconds_count") > decoded, "the batch starts")
    # The client is gone: the worker stops at the next image and counts no prediction. Bound: after the count read
    # once the client has hung up, the image then being decoded, and one more for the moment the server takes to see
    # the hang-up (each image takes tens of milliseconds).
    samples = [metric(faults.url, "mnist_preprocess_seconds_count")]

    def settled() -> bool:
        time.sleep(1.0)
        samples.append(metric(faults.url, "mnist_preprocess_seconds_count"))
        return samples[-1] == samples[-2]

    wait_for(settled, "decoding stops")
    assert samples[-1] <= samples[0] + 2, samples
    assert samples[-1] - decoded < count
    assert metric(faults.url, "mnist_predictions_total", digit="7") == sevens
    assert_still_answers(faults.url, mnist_digits)


# Each 4096x4096 image takes 0.1-0.4 s to decode on the machines seen so far: 24 take 2.4 s or more, well past the
# 1 s deadline on any of them, so the 504 always comes (it may never be skipped).
IMAGES = 24


def test_work_stops_when_the_server_gave_up_on_the_request(
    faults: LocalServer, tmp_path: Path, mnist_digits: list[Digit]
) -> None:
    env = {
        **FAULTS_ENV,
        "MNIST_REQUEST_TIMEOUT_S": "1",
        "MNIST_BODY_TIMEOUT_S": "0.5",
        "MNIST_MAX_REQUEST_PIXELS": str(IMAGES * BIG),
        "MNIST_MAX_INFLIGHT_PIXELS": str(IMAGES * BIG),
    }
    seven = next(d for d in mnist_digits if d.label == 7)
    png = big_png(seven, 4096)
    images = [("images", (f"{i}.png", png, "image/png")) for i in range(IMAGES)]
    assert_still_answers(faults.url, mnist_digits)
    counted_before = metric(faults.url, "mnist_predictions_total")
    with LocalServer(env=env, log_path=tmp_path / "bentoml.log") as server:
        # A server started beside it leaves the other's metrics alone (each has its own BENTOML_HOME).
        assert metric(faults.url, "mnist_predictions_total") == counted_before > 0
        start = time.monotonic()
        response = requests.post(f"{server.url}/predict_batch", files=images, timeout=TIMEOUT)
        answered_s = time.monotonic() - start
        assert response.status_code == 504, response.text[:300]  # the server was too slow: our deadline
        assert response.json() == {
            "error": "not able to process the request in 1 seconds (MNIST_REQUEST_TIMEOUT_S)",
            "request_id": response.headers["x-request-id"],
        }
        assert answered_s < 1 + 1.0  # at the deadline, not when the work would have ended
        # Bound: after the count read once the 504 came, only the image then being decoded.
        samples = [metric(server.url, "mnist_preprocess_seconds_count")]

        def settled() -> bool:
            time.sleep(1.0)
            samples.append(metric(server.url, "mnist_preprocess_seconds_count"))
            return samples[-1] == samples[-2]

        wait_for(settled, "decoding stops")
        assert samples[-1] <= samples[0] + 1, samples  # it stopped at the next image...
        assert metric(server.url, "mnist_predictions_total") == 0  # ...and counted no answer nobody got
        assert responses_by_status(server.url).get(504) == 1
        assert_still_answers(server.url, mnist_digits)


# -- 5. decoded pixels in flight are bounded: queue, then 503 with Retry-After ----------------------------


# A batch that holds a worker's whole budget for several seconds: 32 images of 4096x4096 (3.2-12 s to decode).
HOLD = 32


def test_a_request_that_waits_2_s_for_pixels_gets_503_with_retry_after(
    tmp_path: Path, mnist_digits: list[Digit]
) -> None:
    """docs/api.md, "Errors": a worker already decoding MNIST_MAX_INFLIGHT_PIXELS keeps a request waiting for its turn
    up to 2 s, then answers it 503 with Retry-After: 1. One worker, so both requests meet in it."""
    env = {
        **FAULTS_ENV,
        "MNIST_WORKERS": "1",
        "MNIST_THREADS": "1",
        "MNIST_REQUEST_TIMEOUT_S": "60",
        "MNIST_BODY_TIMEOUT_S": "5",
        "MNIST_MAX_REQUEST_PIXELS": str(HOLD * BIG),
        "MNIST_MAX_INFLIGHT_PIXELS": str(HOLD * BIG),
    }
    seven = next(d for d in mnist_digits if d.label == 7)
    png = big_png(seven, 4096)
    body, content_type = multipart([("images", f"{i}.png", png) for i in range(HOLD)])
    with LocalServer(env=env, log_path=tmp_path / "bentoml.log") as server:
        holder = socket.create_connection(("127.0.0.1", server.port))
        try:
            holder.sendall(request_head("/predict_batch", content_type, len(body)) + body)
            wait_for(lambda: metric(server.url, "mnist_preprocess_seconds_count") > 0, "the batch holds the budget")
            start = time.monotonic()
            response = requests.post(f"{server.url}/predict", files={"image": ("big.png", png)}, timeout=TIMEOUT)
            waited_s = time.monotonic() - start
            still_decoding = metric(server.url, "mnist_preprocess_seconds_count") < HOLD
        finally:
            holder.close()  # the batch's client hangs up: its work stops at the next image and frees the budget
        assert response.status_code == 503, response.text[:300]
        assert response.headers["Retry-After"] == "1"
        error = response.json()["error"]
        assert error.startswith("server busy: ") and "MNIST_MAX_INFLIGHT_PIXELS" in error, error
        assert response.json()["request_id"] == response.headers["x-request-id"]
        assert 2.0 <= waited_s < 2.0 + 3.0, waited_s  # waited its 2 s for the pixels, not for the whole batch
        assert still_decoding  # the budget was still held when it gave up
        assert responses_by_status(server.url).get(503) == 1
        # Once the batch's work has stopped, the same image is answered.
        after = requests.post(f"{server.url}/predict", files={"image": ("big.png", png)}, timeout=TIMEOUT)
        assert after.status_code == 200 and after.json()["digit"] == 7, after.text[:300]


def test_a_burst_of_big_decodes_gets_answers_or_503s_with_retry_after(
    faults: LocalServer, mnist_digits: list[Digit]
) -> None:
    seven = next(d for d in mnist_digits if d.label == 7)
    png = big_png(seven, 4096)

    def upload(_: int) -> requests.Response:
        return requests.post(f"{faults.url}/predict", files={"image": ("big.png", png)}, timeout=TIMEOUT)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(upload, range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    for response in responses:
        if response.status_code == 200:
            assert response.json()["digit"] == 7
        else:
            assert response.headers["Retry-After"] == "1"
            assert "server busy" in response.json()["error"] and "MNIST_MAX_INFLIGHT_PIXELS" in response.json()["error"]
    assert_still_answers(faults.url, mnist_digits)


# -- 6. slow or idle connections are closed ---------------------------------------------------------------


def test_slow_headers_and_idle_connections_are_closed(faults: LocalServer, mnist_digits: list[Digit]) -> None:
    head = b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\nContent-Length: 10\r\n"
    trickling = [socket.create_connection(("127.0.0.1", faults.port)) for _ in range(20)]
    idle = [socket.create_connection(("127.0.0.1", faults.port)) for _ in range(20)]
    kept_alive = socket.create_connection(("127.0.0.1", faults.port))
    kept_alive.sendall(b"POST /ping HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n")
    received: dict[socket.socket, bytes] = {s: b"" for s in [*trickling, *idle, kept_alive]}
    open_ = set(received)
    deadline = time.monotonic() + 30
    sent = 0
    try:
        while open_ and time.monotonic() < deadline:
            for sock in trickling:  # one byte each, every 0.2 s: a slowloris
                if sock in open_ and sent < len(head):
                    try:
                        sock.send(head[sent : sent + 1])
                    except OSError:
                        open_.discard(sock)
            sent += 1
            for sock in select.select(list(open_), [], [], 0.2)[0]:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                received[sock] += data
                if not data:
                    open_.discard(sock)
        assert not open_, f"{len(open_)} of {len(received)} connections still open after 30 s"
        assert all(received[s].startswith(b"HTTP/1.1 408 ") for s in trickling)
        assert b"MNIST_HEADER_TIMEOUT_S" in received[trickling[0]]
        assert all(received[s] == b"" for s in idle)
        assert received[kept_alive].startswith(b"HTTP/1.1 200 ")  # answered, then closed when idle
    finally:
        for sock in received:
            sock.close()
    assert_still_answers(faults.url, mnist_digits)


# -- 8. the workers do not outlive their supervisor -------------------------------------------------------


def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    env = {**FAULTS_ENV, "MNIST_CORS_ORIGINS": ""}
    server = LocalServer(env=env, log_path=tmp_path / "bentoml.log").start()
    workers = [p for role, p in server.processes() if role == "worker"]
    assert len(workers) == 2
    try:
        os.kill(server.proc.pid, signal.SIGKILL)

        def gone() -> bool:
            return not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)

        wait_for(gone, "both workers exit after `kill -9` of bentoml serve")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
        server.stop()


# -- 9. SIGTERM drains: in-flight work finishes, new connections are refused, none is reset ---------------


def test_sigterm_finishes_in_flight_work_and_resets_no_connection(tmp_path: Path, mnist_digits: list[Digit]) -> None:
    env = {**FAULTS_ENV, "MNIST_MAX_REQUEST_PIXELS": str(4 * BIG), "MNIST_MAX_INFLIGHT_PIXELS": str(4 * BIG)}
    server = LocalServer(env=env, log_path=tmp_path / "bentoml.log").start()
    digit = mnist_digits[0]
    small, small_type = multipart([("image", digit.name, digit.png)])
    slow, slow_type = multipart([("images", f"{i}.png", big_png(digit, 2048)) for i in range(12)])
    outcomes: list[str] = []
    stop = threading.Event()

    def post(body: bytes, content_type: str, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        try:
            connection.request("POST", path, body, {"Content-Type": content_type, "Connection": "close"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def client() -> None:  # a new connection per request, until the server refuses them
        refused_since = None
        while not stop.is_set():
            try:
                status, body = post(small, small_type, "/predict")
                ok = status == 200 and f'"digit":{digit.label}'.encode() in body
                outcomes.append("answered" if ok else f"{status} {body[:100]!r}")
                refused_since = None
            except ConnectionRefusedError:
                outcomes.append("refused")
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > 1.0:
                    return
                time.sleep(0.01)
            except OSError as exc:  # reset, or closed without an answer: what must not happen
                outcomes.append(f"{type(exc).__name__}: {exc}")

    try:
        with ThreadPoolExecutor(3) as pool:
            in_flight = pool.submit(post, slow, slow_type, "/predict_batch")
            clients = [pool.submit(client) for _ in range(2)]
            wait_for(lambda: metric(server.url, "mnist_preprocess_seconds_count") > 0, "the slow batch starts")
            answered_before = outcomes.count("answered")
            os.kill(server.proc.pid, signal.SIGTERM)
            status, body = in_flight.result(timeout=TIMEOUT)
            for future in clients:
                future.result(timeout=TIMEOUT)
        assert status == 200, body[:300]
        assert body.count(f'"digit":{digit.label}'.encode()) == 12
        assert answered_before > 0 and outcomes[-1] == "refused"
        assert set(outcomes) <= {"answered", "refused"}, [o for o in outcomes if o not in ("answered", "refused")]
        assert server.proc.wait(timeout=TIMEOUT) == 0
    finally:
        stop.set()
        server.stop()


# -- 10. headers: no third-party requests, nosniff everywhere, relative redirects, CORS only when asked ----


def test_the_docs_page_makes_no_third_party_request(server: Server) -> None:
    page = requests.get(f"{server.url}/", timeout=TIMEOUT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "googletagmanager" not in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and all(a.startswith("./") for a in assets), assets  # all from this server
    for asset in [*assets, "./docs.json"]:
        assert requests.get(f"{server.url}/{asset[2:]}", timeout=TIMEOUT).status_code == 200, asset


def test_every_answer_carries_nosniff_and_redirects_stay_on_this_server(
    server: Server, mnist_digits: list[Digit]
) -> None:
    answers = [
        requests.post(f"{server.url}/predict", files={"image": ("d.png", mnist_digits[0].png)}, timeout=TIMEOUT),
        requests.post(f"{server.url}/predict", data=b"x", headers={"Content-Type": "text/plain"}, timeout=TIMEOUT),
        requests.get(f"{server.url}/model", timeout=TIMEOUT),
        requests.get(f"{server.url}/metrics", timeout=TIMEOUT),
        requests.get(f"{server.url}/ui/", timeout=TIMEOUT),
        requests.get(f"{server.url}/nowhere", timeout=TIMEOUT),
    ]
    assert [r.status_code for r in answers] == [200, 415, 200, 200, 200, 404]
    assert all(r.headers["x-content-type-options"] == "nosniff" for r in answers)
    assert "default-src 'none'" in answers[4].headers["content-security-policy"]
    for path in ("/ui", "/model/"):
        redirect = requests.get(
            f"{server.url}{path}", headers={"Host": "evil.example"}, allow_redirects=False, timeout=TIMEOUT
        )
        assert redirect.status_code in (301, 302, 307, 308)
        assert redirect.headers["location"] == {"/ui": "/ui/", "/model/": "/model"}[path]
    # CORS is off by default: no browser origin is allowed.
    preflight = requests.options(
        f"{server.url}/predict",
        headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"},
        timeout=TIMEOUT,
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_allows_only_the_listed_origins(faults: LocalServer, mnist_digits: list[Digit]) -> None:
    def preflight(origin: str, path: str = "/predict", method: str = "POST", headers: str = "") -> requests.Response:
        asked = {"Origin": origin, "Access-Control-Request-Method": method}
        if headers:
            asked["Access-Control-Request-Headers"] = headers
        return requests.options(f"{faults.url}{path}", headers=asked, timeout=TIMEOUT)

    assert preflight(ALLOWED_ORIGIN).headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers
    files = {"image": ("d.png", mnist_digits[0].png)}
    answer = requests.post(f"{faults.url}/predict", files=files, headers={"Origin": ALLOWED_ORIGIN}, timeout=TIMEOUT)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    # docs/api.md, MNIST_CORS_ORIGINS: GET and POST, with a Content-Type header; on the API routes (the fast path)
    # and on BentoML's own (GET /model) alike.
    for path, method in (("/predict", "POST"), ("/read", "POST"), ("/model", "GET")):
        allowed = preflight(ALLOWED_ORIGIN, path, method, headers="Content-Type")
        assert allowed.status_code == 200, (path, allowed.text)
        methods = {m.strip() for m in allowed.headers["access-control-allow-methods"].split(",")}
        assert methods == {"GET", "POST"}, (path, methods)
        assert "content-type" in allowed.headers["access-control-allow-headers"].lower(), path
        for refused in (preflight(ALLOWED_ORIGIN, path, "DELETE"), preflight(ALLOWED_ORIGIN, path, method, "X-Secret")):
            assert refused.status_code == 400, (path, refused.text)
    model = requests.get(f"{faults.url}/model", headers={"Origin": ALLOWED_ORIGIN}, timeout=TIMEOUT)
    assert model.status_code == 200 and model.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


# -- the whole matrix: no 5xx but documented 503s, and real digits still answered right ------------------


def test_no_server_error_in_the_whole_fault_matrix(faults: LocalServer, mnist_digits: list[Digit]) -> None:
    assert_still_answers(faults.url, mnist_digits)
    errors = {status: n for status, n in responses_by_status(faults.url).items() if status >= 500 and n}
    assert set(errors) <= {503}, errors
