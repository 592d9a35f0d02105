"""The rendered Kubernetes Deployment really runs: `kubectl kustomize deploy/k8s/overlays/cpu`, its pod played by a
real container engine with `podman kube play`, probed, asked for a digit, a worker killed, and `podman kube down`.

No cluster can run here, so Podman plays the kubelet's part, and what Podman 4.3 (Debian 12's) does not do of it, the
test does, from the manifest's own numbers. `adapt` lists every change made to the rendered Deployment, and why:
- image: the locally built test image, imagePullPolicy Never (no registry);
- hostPort on the `http` port, on 127.0.0.1 (a cluster reaches a pod by its IP; `kube play` 4.3 has no --publish);
- probes: `port: http` as the number (Podman 4.3 resolves a named port to 0), and the liveness probe's httpGet as an
  exec of the image's Python fetching the same URL (Podman turns httpGet into `curl`, which the image lacks), as
  one shell line (Podman joins an exec probe's words into one `sh -c` line, unquoted);
- the pod's and its emptyDir volumes' names made unique (Podman makes each emptyDir a named volume, shared by name
  with any other pod on the machine).
Podman 4.3 turns only the liveness probe into its healthcheck, and runs healthchecks from systemd timers (none here):
the test runs the startup and readiness probes itself, at their period and timeout, and the healthcheck with `podman
healthcheck run`. It ignores preStop hooks and terminationGracePeriodSeconds (it stops with SIGTERM, then SIGKILL
after its own 10 s).
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from conftest import FIXTURES
from container_fixture import REPO, fail_or_skip, run

from loadtest.server import free_port

pytestmark = pytest.mark.slow
pytest_plugins = ("container_fixture",)  # the session's image, shared with test_container.py and test_siblings.py

OVERLAY = REPO / "deploy" / "k8s" / "overlays" / "cpu"
DIGIT = FIXTURES / "mnist_digits" / "t10k-0000.png"  # a 7
PODMAN_STOP_TIMEOUT_S = 10  # Podman's own: after it, SIGKILL (kube play 4.3 ignores terminationGracePeriodSeconds)


def rendered_deployment() -> dict[str, Any]:
    if shutil.which("kubectl") is None:
        fail_or_skip("kubectl is missing: it renders deploy/k8s (make test installs it)")
    out = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, check=False, timeout=60
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")


def container_port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == name)


def adapt(deployment: dict[str, Any], image: str, host_port: int, suffix: str) -> dict[str, Any]:
    """The rendered Deployment as `podman kube play` 4.3 runs it here (the module docstring says why each change)."""
    out = copy.deepcopy(deployment)
    out["metadata"]["name"] = f"{deployment['metadata']['name']}-{suffix}"
    pod = out["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["image"], container["imagePullPolicy"] = image, "Never"
    for port in container["ports"]:
        if port.get("name") == "http":
            port["hostPort"], port["hostIP"] = host_port, "127.0.0.1"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        if isinstance(get["port"], str):
            get["port"] = container_port(container, get["port"])
    liveness = container["livenessProbe"]
    get = liveness.pop("httpGet")
    url = f"http://127.0.0.1:{get['port']}{get['path']}"
    fetch = f"import urllib.request as u; u.urlopen('{url}', timeout={liveness.get('timeoutSeconds', 1)})"
    # Podman joins an exec probe's words into one shell line (`CMD-SHELL`), so it is written as one.
    liveness["exec"] = {"command": [f'python -c "{fetch}"']}
    renamed = {v["name"]: f"{v['name']}-{suffix}" for v in pod.get("volumes", [])}
    for volume in pod.get("volumes", []):
        volume["name"] = renamed[volume["name"]]
    for mount in container.get("volumeMounts", []):
        mount["name"] = renamed[mount["name"]]
    return out


def test_adapt_changes_only_what_podman_needs() -> None:
    deployment = rendered_deployment()
    adapted = adapt(deployment, "localhost/x:test", 12345, "t")
    before, after = deployment["spec"]["template"]["spec"], adapted["spec"]["template"]["spec"]
    c0, c1 = before["containers"][0], after["containers"][0]
    assert c1["image"] == "localhost/x:test" and c1["imagePullPolicy"] == "Never"
    assert {"hostPort": 12345, "hostIP": "127.0.0.1"}.items() <= c1["ports"][0].items()
    assert c1["readinessProbe"]["httpGet"]["path"] == c0["readinessProbe"]["httpGet"]["path"]
    assert c0["livenessProbe"]["httpGet"]["path"] in c1["livenessProbe"]["exec"]["command"][-1]
    for key in ("env", "resources", "securityContext", "startupProbe", "readinessProbe", "lifecycle"):
        if key.endswith("Probe"):
            assert {k: v for k, v in c1[key].items() if k != "httpGet"} == {
                k: v for k, v in c0[key].items() if k != "httpGet"
            }
        else:
            assert c1[key] == c0[key], key
    assert after["securityContext"] == before["securityContext"]


@dataclass
class Pod:
    url: str
    container: str
    manifest: Path
    spec: dict[str, Any]  # the adapted container's
    grace_s: int
    ready_s: float
    env: dict[str, str]

    def podman(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, check=False)


def probe(url: str, spec: dict[str, Any]) -> bool:
    """One httpGet probe as the kubelet runs it: success is a status from 200 to 399 within timeoutSeconds."""
    get = spec["httpGet"]
    try:
        status = requests.get(f"{url}{get['path']}", timeout=spec.get("timeoutSeconds", 1)).status_code
    except requests.RequestException:
        return False
    return 200 <= status < 400


def wait_ready(pod: Pod, started: float) -> float:
    """The startup probe until it succeeds (at most failureThreshold x periodSeconds), then the readiness probe: the
    seconds from `started` to the first readiness success."""
    startup, readiness = pod.spec["startupProbe"], pod.spec["readinessProbe"]
    for _ in range(startup.get("failureThreshold", 3)):
        if probe(pod.url, startup):
            break
        time.sleep(startup.get("periodSeconds", 10))
    else:
        pytest.fail(f"startup probe failed {startup['failureThreshold']} times:\n{logs(pod)}")
    assert probe(pod.url, readiness), f"startup passed, readiness failed:\n{logs(pod)}"
    return time.monotonic() - started


def logs(pod: Pod) -> str:
    out = pod.podman("logs", pod.container)
    return (out.stdout + out.stderr)[-4000:]


@pytest.fixture(scope="module")
def pod(image: str, podman_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    suffix = f"test{os.getpid()}"
    adapted = adapt(rendered_deployment(), image, free_port(), suffix)
    manifest = tmp_path_factory.mktemp("kube") / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(adapted, sort_keys=False))
    spec = adapted["spec"]["template"]["spec"]
    container = spec["containers"][0]
    host_port = next(p["hostPort"] for p in container["ports"] if "hostPort" in p)
    # kube play names the pod <deployment>-pod-0 and the container <pod>-<container>
    name = f"{adapted['metadata']['name']}-pod-0-{container['name']}"
    started = time.monotonic()
    run(["podman", "kube", "play", str(manifest)], podman_env, timeout=120)
    the_pod = Pod(
        f"http://127.0.0.1:{host_port}",
        name,
        manifest,
        container,
        spec["terminationGracePeriodSeconds"],
        0.0,
        podman_env,
    )
    try:
        the_pod.ready_s = wait_ready(the_pod, started)
        print(f"\npod ready (startup, then readiness probe) {the_pod.ready_s:.1f} s after `podman kube play`")
        yield the_pod
    finally:
        subprocess.run(["podman", "kube", "down", str(manifest)], env=podman_env, capture_output=True, check=False)


def test_the_pod_answers_a_real_digit(pod: Pod) -> None:
    reply = requests.post(
        f"{pod.url}/predict", files={"image": ("digit.png", DIGIT.read_bytes(), "image/png")}, timeout=30
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.json()["digit"] == 7


def test_the_pod_runs_as_the_manifest_says(pod: Pod) -> None:
    """Non-root, read-only root filesystem, the manifest's environment: what kube play made of the security context."""
    inspect = pod.podman("inspect", "-f", "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}", pod.container)
    user, readonly = inspect.stdout.split()
    assert user.split(":")[0] == "1034" and readonly == "true", inspect.stdout
    env = pod.podman("exec", pod.container, "env").stdout
    for variable in pod.spec["env"]:
        if "value" in variable:
            assert f"{variable['name']}={variable['value']}" in env.splitlines()


def test_podman_runs_the_liveness_probe_healthy(pod: Pod) -> None:
    check = pod.podman("healthcheck", "run", pod.container)
    assert check.returncode == 0 and check.stdout.strip() in ("", "healthy"), check.stdout + check.stderr
    status = pod.podman("inspect", "-f", "{{.State.Health.Status}}", pod.container).stdout.strip()
    assert status == "healthy", status


def test_a_killed_worker_restarts_the_container(pod: Pod) -> None:
    """Item 5 under an orchestrator: one of the pod's workers killed, the container ends (service/http/siblings.py)
    and kube play's restartPolicy (Always, a Deployment's) starts it again; the pod is ready again after."""
    workers = pod.podman("exec", pod.container, "cat", "/proc/1/task/1/children").stdout.split()
    assert len(workers) == int(next(v["value"] for v in pod.spec["env"] if v["name"] == "MNIST_WORKERS")) >= 2
    restarts = int(pod.podman("inspect", "-f", "{{.RestartCount}}", pod.container).stdout)
    started = time.monotonic()
    killed = pod.podman("exec", pod.container, "sh", "-c", f"kill -9 {workers[0]}")
    assert killed.returncode == 0, killed.stderr
    while int(pod.podman("inspect", "-f", "{{.RestartCount}}", pod.container).stdout or 0) == restarts:
        assert time.monotonic() - started < 15, f"container not restarted 15 s after a worker was killed:\n{logs(pod)}"
        time.sleep(0.2)
    restarted_s = time.monotonic() - started
    ready_s = wait_ready(pod, started)
    print(f"\nworker killed: container restarted after {restarted_s:.1f} s, ready again after {ready_s:.1f} s")


def test_kube_down_stops_the_pod_cleanly_within_the_grace_period(pod: Pod) -> None:
    """SIGTERM drains the service and it exits well before Podman's SIGKILL (10 s) and the manifest's grace period."""
    started = time.monotonic()
    down = pod.podman("kube", "down", str(pod.manifest))
    stop_s = time.monotonic() - started
    assert down.returncode == 0, down.stderr
    print(f"\n`podman kube down`: {stop_s:.1f} s (grace period {pod.grace_s} s)")
    assert stop_s < min(pod.grace_s, PODMAN_STOP_TIMEOUT_S), "the pod was killed, not stopped: it ignored SIGTERM"
    assert pod.podman("container", "exists", pod.container).returncode == 1
