"""The batch convention of fine-tuning and ``evaluate_accuracy`` (one for the whole package).

A loader batch is either

- a tuple or list ``(inputs, targets, *ignored)``: what ``TensorDataset`` + ``DataLoader`` and
  torchvision datasets give, or
- a mapping with the keys ``"inputs"`` and ``"targets"`` (other keys are ignored).

``inputs`` is one tensor, or a tuple/list of tensors passed to the model as positional
arguments (``model(*inputs)``); ``targets`` is what the loss takes (class indices for the
default cross-entropy). Anything else raises ``InvalidInputError`` naming the type.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from autoprune.errors import InvalidInputError

__all__ = ["evaluate_accuracy", "split_batch", "to_device"]


def split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """``(positional model inputs as a tuple, targets)`` of one batch (see the module doc)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    elif isinstance(batch, Mapping) and "inputs" in batch and "targets" in batch:
        x, y = batch["inputs"], batch["targets"]
    else:
        got = type(batch).__name__
        if isinstance(batch, (tuple, list)):
            got = f"a {got} of length {len(batch)}"
        elif isinstance(batch, Mapping):
            got = f"a mapping with keys {sorted(map(str, batch))}"
        raise InvalidInputError(
            "each batch must be (inputs, targets) or {'inputs': ..., 'targets': ...}, got "
            f"{got}: wrap the dataset so it yields (inputs, targets)"
        )
    return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a tensor, or tuples/lists of them) moved to ``device``; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    return obj


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: Iterable[Any], device: str | torch.device = "cpu",
                      max_batches: int | None = None) -> float:
    """Top-1 accuracy (0..1) of a classifier over batches of the fine-tuning convention."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(batch)
            out = model(*to_device(x, device))
            correct += int((out.argmax(-1) == y.to(device)).sum())
            total += int(y.numel())
    finally:
        model.train(was_training)
    if total == 0:
        raise InvalidInputError("evaluation loader yielded no samples")
    return correct / total
