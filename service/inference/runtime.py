"""ONNX Runtime sessions for the exported MNIST models, and the model cards read from their metadata.

The ONNX file is the contract with training: it names its input, shape, pixel range, polarity and labels
in `metadata_props`, and the score and thresholds behind each answer's `status` (chosen on validation data
by training, never typed here). A model whose metadata is missing or disagrees with what
`service/imaging/preprocess.py` produces (28x28 pixels in [0, 1], white ink on black) is refused at start-up, never
served wrongly: a model without the status thresholds could only answer "ok" for a smiley.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import ClientError
from ..settings import Settings

log = logging.getLogger(__name__)

REQUIRED_KEYS = (
    "model_name",
    "version",
    "input_name",
    "input_shape",
    "input_range",
    "input_polarity",
    "output_name",
    "labels",
    "ood_score",
    "ood_threshold",
    "uncertain_threshold",
)
# The scores training knows how to threshold (training/calibrate.py: digit_score), and the graph output each reads.
OOD_SCORES = {"max_probability": "probabilities", "logsumexp": "logits"}
LOGITS = "logits"  # the graph output of the (calibrated) logits, which training/export.py always writes
# What preprocess.py hands over; the model must expect exactly this.
EXPECTED_SHAPE = [-1, 1, 28, 28]
EXPECTED_RANGE = [0.0, 1.0]
EXPECTED_POLARITY = "white-on-black"

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# ONNX Runtime's own log levels: 2 = warning (its default), 4 = fatal only.
_ORT_WARNING, _ORT_FATAL = 2, 4
_cuda_warned = False


class ModelError(RuntimeError):
    """A model cannot be served (missing file, bad metadata, device unavailable); str(e) says what to do."""


class UnknownModelError(ClientError):
    """A request named a model that is not loaded (the client's mistake: answered with 404)."""

    def __init__(self, name: str, loaded: list[str]) -> None:
        super().__init__(404, f"unknown model {name!r}; loaded models: {', '.join(loaded)}")


@dataclass(frozen=True)
class ModelCard:
    """What a client may know about a model: its identity, its contract and its measured accuracy."""

    name: str
    version: str
    architecture: str | None
    parameters: int | None
    test_accuracy: float | None
    input_name: str
    output_name: str
    labels: tuple[str, ...]
    provider: str  # the execution provider really in use, not the one asked for
    ood_score: str  # how much an input looks like a digit: "max_probability" or "logsumexp" (of the logits)
    ood_threshold: float  # status "not_a_digit" below it
    uncertain_threshold: float  # status "uncertain" when the confidence is below it
    metadata: dict[str, Any] = field(default_factory=dict)  # every metadata key, JSON values decoded

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "parameters": self.parameters,
            "test_accuracy": self.test_accuracy,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "labels": list(self.labels),
            "provider": self.provider,
            "ood_score": self.ood_score,
            "ood_threshold": self.ood_threshold,
            "uncertain_threshold": self.uncertain_threshold,
            "metadata": self.metadata,
        }


class Model:
    """One loaded ONNX model: `predict` maps pixels (N, 28, 28) float32 to probabilities (N, 10)."""

    def __init__(self, session: ort.InferenceSession, card: ModelCard) -> None:
        self.session = session
        self.card = card

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """pixels: float32 (N, 28, 28) in [0, 1], white on black -> float32 (N, len(labels)), rows sum to 1."""
        return self.predict_with_scores(pixels)[0]

    def predict_with_scores(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like `predict`, plus each input's digit score (N,) of the kind `card.ood_score` names: one run."""
        score_output = OOD_SCORES[self.card.ood_score]
        names = (
            [self.card.output_name] if score_output == self.card.output_name else [self.card.output_name, score_output]
        )
        outputs = self._run(names, pixels)
        return outputs[0], self._digit_scores(outputs[0], outputs[-1])

    def predict_for_reading(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like `predict_with_scores`, plus each input's top logit (N,), all from one run: the strength of the model's
        evidence for its digit, which keeps growing where the probability has saturated at ~1 (a touching "81"
        read whole as an 8 is as sure as a clean 8, but with a smaller top logit)."""
        probabilities, logits = self._run([self.card.output_name, LOGITS], pixels)
        return probabilities, self._digit_scores(probabilities, logits), logits.max(axis=1)

    def _run(self, names: list[str], pixels: np.ndarray) -> list[np.ndarray]:
        batch = np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1, 1, 28, 28)  # a view, no copy
        return self.session.run(names, {self.card.input_name: batch})

    def _digit_scores(self, probabilities: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if self.card.ood_score == "max_probability":
            return probabilities.max(axis=1)
        logits = logits.astype(np.float64)
        top = logits.max(axis=1)
        return (top + np.log(np.exp(logits - top[:, None]).sum(axis=1))).astype(np.float32)


def create_session(path: Path, device: str, intra_op_threads: int) -> ort.InferenceSession:
    """An InferenceSession on `device` (auto | cuda | cpu).

    `get_available_providers()` lists CUDA whenever onnxruntime-gpu is installed, even on machines with no
    GPU or no CUDA libraries, so the only reliable test is to create the session and look at the providers
    it really got: auto falls back to CPU with one warning, cuda raises.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1  # MNIST graphs are a chain: nothing to run in parallel between ops
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if device == "cpu":
        return ort.InferenceSession(str(path), options, providers=[CPU])
    if device == "auto":
        # ONNX Runtime prints its CUDA loading failure as an error; on a GPU-less machine that is the
        # expected path, so silence it here and log one warning of our own below.
        ort.set_default_logger_severity(_ORT_FATAL)
    try:
        session = ort.InferenceSession(str(path), options, providers=[CUDA, CPU])
    finally:
        ort.set_default_logger_severity(_ORT_WARNING)
    if session.get_providers()[0] == CUDA:
        return session
    if device == "cuda":
        raise ModelError(
            f"MNIST_DEVICE=cuda, but ONNX Runtime could not start {CUDA} for {path.name} (no GPU, or the "
            "CUDA/cuDNN libraries onnxruntime-gpu needs are missing; see the log above). "
            "Use MNIST_DEVICE=auto to fall back to the CPU, or MNIST_DEVICE=cpu."
        )
    global _cuda_warned
    if not _cuda_warned:  # once per worker, not once per model (and per version loaded later)
        _cuda_warned = True
        log.warning("CUDA is not usable on this machine; models run on the CPU (MNIST_DEVICE=auto)")
    return session


def read_card(session: ort.InferenceSession, path: Path) -> ModelCard:
    """The model card from the session's metadata; ModelError naming every missing or wrong key."""
    raw = dict(session.get_modelmeta().custom_metadata_map)
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ModelError(
            f"{path} lacks required metadata: {', '.join(missing)}. Re-export it with "
            "`python -m training export`, which writes them."
        )
    meta = {key: _decode(value) for key, value in raw.items()}
    problems = []
    if meta["input_shape"] != EXPECTED_SHAPE:
        problems.append(f"input_shape is {meta['input_shape']}, expected {EXPECTED_SHAPE}")
    if [float(v) for v in meta["input_range"]] != EXPECTED_RANGE:
        problems.append(f"input_range is {meta['input_range']}, expected {EXPECTED_RANGE}")
    if meta["input_polarity"] != EXPECTED_POLARITY:
        problems.append(f"input_polarity is {meta['input_polarity']!r}, expected {EXPECTED_POLARITY!r}")
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if meta["input_name"] not in inputs:
        problems.append(f"input_name {meta['input_name']!r} is not a graph input ({inputs})")
    if meta["output_name"] not in outputs:
        problems.append(f"output_name {meta['output_name']!r} is not a graph output ({outputs})")
    if LOGITS not in outputs:  # /read compares readings by them (Model.predict_for_reading)
        problems.append(f"no graph output {LOGITS!r} ({outputs}); `python -m training export` writes it")
    if not isinstance(meta["labels"], list) or len(meta["labels"]) != 10:
        problems.append(f"labels must be a JSON list of 10 names, got {raw['labels']!r}")
    if meta["ood_score"] not in OOD_SCORES:
        problems.append(f"ood_score is {meta['ood_score']!r}, expected one of {', '.join(OOD_SCORES)}")
    elif OOD_SCORES[meta["ood_score"]] not in outputs:
        problems.append(f"ood_score {meta['ood_score']!r} needs the graph output {OOD_SCORES[meta['ood_score']]!r}")
    thresholds = {key: _maybe(float, meta[key]) for key in ("ood_threshold", "uncertain_threshold")}
    for key, value in thresholds.items():
        if value is None or not np.isfinite(value):
            problems.append(f"{key} must be a finite number, got {raw[key]!r}")
    if thresholds["uncertain_threshold"] is not None and not 0.0 <= thresholds["uncertain_threshold"] <= 1.0:
        problems.append(f"uncertain_threshold is {raw['uncertain_threshold']}, expected a probability in [0, 1]")
    if problems:
        raise ModelError(f"{path} cannot be served: {'; '.join(problems)}")
    return ModelCard(
        name=str(meta["model_name"]),
        version=str(meta["version"]),
        architecture=meta.get("architecture"),
        parameters=_maybe(int, meta.get("parameters")),
        test_accuracy=_maybe(float, meta.get("test_accuracy")),
        input_name=meta["input_name"],
        output_name=meta["output_name"],
        labels=tuple(str(label) for label in meta["labels"]),
        provider=session.get_providers()[0],
        ood_score=meta["ood_score"],
        ood_threshold=float(thresholds["ood_threshold"]),
        uncertain_threshold=float(thresholds["uncertain_threshold"]),
        metadata=meta,
    )


def load_model(path: Path, device: str = "auto", intra_op_threads: int = 1) -> Model:
    if not path.is_file():
        raise ModelError(f"no model file at {path}; train and export it first (`make train export`)")
    try:
        session = create_session(path, device, intra_op_threads)
    except ModelError:
        raise
    except Exception as exc:  # ONNX Runtime's own errors (InvalidProtobuf, InvalidGraph, Fail...) share no base
        raise ModelError(f"{path} is not a model ONNX Runtime can load: {exc}") from exc
    card = read_card(session, path)
    log.info("loaded %s %s from %s on %s", card.name, card.version, path, card.provider)
    return Model(session, card)


class UnknownVersionError(ClientError):
    """A request named a version of a model that is not loaded (404)."""

    def __init__(self, name: str, version: str, loaded: list[str]) -> None:
        super().__init__(404, f"model {name!r} has no version {version!r} loaded; loaded versions: {', '.join(loaded)}")


class Registry:
    """The models one worker serves, by name and version. The first name is the default model, and each name has a
    default version: the one a request that names no version gets.

    The model repository (repository.py) swaps in new contents while requests run: the three parts are one tuple,
    replaced in one assignment, and each lookup reads it once, so no request sees half of a change. A request that
    already holds a Model keeps it (and its session) to the end, even if its version is unloaded meanwhile.
    """

    def __init__(
        self,
        models: dict[str, dict[str, Model]],
        defaults: dict[str, str],
        default: str,
        everywhere: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._view = (models, defaults, default)
        # Whether a loaded version is loaded by every worker of the server (the repository knows); one worker alone:
        # loaded here is loaded everywhere.
        self._everywhere = everywhere

    @classmethod
    def load(cls, settings: Settings) -> Registry:
        """The models MNIST_MODELS names, one version each (the file in MNIST_EXPORTED_DIR), without a repository."""
        models = {}
        for name in settings.models:
            model = load_model(settings.model_path(name), settings.device, settings.intra_op_threads)
            models[name] = {model.card.version: model}
        return cls.of(models, settings.default_model)

    @classmethod
    def of(cls, models: dict[str, dict[str, Model]], default: str, **kwargs: Any) -> Registry:
        """A registry whose default version of each model is its first one."""
        return cls(models, {name: next(iter(versions)) for name, versions in models.items()}, default, **kwargs)

    def replace(self, models: dict[str, dict[str, Model]], defaults: dict[str, str], default: str) -> None:
        self._view = (models, defaults, default)

    @property
    def default(self) -> str:
        """The name of the default model."""
        return self._view[2]

    def get(self, name: str | None, version: str | None = None) -> Model:
        """The model called `name` (the default for None or ""), at `version` (its default version for None or "");
        UnknownModelError or UnknownVersionError otherwise."""
        models, defaults, default = self._view
        if not isinstance(name, str | None) or not isinstance(version, str | None):
            raise UnknownModelError(str(name), list(models))
        name = name or default
        versions = models.get(name)
        if versions is None:
            raise UnknownModelError(name, list(models))
        model = versions.get(version or defaults[name])
        if model is None:
            raise UnknownVersionError(name, str(version), list(versions))
        return model

    def names(self) -> list[str]:
        """The names of the models served, the default first."""
        return list(self._view[0])

    def versions(self, name: str) -> list[str]:
        """The versions of `name` this worker serves, oldest load first (UnknownModelError for a name it lacks)."""
        models = self._view[0]
        if name not in models:
            raise UnknownModelError(name, list(models))
        return list(models[name])

    def default_version(self, name: str) -> str:
        return self.get(name).card.version

    def ready(self, name: str, version: str | None = None) -> bool:
        """Whether `name` (at `version`; its default without one) is served by every worker of this server."""
        try:
            model = self.get(name, version)
        except ClientError:
            return False
        return self._everywhere is None or self._everywhere(model.card.name, model.card.version)

    def cards(self) -> list[dict[str, Any]]:
        """Each model's default version's card, the default model first."""
        models, defaults, _ = self._view
        return [versions[defaults[name]].card.as_dict() for name, versions in models.items()]


def _decode(value: str) -> Any:
    """Metadata values are strings; structured ones are JSON. Plain strings stay strings."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _maybe(kind: type, value: Any) -> Any:
    try:
        return None if value is None else kind(value)
    except (TypeError, ValueError):
        return None
