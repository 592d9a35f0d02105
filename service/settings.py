"""Service settings, read from the environment here and nowhere else.

Every knob has a default that works on a laptop; `Settings.from_env()` names the variable and the value it
could not use, so a typo fails at start-up instead of being ignored.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("auto", "cuda", "cpu")
# The patches of server internals (http/patches.py) that MNIST_PATCHES may name.
PATCHES = ("accept", "protocol", "drain")


def available_cores() -> int:
    """CPU cores this process may use: the affinity mask (taskset, cpusets), and the CPU limit of its cgroup
    (Kubernetes' `limits.cpu`, `docker --cpus`), which the mask does not show: a pod limited to 2 CPUs on a 64-core
    node sees 64 cores, and 64 workers each with its own ONNX Runtime threads would spend its quota being throttled.
    A fractional limit rounds down (at least 1), as Go's automaxprocs does."""
    cores = len(os.sched_getaffinity(0))
    quota = cpu_limit()
    return cores if quota is None else max(1, min(cores, math.floor(quota)))


def cpu_limit(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """This process's cgroup CPU limit in cores (quota / period), or None when it has none. cgroup v2: `cpu.max`
    ("200000 100000", or "max ..." for none) in the process's own cgroup or the root of the mounted hierarchy (a
    container's); cgroup v1: cpu.cfs_quota_us (-1 for none) over cpu.cfs_period_us."""
    own = ""
    with contextlib.suppress(OSError):
        own = next((line.split(":", 2)[2].strip() for line in membership.read_text().splitlines()
                    if line.startswith("0::")), "")  # fmt: skip
    for folder in dict.fromkeys([root / own.lstrip("/"), root]):
        with contextlib.suppress(OSError, ValueError):
            quota, period = (folder / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None


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
    max_digits: int = 32  # MNIST_MAX_DIGITS: digits /read reads on one image
    # MNIST_MAX_REQUEST_PIXELS: decoded pixels of all of one request's images together, read from their
    # headers before anything is decoded; bounds the work one request can ask for (4 images of 4096x4096).
    max_request_pixels: int = 4 * 4096 * 4096
    # MNIST_MAX_INFLIGHT_PIXELS: decoded pixels one worker holds in flight (being decoded, or queued for a
    # thread); requests beyond it wait up to QUEUE_WAIT_S, then get 503 with Retry-After. Bounds memory.
    max_inflight_pixels: int = 4 * 4096 * 4096
    # MNIST_REQUEST_TIMEOUT_S: BentoML's per-request timeout (answered 504: the server was too slow).
    request_timeout_s: float = 10.0
    # MNIST_BODY_TIMEOUT_S: time to receive a request's whole body; a slower client, or a Content-Length
    # larger than the body sent, gets 408. Below the request timeout, so the client's slowness is never a 504.
    body_timeout_s: float = 5.0
    # MNIST_HEADER_TIMEOUT_S: time to receive a request's headers, from the connection's start or the end
    # of its previous answer (slowloris); the connection is then closed (408 if part of a request came).
    header_timeout_s: float = 5.0
    # MNIST_KEEPALIVE_TIMEOUT_S: an idle keep-alive connection is closed after this.
    keepalive_timeout_s: float = 5.0
    # MNIST_SHUTDOWN_TIMEOUT_S: at SIGTERM, how long a worker lets requests in progress finish before it cancels
    # them and exits (uvicorn's timeout_graceful_shutdown; unbounded otherwise). Below Kubernetes' default grace
    # period of 30 s.
    shutdown_timeout_s: float = 20.0
    # MNIST_CORS_ORIGINS: comma list of origins allowed to call the API from a browser; empty: no CORS.
    cors_origins: tuple[str, ...] = ()
    # MNIST_FAST_PATH: API routes answered by our handlers directly, without BentoML's per-API dispatch
    # (fastpath.py); 0 sends them through BentoML's dispatch (its X-BentoML-Request-ID header comes back).
    fast_path: bool = True
    # MNIST_ACCESS_LOG: BentoML's access log, one line per request (off: ~8 % of a /predict, docs/benchmarks.md).
    access_log: bool = False
    # MNIST_TRACING: OpenTelemetry spans for the API routes (configure the exporter in BentoML's config).
    tracing: bool = False
    # MNIST_PATCHES: comma list of the patches of server internals to apply (http/patches.py), or "none": to measure
    # what each one earns, or to run without one that a library upgrade broke.
    patches: tuple[str, ...] = PATCHES
    # MNIST_MODEL_REPOSITORY: where the versions loaded through the management API are kept (<name>/<version>/
    # model.onnx) and the state every worker follows (inference/repository.py); must be writable.
    model_repository: Path = field(default_factory=lambda: _bentoml_home({}) / "mnist-repository")
    # MNIST_ADMIN_TOKEN: the bearer token of the management routes (load, unload, set the default version); unset:
    # those routes do not exist. At least 16 characters. Never logged, never in repr().
    admin_token: str = field(default="", repr=False)
    # MNIST_GATE_MARGIN: a version takes traffic only if its accuracy on the shipped verification digits is at least
    # the test accuracy its metadata claims minus this (inference/gate.py).
    gate_margin: float = 0.02

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

    @property
    def verification_digits(self) -> Path:
        """Real MNIST test digits every version must read before it takes traffic (`python -m training.sample`)."""
        return self.exported_dir / "verification-digits.npz"

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
            max_digits=_positive_int(env, "MNIST_MAX_DIGITS", defaults.max_digits),
            max_request_pixels=_positive_int(env, "MNIST_MAX_REQUEST_PIXELS", defaults.max_request_pixels),
            max_inflight_pixels=_positive_int(env, "MNIST_MAX_INFLIGHT_PIXELS", defaults.max_inflight_pixels),
            request_timeout_s=_positive_float(env, "MNIST_REQUEST_TIMEOUT_S", defaults.request_timeout_s),
            body_timeout_s=_positive_float(env, "MNIST_BODY_TIMEOUT_S", defaults.body_timeout_s),
            header_timeout_s=_positive_float(env, "MNIST_HEADER_TIMEOUT_S", defaults.header_timeout_s),
            keepalive_timeout_s=_positive_float(env, "MNIST_KEEPALIVE_TIMEOUT_S", defaults.keepalive_timeout_s),
            shutdown_timeout_s=_positive_float(env, "MNIST_SHUTDOWN_TIMEOUT_S", defaults.shutdown_timeout_s),
            fast_path=_flag(env, "MNIST_FAST_PATH", defaults.fast_path),
            access_log=_flag(env, "MNIST_ACCESS_LOG", defaults.access_log),
            tracing=_flag(env, "MNIST_TRACING", defaults.tracing),
            cors_origins=tuple(o.strip() for o in env.get("MNIST_CORS_ORIGINS", "").split(",") if o.strip()),
            patches=_patches(env.get("MNIST_PATCHES"), defaults.patches),
            model_repository=Path(env.get("MNIST_MODEL_REPOSITORY") or _bentoml_home(env) / "mnist-repository"),
            admin_token=_token(env.get("MNIST_ADMIN_TOKEN", "")),
            gate_margin=_fraction(env, "MNIST_GATE_MARGIN", defaults.gate_margin),
        )._checked()

    def _checked(self) -> Settings:
        """Limits that must nest: each one smaller than the one that contains it."""
        if self.body_timeout_s >= self.request_timeout_s:
            raise ValueError(
                f"MNIST_BODY_TIMEOUT_S={self.body_timeout_s:g} must be below MNIST_REQUEST_TIMEOUT_S="
                f"{self.request_timeout_s:g}, or a slow client would get 504 instead of 408"
            )
        if self.max_pixels > self.max_request_pixels:
            raise ValueError(
                f"MNIST_MAX_PIXELS={self.max_pixels} must be at most MNIST_MAX_REQUEST_PIXELS={self.max_request_pixels}"
            )
        if self.max_request_pixels > self.max_inflight_pixels:
            raise ValueError(
                f"MNIST_MAX_REQUEST_PIXELS={self.max_request_pixels} must be at most MNIST_MAX_INFLIGHT_PIXELS="
                f"{self.max_inflight_pixels}, or such a request could never be served"
            )
        return self


def _bentoml_home(env: Mapping[str, str]) -> Path:
    """BentoML's home (its own default when BENTOML_HOME is unset): per server in the tests, so each test server has
    a repository of its own."""
    return Path(env.get("BENTOML_HOME") or Path.home() / "bentoml")


def _token(raw: str) -> str:
    token = raw.strip()
    if token and (len(token) < 16 or not token.isascii() or not token.isprintable()):
        # The value itself is never echoed: it is a secret, even a bad one.
        raise ValueError(
            f"MNIST_ADMIN_TOKEN must be at least 16 printable ASCII characters (it has {len(token)}); "
            "e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return token


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value:g} must be a fraction between 0 and 1")
    return value


def _patches(raw: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None or not raw.strip():
        return default
    names = tuple(dict.fromkeys(n.strip().lower() for n in raw.split(",") if n.strip()))
    if not names:
        raise ValueError(f"MNIST_PATCHES={raw!r} names no patch; give a comma list of {', '.join(PATCHES)} (or none)")
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        raise ValueError(
            f"MNIST_PATCHES names {', '.join(unknown)}; give a comma list of {', '.join(PATCHES)}, or none"
        )
    return names


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r} must be 1 or 0 (true/false, yes/no, on/off)")


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


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={value:g} must be a positive number of seconds")
    return value
