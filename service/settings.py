"""Service settings, read from the environment here and nowhere else.

Every knob has a default that works on a laptop; `Settings.from_env()` names the variable and the value it
could not use, so a typo fails at start-up instead of being ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("auto", "cuda", "cpu")


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Settings:
    """What the service loads and how hard it works. Field comments give the environment variable."""

    models: tuple[str, ...] = ("mnist-cnn",)  # MNIST_MODELS, comma list; the first is the default
    exported_dir: Path = REPO_ROOT / "exported"  # MNIST_EXPORTED_DIR: where <name>.onnx files live
    device: str = "auto"  # MNIST_DEVICE: auto (CUDA if it really starts, else CPU) | cuda | cpu
    # MNIST_WORKERS: server processes. One per core: the HTTP stack is Python, so it scales by processes.
    workers: int = max(1, available_cores())
    threads: int = 2  # MNIST_THREADS: requests one worker decodes and infers at the same time
    max_bytes: int = 10 * 1024 * 1024  # MNIST_MAX_BYTES: request body limit
    # MNIST_MAX_PIXELS: decoded size limit (width x height); far below Pillow's own bomb guard of ~89 M.
    max_pixels: int = 4096 * 4096
    max_batch: int = 256  # MNIST_MAX_BATCH: images per /predict_batch request

    @property
    def default_model(self) -> str:
        return self.models[0]

    @property
    def intra_op_threads(self) -> int:
        """ONNX Runtime threads per inference: the cores left per concurrent request, at least one.

        workers x threads requests can run at once; giving each more than its share of the cores makes
        them fight over the same cores (oversubscription), which costs more than it gains.
        """
        return max(1, available_cores() // (self.workers * self.threads))

    def model_path(self, name: str) -> Path:
        return self.exported_dir / f"{name}.onnx"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        defaults = cls()
        models = tuple(m.strip() for m in env.get("MNIST_MODELS", ",".join(defaults.models)).split(","))
        models = tuple(dict.fromkeys(m for m in models if m))  # drop blanks and repeats, keep order
        if not models:
            raise ValueError("MNIST_MODELS is empty; give at least one model name, e.g. mnist-cnn")
        device = env.get("MNIST_DEVICE", defaults.device).strip().lower()
        if device not in DEVICES:
            raise ValueError(f"MNIST_DEVICE={device!r} is not one of {', '.join(DEVICES)}")
        return cls(
            models=models,
            exported_dir=Path(env.get("MNIST_EXPORTED_DIR", str(defaults.exported_dir))),
            device=device,
            workers=_positive_int(env, "MNIST_WORKERS", defaults.workers),
            threads=_positive_int(env, "MNIST_THREADS", defaults.threads),
            max_bytes=_positive_int(env, "MNIST_MAX_BYTES", defaults.max_bytes),
            max_pixels=_positive_int(env, "MNIST_MAX_PIXELS", defaults.max_pixels),
            max_batch=_positive_int(env, "MNIST_MAX_BATCH", defaults.max_batch),
        )


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={value} must be at least 1")
    return value
