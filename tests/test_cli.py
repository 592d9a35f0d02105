"""The training CLI as a user runs it: help, clear errors, non-zero exits."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=300
    )


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


def test_evaluate_a_missing_file_is_a_clear_error() -> None:
    result = run("evaluate", "nowhere.onnx")
    assert result.returncode != 0 and "no such file: nowhere.onnx" in result.stderr


def test_data_reports_verified_files() -> None:
    result = run("data")
    assert result.returncode == 0
    assert result.stdout.count("SHA-256 verified") == 4
