"""Checkpoint -> verified ONNX file with its conventions in the metadata, listed in ``models.json``.

The graph takes plain pixels in [0, 1] (white ink on black, MNIST's convention), applies the training
normalisation itself, divides the logits by the calibration temperature fitted on the validation split and ends
in softmax, so a client cannot get the normalisation wrong and reads calibrated probabilities. The metadata
carries the temperature, the measured test ECE, and the score and thresholds behind an answer's ``status``.

Exporter: the torch.export-based one (``dynamo=True``). It is the exporter PyTorch maintains and makes the
default; the TorchScript-based one is deprecated. Our models are plain feed-forward graphs, so torch.export
captures them exactly, with a symbolic batch dimension.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from training.calibrate import ECE_BINS, digit_score, ece, ood_report, softmax, statuses
from training.data import MNIST_MEAN, MNIST_STD, load_arrays
from training.evaluate import load_checkpoint, onnx_outputs, onnx_probabilities, summarise
from training.models import count_parameters
from training.outliers import held_out_outliers
from training.shapes import held_out_shapes

log = logging.getLogger(__name__)

# What the service and the image serve (MNIST_EXPORTED_DIR's default): written only by `export --replace`.
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "exported"
OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("probabilities", "logits")
LABELS = [str(d) for d in range(10)]
TOLERANCE = 1e-5
VERIFY_BATCHES = (1, 7, 256)
# Keys the service refuses to start without (see docs/CONTRACT.md); the test of exported/ checks them all.
REQUIRED_METADATA = (
    "model_name",
    "architecture",
    "version",
    "parameters",
    "opset",
    "input_name",
    "input_shape",
    "input_range",
    "input_polarity",
    "output_name",
    "labels",
    "normalization",
    "test_accuracy",
    "temperature",
    "test_ece",
    "ood_score",
    "ood_threshold",
    "uncertain_threshold",
    "run_id",
    "recipe",
    "data_sha256",
    "torch_version",
    "onnx_version",
    "exported_at",
)


class ExportError(RuntimeError):
    """The exported file failed verification."""


class WithPreprocessing(nn.Module):
    """[N, 1, 28, 28] pixels in [0, 1] -> (probabilities, logits): normalisation, temperature and softmax live
    in the graph. ``logits`` are the model's logits divided by the temperature (the calibrated ones)."""

    def __init__(self, model: nn.Module, mean: float, std: float, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = mean, std
        self.temperature = temperature

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((image - self.mean) / self.std) / self.temperature
        return torch.softmax(logits, dim=1), logits


@dataclass
class ExportReport:
    path: Path
    sha256: str
    torch_test_accuracy: float
    onnx_test_accuracy: float
    max_abs_diff: dict[int, float]
    parameters: int
    quality: dict = field(default_factory=dict)
    int8: dict = field(default_factory=dict)

    def summary(self) -> list[str]:
        lines = [
            f"wrote {self.path} (SHA-256 {self.sha256[:16]}…, {self.parameters} parameters, opset {OPSET})",
            "onnx.checker full check: passed",
            "ONNX Runtime vs torch, max |Δ probability|: "
            + ", ".join(f"batch {b}: {d:.1e}" for b, d in self.max_abs_diff.items()),
            f"test accuracy: torch {100 * self.torch_test_accuracy:.2f}%, "
            f"ONNX Runtime {100 * self.onnx_test_accuracy:.2f}% (10,000 images)",
        ]
        if self.quality:
            q, ood = self.quality, self.quality["ood"]
            lines.append(
                f"test ECE ({ECE_BINS} bins): {q['test_ece_uncalibrated']:.4f} before, {q['test_ece']:.4f} after "
                f"temperature {q['temperature']:.4f}"
            )
            lines.append(
                f"not a digit (held-out set): AUROC {ood['auroc']:.4f}, non-digits flagged "
                f"{100 * ood['non_digits_flagged']:.1f}%, MNIST test digits flagged {100 * ood['digits_flagged']:.2f}%"
            )
        if self.int8:
            lines.append(f"int8: {json.dumps(self.int8)}")
        return lines


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metadata(checkpoint: dict, name: str, parameters: int, test_accuracy: float, quality: dict) -> dict[str, str]:
    recipe = checkpoint["recipe"]
    calibration = checkpoint["calibration"]
    return {
        "model_name": name,
        "architecture": checkpoint["arch"],
        "version": checkpoint["run_id"],
        "parameters": str(parameters),
        "opset": str(OPSET),
        "input_name": INPUT_NAME,
        "input_shape": json.dumps([-1, 1, 28, 28]),
        "input_range": json.dumps([0.0, 1.0]),
        "input_polarity": "white-on-black",
        "output_name": OUTPUT_NAMES[0],
        "labels": json.dumps(LABELS),
        "normalization": json.dumps({**checkpoint["normalization"], "applied_in_graph": True}),
        "test_accuracy": f"{test_accuracy:.4f}",
        "temperature": f"{calibration['temperature']:.6g}",
        "test_ece": f"{quality['test_ece']:.4f}",
        "test_ece_uncalibrated": f"{quality['test_ece_uncalibrated']:.4f}",
        "ood_score": calibration["ood_score"],
        "ood_threshold": f"{calibration['ood_threshold']:.6g}",
        "uncertain_threshold": f"{calibration['uncertain_threshold']:.6g}",
        "ood_held_out": json.dumps({k: round(v, 4) for k, v in quality["ood"].items()}),
        "drawn_shapes_held_out": json.dumps({k: round(v, 4) for k, v in quality["drawn_shapes"].items()}),
        "run_id": checkpoint["run_id"],
        "recipe": json.dumps(recipe),
        "data_sha256": json.dumps(checkpoint.get("data_sha256", {})),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def to_onnx(
    model: nn.Module, path: Path, mean: float = MNIST_MEAN, std: float = MNIST_STD, temperature: float = 1.0
) -> None:
    """Export ``model`` (eval mode) wrapped with normalisation, temperature and softmax, dynamic batch dimension."""
    wrapped = WithPreprocessing(model, mean, std, temperature).eval()
    example = torch.rand(2, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        wrapped,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"image": {0: batch}},
        optimize=True,
        verbose=False,
    )
    program.save(str(path))


def verify(
    path: Path, model: nn.Module, images: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> tuple[dict[int, float], float, float]:
    """Full onnx.checker, ONNX Runtime vs torch (with ``temperature``) on real digits, and both test accuracies
    on all images.

    Returns (max |Δ probability| per batch size, torch accuracy, ONNX Runtime accuracy); raises ExportError.
    """
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wrapped = WithPreprocessing(model, MNIST_MEAN, MNIST_STD, temperature).eval()
    diffs: dict[int, float] = {}
    for batch in VERIFY_BATCHES:
        x = images[:batch, None].astype(np.float32) / 255.0
        with torch.no_grad():
            expected = wrapped(torch.from_numpy(x))[0].numpy()
        actual = session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x})[0]
        diffs[batch] = float(np.abs(actual - expected).max())
        if actual.shape != (batch, 10) or diffs[batch] > TOLERANCE:
            raise ExportError(f"batch {batch}: ONNX Runtime differs from torch by {diffs[batch]:.2e} > {TOLERANCE}")
    with torch.no_grad():
        torch_probs = np.concatenate(
            [
                wrapped(torch.from_numpy(images[i : i + 1000, None].astype(np.float32) / 255.0))[0].numpy()
                for i in range(0, len(images), 1000)
            ]
        )
    torch_acc = summarise(torch_probs.argmax(1), labels)["accuracy"]
    onnx_acc = summarise(onnx_probabilities(session, images).argmax(1), labels)["accuracy"]
    if onnx_acc != torch_acc:
        raise ExportError(f"ONNX Runtime test accuracy {onnx_acc:.4%} differs from torch's {torch_acc:.4%}")
    return diffs, torch_acc, onnx_acc


def measure_quality(
    session: ort.InferenceSession, images: np.ndarray, labels: np.ndarray, temperature: float, calibration: dict
) -> dict:
    """Test ECE before and after the temperature, the held-out "not a digit" figures, and the share of held-out
    drawn shapes a user would not see as a confident digit (not_a_digit or uncertain), from the graph's outputs."""
    probabilities, logits = onnx_outputs(session, images)
    others = onnx_outputs(session, held_out_outliers()[0])[1]
    kind, threshold = calibration["ood_score"], calibration["ood_threshold"]
    shape_probabilities, shape_logits = onnx_outputs(session, held_out_shapes()[0])
    flagged, not_ok = statuses(shape_probabilities, shape_logits, kind, threshold, calibration["uncertain_threshold"])
    return {
        "temperature": temperature,
        "test_ece": ece(probabilities, labels),
        "test_ece_uncalibrated": ece(softmax(logits * temperature), labels),  # undo the graph's division
        "ood": ood_report(digit_score(logits, kind), digit_score(others, kind), threshold),
        "drawn_shapes": {
            "count": len(shape_logits),
            "flagged": float(flagged.mean()),
            "not_ok": float(not_ok.mean()),
        },
    }


def shipped_accuracy(path: Path) -> float | None:
    """The test accuracy recorded in the metadata of the model file at ``path``, or None if there is none."""
    if not path.is_file():
        return None
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return float(meta["test_accuracy"]) if "test_accuracy" in meta else None


def export(
    checkpoint_path: Path,
    out_dir: Path,
    name: str | None = None,
    int8: bool = False,
    data_dir: Path | None = None,
    replace: bool = False,
) -> ExportReport:
    """Export, verify, write metadata, and record the file in ``out_dir/models.json``.

    The shipped folder (``SHIPPED_DIR``, what the service and the image serve) is written only with ``replace``;
    with ``replace``, a model of the same name already in ``out_dir`` is replaced only by one at least as accurate
    on the test set (else ExportError naming both figures, and nothing is written).
    """
    if out_dir.resolve() == SHIPPED_DIR.resolve() and not replace:
        raise ExportError(
            f"{out_dir} holds the shipped models: export elsewhere (--out), or pass --replace to replace one "
            "(only by a model at least as accurate)"
        )
    model, checkpoint = load_checkpoint(checkpoint_path)
    if "calibration" not in checkpoint:  # a run from before calibration: fit it now, on its validation split
        from training.data import load_mnist
        from training.train import Recipe, calibrate

        recipe = Recipe(**checkpoint["recipe"])
        data = load_mnist(data_dir, recipe.val_size, recipe.validation_seed(), recipe.train_subset)
        checkpoint["calibration"] = calibrate(model, data, recipe, torch.device("cpu"))
    temperature = checkpoint["calibration"]["temperature"]
    name = name or f"mnist-{checkpoint['arch']}"
    arrays = load_arrays(data_dir)
    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.onnx"

    # Export and verify in a scratch directory: a file that fails verification never reaches out_dir.
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / path.name
        to_onnx(model, scratch, **{k: checkpoint["normalization"][k] for k in ("mean", "std")}, temperature=temperature)
        diffs, torch_acc, onnx_acc = verify(scratch, model, images, labels, temperature)
        parameters = count_parameters(model)
        session = ort.InferenceSession(str(scratch), providers=["CPUExecutionProvider"])
        quality = measure_quality(session, images, labels, temperature, checkpoint["calibration"])
        if replace and (old := shipped_accuracy(path)) is not None and round(onnx_acc, 4) < old:
            raise ExportError(
                f"not replacing {path}: its test accuracy is {100 * old:.2f}%, this export's {100 * onnx_acc:.2f}% "
                f"(10,000 test images); {out_dir} is unchanged"
            )
        proto = onnx.load(str(scratch))
        proto.doc_string = f"MNIST digit classifier {name} ({checkpoint['arch']}), run {checkpoint['run_id']}"
        onnx.helper.set_model_props(proto, _metadata(checkpoint, name, parameters, onnx_acc, quality))
        onnx.save(proto, str(path))

    report = ExportReport(path, file_sha256(path), torch_acc, onnx_acc, diffs, parameters, quality=quality)
    if int8:
        from training.quantize import quantize_if_worth_it

        report.int8 = quantize_if_worth_it(path, arrays, onnx_acc)
    _record(out_dir, report, checkpoint, checkpoint_path, name)
    return report


def _record(out_dir: Path, report: ExportReport, checkpoint: dict, checkpoint_path: Path, name: str) -> None:
    index_path = out_dir / "models.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"models": {}}
    entries = {report.path.name: report}
    int8_name = f"{name}-int8"
    if report.int8.get("kept"):
        entries[Path(report.int8["file"]).name] = None
    else:  # a quantised file left from an earlier export no longer matches this model
        (out_dir / f"{int8_name}.onnx").unlink(missing_ok=True)
        index["models"].pop(int8_name, None)
    for file_name, rep in entries.items():
        file_path = out_dir / file_name
        meta = {p.key: p.value for p in onnx.load(str(file_path), load_external_data=False).metadata_props}
        index["models"][meta["model_name"]] = {
            "file": file_name,
            "sha256": file_sha256(file_path),
            "test_accuracy": float(meta["test_accuracy"]),
            "temperature": float(meta["temperature"]),
            "test_ece": float(meta["test_ece"]),
            "test_ece_uncalibrated": float(meta["test_ece_uncalibrated"]),
            "ood_score": meta["ood_score"],
            "ood_threshold": float(meta["ood_threshold"]),
            "uncertain_threshold": float(meta["uncertain_threshold"]),
            "ood_held_out": json.loads(meta["ood_held_out"]),
            **(
                {"drawn_shapes_held_out": json.loads(meta["drawn_shapes_held_out"])}
                if "drawn_shapes_held_out" in meta  # exports from before 2026-12-04 did not measure them
                else {}
            ),
            "parameters": int(meta["parameters"]),
            "opset": int(meta["opset"]),
            "architecture": meta["architecture"],
            "run_id": checkpoint["run_id"],
            "recipe": checkpoint["recipe"],
            "train_command": checkpoint.get("command", ""),
            "export_command": f"python -m training export {checkpoint_path} --out {out_dir} --name {name}"
            + (" --int8" if rep is None or report.int8 else "")
            + (" --replace" if out_dir.resolve() == SHIPPED_DIR.resolve() else ""),
            "exported_at": meta["exported_at"],
        }
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
