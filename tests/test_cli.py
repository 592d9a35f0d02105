"""The training CLI as a user runs it: help, clear errors, non-zero exits."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [[], ["train"], ["export"], ["evaluate"], ["data"]])
def test_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: python -m training" in result.stdout


def test_unknown_model_is_a_clear_error() -> None:
    result = run("train", "--model", "resnet50", "--epochs", "1")
    assert result.returncode != 0
    assert "unknown model 'resnet50'" in result.stderr and "mlp, cnn, cnn-tiny" in result.stderr


def test_unknown_device_is_a_clear_error() -> None:
    result = run("train", "--device", "tpu", "--epochs", "1")
    assert result.returncode != 0
    assert "unknown device 'tpu'" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--distill-weight", "0.5"], "need --teachers"),
        (["--teachers", "nowhere.pt"], "no such teacher checkpoint: nowhere.pt"),
        (["--teachers", "README.md", "--distill-weight", "1.5"], "--distill-weight must be in [0, 1]"),
        (["--teachers", "README.md", "--distill-temperature", "0"], "--distill-temperature must be > 0"),
    ],
)
def test_distillation_flags_are_checked_before_training(flags: list[str], message: str) -> None:
    result = run("train", "--epochs", "1", *flags)
    assert result.returncode == 2 and message in result.stderr


def test_evaluate_a_missing_file_is_a_clear_error() -> None:
    result = run("evaluate", "nowhere.onnx")
    assert result.returncode != 0 and "no such file: nowhere.onnx" in result.stderr


def test_data_reports_verified_files() -> None:
    result = run("data")
    assert result.returncode == 0
    assert result.stdout.count("SHA-256 verified") == 4


def test_evaluating_an_onnx_file_needs_no_torch() -> None:
    # Importing torch is made to fail: the ONNX path must still measure the shipped model.
    code = (
        "import sys; sys.modules['torch'] = None; from training.__main__ import main; "
        "sys.exit(main(['evaluate', 'exported/mnist-cnn-tiny.onnx', '--ood']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "digit 9:" in result.stdout
    # Calibration and "not a digit" are measured from the file alone too.
    assert "expected calibration error (15 bins)" in result.stdout and "AUROC" in result.stdout
    assert "MNIST test digits wrongly flagged" in result.stdout


def test_export_writes_to_a_scratch_folder_unless_told_to_replace() -> None:
    result = run("export", "--help")
    assert "default: runs/export/, or exported/ with --replace" in " ".join(result.stdout.split())
    assert "--replace" in result.stdout and "at least as accurate" in " ".join(result.stdout.split())
    # exported/ is refused before anything is read (the checkpoint need not even exist).
    refused = run("export", "nowhere.pt", "--out", "exported")
    assert refused.returncode == 1 and "holds the shipped models" in refused.stderr and "--replace" in refused.stderr
