"""The README's quick start can be pasted: the files its curl lines send exist, the make targets it names exist,
its figures are the shipped models', and it stays a page (under 12 KB; reference material lives in docs/)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAX_BYTES = 12 * 1024


def readme() -> str:
    return README.read_text()


def makefile_targets() -> set[str]:
    """The targets `make` knows in this Makefile, from its own database (no recipe runs)."""
    database = subprocess.run(
        ["make", "-pRrq", "-f", str(REPO / "Makefile")], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout
    return {m[1] for m in re.finditer(r"^([a-zA-Z0-9][a-zA-Z0-9_.-]*):(?!=)", database, re.MULTILINE)}


def test_the_readme_is_a_page() -> None:
    assert README.stat().st_size < MAX_BYTES, f"README.md is {README.stat().st_size} bytes; move reference to docs/"


@pytest.mark.parametrize("page", ["README.md", "docs/api.md", "deploy/README.md"])
def test_every_file_a_curl_line_sends_exists(page: str) -> None:
    sent = re.findall(r"(?:-F\s+\w+=@|--data-binary\s+@)([^\s'\"]+)", (REPO / page).read_text())
    assert sent, f"{page} sends no file: its examples are gone"
    missing = sorted({name for name in sent if not (REPO / name).is_file()})
    assert not missing, f"curl lines in {page} send files that are not in the repository: {missing}"


def test_the_quick_start_sends_the_three_examples() -> None:
    quick_start = readme().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    for name in ("examples/digit.png", "examples/photo.jpg", "examples/number.jpg"):
        assert f"@{name}" in quick_start, name
    assert "make serve" in quick_start and "make test" in quick_start and "/ui" in quick_start


def test_every_make_target_the_readme_names_exists() -> None:
    named = set(re.findall(r"\bmake ((?:[a-z][a-z0-9-]*))\b(?![=.])", readme()))
    assert {"serve", "test"} <= named
    missing = sorted(named - makefile_targets())
    assert not missing, f"README.md names make targets the Makefile lacks: {missing}"


def test_make_serve_takes_a_port() -> None:
    dry_run = subprocess.run(
        ["make", "-n", "serve", "PORT=3123"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout
    assert "bentoml serve --port 3123" in dry_run, dry_run


def test_the_models_table_is_models_json() -> None:
    models = json.loads((REPO / "exported" / "models.json").read_text())["models"]
    rows = {
        m[1]: m
        for m in re.finditer(
            r"^\| `(mnist-[a-z-]+)` \| ([\d.]+)% \| (\d{4}-\d\d-\d\d), (\d+) epochs \| ([\d,]+) \|",
            readme(),
            re.MULTILINE,
        )
    }
    assert set(rows) == set(models), "one row per shipped model"
    for name, entry in models.items():
        row = rows[name]
        assert float(row[2]) == pytest.approx(100 * entry["test_accuracy"], abs=0.005), name
        run_date = re.search(r"-(\d{4})(\d\d)(\d\d)-", entry["run_id"]).groups()
        assert row[3] == "-".join(run_date), f"{name}: trained {row[3]}, its run is {entry['run_id']}"
        assert int(row[4]) == entry["recipe"]["epochs"], name
        assert int(row[5].replace(",", "")) == entry["parameters"], name


def test_the_sample_answer_names_the_shipped_version() -> None:
    versions = {
        entry["run_id"] for entry in json.loads((REPO / "exported" / "models.json").read_text())["models"].values()
    }
    quoted = re.findall(r'"version": "([^"]+)"', readme())
    assert quoted and set(quoted) <= versions, quoted
