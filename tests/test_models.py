"""Every registered architecture: output shape, eval mode determinism, the documented sizes."""

from __future__ import annotations

import pytest
import torch

from training.models import MODELS, build, count_parameters
from training.train import DEFAULT_RECIPES


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("batch", [1, 7])
def test_output_is_logits_of_shape_n_by_10(name: str, batch: int) -> None:
    model = build(name, **DEFAULT_RECIPES[name]["model_args"]).eval()
    out = model(torch.randn(batch, 1, 28, 28))
    assert out.shape == (batch, 10)
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities


@pytest.mark.parametrize("name", sorted(MODELS))
def test_eval_mode_turns_dropout_off(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, **{**DEFAULT_RECIPES[name]["model_args"]})
    x = torch.randn(16, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))
    if any(isinstance(m, torch.nn.Dropout) for m in model.modules()):
        model.train()
        assert not torch.equal(model(x), model(x))


def test_mlp_sizes_match_the_lectures() -> None:
    default = build("mlp")
    assert [m.out_features for m in default.modules() if isinstance(m, torch.nn.Linear)] == [400, 400, 10]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in default.modules())
    lesson4 = build("mlp", hidden=[100], dropout=0)
    assert count_parameters(lesson4) == 784 * 100 + 100 + 100 * 10 + 10
    assert not any(isinstance(m, torch.nn.Dropout) for m in lesson4.modules())


def test_tiny_cnn_is_lecture_003s_network() -> None:
    tiny = build("cnn-tiny")
    convs = [(m.in_channels, m.out_channels) for m in tiny.modules() if isinstance(m, torch.nn.Conv2d)]
    dense = [(m.in_features, m.out_features) for m in tiny.modules() if isinstance(m, torch.nn.Linear)]
    assert convs == [(1, 2), (2, 4)] and dense == [(196, 8), (8, 10)]


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="mlp, cnn, cnn-tiny"):
        build("resnet")
