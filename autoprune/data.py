"""Small real datasets that work offline, for examples, tests and benchmarks.

- ``digits_loaders``: scikit-learn's bundled 8x8 handwritten digits (1,797 images), upscaled
  to ``size`` x ``size`` and repeated to ``channels`` so torchvision models accept them.
  The test split is 20% (360 images: one image is 0.28 accuracy points).
- ``mnist1d_loaders``: the MNIST-1D benchmark, generated locally by ``mnist1d.make_dataset``
  (never downloaded): 4,000 train / 1,000 test sequences of length 40.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

#: a loader of (inputs, labels) batches
Loader = DataLoader[tuple[torch.Tensor, ...]]


def _split(n: int, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)
    n_test = int(round(n * test_share))
    return idx[n_test:], idx[:n_test]


def digits_tensors(
    size: int = 32, channels: int = 3, seed: int = 0, test_share: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N,1,8,8 in [0,1]
    x = (x - 0.5) / 0.5
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = _split(len(y), test_share, seed)
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def digits_loaders(
    size: int = 32, channels: int = 3, batch_size: int = 64, seed: int = 0
) -> tuple[Loader, Loader]:
    """(train, test) loaders of sklearn digits; the train loader shuffles with ``seed``."""
    train, test = digits_tensors(size=size, channels=channels, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(test, batch_size=256, shuffle=False),
    )


def mnist1d_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    def conv(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.float32).unsqueeze(1)  # N,1,40
    return (
        TensorDataset(conv(d["x"]), torch.tensor(d["y"], dtype=torch.long)),
        TensorDataset(conv(d["x_test"]), torch.tensor(d["y_test"], dtype=torch.long)),
    )


def mnist1d_loaders(batch_size: int = 64, seed: int = 0) -> tuple[Loader, Loader]:
    """(train, test) loaders of MNIST-1D, inputs shaped (N, 1, 40)."""
    train, test = mnist1d_tensors(seed=seed)
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(test, batch_size=256, shuffle=False),
    )
