"""Small reference models used by the examples, tests and benchmarks (random init; train them
with ``autoprune.data``). torchvision models are used as they are; these cover what torchvision
has not: a 1-D conv net for sequence data and a plain MLP."""

from __future__ import annotations

from torch import nn

from autoprune.errors import UnknownNameError


def conv1d_net(num_classes: int = 10, width: int = 64, in_channels: int = 1) -> nn.Sequential:
    """A 1-D CNN for MNIST-1D-style input (N, 1, 40): three conv-BN-ReLU stages, pooled, linear."""
    return nn.Sequential(
        nn.Conv1d(in_channels, width, 5, padding=2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm1d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def mlp(in_features: int = 64, hidden: int = 256, num_classes: int = 10) -> nn.Sequential:
    """A two-hidden-layer MLP (e.g. for flattened 8x8 digits)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def torchvision_model(name: str, num_classes: int = 10, **kwargs: object) -> nn.Module:
    """A randomly initialised torchvision classifier (``weights=None``; nothing is downloaded)."""
    import torchvision

    fn = getattr(torchvision.models, name, None)
    if fn is None:
        raise UnknownNameError("torchvision model", name, torchvision.models.list_models())
    model: nn.Module = fn(weights=None, num_classes=num_classes, **kwargs)
    return model
