"""Copies of models that ``copy.deepcopy`` refuses: ``torch.nn.utils.prune`` reparametrisations.

``torch.nn.utils.prune`` replaces a parameter ``weight`` by ``weight_orig`` (a parameter) and
``weight_mask`` (a buffer), and keeps ``weight = weight_orig * weight_mask`` as a plain module
attribute that a forward pre-hook recomputes. With gradients enabled (when pruning, and after
every forward pass) that attribute is a non-leaf tensor, and ``copy.deepcopy`` of the model
fails ("Only Tensors created explicitly by the user (graph leaves) support the deepcopy
protocol"). ``analyze`` works on :func:`without_torch_pruning`'s copy, which holds what a device
runs (plain weights carrying the zeros); the user's model is neither copied unsafely nor
changed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["copy_module", "has_torch_pruning", "without_torch_pruning"]


def _pruning_hooks(module: nn.Module) -> list[Any]:
    from torch.nn.utils.prune import BasePruningMethod

    return [h for h in module._forward_pre_hooks.values() if isinstance(h, BasePruningMethod)]


def has_torch_pruning(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a ``torch.nn.utils.prune`` hook."""
    return any(_pruning_hooks(m) for m in model.modules())


def copy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` that also copies non-leaf tensors held as plain module
    attributes (the pruned ``weight`` of ``torch.nn.utils.prune``): each becomes a detached
    clone with the same values in the copy. ``model`` itself is not touched (the copies are
    handed to ``deepcopy`` through its memo, keyed by the original tensors' ids)."""
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for value in vars(mod).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def without_torch_pruning(model: nn.Module) -> nn.Module:
    """``model`` itself when it has no ``torch.nn.utils.prune`` hooks; else a copy with every
    such pruning made permanent (``weight = weight_orig * weight_mask`` as a plain parameter,
    no ``_orig`` / ``_mask`` / hook left): the model a device runs, with the same outputs."""
    from torch.nn.utils import prune

    if not has_torch_pruning(model):
        return model
    plain = copy_module(model)
    for mod in plain.modules():
        for hook in _pruning_hooks(mod):
            name = getattr(hook, "_tensor_name", None)
            if isinstance(name, str):
                with torch.no_grad():
                    prune.remove(mod, name)
    # deepcopy copied the user's gradients onto weight_orig, now the plain weight: drop them
    for p in plain.parameters():
        p.grad = None
    return plain
