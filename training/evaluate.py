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


def evaluate_model(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> dict:
    """Evaluate ``model`` (eval mode, no grad) on uint8 images [N, 28, 28]; adds the mean cross-entropy loss."""
    import torch
    import torch.nn.functional as F

    from training.data import normalise

    was_training = model.training
    model.eval()
    logits = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, len(images), EVAL_BATCH):
            batch = normalise(images[start : start + EVAL_BATCH].to(device))
            logits.append(model(batch).float())
    all_logits = torch.cat(logits)
    labels = labels.to(device)
    loss = F.cross_entropy(all_logits, labels).item()
    model.train(was_training)
    result = summarise(all_logits.argmax(1).cpu().numpy(), labels.cpu().numpy())
    result["loss"] = loss
    return result


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model a checkpoint describes (architecture name + constructor arguments) in eval mode."""
    import torch

    from training.models import build

    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = build(checkpoint["arch"], **checkpoint["model_args"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval().to(device), checkpoint


def evaluate_checkpoint(path: Path, data_dir: Path | None = None) -> dict:
    import torch

    from training.data import load_mnist

    model, _ = load_checkpoint(path)
    data = load_mnist(data_dir=data_dir)
    return evaluate_model(model, data.test_images, data.test_labels, torch.device("cpu"))


def onnx_probabilities(session: object, images: np.ndarray, batch: int = EVAL_BATCH) -> np.ndarray:
    """Run an ONNX Runtime session on uint8 images [N, 28, 28]; returns probabilities [N, 10]."""
    input_name = session.get_inputs()[0].name
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch, None].astype(np.float32) / 255.0
        out.append(session.run(["probabilities"], {input_name: x})[0])
    return np.concatenate(out)


def evaluate_onnx(path: Path, data_dir: Path | None = None) -> dict:
    """Test accuracy of an ONNX file with ONNX Runtime alone (CPU provider: the reference result)."""
    import onnxruntime as ort

    from training.data import load_arrays

    arrays = load_arrays(data_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = onnx_probabilities(session, arrays["t10k-images-idx3-ubyte"])
    labels = arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    return summarise(probabilities.argmax(1), labels)
