"""service/settings.py: environment variables in, one frozen settings object out; its defaults are docs/api.md's."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest

from service.settings import REPO_ROOT, Settings, cpu_limit

REFERENCE = REPO_ROOT / "docs" / "api.md"  # the HTTP API reference, "Settings"
# Defaults the reference gives in words rather than as a value.
IN_WORDS = {
    "CPU cores available": len(os.sched_getaffinity(0)),
    "empty (no CORS)": (),
    "empty (no management)": "",
    "`mnist-repository` in BentoML's home (`$BENTOML_HOME`, else `~/bentoml`)": Path.home()
    / "bentoml"
    / "mnist-repository",
}


def readme_settings() -> dict[str, str]:
    """{variable: its default cell} from docs/api.md's settings table (rows "| `MNIST_...` | default | meaning |")."""
    text = REFERENCE.read_text()
    table = text[text.index("## Settings") :]
    rows = {}
    for line in table[table.index("| variable |") :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        found = re.match(r"\| `(MNIST_[A-Z_]+)` \| ([^|]+) \|", line)
        assert found, f"a settings row this test cannot read: {line[:80]}"
        rows[found[1]] = found[2].strip()
    return rows


def field_of(variable: str) -> str:
    """MNIST_MAX_BYTES -> max_bytes: each variable sets the field of its name."""
    return variable.removeprefix("MNIST_").lower()


def documented_default(variable: str, cell: str) -> Any:
    """The default a docs/api.md cell gives, read as the service reads the variable: "`2`", "`10485760` (10 MiB)"."""
    if cell in IN_WORDS:
        return IN_WORDS[cell]
    found = re.fullmatch(r"`([^`]*)`(?: \((.*)\))?", cell)
    assert found, f"{variable}: the default {cell!r} is neither `a value` nor in IN_WORDS"
    raw, gloss = found[1], found[2]
    if gloss is not None and (size := re.fullmatch(r"(?:(\d+) × )?(\d+)(²| MiB)", gloss)):
        times, base, unit = int(size[1] or 1), int(size[2]), size[3]
        assert int(raw) == times * (base**2 if unit == "²" else base * 1024 * 1024), f"{variable}: {cell}"
    value = getattr(Settings.from_env({variable: raw}), field_of(variable))
    return REPO_ROOT / value if isinstance(value, Path) and not value.is_absolute() else value


def test_every_setting_has_a_readme_row_and_every_row_a_setting() -> None:
    documented = {field_of(variable) for variable in readme_settings()}
    fields = {field.name for field in dataclasses.fields(Settings)}
    assert documented == fields, f"undocumented: {fields - documented}; no such setting: {documented - fields}"


@pytest.mark.parametrize("variable", sorted(readme_settings()))
def test_the_default_is_the_readmes(variable: str) -> None:
    expected = documented_default(variable, readme_settings()[variable])
    assert getattr(Settings(), field_of(variable)) == expected, variable
    assert getattr(Settings.from_env({}), field_of(variable)) == expected, variable


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings.models == ("mnist-cnn",) and settings.default_model == "mnist-cnn"
    assert settings.device == "auto"
    assert settings.workers == len(os.sched_getaffinity(0))  # "CPU cores available" (docs/api.md), whatever nproc says
    assert settings.max_bytes == 10 * 1024 * 1024 and settings.max_batch == 256
    assert settings.max_pixels <= settings.max_request_pixels <= settings.max_inflight_pixels
    assert settings.body_timeout_s < settings.request_timeout_s
    assert settings.cors_origins == ()  # CORS is off unless origins are named
    assert (settings.fast_path, settings.access_log, settings.tracing) == (True, False, False)
    assert settings.model_path("mnist-cnn").parts[-2:] == ("exported", "mnist-cnn.onnx")
    assert settings.admin_token == ""  # management off
    # The repository follows BentoML's home (each test server has its own), unless named.
    assert Settings.from_env({"BENTOML_HOME": "/srv/b"}).model_repository == Path("/srv/b/mnist-repository")


def test_values_from_the_environment() -> None:
    env = {
        "MNIST_MODELS": " mnist-mlp, mnist-cnn,,mnist-mlp ",
        "MNIST_DEVICE": "CPU",
        "MNIST_WORKERS": "3",
        "MNIST_THREADS": "4",
        "MNIST_MAX_BYTES": "1000",
        "MNIST_MAX_PIXELS": "2000",
        "MNIST_MAX_BATCH": "8",
        "MNIST_EXPORTED_DIR": "/models",
        "MNIST_MAX_REQUEST_PIXELS": "3000",
        "MNIST_MAX_INFLIGHT_PIXELS": "6000",
        "MNIST_REQUEST_TIMEOUT_S": "20",
        "MNIST_BODY_TIMEOUT_S": "2.5",
        "MNIST_HEADER_TIMEOUT_S": "1",
        "MNIST_KEEPALIVE_TIMEOUT_S": "30",
        "MNIST_CORS_ORIGINS": " https://a.example, ,https://b.example",
        "MNIST_FAST_PATH": "off",
        "MNIST_ACCESS_LOG": "1",
        "MNIST_TRACING": " Yes ",
        "MNIST_MAX_DIGITS": "5",
        "MNIST_SHUTDOWN_TIMEOUT_S": "3.5",
        "MNIST_PATCHES": "drain, accept",
        "MNIST_ADMIN_TOKEN": " s3cret-token-of-20-chars ",
        "MNIST_MODEL_REPOSITORY": "/var/lib/mnist",
        "MNIST_GATE_MARGIN": "0.05",
    }
    assert set(env) == set(readme_settings()), "every documented variable, each set to a value of its own"
    settings = Settings.from_env(env)
    defaults = Settings()
    assert not [f.name for f in dataclasses.fields(Settings) if getattr(settings, f.name) == getattr(defaults, f.name)]
    assert settings.models == ("mnist-mlp", "mnist-cnn") and settings.default_model == "mnist-mlp"
    assert (settings.device, settings.workers, settings.threads) == ("cpu", 3, 4)
    assert (settings.max_bytes, settings.max_pixels, settings.max_batch) == (1000, 2000, 8)
    assert settings.model_path("x") == Path("/models/x.onnx")
    assert settings.intra_op_threads == 1  # 12 concurrent requests on this machine: one thread each
    assert (settings.max_request_pixels, settings.max_inflight_pixels) == (3000, 6000)
    assert (settings.request_timeout_s, settings.body_timeout_s) == (20.0, 2.5)
    assert (settings.header_timeout_s, settings.keepalive_timeout_s) == (1.0, 30.0)
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert (settings.fast_path, settings.access_log, settings.tracing) == (False, True, True)
    assert (settings.max_digits, settings.shutdown_timeout_s, settings.patches) == (5, 3.5, ("drain", "accept"))
    assert (settings.admin_token, settings.model_repository) == ("s3cret-token-of-20-chars", Path("/var/lib/mnist"))
    assert settings.gate_margin == 0.05 and "s3cret" not in repr(settings)  # a secret stays out of logs and tracebacks


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MNIST_DEVICE": "tpu"}, "MNIST_DEVICE='tpu' is not one of auto, cuda, cpu"),
        ({"MNIST_ADMIN_TOKEN": "short"}, "MNIST_ADMIN_TOKEN must be at least 16 printable ASCII characters .it has 5."),
        ({"MNIST_GATE_MARGIN": "2"}, "MNIST_GATE_MARGIN=2 must be a fraction between 0 and 1"),
        ({"MNIST_WORKERS": "two"}, "MNIST_WORKERS='two' is not an integer"),
        ({"MNIST_MAX_BATCH": "0"}, "MNIST_MAX_BATCH=0 must be at least 1"),
        ({"MNIST_MODELS": " , "}, "MNIST_MODELS is empty"),
        ({"MNIST_BODY_TIMEOUT_S": "soon"}, "MNIST_BODY_TIMEOUT_S='soon' is not a number"),
        ({"MNIST_HEADER_TIMEOUT_S": "0"}, "MNIST_HEADER_TIMEOUT_S=0 must be a positive number of seconds"),
        ({"MNIST_KEEPALIVE_TIMEOUT_S": "nan"}, "MNIST_KEEPALIVE_TIMEOUT_S=nan must be a positive number"),
        ({"MNIST_BODY_TIMEOUT_S": "10"}, "MNIST_BODY_TIMEOUT_S=10 must be below MNIST_REQUEST_TIMEOUT_S=10"),
        (
            {"MNIST_MAX_PIXELS": "5000", "MNIST_MAX_REQUEST_PIXELS": "4000"},
            "MNIST_MAX_PIXELS=5000 must be at most MNIST_MAX_REQUEST_PIXELS=4000",
        ),
        ({"MNIST_MAX_INFLIGHT_PIXELS": "1000"}, "must be at most MNIST_MAX_INFLIGHT_PIXELS=1000"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_a_flag_that_is_not_one_names_itself() -> None:
    with pytest.raises(ValueError, match="MNIST_ACCESS_LOG='maybe' must be 1 or 0"):
        Settings.from_env({"MNIST_ACCESS_LOG": "maybe"})


@pytest.mark.parametrize(
    ("files", "membership", "limit"),
    [
        ({"cpu.max": "200000 100000\n"}, "0::/\n", 2.0),  # cgroup v2, in a container (its own root)
        ({"kubepods/pod1/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"}, "0::/kubepods/pod1\n", 1.5),
        ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", 0.5),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", None),
        ({}, "", None),  # no cgroup file system at all
    ],
)
def test_the_cpu_limit_of_the_cgroup_is_read(
    tmp_path: Path, files: dict[str, str], membership: str, limit: float | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(membership)
    assert cpu_limit(tmp_path, tmp_path / "self-cgroup") == limit
