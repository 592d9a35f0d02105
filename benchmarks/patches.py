"""What the connection patches earn that a throughput table cannot show (service/http/patches.py; MNIST_PATCHES).

    .venv/bin/python -m benchmarks.patches [--runs 3]

Each scenario runs against a fresh `bentoml serve` (2 workers, default settings) with every patch, and without the
patch under test, alternating:
- slowloris (the protocol patch): 50 connections send a request's headers one line every 0.5 s for ever, 20 more
  connect and send nothing; after 15 s, how many of the 70 are still open, and does a real client still get its
  digit read? uvicorn times out only idle keep-alive connections, and each byte restarts that timer.
- SIGTERM under traffic (the drain patch): two clients open a new connection per /predict as fast as they can, a
  batch of 12 big images is in flight, and the server gets SIGTERM: every request must be answered or refused
  (a client may retry a refused connection), none reset or closed unanswered; the batch must be answered.
The accept patch's effect (connections split evenly over the workers) is in `make bench` ("2 workers, no accept
patch") and `make chaos` (balance).
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import select
import signal
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from loadtest.digits import mnist_test_digits, multipart, single_body
from loadtest.server import LocalServer

ALL = "accept,protocol,drain"


def server(patches: str, folder: Path) -> LocalServer:
    env = {"MNIST_WORKERS": "2", "MNIST_PATCHES": patches, "BENTOML_HOME": str(folder / "home")}
    return LocalServer(env=env, log_path=folder / "bentoml.log")


def slowloris(url_port: int, digit_body: tuple[bytes, str], label: int, seconds: float = 15.0) -> dict[str, object]:
    """Connections still open after `seconds` of trickled headers and silence; a real request's answer meanwhile."""
    trickling = [socket.create_connection(("127.0.0.1", url_port)) for _ in range(50)]
    silent = [socket.create_connection(("127.0.0.1", url_port)) for _ in range(20)]
    head = [b"POST /predict HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(1000)]
    open_ = set(trickling + silent)
    start, line = time.monotonic(), 0
    answered = None
    try:
        while time.monotonic() - start < seconds:
            for sock in trickling:
                if sock in open_:
                    try:
                        sock.send(head[line])
                    except OSError:
                        open_.discard(sock)
            line += 1
            for sock in select.select(list(open_), [], [], 0.5)[0]:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    open_.discard(sock)
            if answered is None and time.monotonic() - start > seconds / 2:
                answered = post(url_port, *digit_body, "/predict")[1].count(b'"digit":%d' % label) == 1
        return {"still open": len(open_), "of": len(trickling) + len(silent), "real client answered": answered}
    finally:
        for sock in trickling + silent:
            sock.close()


def post(port: int, body: bytes, content_type: str, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body, {"Content-Type": content_type, "Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def big_batch(png_digit: bytes) -> tuple[bytes, str]:
    image = Image.open(io.BytesIO(png_digit)).resize((2048, 2048), Image.NEAREST)
    out = io.BytesIO()
    Image.fromarray(np.asarray(image).astype(np.uint16) * 257).save(out, format="PNG")
    return multipart([("images", f"{i}.png", out.getvalue()) for i in range(12)])


def sigterm_under_traffic(srv: LocalServer, small: tuple[bytes, str], slow: tuple[bytes, str]) -> dict[str, object]:
    outcomes: list[str] = []

    def client() -> None:
        refused_since = None
        while True:
            try:
                status, _ = post(srv.port, *small, "/predict")
                outcomes.append("answered" if status == 200 else f"status {status}")
                refused_since = None
            except ConnectionRefusedError:
                outcomes.append("refused")
                refused_since = refused_since or time.monotonic()
                if time.monotonic() - refused_since > 1.0:
                    return
                time.sleep(0.01)
            except OSError:  # reset, or closed without an answer
                outcomes.append("reset or unanswered")

    with ThreadPoolExecutor(3) as pool:
        in_flight = pool.submit(post, srv.port, *slow, "/predict_batch")
        clients = [pool.submit(client) for _ in range(2)]
        time.sleep(1.0)
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGTERM)
        try:
            batch = f"status {in_flight.result(timeout=60)[0]}"
        except OSError as exc:
            batch = type(exc).__name__
        for future in clients:
            future.result(timeout=60)
    return {kind: outcomes.count(kind) for kind in sorted(set(outcomes))} | {"in-flight batch": batch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    digit = mnist_test_digits(1, seed=3)[0]
    small, slow = single_body(digit), big_batch(digit.png)
    for run in range(args.runs):
        for name, patches in (("all patches", ALL), ("no protocol patch", "accept,drain")):
            with tempfile.TemporaryDirectory() as folder, server(patches, Path(folder)) as srv:
                print(
                    f"run {run + 1} | slowloris      | {name:18} | {slowloris(srv.port, small, digit.label)}",
                    flush=True,
                )
        for name, patches in (("all patches", ALL), ("no drain patch", "accept,protocol")):
            with tempfile.TemporaryDirectory() as folder:
                srv = server(patches, Path(folder)).start()
                try:
                    print(
                        f"run {run + 1} | SIGTERM        | {name:18} | {sigterm_under_traffic(srv, small, slow)}",
                        flush=True,
                    )
                finally:
                    srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
