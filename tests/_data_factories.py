"""Importable ``--data`` / ``--model`` factories for the CLI tests (``tests`` is on sys.path):
what a user's own ``mypackage.data:loaders`` would be."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _set(n: int, shape: tuple[int, ...], num_classes: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randn(n, *shape, generator=g) * 0.1 + y.view(-1, *[1] * len(shape)).float()
    return TensorDataset(x, y)


def loaders(n: int = 48, channels: int = 3, size: int = 16, num_classes: int = 3,
            batch_size: int = 16) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """(train, val): class k's images are noise around the value k (learnable in a step)."""
    shape = (channels, size, size)
    g = torch.Generator().manual_seed(0)
    return (DataLoader(_set(n, shape, num_classes, 1), batch_size=batch_size, shuffle=True,
                       generator=g),
            DataLoader(_set(n // 2, shape, num_classes, 2), batch_size=batch_size))


def one_loader() -> DataLoader[Any]:
    return loaders()[0]


def three_loaders() -> tuple[Any, Any, Any]:
    train, val = loaders()
    return train, val, val


def one_shot() -> tuple[Any, Any]:
    train, val = loaders()
    return iter(train), val


def empty_val() -> tuple[Any, Any]:
    return loaders()[0], []


def float_labels() -> tuple[Any, Any]:
    x = torch.randn(8, 3, 16, 16)
    batches = [(x, torch.zeros(8))]
    return batches, batches


def no_labels() -> tuple[Any, Any]:
    batches = [torch.randn(8, 3, 16, 16)]
    return batches, batches


def tiny_cnn(num_classes: int = 3, in_channels: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )
