"""service/http/patches.py: nothing is patched at import, every patched internal is still there with the signature
our code relies on, `install` applies every patch, and a worker's shutdown is bounded (MNIST_SHUTDOWN_TIMEOUT_S).

The guards fail on an upgrade of asyncio, uvicorn, h11 or BentoML that renames or reshapes what we patch, before a
server quietly loses a protection: run them after every `make lock`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h11
import pytest
import uvicorn.config
from bentoml import IODescriptor
from conftest import EXPORTED, REPO_ROOT
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from loadtest.server import LocalServer
from service.http import patches
from service.settings import Settings

# What the patched code touches, read as the patches read it (a patch may only rely on what is listed here).
SNAPSHOT = """
import json, asyncio.selector_events as se, uvicorn.config, uvicorn.server
def snapshot():
    return [repr(se.BaseSelectorEventLoop._accept_connection), sorted(uvicorn.config.HTTP_PROTOCOLS.items()),
            repr(uvicorn.server.Server.shutdown), repr(uvicorn.config.Config.load)]
before = snapshot()
{action}
print(json.dumps([before, snapshot()]))
"""


def snapshots(action: str) -> tuple[list, list]:
    """(before, after) of the patched attributes around `action`, in a fresh interpreter."""
    out = subprocess.run(
        [sys.executable, "-c", SNAPSHOT.format(action=action)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=True,
        env={**os.environ, "MNIST_EXPORTED_DIR": str(EXPORTED)},
    )  # fmt: skip
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    return before, after


def test_importing_the_service_patches_nothing() -> None:
    """`bentoml serve`'s supervisor, `bentoml build` and the tests import the service: none of them may be patched."""
    before, after = snapshots("import service.service")
    assert after == before


def test_install_applies_every_patch_in_a_worker() -> None:
    before, after = snapshots(
        "from service.http import patches; from service.settings import Settings; "
        "patches.install(Settings(workers=2), worker_index=1)"
    )
    accept, protocols, shutdown, load = after
    assert accept != before[0]  # functools.wraps keeps the name: a different function object is the sign
    assert dict(protocols)["h11"] == dict(protocols)["auto"] == "service.http.patches:GuardedH11Protocol"
    assert shutdown != before[2] and "_draining_shutdown" in shutdown
    assert "_configuring_load" in load


def test_mnist_patches_applies_only_the_patches_it_names() -> None:
    before, after = snapshots(
        "from service.http import patches; from service.settings import Settings; "
        "patches.install(Settings.from_env({'MNIST_PATCHES': 'drain', 'MNIST_WORKERS': '2'}), worker_index=1)"
    )
    assert after[:2] == before[:2] and after[2] != before[2]  # accept and protocol as shipped, shutdown patched
    before, after = snapshots(
        "from service.http import patches; from service.settings import Settings; "
        "patches.install(Settings.from_env({'MNIST_PATCHES': 'none', 'MNIST_WORKERS': '2'}), worker_index=1)"
    )
    assert after[:3] == before[:3]
    for bad in ("accept,acept", ","):
        with pytest.raises(ValueError, match="MNIST_PATCHES"):
            Settings.from_env({"MNIST_PATCHES": bad})


@pytest.mark.parametrize("patch_list", ["accept,protocol,drain", "none", "accept"])
def test_uvicorns_own_options_are_set_whatever_patches_run(patch_list: str) -> None:
    """Keep-alive, the shutdown's bound and nosniff are public uvicorn options, set on every worker's Config (as
    BentoML's worker builds it: keep-alive and graceful shutdown passed as None), not a patch to switch off."""
    code = (
        "import json, uvicorn; from service.http import patches; from service.settings import Settings; "
        f"patches.install(Settings.from_env({{'MNIST_PATCHES': '{patch_list}', 'MNIST_KEEPALIVE_TIMEOUT_S': '7', "
        "'MNIST_SHUTDOWN_TIMEOUT_S': '3'}), worker_index=1); "
        "c = uvicorn.Config(app=lambda s, r, x: None, timeout_keep_alive=None, timeout_graceful_shutdown=None, "
        "server_header=False); c.load(); "
        "print(json.dumps([c.timeout_keep_alive, c.timeout_graceful_shutdown, [list(map(bytes.decode, h)) "
        "for h in c.encoded_headers]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    keep_alive, bound, headers = json.loads(out.stdout.strip().splitlines()[-1])
    assert (keep_alive, bound, headers) == (7, 3, [["x-content-type-options", "nosniff"]])


@pytest.mark.parametrize("name", list(patches.PATCHED_SIGNATURES))
def test_a_patched_callable_keeps_the_parameters_we_rely_on(name: str) -> None:
    func, expected = patches.PATCHED_SIGNATURES[name]
    assert patches.signature_of(func)[: len(expected)] == expected, name


def test_the_protocol_internals_the_guarded_protocol_uses_are_there() -> None:
    for method in ("handle_events", "on_response_complete", "shutdown", "connection_made", "connection_lost"):
        assert callable(getattr(H11Protocol, method)), method
    assert "data_received" in vars(H11Protocol)
    assert {"h11", "auto"} <= set(uvicorn.config.HTTP_PROTOCOLS)
    config = uvicorn.config.Config(app=lambda scope, receive, send: None)
    config.load()
    assert not config.http2  # uvicorn's HTTP/2 path bypasses HTTP_PROTOCOLS: BentoML must never turn it on
    loop = asyncio.new_event_loop()
    try:
        protocol = H11Protocol(config, ServerState(), {}, _loop=loop)
        for attribute in ("conn", "cycle", "server_state", "loop", "timeout_keep_alive", "transport"):
            assert hasattr(protocol, attribute), attribute
        assert isinstance(protocol.conn, h11.Connection)
        assert protocol.conn.trailing_data[0] == b"" and protocol.conn.their_state is h11.IDLE
        assert {"connections", "default_headers"} <= set(vars(protocol.server_state))
        for attribute in ("timeout_keep_alive", "timeout_graceful_shutdown", "encoded_headers"):
            assert hasattr(config, attribute), attribute
    finally:
        loop.close()


def test_asyncio_servers_keep_what_the_drain_reads() -> None:
    async def check() -> None:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
        try:
            for attribute in ("_loop", "_protocol_factory", "_ssl_context"):
                assert hasattr(server, attribute), attribute
            assert isinstance(server._loop, asyncio.selector_events.BaseSelectorEventLoop)
            for method in ("_add_reader", "_remove_reader"):
                assert callable(getattr(server._loop, method)), method
        finally:
            server.close()

    asyncio.run(check())


def test_bentoml_still_has_the_descriptor_method_we_override() -> None:
    assert inspect.ismethod(IODescriptor.from_http_request)  # a classmethod
    assert list(inspect.signature(IODescriptor.from_http_request).parameters)[:2] == ["request", "serde"]


# -- the bounded shutdown, over real HTTP --------------------------------------------------------------------


@pytest.mark.slow
def test_a_stuck_request_holds_the_shutdown_no_longer_than_the_bound(tmp_path: Path) -> None:
    """A request whose body never finishes (its own timeouts set far away) keeps a worker busy: at SIGTERM the
    worker waits MNIST_SHUTDOWN_TIMEOUT_S for it, then exits, instead of waiting for the request (uvicorn's default:
    for ever)."""
    bound_s = 2
    env = {
        "MNIST_EXPORTED_DIR": str(EXPORTED), "MNIST_MODELS": "mnist-cnn", "MNIST_WORKERS": "1",
        "MNIST_SHUTDOWN_TIMEOUT_S": str(bound_s), "MNIST_REQUEST_TIMEOUT_S": "120", "MNIST_BODY_TIMEOUT_S": "100",
        "MNIST_HEADER_TIMEOUT_S": "100", "BENTOML_HOME": str(tmp_path / "home"),
    }  # fmt: skip
    server = LocalServer(env=env, log_path=tmp_path / "bentoml.log").start()
    try:
        stuck = socket.create_connection(("127.0.0.1", server.port))
        head = "POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        stuck.sendall(head.encode() + b"\x89PNG")  # 4 bytes of 100,000: the request is in progress for good
        time.sleep(1.0)
        assert server.proc is not None
        started = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=60)
        took = time.monotonic() - started
        stuck.close()
    finally:
        server.stop()
    log = (tmp_path / "bentoml.log").read_text()
    assert "graceful shutdown bounded at 2s" in log
    # The bound, plus the worker's and the supervisor's own stopping; far below the request's 100 s.
    assert bound_s <= took < bound_s + 15, (took, log[-3000:])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_ATTACH_FILTER is Linux's")
def test_the_drain_holds_new_connections_off_before_its_last_accept() -> None:
    """After refuse_new_handshakes a new client's SYN is dropped (its connect times out rather than completing into
    the listen queue, where the shutdown would reset it); before it, the same connect completes."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # a plain listening socket takes connections
        assert patches.refuse_new_handshakes(listener)
        with pytest.raises(TimeoutError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            pass
    # Not TCP: nothing to filter, and it says so.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert not patches.refuse_new_handshakes(unix)
