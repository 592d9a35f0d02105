"""service/runtime.py on the real exported model with the real ONNX Runtime."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.inference.runtime import REQUIRED_KEYS, ModelError, Registry, UnknownModelError, load_model
from service.settings import Settings

# No NVIDIA device node: CUDA cannot start here, whatever get_available_providers() claims.
NO_GPU = not Path("/dev/nvidia0").exists()
needs_no_gpu = pytest.mark.skipif(not NO_GPU, reason="checks the fallback on a machine without a GPU")


def edited_copy(source: Path, target: Path, drop: tuple[str, ...] = (), set_: dict | None = None) -> Path:
    """A copy of the model with metadata keys removed or changed (graph untouched)."""
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props if p.key not in drop}
    props.update(set_ or {})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))
    return target


@needs_no_gpu
def test_auto_falls_back_to_cpu_with_one_warning(cnn_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.inference.runtime"):
        model = load_model(cnn_path, "auto")
    assert model.card.provider == "CPUExecutionProvider"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "CUDA is not usable" in warnings[0].getMessage()


@needs_no_gpu
def test_cuda_that_cannot_start_raises_a_clear_error(cnn_path: Path) -> None:
    with pytest.raises(ModelError, match=r"MNIST_DEVICE=cuda.*CUDAExecutionProvider.*MNIST_DEVICE=auto"):
        load_model(cnn_path, "cuda")


def test_cpu_device_uses_the_cpu_provider(cnn_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.inference.runtime"):
        model = load_model(cnn_path, "cpu")
    assert model.card.provider == "CPUExecutionProvider"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_card_comes_from_the_model_metadata(cnn_path: Path) -> None:
    card = load_model(cnn_path, "cpu").card
    meta = onnx.load(str(cnn_path), load_external_data=False).metadata_props
    raw = {p.key: p.value for p in meta}
    assert card.name == raw["model_name"] == "mnist-cnn"
    assert card.version == raw["version"]
    assert card.labels == tuple(str(d) for d in range(10))
    assert card.input_name == "image" and card.output_name == "probabilities"
    assert set(REQUIRED_KEYS) <= set(card.metadata)


def test_refuses_a_model_without_required_metadata(cnn_path: Path, tmp_path: Path) -> None:
    broken = edited_copy(cnn_path, tmp_path / "broken.onnx", drop=("labels", "input_polarity"))
    with pytest.raises(ModelError, match="lacks required metadata: input_polarity, labels") as info:
        load_model(broken, "cpu")
    assert str(broken) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("input_polarity", "black-on-white", "input_polarity is 'black-on-white'"),
        ("input_range", "[0, 255]", "input_range is [0, 255]"),
        ("input_shape", "[-1, 784]", "input_shape is [-1, 784]"),
        ("output_name", "scores", "output_name 'scores' is not a graph output"),
        ("labels", '["a", "b"]', "labels must be a JSON list of 10 names"),
        ("ood_score", "entropy", "ood_score is 'entropy', expected one of max_probability, logsumexp"),
        ("ood_threshold", "high", "ood_threshold must be a finite number, got 'high'"),
        ("uncertain_threshold", "1.5", "uncertain_threshold is 1.5, expected a probability in [0, 1]"),
    ],
)
def test_refuses_metadata_that_disagrees_with_preprocessing(
    cnn_path: Path, tmp_path: Path, key: str, value: str, message: str
) -> None:
    wrong = edited_copy(cnn_path, tmp_path / "wrong.onnx", set_={key: value})
    with pytest.raises(ModelError, match="cannot be served") as info:
        load_model(wrong, "cpu")
    assert message in str(info.value)


def test_refuses_a_graph_without_the_logits_output(cnn_path: Path, tmp_path: Path) -> None:
    model = onnx.load(str(cnn_path))
    logits = next(o for o in model.graph.output if o.name == "logits")
    model.graph.output.remove(logits)
    onnx.save(model, str(tmp_path / "no-logits.onnx"))
    with pytest.raises(ModelError, match="cannot be served") as info:
        load_model(tmp_path / "no-logits.onnx", "cpu")
    assert "no graph output 'logits'" in str(info.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no model file at .*nothing\.onnx"):
        load_model(tmp_path / "nothing.onnx", "cpu")


def test_batch_equals_one_by_one_and_reads_the_digits(cnn_path: Path, mnist_digits: list) -> None:
    model = load_model(cnn_path, "cpu")
    pixels = np.stack([d.pixels for d in mnist_digits])
    batch = model.predict(pixels)
    singles = np.concatenate([model.predict(p[np.newaxis]) for p in pixels])
    assert batch.shape == (100, 10) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, singles, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, atol=1e-5)
    labels = np.array([d.label for d in mnist_digits])
    assert (batch.argmax(axis=1) == labels).mean() >= 0.95


def test_registry_picks_by_name_and_rejects_unknown_names(cnn_path: Path) -> None:
    settings = Settings(models=("mnist-cnn",), exported_dir=cnn_path.parent, device="cpu")
    registry = Registry.load(settings)
    assert registry.get(None) is registry.get("") is registry.get("mnist-cnn")
    with pytest.raises(UnknownModelError, match="unknown model 'mnist-xl'; loaded models: mnist-cnn"):
        registry.get("mnist-xl")
    with pytest.raises(UnknownModelError):
        registry.get(["mnist-cnn"])  # type: ignore[arg-type]  # JSON can carry any type


def test_registry_refuses_to_start_without_a_listed_model(tmp_path: Path, cnn_path: Path) -> None:
    shutil.copy(cnn_path, tmp_path / "mnist-cnn.onnx")
    settings = Settings(models=("mnist-cnn", "mnist-mlp"), exported_dir=tmp_path, device="cpu")
    with pytest.raises(ModelError, match=r"mnist-mlp\.onnx"):
        Registry.load(settings)


def test_refuses_a_model_without_the_status_thresholds(cnn_path: Path, tmp_path: Path) -> None:
    # Without them every answer's status would be a guess: the service says so at start-up instead.
    old = edited_copy(cnn_path, tmp_path / "old.onnx", drop=("ood_score", "ood_threshold", "uncertain_threshold"))
    with pytest.raises(ModelError, match="lacks required metadata: ood_score, ood_threshold, uncertain_threshold"):
        load_model(old, "cpu")


def test_card_carries_the_status_thresholds_from_the_metadata(cnn_path: Path) -> None:
    card = load_model(cnn_path, "cpu").card
    raw = {p.key: p.value for p in onnx.load(str(cnn_path), load_external_data=False).metadata_props}
    assert card.ood_score == raw["ood_score"]
    assert card.ood_threshold == float(raw["ood_threshold"])
    assert card.uncertain_threshold == float(raw["uncertain_threshold"])
    assert card.as_dict()["ood_threshold"] == card.ood_threshold


@pytest.mark.parametrize("score", ["max_probability", "logsumexp"])
def test_digit_scores_are_the_named_score_of_the_graph_outputs(
    cnn_path: Path, tmp_path: Path, mnist_digits: list, score: str
) -> None:
    path = edited_copy(cnn_path, tmp_path / f"{score}.onnx", set_={"ood_score": score})
    model = load_model(path, "cpu")
    pixels = np.stack([d.pixels for d in mnist_digits[:20]])
    probabilities, scores = model.predict_with_scores(pixels)
    np.testing.assert_array_equal(probabilities, model.predict(pixels))
    (logits,) = model.session.run(["logits"], {"image": pixels[:, np.newaxis]})
    expected = probabilities.max(1) if score == "max_probability" else np.log(np.exp(logits.astype(np.float64)).sum(1))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


@pytest.mark.parametrize("score", ["max_probability", "logsumexp"])
def test_reading_gets_the_same_answers_and_each_inputs_top_logit_from_one_run(
    cnn_path: Path, tmp_path: Path, mnist_digits: list, score: str
) -> None:
    model = load_model(edited_copy(cnn_path, tmp_path / f"{score}.onnx", set_={"ood_score": score}), "cpu")
    pixels = np.stack([d.pixels for d in mnist_digits[:20]])
    probabilities, scores, top_logits = model.predict_for_reading(pixels)
    expected_probabilities, expected_scores = model.predict_with_scores(pixels)
    np.testing.assert_array_equal(probabilities, expected_probabilities)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
    (logits,) = model.session.run(["logits"], {"image": pixels[:, np.newaxis]})
    np.testing.assert_allclose(top_logits, logits.max(1), rtol=1e-6)
    assert (logits.argmax(1) == probabilities.argmax(1)).all()
