"""The servers `make bench` measures ours against, each under plain uvicorn (issue 14):

- `fastapi_app`: the obvious 30-line alternative to our service, FastAPI + ONNX Runtime with the same
  `service.imaging.preprocess` and the same model file, answering /predict with the digit, its confidence and the
  probabilities. Written to be as fast as a careful user would make it: `async def` (a 28x28 PNG costs less
  than handing it to a thread pool), one ONNX Runtime thread per worker (one worker per core), no access log.
- `floor_app`: a bare ASGI app that reads the request and answers a constant: what HTTP alone costs under
  the same uvicorn, so the rest of a request is what the service does.

    python -m benchmarks.baseline fastapi --workers 2 --port 3100   # MNIST_BASELINE_MODEL=path.onnx
    python -m benchmarks.baseline floor --workers 2 --port 3100

`uvicorn --workers 2` itself is not used: its listening socket is made without the TCP protocol number, so
asyncio never sets TCP_NODELAY on the connections it accepts, and every keep-alive answer (headers, then body:
two writes) waits ~40 ms for the client's delayed ACK (Nagle). Measured here, the floor app: 2,760 req/s with
one `uvicorn` process, 362 req/s under `uvicorn --workers 2`. And its workers share one socket, so with
keep-alive the first to wake takes most connections. `main()` runs each worker's uvicorn on its own
SO_REUSEPORT socket instead (what `gunicorn --reuse-port` does): the kernel spreads the connections, and the
baseline is the fast version of the alternative, not the accidentally slow one.

Benchmark code only: nothing in service/ imports it, and FastAPI is a test/benchmark dependency.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, UploadFile
from fastapi.responses import JSONResponse

from service.imaging.preprocess import ImageError, preprocess
from service.settings import Settings

MODEL = Path(os.environ.get("MNIST_BASELINE_MODEL", Path(__file__).resolve().parent.parent / "exported/mnist-cnn.onnx"))

LIMITS = Settings.from_env()  # the same byte and pixel limits as the service's defaults
_options = ort.SessionOptions()
_options.intra_op_num_threads = 1
_session = ort.InferenceSession(str(MODEL), _options, providers=["CPUExecutionProvider"])
_input = _session.get_inputs()[0].name

fastapi_app = FastAPI()


@fastapi_app.get("/readyz")
async def readyz() -> dict[str, bool]:
    return {"ready": True}


@fastapi_app.post("/predict")
async def predict(image: UploadFile) -> Any:
    try:
        pixels = preprocess(await image.read(), max_bytes=LIMITS.max_bytes, max_pixels=LIMITS.max_pixels)
    except ImageError as exc:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)
    probabilities = _session.run(["probabilities"], {_input: pixels.reshape(1, 1, 28, 28)})[0][0]
    digit = int(np.argmax(probabilities))
    return {"digit": digit, "confidence": float(probabilities[digit]), "probabilities": probabilities.tolist()}


_CONSTANT = b'{"ok":true}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(_CONSTANT)).encode())]


async def floor_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Any path, any method: read the body, answer {"ok":true}."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _CONSTANT})


APPS = {"fastapi": fastapi_app, "floor": floor_app}


def serve_worker(app: str, host: str, port: int) -> None:
    """One worker: its own listening socket on the shared port (SO_REUSEPORT), plain uvicorn, h11, asyncio."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    config = uvicorn.Config(APPS[app], access_log=False, log_level="warning", http="h11", loop="asyncio")
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="serve a baseline app with N uvicorn workers")
    parser.add_argument("app", choices=sorted(APPS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    workers = [
        multiprocessing.Process(target=serve_worker, args=(args.app, args.host, args.port), daemon=True)
        for _ in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:  # SIGTERM to the process group stops every worker (uvicorn handles it)
        worker.join()
    return max(worker.exitcode or 0 for worker in workers)


if __name__ == "__main__":
    sys.exit(main())
