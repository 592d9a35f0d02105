"""Model versions changed live over real HTTP: the management routes (locked, or absent), the gate's refusals, and a
version swapped under load with zero failed requests (benchmarks/live_versions.py, shorter)."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from benchmarks.live_versions import measure
from tests.conftest import EXPORTED, Digit, Server, serve
from tests.test_repository import variant

pytestmark = pytest.mark.slow
TOKEN = secrets.token_urlsafe(24)
CNN = "mnist-cnn"


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a management token, two workers, the CNN and the MLP."""
    yield from serve(tmp_path_factory.mktemp("managed") / "bentoml.log", MNIST_ADMIN_TOKEN=TOKEN)


def admin(server: Server, path: str, token: str | None = TOKEN, **kwargs: object) -> requests.Response:
    headers = {**kwargs.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}  # type: ignore[dict-item]
    return requests.post(f"{server.url}/v2/repository{path}", headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


def predict(server: Server, digit: Digit, **fields: str) -> dict:
    response = requests.post(
        f"{server.url}/predict", files={"image": ("d.png", digit.png, "image/png")}, data=fields, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_without_a_token_the_management_routes_do_not_exist(server: Server) -> None:
    for path in ("/index", f"/models/{CNN}/load", f"/models/{CNN}/unload", f"/models/{CNN}/default"):
        assert admin(server, path, token="anything-at-all-0123").status_code == 404


def test_management_wants_the_token_and_never_logs_it(managed: Server) -> None:
    missing = admin(managed, "/index", token=None)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in missing.json()["error"]
    wrong = admin(managed, "/index", token=TOKEN[:-1] + ("x" if TOKEN[-1] != "x" else "y"))
    assert wrong.status_code == 403 and wrong.json()["request_id"]
    assert admin(managed, "/index", headers={"Authorization": f"Basic {TOKEN}"}, token=None).status_code == 401
    index = admin(managed, "/index")
    assert index.status_code == 200
    assert {(row["name"], row["state"]) for row in index.json()} == {(CNN, "READY"), ("mnist-mlp", "READY")}
    assert TOKEN not in managed.log.read_text()


def test_a_version_loaded_over_http_is_served_by_name_then_as_the_default(
    managed: Server, mnist_digits: list[Digit], tmp_path: Path
) -> None:
    digit = mnist_digits[0]
    shipped = predict(managed, digit)["version"]
    new = f"{shipped}-http"
    data = variant(EXPORTED / f"{CNN}.onnx", tmp_path / "new.onnx", version=new).read_bytes()
    # Triton's JSON load request: the file base64-encoded in parameters.
    loaded = admin(
        managed, f"/models/{CNN}/load", json={"parameters": {"file:1/model.onnx": base64.b64encode(data).decode()}}
    )
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    assert (body["version"], body["default"], body["workers"]) == (new, shipped, 2)
    assert body["gate"]["accuracy"] >= body["gate"]["claimed"] - 0.02
    # Ready means every worker: so each of many requests naming it is answered by it, whichever worker takes it.
    for _ in range(10):
        assert predict(managed, digit, version=new)["version"] == new
        assert predict(managed, digit)["version"] == shipped
    assert requests.get(f"{managed.url}/v2/models/{CNN}/versions/{new}/ready", timeout=10).status_code == 200
    default = admin(managed, f"/models/{CNN}/default", json={"version": new})
    assert default.status_code == 200 and default.json()["default"] == new
    assert all(predict(managed, digit)["version"] == new for _ in range(10))
    rollback = admin(managed, f"/models/{CNN}/rollback")
    assert rollback.status_code == 200 and rollback.json()["default"] == shipped
    assert all(predict(managed, digit)["version"] == shipped for _ in range(10))
    assert admin(managed, f"/models/{CNN}/unload", json={"parameters": {"version": new}}).status_code == 200
    gone = requests.post(
        f"{managed.url}/predict", files={"image": ("d.png", digit.png)}, data={"version": new}, timeout=30
    )
    assert gone.status_code == 404 and f"no version {new!r}" in gone.json()["error"]


def test_tritonclient_manages_the_repository(managed: Server, tmp_path: Path) -> None:
    """Triton's own client, as its docs show: load_model with the file's bytes (here a new model: the MLP's weights
    under another name), the repository index, readiness, unload_model."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(managed.url.removeprefix("http://"))
    assert "model_repository" in client.get_server_metadata()["extensions"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    name = "mnist-mlp-copy"
    data = variant(EXPORTED / "mnist-mlp.onnx", tmp_path / "mlp.onnx", version="mlp-triton", model_name=name)
    with pytest.raises(InferenceServerException, match="needs `Authorization: Bearer"):
        client.load_model(name, files={"file:1/model.onnx": data.read_bytes()})
    client.load_model(name, headers=headers, files={"file:1/model.onnx": data.read_bytes()})
    row = next(row for row in client.get_model_repository_index(headers=headers) if row["name"] == name)
    assert (row["version"], row["state"], row["default"]) == ("mlp-triton", "READY", True)
    assert client.is_model_ready(name) and client.is_model_ready(name, "mlp-triton")
    client.unload_model(name, headers=headers)  # the whole model: not the default model, so it may go
    assert not client.is_model_ready(name)
    with pytest.raises(InferenceServerException, match="is the default model"):
        client.unload_model(CNN, headers=headers)


def test_a_wrong_file_is_refused_and_the_old_version_keeps_serving(
    managed: Server, mnist_digits: list[Digit], tmp_path: Path
) -> None:
    digit = mnist_digits[1]
    before = predict(managed, digit)
    wrong = variant(EXPORTED / f"{CNN}.onnx", tmp_path / "wrong.onnx", version="cnn-wrong",
                    labels='["9", "8", "7", "6", "5", "4", "3", "2", "1", "0"]').read_bytes()  # fmt: skip
    refused = admin(managed, f"/models/{CNN}/load?default=true", data=wrong,
                    headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert refused.status_code == 422
    assert "refused by the verification gate" in refused.json()["error"]
    assert "refused by the gate" in managed.log.read_text()  # and the log says why
    broken = admin(managed, f"/models/{CNN}/load", data=b"not an onnx file",
                   headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert broken.status_code == 422 and broken.json()["error"].startswith("refused:")
    after = predict(managed, digit)
    assert (after["version"], after["probabilities"]) == (before["version"], before["probabilities"])
    index = admin(managed, "/index").json()
    assert "cnn-wrong" not in {row["version"] for row in index}  # nothing of it stays, not even on disk
    assert {(row["name"], row["version"]) for row in index if row["state"] == "READY"} == {
        (CNN, before["version"]),
        ("mnist-mlp", predict(managed, digit, model="mnist-mlp")["version"]),
    }


def test_a_version_swapped_under_load_fails_no_request() -> None:
    result = measure(duration_s=8, clients=4, workers=2, v2=True)
    assert result["failed"] == 0, result["failures"]
    assert result["answers_without_version"] == 0
    assert result["old_answers_after_default_answered"] == 0
    assert set(result["by_version"]) == set(result["versions"].values())
    assert all(step["status"] == 200 for step in result["steps"].values()), result["steps"]
    assert result["by_route"]["v2"] > 0 and result["by_route"]["predict"] > 0
