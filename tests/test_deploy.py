"""deploy/k8s agrees with Kubernetes, with KServe and with the service.

Every overlay is rendered with `kubectl kustomize` (a real kustomize) and its objects validated, strictly (unknown
fields fail), against the Kubernetes API schemas of named versions (kubernetes-validate bundles them); the KServe
example against KServe's own InferenceService CRD schema (tests/fixtures, with its source commit). Then the rendered
objects are checked against the service: its port, its health routes, its image user, the settings it reads, the
drain it does at SIGTERM and the paths it writes. tests/test_container.py probes a real container at the same paths.
Offline, a few seconds.
"""

from __future__ import annotations

import copy
import json
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.container.generate import BENTO_UID_GID
from bentoml._internal.server.base_app import BaseAppFactory
from starlette.routing import Mount, Route

from service.http.v2 import OpenInference
from service.settings import Settings

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KSERVE = K8S / "kserve" / "inferenceservice.yaml"
KSERVE_SCHEMA = Path(__file__).resolve().parent / "fixtures" / "kserve-inferenceservice-v1beta1.schema.json"
# The oldest minor version the big clouds still support, and the newest the kubernetes-validate lock bundles.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
KINDS = ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
# Where the image runs the service from: its BentoML home, which a volume must not hide (BENTO_PATH in the image).
BENTO_PATH = "/home/bentoml/bento"
# Variables the service, or BentoML under it, reads beyond Settings' MNIST_* fields.
BENTOML_VARIABLES = {"BENTOML_HOME"}

Object = dict[str, Any]


class _HealthRoutes(BaseAppFactory):
    """The smallest BentoML server app: only the system routes every BentoML server mounts."""

    name = "health-routes"


def render(overlay: str) -> list[Object]:
    """`kubectl kustomize deploy/k8s/overlays/<overlay>`, parsed: what `kubectl apply -k` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found: run `make sysdeps` (scripts/install-system-deps.sh installs it)")
    done = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize overlays/{overlay} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Object]]:
    return {name: render(name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def docs(rendered: dict[str, list[Object]], overlay: str) -> dict[str, Object]:
    kinds = sorted(d["kind"] for d in rendered[overlay])
    assert kinds == KINDS, f"overlays/{overlay} renders {kinds}"
    return {d["kind"]: d for d in rendered[overlay]}


@pytest.fixture(scope="module")
def pod(docs: dict[str, Object]) -> Object:
    return docs["Deployment"]["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def container(pod: Object) -> Object:
    containers = pod["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture(scope="module")
def kserve() -> Object:
    (isvc,) = [d for d in yaml.safe_load_all(KSERVE.read_text()) if d]
    return isvc


@pytest.fixture(scope="module")
def kserve_container(kserve: Object) -> Object:
    (container,) = kserve["spec"]["predictor"]["containers"]
    return container


def environment(container: Object) -> dict[str, str]:
    """The container's plain variables; a variable from a Secret must be optional (the pod starts without it)."""
    env = {}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref.get("optional") is True, f"{item['name']} from Secret {ref['name']}: not optional"
    return env


def writable_paths(env: dict[str, str]) -> dict[str, str]:
    """Every path the service writes at run time, for this environment, with what writes there.

    Found by running the image with a read-only root filesystem (docs/kubernetes.md): BentoML's home (its
    prometheus_multiproc_dir, client id, and the folders it creates at start-up), the temporary folder (BentoML's
    per-worker sockets), and the model repository when MNIST_ADMIN_TOKEN is set.
    """
    settings = Settings.from_env(env)
    home = env.get("BENTOML_HOME", "")
    assert home, "BENTOML_HOME unset: BentoML would write under the image's home, beside the bento"
    return {
        home: "BENTOML_HOME",
        posixpath.join(home, "prometheus_multiproc_dir"): "BentoML's Prometheus multiprocess folder",
        env.get("TMPDIR", "/tmp"): "the temporary folder (tempfile: bentoml-uds-*, bentoml-client-*)",
        str(settings.model_repository): "MNIST_MODEL_REPOSITORY",
    }


def assert_writable_on_empty_dirs(container: Object, volumes: list[Object]) -> None:
    empty_dirs = {v["name"] for v in volumes if "emptyDir" in v}
    mounts = {m["mountPath"].rstrip("/"): m for m in container.get("volumeMounts", [])}
    env = environment(container)
    for path, what in writable_paths(env).items():
        if path == str(Settings.from_env(env).model_repository) and not any(
            item["name"] == "MNIST_ADMIN_TOKEN" for item in container["env"]
        ):
            continue  # without a token the service writes no repository
        under = [m for mount, m in mounts.items() if path == mount or path.startswith(mount + "/")]
        assert under, f"{path} ({what}) is on no volume: the root filesystem is read-only"
        mount = max(under, key=lambda m: len(m["mountPath"]))
        assert mount["name"] in empty_dirs, f"{path} ({what}) is on {mount['name']}, not an emptyDir"
        assert not mount.get("readOnly"), f"{path} ({what}) is mounted read-only"
    for mount in mounts:
        assert not (BENTO_PATH + "/").startswith(mount + "/"), f"the volume at {mount} hides the bento at {BENTO_PATH}"


def strict(schema: Any) -> Any:
    """`schema` with unknown fields rejected wherever KServe's schema lists the fields (kubectl --validate=strict)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def matches(routes: list[Any], path: str) -> bool:
    """Whether a GET of `path` reaches one of these Starlette routes (through mounts)."""
    for route in routes:
        if isinstance(route, Mount) and path.startswith(route.path + "/"):
            if matches(route.routes, path[len(route.path) :]):
                return True
        elif isinstance(route, Route) and route.path_regex.fullmatch(path) and "GET" in (route.methods or ()):
            return True
    return False


# Kubernetes' own schemas.


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_api(rendered: dict[str, list[Object]], version: str) -> None:
    for name, objects in rendered.items():
        for obj in objects:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"overlays/{name} {obj['kind']} against Kubernetes {version}: {exc}")


def test_the_validator_rejects_an_unknown_field(rendered: dict[str, list[Object]]) -> None:
    """Guards the check above: a misspelt field must fail, not be ignored."""
    deployment = copy.deepcopy(next(d for d in rendered["cpu"] if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# The service behind the Deployment.


def test_port_is_bentomls_http_port(container: Object) -> None:
    (port,) = container["ports"]
    assert port["containerPort"] == BentoMLContainer.http.port.get() == 3000
    assert port["name"] == "http"


def test_probes_hit_bentomls_health_routes(container: Object) -> None:
    routes = {route.path for route in _HealthRoutes().get_system_routes()}
    expected = {"livenessProbe": "/livez", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes, f"{probe}: {get['path']} (BentoML serves {routes})"
        assert get["port"] in ("http", 3000), f"{probe} port {get['port']}"


def test_service_selects_the_pods_on_the_container_port(docs: dict[str, Object]) -> None:
    deployment, service = docs["Deployment"], docs["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_pod_runs_as_the_images_user_locked_down(pod: Object, container: Object) -> None:
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == BENTO_UID_GID  # the `bentoml` user BentoML's Dockerfile creates
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    own = container["securityContext"]
    assert own["allowPrivilegeEscalation"] is False
    assert own["readOnlyRootFilesystem"] is True
    assert own["capabilities"] == {"drop": ["ALL"]}
    assert "runAsUser" not in own or own["runAsUser"] == BENTO_UID_GID


def test_environment_is_what_the_service_reads(container: Object) -> None:
    env = environment(container)
    settings = Settings.from_env(env)  # raises on a value the service would refuse at start-up
    as_read = {
        "MNIST_MODELS": ",".join(settings.models),
        "MNIST_DEVICE": settings.device,
        "MNIST_WORKERS": str(settings.workers),
        "MNIST_THREADS": str(settings.threads),
        "MNIST_SHUTDOWN_TIMEOUT_S": f"{settings.shutdown_timeout_s:g}",
        "MNIST_MODEL_REPOSITORY": str(settings.model_repository),
    }
    unknown = set(env) - set(as_read) - BENTOML_VARIABLES
    assert not unknown, f"the manifest sets variables this test does not know the service reads: {unknown}"
    assert {name: as_read[name] for name in env if name in as_read} == {
        name: value for name, value in env.items() if name in as_read
    }
    secret = {item["name"] for item in container["env"] if "valueFrom" in item}
    assert secret <= {"MNIST_ADMIN_TOKEN"}, f"from Secrets: {secret}"


def test_workers_fit_the_cpu_the_pod_requests(container: Object) -> None:
    """CPU limits don't narrow the cores a container sees, so the manifest must size the worker count itself."""
    settings = Settings.from_env(environment(container))
    cpu = container["resources"]["requests"]["cpu"]
    assert settings.workers == int(cpu), f"{settings.workers} workers on {cpu} requested cores"
    assert container["resources"]["limits"]["cpu"] == cpu


def test_grace_period_outlasts_the_prestop_and_the_drain(pod: Object, container: Object) -> None:
    settings = Settings.from_env(environment(container))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pre_stop = float(command[1])
    assert pre_stop >= settings.keepalive_timeout_s, "idle keep-alive connections outlive the preStop wait"
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + settings.shutdown_timeout_s, (
        f"terminationGracePeriodSeconds {grace} < preStop {pre_stop:g} s + MNIST_SHUTDOWN_TIMEOUT_S "
        f"{settings.shutdown_timeout_s:g} s: the kubelet would kill requests the service is still finishing"
    )


def test_rolling_update_never_lowers_capacity(docs: dict[str, Object]) -> None:
    spec = docs["Deployment"]["spec"]
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] not in (0, "0%"), "maxUnavailable 0 needs a surge"
    assert "replicas" not in spec, "the HPA owns the replica count; `replicas` would reset it at each apply"


def test_every_writable_path_is_an_empty_dir(pod: Object, container: Object) -> None:
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert_writable_on_empty_dirs(container, pod["volumes"])


def test_hpa_scales_the_deployment(docs: dict[str, Object]) -> None:
    hpa, deployment = docs["HorizontalPodAutoscaler"], docs["Deployment"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        deployment["kind"],
        deployment["metadata"]["name"],
    )
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (cpu,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu["resource"]["target"]["type"] == "Utilization"
    requests = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert "cpu" in requests, "CPU utilization is measured against the request"


def test_pdb_selects_the_pods_and_lets_a_drain_proceed(docs: dict[str, Object]) -> None:
    pdb, deployment = docs["PodDisruptionBudget"], docs["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert set(pdb["spec"]["selector"]) == {"matchLabels"}
    # At the HPA's floor a node drain must still be able to evict one pod, and one must still serve.
    floor = docs["HorizontalPodAutoscaler"]["spec"]["minReplicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert 1 <= pdb["spec"]["maxUnavailable"] < floor
    else:
        assert 1 <= pdb["spec"]["minAvailable"] < floor


def test_overlays_pick_the_image_and_device(docs: dict[str, Object], container: Object, overlay: str) -> None:
    env = environment(container)
    limits = container["resources"]["limits"]
    repository, tag = container["image"].rsplit(":", 1)
    assert repository == "registry.example.com/mnist-service"
    if overlay == "gpu":
        assert env["MNIST_DEVICE"] == "cuda"
        assert str(limits["nvidia.com/gpu"]) == "1"
        assert tag.endswith("-gpu"), f"the GPU overlay runs {container['image']}, not the GPU image"
    else:
        assert env["MNIST_DEVICE"] == "cpu"
        assert "nvidia.com/gpu" not in limits
        assert not tag.endswith("-gpu")


def test_memory_limit_covers_the_measured_peak(container: Object) -> None:
    """The figures in base/deployment.yaml's comment: supervisor 107 MiB, chaos peak 770 MiB per worker."""
    settings = Settings.from_env(environment(container))
    peak_mib = 107 + settings.workers * 770
    limit = container["resources"]["limits"]["memory"]
    units = {"Mi": 1, "Gi": 1024}
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", limit).groups()  # type: ignore[union-attr]
    assert int(number) * units[unit] >= peak_mib, f"memory limit {limit} < measured peak {peak_mib} MiB"


# KServe.


def test_inference_service_validates_against_kserves_crd(kserve: Object) -> None:
    schema = json.loads(KSERVE_SCHEMA.read_text())
    assert "aaac4e294dae2c7b1aa1886447793f3aa1c30912" in schema["$comment"]
    assert (kserve["apiVersion"], kserve["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    validator = jsonschema.Draft7Validator(strict(schema))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(kserve)]
    assert not errors, "\n".join(errors)
    misspelt = copy.deepcopy(kserve)
    misspelt["spec"]["predictor"]["canaryTraficPercent"] = 10
    assert not validator.is_valid(misspelt), "the schema check would not catch a misspelt field"


def test_inference_service_speaks_v2_on_the_services_port(kserve: Object, kserve_container: Object) -> None:
    predictor = kserve["spec"]["predictor"]
    assert 0 < predictor["canaryTrafficPercent"] < 100
    assert kserve_container["name"] == "kserve-container"  # the container KServe treats as the predictor
    (port,) = kserve_container["ports"]
    assert port["containerPort"] == BentoMLContainer.http.port.get()
    env = environment(kserve_container)
    assert env.pop("PROTOCOL") == "v2"  # how KServe knows a custom container's protocol
    settings = Settings.from_env(env)
    assert settings.workers * settings.threads == predictor["scaleTarget"] or predictor["scaleMetric"] != "concurrency"
    unknown = {name for name in env if not name.startswith("MNIST_")} - BENTOML_VARIABLES
    assert not unknown, unknown
    v2 = OpenInference(settings).routes
    for probe in ("readinessProbe", "livenessProbe"):
        path = kserve_container[probe]["httpGet"]["path"]
        assert matches(v2, path), f"{probe}: the service has no V2 route {path}"


def test_inference_service_is_locked_down_like_the_deployment(
    kserve: Object, kserve_container: Object, rendered: dict[str, list[Object]]
) -> None:
    security = kserve_container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == BENTO_UID_GID
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert_writable_on_empty_dirs(kserve_container, kserve["spec"]["predictor"]["volumes"])
    deployment = next(d for d in rendered["cpu"] if d["kind"] == "Deployment")
    ours = deployment["spec"]["template"]["spec"]["containers"][0]
    assert kserve_container["resources"] == ours["resources"]
    assert kserve_container["image"] == ours["image"]
