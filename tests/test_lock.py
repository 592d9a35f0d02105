"""The lock (requirements/serving.txt, requirements/dev.txt) matches pyproject.toml, offline.

No resolution here: a test that asked today's index would break whenever a release appears. Instead each lock's
header records the fingerprint of the pyproject.toml it was resolved from (requirements/lock.py, `make lock`),
and every requirement pyproject.toml states must hold for a version the lock pins.
"""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lock", REPO / "requirements" / "lock.py")
assert _spec is not None and _spec.loader is not None
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCKS = {path.name: path for path in lock.EXTRAS}
RELOCK = "run `make lock` (needs PyPI) and commit requirements/"


def wanted(path: Path) -> list[Requirement]:
    """Everything pyproject.toml asks of one lock: its extras; for dev.txt also the tools and the build backend."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    strings = [*PYPROJECT["project"].get("dependencies", []), *(r for x in lock.EXTRAS[path] for r in extras[x])]
    if path == lock.DEV:
        strings += [*PYPROJECT["dependency-groups"][lock.GROUP], *PYPROJECT["build-system"]["requires"]]
    return [Requirement(s) for s in strings]


@pytest.mark.parametrize("name", LOCKS)
def test_lock_was_made_from_this_pyproject(name: str) -> None:
    recorded = lock.read_fingerprint(LOCKS[name])
    assert recorded == lock.fingerprint(PYPROJECT), (
        f"requirements/{name} was resolved from other dependencies than pyproject.toml's: {RELOCK}"
    )


@pytest.mark.parametrize("name", LOCKS)
def test_lock_pins_a_version_for_every_requirement(name: str) -> None:
    pins = lock.read_pins(LOCKS[name])
    unmet = []
    for requirement in wanted(LOCKS[name]):
        if requirement.marker is not None and not requirement.marker.evaluate(lock.TARGET):
            continue
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or not requirement.specifier.contains(pin[0], prereleases=True):
            unmet.append(f"{requirement} (locked: {pin[0] if pin else 'absent'})")
    assert not unmet, f"requirements/{name} does not satisfy pyproject.toml: {', '.join(unmet)}; {RELOCK}"


@pytest.mark.parametrize("name", LOCKS)
def test_every_pin_carries_hashes(name: str) -> None:
    pins = lock.read_pins(LOCKS[name])
    assert len(pins) > 10
    assert all(hashes and all(h.startswith("sha256:") for h in hashes) for _, hashes in pins.values())


def test_serving_lock_is_the_dev_lock_cut_down() -> None:
    """`make serve` then `make test` in one .venv changes no version: serving pins are dev's, hashes and all."""
    serving, dev = lock.read_pins(lock.SERVING), lock.read_pins(lock.DEV)
    differ = sorted(name for name, pin in serving.items() if dev.get(name) != pin)
    assert not differ, f"pinned differently in serving.txt and dev.txt: {differ}; {RELOCK}"


def test_serving_lock_holds_what_serving_needs_only() -> None:
    """The image installs this file: no training side, no tools."""
    serving = lock.read_pins(lock.SERVING)
    assert not {"torch", "torchvision", "triton", "onnx", "uv", "pip", "setuptools"} & serving.keys()
    assert "onnxruntime-gpu" in serving


@pytest.mark.parametrize("name", LOCKS)
def test_onnxruntime_gpu_only(name: str) -> None:
    """onnxruntime and onnxruntime-gpu install into the same module; the two together break each other."""
    assert "onnxruntime" not in lock.read_pins(LOCKS[name])


def test_the_image_installs_the_serving_lock() -> None:
    python = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]
    assert python.get("requirements_txt") == "requirements/serving.txt"
    assert python.get("lock_packages") is False, "BentoML would re-resolve (and unpin) the lock"
    assert "packages" not in python


def test_make_installs_from_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "LOCK_INSTALL := $(PIP) install -q --require-hashes --no-deps -r\n" in makefile
    for name in LOCKS:
        assert f"\t$(LOCK_INSTALL) requirements/{name}\n" in makefile
