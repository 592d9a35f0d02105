"""deploy/k8s.yaml agrees with the service: its port, its health routes, its image user and its settings.

tests/test_container.py then probes a real container at the same paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.container.generate import BENTO_UID_GID
from bentoml._internal.server.base_app import BaseAppFactory

from service.settings import Settings

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "k8s.yaml"


class _HealthRoutes(BaseAppFactory):
    """The smallest BentoML server app: only the system routes every BentoML server mounts."""

    name = "health-routes"


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    parsed = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    kinds = [d["kind"] for d in parsed]
    assert sorted(kinds) == ["Deployment", "Service"], kinds
    return {d["kind"]: d for d in parsed}


@pytest.fixture(scope="module")
def container(docs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_port_is_bentomls_http_port(container: dict[str, Any]) -> None:
    (port,) = container["ports"]
    assert port["containerPort"] == BentoMLContainer.http.port.get() == 3000
    assert port["name"] == "http"


def test_probes_hit_bentomls_health_routes(container: dict[str, Any]) -> None:
    routes = {route.path for route in _HealthRoutes().get_system_routes()}
    expected = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes, f"{probe}: {get['path']} (BentoML serves {routes})"
        assert get["port"] in ("http", 3000), f"{probe} port {get['port']}"


def test_service_selects_the_pods_on_the_container_port(docs: dict[str, dict[str, Any]]) -> None:
    deployment, service = docs["Deployment"], docs["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_pod_runs_as_the_images_user(docs: dict[str, dict[str, Any]]) -> None:
    security = docs["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == BENTO_UID_GID  # the `bentoml` user BentoML's Dockerfile creates


def test_environment_is_what_the_service_reads(container: dict[str, Any]) -> None:
    env = {item["name"]: item["value"] for item in container["env"]}
    settings = Settings.from_env(env)  # raises on a value the service would refuse at start-up
    as_read = {
        "MNIST_MODELS": ",".join(settings.models),
        "MNIST_DEVICE": settings.device,
        "MNIST_WORKERS": str(settings.workers),
        "MNIST_THREADS": str(settings.threads),
    }
    unknown = set(env) - set(as_read)
    assert not unknown, f"k8s.yaml sets variables this test does not know the service reads: {unknown}"
    assert {name: as_read[name] for name in env} == env
