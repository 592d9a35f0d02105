"""The model repository and its verification gate, in process: two Repository objects on one folder are two workers
(each its own registry, following state.json), with the real shipped ONNX files and real verification digits.
Over real HTTP, with real workers under load: tests/test_live_versions.py."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

from service.inference.gate import Digits, GateError, verify
from service.inference.repository import Repository, RepositoryError, fixed_registry
from service.inference.runtime import ModelError, UnknownModelError, UnknownVersionError, load_model
from service.settings import Settings
from tests.conftest import EXPORTED

RUN = "test-run"


def variant(src: Path, out: Path, **metadata: str) -> Path:
    """A copy of the ONNX file `src` with these metadata values changed: a new version, or a wrong file."""
    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key in metadata:
            prop.value = metadata.pop(prop.key)
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(out))
    return out


@pytest.fixture(scope="module")
def digits() -> Digits:
    return Digits.load(EXPORTED / "verification-digits.npz")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return replace(
        Settings(), models=("mnist-cnn", "mnist-mlp"), exported_dir=EXPORTED, device="cpu", workers=2,
        model_repository=tmp_path / "repository",
    )  # fmt: skip


@pytest.fixture
def workers(settings: Settings) -> tuple[Repository, Repository]:
    first, second = Repository(settings, 1, run=RUN), Repository(settings, 2, run=RUN)
    first.start()
    second.start()
    return first, second


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("versions")
    cnn = EXPORTED / "mnist-cnn.onnx"
    return {
        "v2": variant(cnn, folder / "v2.onnx", version="cnn-v2"),
        "v2-other": variant(
            EXPORTED / "mnist-cnn-tiny.onnx", folder / "v2-other.onnx", version="cnn-v2", model_name="mnist-cnn"
        ),
        # The CNN's weights with its labels in the wrong order: a perfect contract, and wrong nine times in ten.
        "permuted": variant(
            cnn,
            folder / "permuted.onnx",
            version="cnn-permuted",
            labels=json.dumps([str((k + 1) % 10) for k in range(10)]),
        ),
        "overclaims": variant(
            EXPORTED / "mnist-cnn-tiny.onnx",
            folder / "overclaims.onnx",
            version="cnn-tiny-claims",
            model_name="mnist-cnn",
            test_accuracy="0.999",
        ),
        "no-claim": variant(cnn, folder / "no-claim.onnx", version="cnn-no-claim", test_accuracy="unknown"),
        "bad-contract": variant(cnn, folder / "bad-contract.onnx", version="cnn-bad", input_polarity="black-on-white"),
        "other-name": variant(cnn, folder / "other-name.onnx", version="cnn-other", model_name="mnist-xl"),
        "traversal": variant(cnn, folder / "traversal.onnx", version="../../escape"),
    }


# ---- the gate ----


@pytest.mark.parametrize("name", ["mnist-cnn", "mnist-mlp", "mnist-cnn-tiny"])
def test_every_shipped_model_passes_the_gate(name: str, digits: Digits) -> None:
    model = load_model(EXPORTED / f"{name}.onnx", "cpu")
    verdict = verify(model, digits, 0.02, name)
    assert verdict.digits == len(digits.labels) == 1000
    assert sorted(set(digits.labels.tolist())) == list(range(10))  # every class is in the sample
    assert verdict.accuracy >= model.card.test_accuracy - 0.02


@pytest.mark.parametrize(
    ("file", "reason"),
    [
        ("permuted", "verification digits right, below its claimed test accuracy"),
        ("overclaims", "below its claimed test accuracy 99.90%"),
        ("no-claim", "no test_accuracy"),
        ("other-name", "the file says it is model 'mnist-xl'"),
    ],
)
def test_the_gate_refuses_wrong_files(file: str, reason: str, files: dict[str, Path], digits: Digits) -> None:
    with pytest.raises(GateError, match=reason):
        verify(load_model(files[file], "cpu"), digits, 0.02, "mnist-cnn")


# ---- the repository: two workers on one folder ----


def served(worker: Repository, name: str = "mnist-cnn") -> tuple[list[str], str]:
    return worker.registry.versions(name), worker.registry.get(name).card.version


def test_workers_start_from_the_shipped_models(workers: tuple[Repository, Repository]) -> None:
    first = workers[0]
    shipped = load_model(EXPORTED / "mnist-cnn.onnx", "cpu").card.version
    for worker in workers:
        assert worker.registry.names() == ["mnist-cnn", "mnist-mlp"]
        assert served(worker) == ([shipped], shipped)
        assert worker.registry.ready("mnist-cnn") and worker.registry.ready("mnist-mlp", None)
    assert [(row["name"], row["state"], row["source"]) for row in first.index()] == [
        ("mnist-cnn", "READY", "shipped"),
        ("mnist-mlp", "READY", "shipped"),
    ]


def test_a_version_is_ready_only_once_every_worker_serves_it(
    workers: tuple[Repository, Repository], files: dict[str, Path]
) -> None:
    first, second = workers
    shipped = first.registry.default_version("mnist-cnn")
    change = first.load("mnist-cnn", files["v2"].read_bytes(), None, make_default=False)
    assert (change.version, change.default, change.gate is not None) == ("cnn-v2", shipped, True)
    assert first.registry.get("mnist-cnn", "cnn-v2").card.version == "cnn-v2"  # served here at once...
    assert not first.registry.ready("mnist-cnn", "cnn-v2")  # ...but not yet by the other worker
    assert {row["version"]: row["state"] for row in first.index()}["cnn-v2"] == "LOADING"
    with pytest.raises(RepositoryError, match="not served by every worker"):
        first.set_default("mnist-cnn", "cnn-v2")
    assert second.sync()  # what the other worker's follow() task does within POLL_S
    assert second.registry.versions("mnist-cnn") == [shipped, "cnn-v2"]
    assert first.registry.ready("mnist-cnn", "cnn-v2") and second.registry.ready("mnist-cnn", "cnn-v2")
    assert (first.root / "mnist-cnn" / "cnn-v2" / "model.onnx").read_bytes() == files["v2"].read_bytes()


def test_default_rollback_and_unload_reach_every_worker(
    workers: tuple[Repository, Repository], files: dict[str, Path]
) -> None:
    first, second = workers
    shipped = first.registry.default_version("mnist-cnn")
    first.load("mnist-cnn", files["v2"].read_bytes(), None, make_default=False)
    second.sync()
    assert first.set_default("mnist-cnn", "cnn-v2").default == "cnn-v2"
    second.sync()
    assert served(first)[1] == served(second)[1] == "cnn-v2"
    assert second.registry.get(None).card.version == "cnn-v2"  # a request naming nothing gets the new default
    assert second.rollback("mnist-cnn").default == shipped
    first.sync()
    assert served(first)[1] == served(second)[1] == shipped
    with pytest.raises(RepositoryError, match="is the default version"):
        first.unload("mnist-cnn", shipped)
    with pytest.raises(RepositoryError, match="is the default model"):
        first.unload("mnist-cnn", None)
    first.unload("mnist-cnn", "cnn-v2")
    second.sync()
    for worker in workers:
        assert served(worker) == ([shipped], shipped)
        with pytest.raises(UnknownVersionError, match="no version 'cnn-v2'"):
            worker.registry.get("mnist-cnn", "cnn-v2")
    # The file stays, unloaded; loading it again by version needs no upload, and passes the gate again.
    assert {row["version"]: row.get("reason") for row in first.index()}["cnn-v2"] == "unloaded"
    assert first.load("mnist-cnn", None, "cnn-v2", make_default=True).default == "cnn-v2"
    second.sync()
    assert served(second)[1] == "cnn-v2"
    with pytest.raises(RepositoryError, match="no previous default"):
        first.rollback("mnist-mlp")
    first.unload("mnist-mlp", None)  # a model that is not the default model may go entirely
    second.sync()
    with pytest.raises(UnknownModelError):
        second.registry.get("mnist-mlp")


@pytest.mark.parametrize(
    ("file", "status", "message"),
    [
        ("permuted", 422, "refused by the verification gate"),
        ("overclaims", 422, "refused by the verification gate"),
        ("bad-contract", 422, "input_polarity"),
        ("other-name", 422, "the file says it is model 'mnist-xl'"),
        ("v2-other", 409, "a version is never replaced"),
        ("traversal", 400, "is not a valid name"),
    ],
)
def test_a_refused_file_leaves_the_serving_versions_untouched(
    file: str, status: int, message: str, workers: tuple[Repository, Repository], files: dict[str, Path]
) -> None:
    first, second = workers
    if file == "v2-other":
        first.load("mnist-cnn", files["v2"].read_bytes(), None, make_default=False)
        second.sync()
    before = json.loads((first.root / "state.json").read_text())
    with pytest.raises(RepositoryError, match=message) as refused:
        first.load("mnist-cnn", files[file].read_bytes(), None, make_default=True)
    assert refused.value.status == status
    assert json.loads((first.root / "state.json").read_text()) == before
    assert not second.sync()  # nothing new to follow
    assert sorted(p.name for p in first.root.rglob("*.onnx")) == (["model.onnx"] if file == "v2-other" else [])


def test_names_that_are_not_folder_names_are_refused(workers: tuple[Repository, Repository]) -> None:
    first, _ = workers
    for name in ("../mnist-cnn", ".hidden", "a/b", ""):
        with pytest.raises(RepositoryError, match="is not a valid name"):
            first.load(name, None, "v1", make_default=False)
    with pytest.raises(RepositoryError, match="is not a valid name"):
        first.load("mnist-cnn", None, "../../etc", make_default=False)
    with pytest.raises(RepositoryError, match=r"no file mnist-cnn/missing/model\.onnx"):
        first.load("mnist-cnn", None, "missing", make_default=False)


def test_a_new_server_starts_from_its_configuration(settings: Settings, files: dict[str, Path]) -> None:
    old = Repository(settings, 1, run="old-server")
    old.start()
    old.load("mnist-cnn", files["v2"].read_bytes(), None, make_default=True)
    new = Repository(settings, 1, run="new-server")
    new.start()
    shipped = load_model(EXPORTED / "mnist-cnn.onnx", "cpu").card.version
    assert served(new) == ([shipped], shipped)
    assert {row["version"]: row["state"] for row in new.index()}["cnn-v2"] == "UNAVAILABLE"


def test_a_shipped_model_that_fails_the_gate_stops_the_start(settings: Settings, files: dict[str, Path]) -> None:
    exported = files["permuted"].parent / "exported"
    exported.mkdir(exist_ok=True)
    (exported / "mnist-cnn.onnx").write_bytes(files["permuted"].read_bytes())
    (exported / "verification-digits.npz").write_bytes((EXPORTED / "verification-digits.npz").read_bytes())
    broken = replace(settings, models=("mnist-cnn",), exported_dir=exported)
    with pytest.raises(ModelError, match="fails the verification gate"):
        Repository(broken, 1, run=RUN).start()


def test_without_management_the_shipped_models_are_gated_and_fixed(settings: Settings, files: dict[str, Path]) -> None:
    registry = fixed_registry(settings)
    assert registry.names() == ["mnist-cnn", "mnist-mlp"] and registry.ready("mnist-cnn")
    assert not settings.model_repository.exists()  # nothing written: a read-only file system will do
    exported = files["permuted"].parent / "fixed"
    exported.mkdir(exist_ok=True)
    (exported / "mnist-cnn.onnx").write_bytes(files["permuted"].read_bytes())
    with pytest.raises(ModelError, match="no verification digits"):
        fixed_registry(replace(settings, models=("mnist-cnn",), exported_dir=exported))
    (exported / "verification-digits.npz").write_bytes((EXPORTED / "verification-digits.npz").read_bytes())
    with pytest.raises(ModelError, match="fails the verification gate"):
        fixed_registry(replace(settings, models=("mnist-cnn",), exported_dir=exported))


def test_a_file_changed_behind_the_repository_is_not_served(
    workers: tuple[Repository, Repository], files: dict[str, Path]
) -> None:
    first, second = workers
    first.load("mnist-cnn", files["v2"].read_bytes(), None, make_default=False)
    (first.root / "mnist-cnn" / "cnn-v2" / "model.onnx").write_bytes(files["permuted"].read_bytes())
    second.sync()
    assert second.registry.versions("mnist-cnn") == [first.registry.default_version("mnist-cnn")]
    assert not first.registry.ready("mnist-cnn", "cnn-v2")
    row = {row["version"]: row for row in first.index()}["cnn-v2"]
    assert row["state"] == "UNAVAILABLE" and "changed since it passed the gate" in row["reason"]
