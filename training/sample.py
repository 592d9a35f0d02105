"""The verification sample the service ships: real MNIST test digits that every model version must read before it
takes traffic (service/inference/gate.py).

`python -m training.sample` writes exported/verification-digits.npz: 100 test digits of each class (1,000 in all),
drawn with a fixed seed from the 10,000 of t10k, as uint8 pixels with their labels and their indices in t10k. A
stratified sample, so that a model that cannot read one digit fails the gate however good it is at the others.
About 200 KB compressed; the service loads it with NumPy alone (no torch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from training.data import load_arrays

PER_CLASS = 100
SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "exported" / "verification-digits.npz"


def draw(labels: np.ndarray, per_class: int = PER_CLASS, seed: int = SEED) -> np.ndarray:
    """Indices of `per_class` examples of each label, drawn without replacement, sorted."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == digit), size=per_class, replace=False) for digit in range(10)]
    return np.sort(np.concatenate(picks))


def write(out: Path, data_dir: Path | None = None) -> Path:
    arrays = load_arrays(data_dir)
    images, labels = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    indices = draw(labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images[indices], labels=labels[indices], indices=indices.astype(np.int32))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write it (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX files (default: the training cache)")
    args = parser.parse_args()
    path = write(args.out, args.data_dir)
    print(f"{path}: {PER_CLASS * 10} MNIST test digits, {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
