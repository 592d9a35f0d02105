"""A rolling update loses no request: two pods (`bentoml serve` each) behind HAProxy under Locust load, each in turn
replaced by a pod serving a new model version as Kubernetes does it (benchmarks/rollout.py: surge, endpoint removal,
preStop, SIGTERM). Shorter than `make rollout` (8 users, a 1 s preStop): about a minute.

Needs Debian's haproxy (`make sysdeps`); it skips without it only outside CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import EXPORTED

from benchmarks.rollout import parse_args, report, rollout

pytestmark = pytest.mark.slow


def test_a_rolling_update_through_haproxy_fails_no_request(tmp_path: Path) -> None:
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists():
        message = "Debian's haproxy is not installed (apt-get install -y haproxy; `make test` does this)"
        if os.environ.get("CI"):
            pytest.fail(message)  # in CI the rolling update must run, never quietly skip
        pytest.skip(message)
    short = ["--users", "8", "--prestop", "1", "--settle", "3", "--pool", "256"]
    args = parse_args([*short, "--exported", str(EXPORTED), "--out", str(tmp_path)])
    result = rollout(args)
    text = report(result)
    print(f"\n{text}")  # shown with -s
    assert len(result.replacements) == 2, text
    assert result.requests > 0, text
    assert result.failed == 0, text
    assert result.resets == 0, text
    assert result.versions.get(result.old_version, 0) > 0, text
    assert result.versions.get(result.new_version, 0) > 0, text
    assert result.old_after_last == 0, text
    assert not any(step.killed for step in result.replacements), text
