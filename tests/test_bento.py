"""bentofile.yaml packages the whole service: `bentoml build`, then the service imported from the bento alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

BENTOML = Path(sys.executable).with_name("bentoml")


@pytest.mark.slow
def test_the_bento_holds_every_subpackage_and_the_service_imports_from_it(tmp_path: Path) -> None:
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    build = subprocess.run(
        [str(BENTOML), "build", "-o", "tag", str(REPO_ROOT)], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    [src] = (tmp_path / "home" / "bentos").glob("mnist/*/src")
    ours = {p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "service").rglob("*") if p.is_file()}
    ours = {p for p in ours if "__pycache__" not in p.parts}
    packaged = {p.relative_to(src) for p in (src / "service").rglob("*") if p.is_file()}
    assert ours <= packaged, f"missing from the bento: {sorted(map(str, ours - packaged))}"
    assert {p.name for p in (src / "exported").glob("*.onnx")} == {
        p.name for p in (REPO_ROOT / "exported").glob("*.onnx")
    }
    # Imported from the bento's folder, not this checkout: every subpackage the service wires must be there.
    check = (
        "import sys, service.service as s, service.http.ui as ui; "
        "assert s.__file__.startswith(sys.argv[1]), s.__file__; assert ui.STATIC_DIR.joinpath('index.html').is_file(); "
        "print(sorted(m for m in sys.modules if m.startswith('service.')))"
    )
    imported = subprocess.run(
        [sys.executable, "-c", check, str(src)], cwd=src, env={**env, "MNIST_EXPORTED_DIR": str(src / "exported")},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert all(f"service.{layer}" in imported.stdout for layer in ("imaging", "inference", "http")), imported.stdout
