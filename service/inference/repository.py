"""The model repository: which versions of each model the server serves, which is each one's default, and how
every worker comes to serve the same ones without a restart.

Workers are separate processes, so they share a folder, MNIST_MODEL_REPOSITORY (Triton's layout):

    state.json                      the truth: each model's versions (file, SHA-256, gate verdict), its default
                                    version, the one before it (for rollback), and a generation number that every
                                    change increments
    workers/<index>.json            each worker's acknowledgement: the generation it serves, and any version it
                                    could not load
    <name>/<version>/model.onnx     the versions loaded through the management API (the shipped ones stay in
                                    MNIST_EXPORTED_DIR)
    .lock                           flock(2): one change at a time, across workers

A change (load, unload, set default, rollback) is made by whichever worker the management request reached: under
the lock it runs the verification gate (gate.py) on a new file, writes the new state.json (atomically: write, then
rename) and serves it at once. Every other worker notices the new state.json within POLL_S (one stat(2) per poll),
opens the versions it lacks in a thread, swaps its registry in one assignment and writes its acknowledgement. The
management request answers when every worker has acknowledged (or says which have not), and a version is `ready`
only when every worker serves it.

The state lasts as long as the `bentoml serve` that made it: a new server starts from MNIST_MODELS (the shipped
files, each through the gate again), like Triton's explicit model control, so what runs after a restart is what
the configuration says. Files loaded earlier stay in the folder and can be loaded again by version.

Without MNIST_ADMIN_TOKEN nothing can change: each worker serves the shipped models, each through the gate
(`fixed_registry`), and no folder is used (so the default deployment runs on a read-only root file system).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import ClientError
from ..settings import Settings
from .gate import Digits, GateError, Verdict, verify
from .runtime import Model, ModelError, Registry, UnknownModelError, UnknownVersionError, load_model

log = logging.getLogger(__name__)

# How often each worker looks for a new state (one stat(2)); the bulk of the time a change takes to reach every
# worker, next to opening the new file (~50 ms for the CNN).
POLL_S = 0.1
# Model names and versions become folder names: no separators, no dot-dot, nothing a shell or URL must quote.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STATE = "state.json"
MODEL_FILE = "model.onnx"


class RepositoryError(ClientError):
    """A management request the repository refuses (404 unknown, 409 conflict, 422 refused by the gate); the
    serving versions are untouched."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(status, message)
        self.details = details


@dataclass(frozen=True)
class Change:
    """What a management request changed, for its answer and the log."""

    action: str
    model: str
    version: str
    default: str  # the model's default version afterwards
    generation: int
    gate: Verdict | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "action": self.action, "model": self.model, "version": self.version, "default": self.default,
            "generation": self.generation,
        }  # fmt: skip
        if self.gate is not None:
            out["gate"] = self.gate.as_dict()
        return out


def server_run() -> str:
    """An identity of the `bentoml serve` this worker belongs to (its parent): the same for all its workers, and for
    a worker it restarts, never the same for another server, even one with the same PID after a reboot or in a new
    container."""
    parent = os.getppid()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        boot, started = "", ""
    return f"{boot}:{parent}:{started}"


def check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise RepositoryError(
            400, f"{kind} {value!r} is not a valid name: 1-100 letters, digits, '.', '_' or '-', not starting with "
            "'.', '_' or '-'"
        )  # fmt: skip
    return value


def verification_digits(settings: Settings) -> Digits:
    path = settings.verification_digits
    if not path.is_file():
        raise ModelError(f"no verification digits at {path}; `python -m training.sample` writes them")
    return Digits.load(path)


def shipped(settings: Settings, name: str, digits: Callable[[], Digits]) -> tuple[Model, Verdict]:
    """The shipped model `name` through the gate; ModelError if it fails: the operator's to fix."""
    path = settings.model_path(name)
    model = load_model(path, settings.device, settings.intra_op_threads)
    try:
        verdict = verify(model, digits(), settings.gate_margin, name)
    except GateError as exc:
        raise ModelError(f"{path} fails the verification gate: {exc}") from exc
    log.info("%s %s passed the gate (%s)", name, model.card.version, _verdict_text(verdict))
    return model, verdict


def fixed_registry(settings: Settings) -> Registry:
    """The models MNIST_MODELS names, each through the gate, for a server with no management (no MNIST_ADMIN_TOKEN):
    nothing can change, so nothing is shared and no folder needs to be writable (a read-only root file system)."""
    digits = functools.cache(lambda: verification_digits(settings))
    models = {name: shipped(settings, name, digits)[0] for name in settings.models}
    return Registry.of({name: {model.card.version: model} for name, model in models.items()}, settings.default_model)


class Repository:
    """One worker's view of the repository: its registry, kept in step with state.json, and the changes."""

    def __init__(self, settings: Settings, worker: int, run: str | None = None) -> None:
        self.settings = settings
        self.root = settings.model_repository
        self.worker = worker
        self.run = run if run is not None else server_run()
        self.registry = Registry({}, {}, settings.default_model, everywhere=self.everywhere)
        self.state: dict[str, Any] = {}
        self._opened: dict[tuple[str, str], tuple[str, Model]] = {}  # (name, version) -> (sha256, model)
        self._applying = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._digits: Digits | None = None

    # ---- start-up and following the state ----

    def start(self) -> None:
        """Serve the current state, seeding it from MNIST_MODELS when it is another server's (or none).
        ModelError when a shipped model fails to load or fails the gate: the operator's to fix."""
        try:
            (self.root / "workers").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelError(f"MNIST_MODEL_REPOSITORY={self.root} cannot be created: {exc}") from exc
        with self._locked():
            state = self._read()
            if state is None or state.get("run") != self.run:
                state = self._seed()
                self._write(state)
        self.sync()
        if not self.registry.names():
            raise ModelError(f"no model could be loaded from {self.root / STATE}; see the errors above")

    def sync(self) -> bool:
        """Serve state.json if it changed since this worker last did; whether it did. Blocking (opens models)."""
        with self._applying:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            state = self._read()
            if state is None or state.get("run") != self.run:
                return False  # another server's, or a seed in progress: not ours to serve
            self._stamp = stamp
            if state["generation"] == self.state.get("generation"):
                return False
            self._apply(state)
            return True

    async def follow(self) -> None:
        """Forever: apply every new state within POLL_S (the worker's event loop runs this as a task)."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                if self._stat() != self._stamp:
                    await asyncio.to_thread(self.sync)
            except Exception:  # a bad state or a full disk must not end the following
                log.exception("model repository: could not apply %s", self.root / STATE)

    def _seed(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for name in self.settings.models:
            path = self.settings.model_path(name)
            model, verdict = shipped(self.settings, name, self.digits)
            version = check_name("version", model.card.version)
            models[name] = {
                "default": version,
                "previous": None,
                "versions": {version: self._entry(path, _sha256(path.read_bytes()), 1, verdict, "shipped")},
            }
        return {"run": self.run, "generation": 1, "default_model": self.settings.default_model, "models": models}

    def _apply(self, state: dict[str, Any]) -> None:
        models: dict[str, dict[str, Model]] = {}
        defaults: dict[str, str] = {}
        errors: dict[str, str] = {}
        opened: dict[tuple[str, str], tuple[str, Model]] = {}
        for name, entry in state["models"].items():
            for version, spec in entry["versions"].items():
                try:
                    sha, model = self._open(name, version, spec)
                except (ModelError, OSError) as exc:
                    errors[f"{name}/{version}"] = str(exc)
                    log.error("model repository: worker %d cannot serve %s %s: %s", self.worker, name, version, exc)
                    continue
                opened[(name, version)] = (sha, model)
                models.setdefault(name, {})[version] = model
            if name in models:
                defaults[name] = entry["default"] if entry["default"] in models[name] else next(iter(models[name]))
        default_model = state["default_model"] if state["default_model"] in models else next(iter(models), "")
        self._opened = opened
        self.registry.replace(models, defaults, default_model)  # what new requests get, from here on
        before = self.state
        self.state = state
        self._acknowledge(state["generation"], errors)
        for name, versions in models.items():
            old = before.get("models", {}).get(name, {})
            if list(versions) != list(old.get("versions", {})) or defaults[name] != old.get("default"):
                log.info(
                    "model repository: worker %d serves %s versions %s, default %s (generation %d)",
                    self.worker, name, ", ".join(versions), defaults[name], state["generation"],
                )  # fmt: skip

    def _open(self, name: str, version: str, spec: dict[str, Any]) -> tuple[str, Model]:
        cached = self._opened.get((name, version))
        if cached is not None and cached[0] == spec["sha256"]:
            return cached
        path = Path(spec["path"])
        sha = _sha256(path.read_bytes())
        if sha != spec["sha256"]:
            raise ModelError(f"{path} changed since it passed the gate (SHA-256 {sha[:12]}, not {spec['sha256'][:12]})")
        model = self._load(path)
        if (model.card.name, model.card.version) != (name, version):
            raise ModelError(f"{path} says it is {model.card.name} {model.card.version}, not {name} {version}")
        return sha, model

    def _load(self, path: Path) -> Model:
        return load_model(path, self.settings.device, self.settings.intra_op_threads)

    # ---- readiness: every worker serves it ----

    def everywhere(self, name: str, version: str) -> bool:
        """Whether every worker of this server serves `name` `version` (from their acknowledgements)."""
        spec = self.state.get("models", {}).get(name, {}).get("versions", {}).get(version)
        if spec is None:
            return False
        return not self._lagging(spec["generation"], f"{name}/{version}")

    def _lagging(self, generation: int, key: str | None = None) -> list[str]:
        """The workers not yet serving `generation` (or that could not open `key`), in words."""
        acks = self._read_acks()
        out = []
        for index in range(1, self.settings.workers + 1):
            ack = acks.get(index)
            if ack is None:
                out.append(f"worker {index} has not started")
            elif key is not None and key in ack["errors"] and ack["generation"] >= generation:
                out.append(f"worker {index} cannot open {key}: {ack['errors'][key]}")
            elif ack["generation"] < generation:
                out.append(f"worker {index} serves generation {ack['generation']}")
        return out

    async def converged(self, generation: int, key: str | None, timeout_s: float) -> tuple[float, list[str]]:
        """Wait until every worker serves `generation`; the seconds it took and the workers still lagging."""
        start = time.perf_counter()
        while True:
            lagging = self._lagging(generation, key)
            failed = [lag for lag in lagging if "cannot open" in lag]
            if not lagging or failed or time.perf_counter() - start > timeout_s:
                return time.perf_counter() - start, lagging
            await asyncio.sleep(0.005)

    def _acknowledge(self, generation: int, errors: dict[str, str]) -> None:
        ack = {"run": self.run, "pid": os.getpid(), "generation": generation, "errors": errors}
        _write_json(self.root / "workers" / f"{self.worker}.json", ack)

    def _read_acks(self) -> dict[int, dict[str, Any]]:
        """Every worker's acknowledgement of this server (one small file each: ~20 us to read)."""
        acks = {}
        for path in (self.root / "workers").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                ack = json.loads(path.read_text())
                if ack.get("run") == self.run:
                    acks[int(path.stem)] = ack
        return acks

    # ---- changes (blocking: call them in a thread) ----

    def load(self, name: str, data: bytes | None, version: str | None, make_default: bool) -> Change:
        """Load a new version of `name` from `data` (an ONNX file), or `version` from its folder in the repository;
        only through the gate. The model's default becomes it when `make_default`, or when the model is new."""
        check_name("model", name)
        staging = None
        try:
            if data is not None:
                staging = self.root / ".staging" / f"{uuid.uuid4().hex}.onnx"
                staging.parent.mkdir(parents=True, exist_ok=True)
                staging.write_bytes(data)
                path = staging
            else:
                if not version:
                    raise RepositoryError(400, "give the model file (the request body), or the version to load from "
                                          "the repository folder (parameters.version)")  # fmt: skip
                path = self.root / name / check_name("version", version) / MODEL_FILE
                if not path.is_file():
                    raise RepositoryError(404, f"no file {name}/{version}/{MODEL_FILE} in the model repository")
                data = path.read_bytes()
            sha = _sha256(data)
            with self._locked():
                state = self._current()
                try:
                    model = self._load(path)
                except ModelError as exc:
                    raise RepositoryError(422, f"refused: {exc}") from None
                version = check_name("version", model.card.version)
                known = state["models"].get(name, {}).get("versions", {}).get(version)
                if known is not None and known["sha256"] != sha:
                    raise RepositoryError(
                        409, f"{name} version {version} is loaded already, from another file; a version is never "
                        "replaced: export the new model under a new version"
                    )  # fmt: skip
                try:
                    verdict = verify(model, self.digits(), self.settings.gate_margin, name)
                except GateError as exc:
                    log.warning("model repository: %s %s refused by the gate: %s", name, version, exc)
                    raise RepositoryError(422, f"{name} {version} refused by the verification gate: {exc}") from None
                final = self.root / name / version / MODEL_FILE
                if path != final:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(path, final)
                    staging = None
                entry = state["models"].setdefault(name, {"default": version, "previous": None, "versions": {}})
                generation = state["generation"] + 1
                if known is None:
                    entry["versions"][version] = self._entry(final, sha, generation, verdict, "loaded")
                if make_default and entry["default"] != version:
                    entry["previous"], entry["default"] = entry["default"], version
                state["generation"] = generation
                self._write(state)
            log.info(
                "model repository: loaded %s %s (%s)%s [generation %d]", name, version, _verdict_text(verdict),
                ", now the default" if entry["default"] == version else "", generation,
            )  # fmt: skip
        finally:
            if staging is not None:
                staging.unlink(missing_ok=True)
        self.sync()
        return Change("load", name, version, entry["default"], generation, verdict)

    def unload(self, name: str, version: str | None) -> Change:
        """Stop serving `name` `version` (every version of `name` without one). Never the default version: another
        one must become the default first. The file stays in the repository folder."""
        with self._locked():
            state = self._current()
            entry = self._entry_of(state, name)
            if version is None:
                if name == state["default_model"]:
                    raise RepositoryError(409, f"{name} is the default model (MNIST_MODELS); unload a version instead")
                del state["models"][name]
                version = "*"
            else:
                if version not in entry["versions"]:
                    raise UnknownVersionError(name, version, list(entry["versions"]))
                if version == entry["default"]:
                    raise RepositoryError(
                        409, f"{name} {version} is the default version; make another one the default first "
                        f"(POST /v2/repository/models/{name}/default)"
                    )  # fmt: skip
                del entry["versions"][version]
                if entry["previous"] == version:
                    entry["previous"] = None
            state["generation"] += 1
            self._write(state)
        log.info("model repository: unloaded %s %s [generation %d]", name, version, state["generation"])
        self.sync()
        return Change("unload", name, version, entry["default"], state["generation"])

    def set_default(self, name: str, version: str, action: str = "default") -> Change:
        """Make `version` the default of `name`; it must be served by every worker already."""
        with self._locked():
            state = self._current()
            entry = self._entry_of(state, name)
            if version not in entry["versions"]:
                raise UnknownVersionError(name, version, list(entry["versions"]))
            lagging = self._lagging(entry["versions"][version]["generation"], f"{name}/{version}")
            if lagging:
                raise RepositoryError(409, f"{name} {version} is not served by every worker yet: {'; '.join(lagging)}")
            if entry["default"] != version:
                entry["previous"], entry["default"] = entry["default"], version
                state["generation"] += 1
                self._write(state)
        log.info("model repository: %s default is now %s [generation %d]", name, version, state["generation"])
        self.sync()
        return Change(action, name, version, version, state["generation"])

    def rollback(self, name: str) -> Change:
        """Make the previous default version of `name` its default again."""
        with self._locked():
            entry = self._entry_of(self._current(), name)
            previous = entry["previous"]
        if previous is None or previous not in entry["versions"]:
            raise RepositoryError(409, f"{name} has no previous default version to roll back to")
        return self.set_default(name, previous, action="rollback")

    def index(self) -> list[dict[str, Any]]:
        """Every version the repository knows: served (READY everywhere, or LOADING/UNAVAILABLE with the reason)
        or only on disk (UNAVAILABLE). Triton's repository index, plus whether each is its model's default."""
        state = self._read() or self.state
        out = []
        for name, entry in state.get("models", {}).items():
            for version, spec in entry["versions"].items():
                lagging = self._lagging(spec["generation"], f"{name}/{version}")
                failed = [lag for lag in lagging if "cannot open" in lag]
                row = {"name": name, "version": version, "state": "READY", "default": version == entry["default"]}
                if lagging:
                    row |= {"state": "UNAVAILABLE" if failed else "LOADING", "reason": "; ".join(lagging)}
                out.append(row | {"gate": spec["gate"], "source": spec["source"]})
        served = {(row["name"], row["version"]) for row in out}
        for path in sorted(self.root.glob(f"*/*/{MODEL_FILE}")):
            name, version = path.parent.parent.name, path.parent.name
            if (name, version) not in served:
                out.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": "unloaded"})
        return out

    # ---- helpers ----

    def digits(self) -> Digits:
        if self._digits is None:
            self._digits = verification_digits(self.settings)
        return self._digits

    def _current(self) -> dict[str, Any]:
        state = self._read()
        if state is None or state.get("run") != self.run:
            raise RepositoryError(409, f"{self.root / STATE} belongs to another server; restart this one")
        return state

    @staticmethod
    def _entry_of(state: dict[str, Any], name: str) -> dict[str, Any]:
        entry = state["models"].get(name)
        if entry is None:
            raise UnknownModelError(name, list(state["models"]))
        return entry

    @staticmethod
    def _entry(path: Path, sha: str, generation: int, verdict: Verdict, source: str) -> dict[str, Any]:
        return {
            "path": str(path.resolve()), "sha256": sha, "generation": generation, "gate": verdict.as_dict(),
            "source": source, "loaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }  # fmt: skip

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.root / STATE)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.root / STATE).read_text())
        except FileNotFoundError:
            return None

    def _write(self, state: dict[str, Any]) -> None:
        _write_json(self.root / STATE, state)


def _write_json(path: Path, value: Any) -> None:
    """Readers see the old file or the new one, never half of one: written aside, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verdict_text(verdict: Verdict) -> str:
    return f"gate: {verdict.accuracy:.1%} of {verdict.digits} verification digits, claimed {verdict.claimed:.2%}"
