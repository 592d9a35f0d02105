"""`make lock`: resolve pyproject.toml into requirements/dev.txt and requirements/serving.txt (uv pip compile).

Both files pin every package, with the SHA-256 of every file PyPI has for that version, resolved for CPython 3.11
on Linux x86_64 (the image, CI and the machines we serve from). `make` installs them with
`pip install --require-hashes --no-deps`, the image with uv (bentofile.yaml): nothing is resolved at install time
and nothing unlisted gets in.

dev.txt (extras serving + training + tests) is resolved first, serving.txt (extra serving only: no torch) inside
it, with dev.txt as constraints, so the two never pin one package at two versions. serving.txt is what the image
installs and nothing more; dev.txt also locks the `install` dependency group: uv (this script), the pip that
installs the lock and the setuptools that builds this project.

A refresh keeps every pin that still satisfies pyproject.toml (uv prefers the versions in the existing
output file); `make lock LOCK_ARGS=--upgrade` takes the newest releases, `LOCK_ARGS="--upgrade-package numpy"`
one package's.

Each file's header records `fingerprint()` of the pyproject.toml it was resolved from; tests/test_lock.py
recomputes it offline, so a dependency edited without `make lock` fails the tests.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"
DEV = REPO / "requirements" / "dev.txt"
SERVING = REPO / "requirements" / "serving.txt"
# What each lock holds: extras of pyproject.toml; dev.txt also the `install` dependency group (uv, pip, setuptools).
EXTRAS = {DEV: ("serving", "training", "tests"), SERVING: ("serving",)}
GROUP = "install"
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
# The marker environment of that target, for evaluating pyproject.toml's requirements against the lock.
TARGET = {
    "python_version": PYTHON_VERSION,
    "python_full_version": f"{PYTHON_VERSION}.0",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
FINGERPRINT_PREFIX = "# pyproject.toml dependencies sha256: "


def fingerprint(pyproject: dict) -> str:
    """SHA-256 of everything in pyproject.toml that a resolution depends on, insensitive to order and spacing."""

    def normal(requirements: list[str]) -> list[str]:
        return sorted(str(Requirement(r)) for r in requirements)

    project = pyproject["project"]
    inputs = {
        "requires-python": project.get("requires-python"),
        "dependencies": normal(project.get("dependencies", [])),
        "optional-dependencies": {k: normal(v) for k, v in project.get("optional-dependencies", {}).items()},
        "dependency-groups": {k: normal(v) for k, v in pyproject.get("dependency-groups", {}).items()},
        "build-system": normal(pyproject["build-system"]["requires"]),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def read_fingerprint(lock: Path) -> str | None:
    """The fingerprint a lock file's header records, or None if it has none."""
    for line in lock.read_text().splitlines():
        if line.startswith(FINGERPRINT_PREFIX):
            return line.removeprefix(FINGERPRINT_PREFIX).strip()
    return None


def read_pins(lock: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """{normalised name: (version, {"sha256:...", ...})} of a lock file in pip's requirements format."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    for line in lock.read_text().replace("\\\n", " ").splitlines():  # join continued lines
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        requirement = Requirement(words[0])
        specs = list(requirement.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(f"{lock.name}: not an exact pin: {words[0]}")
        hashes = frozenset(w.removeprefix("--hash=") for w in words[1:] if w.startswith("--hash="))
        pins[canonicalize_name(requirement.name)] = (specs[0].version, hashes)
    return pins


def compile_lock(lock: Path, extra_args: list[str], constraints: Path | None = None) -> None:
    command = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml", "--quiet"]
    for extra in EXTRAS[lock]:
        command += ["--extra", extra]
    if lock == DEV:
        command += ["--group", GROUP]
    command += ["--generate-hashes"]
    command += ["--python-version", PYTHON_VERSION, "--python-platform", PYTHON_PLATFORM]
    command += ["--custom-compile-command", "make lock", "--output-file", str(lock.relative_to(REPO))]
    if constraints is not None:
        command += ["--constraints", str(constraints.relative_to(REPO))]
    if subprocess.run([*command, *extra_args], cwd=REPO, check=False).returncode != 0:
        sys.exit(f"make lock: resolving {lock.relative_to(REPO)} failed (uv's reason above); the lock is unchanged")


def stamp(lock: Path, digest: str) -> None:
    """Put the fingerprint under uv's two header lines."""
    lines = lock.read_text().splitlines(keepends=True)
    lines.insert(2, f"{FINGERPRINT_PREFIX}{digest}\n")
    lock.write_text("".join(lines))


def main(extra_args: list[str]) -> None:
    digest = fingerprint(tomllib.loads(PYPROJECT.read_text()))
    compile_lock(DEV, extra_args)
    compile_lock(SERVING, extra_args, constraints=DEV)
    for lock in (DEV, SERVING):
        stamp(lock, digest)
        print(f"{lock.relative_to(REPO)}: {len(read_pins(lock))} packages")


if __name__ == "__main__":
    main(sys.argv[1:])
