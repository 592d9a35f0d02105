"""Accuracy, per-class accuracy and confusion matrix, for a torch model, a checkpoint, or an ONNX file.

The ONNX path needs only NumPy and ONNX Runtime: it is how a shipped file is checked without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

EVAL_BATCH = 1000


def summarise(predictions: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, per-class accuracy and the 10x10 confusion matrix (rows: true digit, columns: predicted)."""
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    return {
        "accuracy": float((predictions == labels).mean()),
        "count": len(labels),
        "per_class_accuracy": [round(float(a), 6) for a in per_class],
        "confusion_matrix": confusion.tolist(),
    }


def _logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch

    from training.data import normalise

    was_training = model.training
    model.eval()
    logits = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(images), EVAL_BATCH):
            batch = normalise(images[start : start + EVAL_BATCH].to(device))
            logits.append(model(batch).float())
    model.train(was_training)
    return torch.cat(logits)


def model_logits(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> np.ndarray:
    """The model's logits [N, 10] (float32 NumPy) for uint8 images [N, 28, 28], in eval mode."""
    return _logits(model, images, device).cpu().numpy()


def evaluate_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    temperature: float | None = None,
) -> dict:
    """Evaluate ``model`` (eval mode, no grad) on uint8 images [N, 28, 28]; adds the mean cross-entropy loss,
    and with a ``temperature`` the expected calibration error before (``ece_uncalibrated``) and after it."""
    import torch.nn.functional as F

    from training.calibrate import ece, softmax

    all_logits = _logits(model, images, device)
    labels = labels.to(device)
    loss = F.cross_entropy(all_logits, labels).item()
    result = summarise(all_logits.argmax(1).cpu().numpy(), labels.cpu().numpy())
    result["loss"] = loss
    if temperature is not None:
        logits, y = all_logits.cpu().numpy(), labels.cpu().numpy()
        result["ece_uncalibrated"] = ece(softmax(logits), y)
        result["ece"] = ece(softmax(logits / temperature), y)
    return result


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint describes (architecture name + constructor arguments) in eval mode."""
    import torch

    from training.models import build

    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = build(checkpoint["arch"], **checkpoint["model_args"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval().to(device), checkpoint


def load_ensemble(paths: list[Path], device: str = "cpu") -> tuple[torch.nn.Module, list[dict]]:
    """One checkpoint's model, or several as one (the mean of their logits), in eval mode; and their checkpoints."""
    from training.models import Ensemble

    loaded = [load_checkpoint(p, device) for p in paths]
    models = [model for model, _ in loaded]
    model = models[0] if len(models) == 1 else Ensemble(models).eval()
    return model, [checkpoint for _, checkpoint in loaded]


def evaluate_checkpoint(paths: list[Path], data_dir: Path | None = None) -> dict:
    """Test accuracy of a checkpoint, or of several as one ensemble (the mean of their logits)."""
    import torch

    from training.data import load_mnist

    model, _ = load_ensemble(paths)
    data = load_mnist(data_dir=data_dir)
    return evaluate_model(model, data.test_images, data.test_labels, torch.device("cpu"))


def onnx_outputs(session: object, images: np.ndarray, batch: int = EVAL_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """Run an ONNX Runtime session on uint8 images [N, 28, 28]; returns (probabilities, logits), each [N, 10]."""
    input_name = session.get_inputs()[0].name
    probabilities, logits = [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch, None].astype(np.float32) / 255.0
        p, z = session.run(["probabilities", "logits"], {input_name: x})
        probabilities.append(p)
        logits.append(z)
    return np.concatenate(probabilities), np.concatenate(logits)


def onnx_probabilities(session: object, images: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    """Run an ONNX Runtime session on uint8 images [N, 28, 28]; returns probabilities [N, 10]."""
    return onnx_outputs(session, images, batch)[0]


def evaluate_onnx(path: Path, data_dir: Path | None = None, ood: bool = False) -> dict:
    """Test accuracy of an ONNX file with ONNX Runtime alone (CPU provider: the reference result).

    A file with a ``temperature`` in its metadata also gets ``ece`` and ``ece_uncalibrated`` (15 bins) and the
    ``reliability`` bins of both; ``ood=True`` adds ``ood``: AUROC of the 10,000 test digits against the held-out
    non-digit set (training/outliers.py) and the shares flagged at the file's own ``ood_threshold``.
    """
    import onnxruntime as ort

    from training.calibrate import digit_score, ood_report, reliability, softmax, statuses
    from training.data import load_arrays

    arrays = load_arrays(data_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = dict(session.get_modelmeta().custom_metadata_map)
    probabilities, logits = onnx_outputs(session, arrays["t10k-images-idx3-ubyte"])
    labels = arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    result = summarise(probabilities.argmax(1), labels)
    if "temperature" in meta:
        before = reliability(softmax(logits * float(meta["temperature"])), labels)
        after = reliability(probabilities, labels)
        result.update(ece=after["ece"], ece_uncalibrated=before["ece"], reliability={"before": before, "after": after})
    if ood:
        if "ood_score" not in meta:
            raise ValueError(f"{path} has no ood_score/ood_threshold metadata: export it again")
        from training.outliers import held_out_outliers

        others, families = held_out_outliers()
        other_logits = onnx_outputs(session, others)[1]
        kind, threshold = meta["ood_score"], float(meta["ood_threshold"])
        digit_scores, other_scores = digit_score(logits, kind), digit_score(other_logits, kind)
        result["ood"] = ood_report(digit_scores, other_scores, threshold)
        result["ood"]["score"] = kind
        names = np.array(families)
        result["ood"]["flagged_by_family"] = {
            family: float((other_scores[names == family] < threshold).mean()) for family in dict.fromkeys(families)
        }
        # Two *test* digits touching, made into one image: what /read asks the model about before it cuts them, and
        # what /predict gets when a client sends a number. The honest answer is "not one digit".
        from training.outliers import touching_pairs

        pairs = touching_pairs(arrays["t10k-images-idx3-ubyte"], 2000, seed=12345)
        pair_probabilities, pair_logits = onnx_outputs(session, pairs)
        uncertain = float(meta["uncertain_threshold"])
        flagged, not_ok = statuses(pair_probabilities, pair_logits, kind, threshold, uncertain)
        result["ood"]["touching_pairs"] = {
            "count": len(pair_probabilities),
            "flagged": float(flagged.mean()),
            "not_ok": float(not_ok.mean()),
        }
        # Hand-drawn shapes (faces, hearts, ticks...; training/shapes.py), another seed than training's: what a
        # user draws to test the reader. "not ok" is what the user sees as not a confident digit.
        from training.shapes import held_out_shapes

        shapes, shape_families = held_out_shapes()
        shape_probabilities, shape_logits = onnx_outputs(session, shapes)
        flagged, not_ok = statuses(shape_probabilities, shape_logits, kind, threshold, uncertain)
        names = np.array(shape_families)
        result["ood"]["drawn_shapes"] = {
            "count": len(shapes),
            "flagged": float(flagged.mean()),
            "not_ok": float(not_ok.mean()),
            "not_ok_by_family": {f: float(not_ok[names == f].mean()) for f in dict.fromkeys(shape_families)},
        }
    return result
