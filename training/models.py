"""Digit classifiers. Each takes normalised images [N, 1, 28, 28] and returns logits [N, 10].

A checkpoint stores the registry name and the constructor arguments, so ``build(name, **kwargs)`` rebuilds any
model without extra flags.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Fully connected net. Default: lecture 002's 784-400-400-10 with dropout 0.5.

    ``hidden=(100,), dropout=0`` is lesson 4's 784-100-10.
    """

    def __init__(self, hidden: Sequence[int] = (400, 400), dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = 28 * 28
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    # bias=False: batch norm's shift makes a conv bias redundant.
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class CNN(nn.Module):
    """The notes' conv -> ReLU -> pool blocks, grown: two 3x3 convs with batch norm per block, two blocks
    (28 -> 14 -> 7), then a dropout-regularised dense head.
    """

    def __init__(self, channels: Sequence[int] = (32, 64), hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            *_conv_block(1, c1),
            *_conv_block(c1, c1),
            nn.MaxPool2d(2),
            *_conv_block(c1, c2),
            *_conv_block(c2, c2),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c2 * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyCNN(nn.Module):
    """Lecture 003's NumPy CNN in PyTorch: conv 1->2, ReLU, pool, conv 2->4, ReLU, pool, dense 196->8, ReLU,
    dense 8->10. The smallest model, so benchmarks can show what size buys.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * 7 * 7, 8),
            nn.ReLU(inplace=True),
            nn.Linear(8, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Ensemble(nn.Module):
    """Several models as one: the mean of their logits (a distillation teacher, or an ensemble to measure)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "cnn-tiny": TinyCNN}


def build(name: str, **kwargs: object) -> nn.Module:
    """Instantiate a registered architecture; unknown names raise ValueError listing the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
