"""``apply_plan``: turn a ``PruningPlan`` into a new, pruned ``nn.Module``.

- ``channel``: channels removed physically with torch-pruning, to exactly
  ``spec.kept_units(plan)`` units per group; the result is an ordinary dense model.
- ``nm``: on every producer of the group, the n highest-scored of every m consecutive input
  weights per output row are kept (mask, see ``autoprune.masks``).
- ``unstructured``: exactly ``round(numel * (1 - keep_ratio))`` zeros per producer (mask).
- ``block``: the residual block is replaced by ``nn.Identity``.

The input model is never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from autoprune._analyze import analyze
from autoprune._analyze._adapters import ADAPTERS
from autoprune._analyze._plain import without_torch_pruning
from autoprune._analyze._tpglue import build_graphs, normalize_inputs, prune_channels
from autoprune.errors import InvalidInputError
from autoprune.importance import Importance, get_importance
from autoprune.masks import nm_mask, set_mask, unstructured_mask
from autoprune.plan import PruningPlan
from autoprune.types import ModelSpec, Structure

__all__ = ["apply_plan"]

def _param_of(model: nn.Module, producer: str) -> tuple[str, torch.Tensor]:
    """The weight a producer's mask goes on, as its layer adapter says (``<path>.weight``; an
    attention module's ``in_proj_weight`` for ``<path>.in_proj``)."""
    try:
        mod, adapter, suffix = ADAPTERS.resolve(model, producer)
    except KeyError as e:
        raise InvalidInputError(
            f"layer {producer!r} of the spec is not in {type(model).__name__}: the spec was "
            "made for another model; pass the spec analyze() returned for this one"
        ) from e
    name, param = adapter.mask_param(mod, suffix)
    base = producer[: -len(suffix) - 1] if suffix else producer
    return f"{base}.{name}", param


def _gamma_for(model: nn.Module, spec: ModelSpec, group: str, rows: int) -> torch.Tensor | None:
    """The first per-channel scale (a BatchNorm's gamma) among the group's members that has
    one entry per weight row."""
    for member in spec.groups[group].members:
        try:
            mod = model.get_submodule(member)
        except AttributeError:
            continue
        adapter = ADAPTERS.for_module(mod)
        gamma = adapter.channel_gamma(mod) if adapter is not None else None
        if gamma is not None and gamma.numel() == rows:
            return gamma
    return None


def _apply_masks(
    model: nn.Module, spec: ModelSpec, plan: PruningPlan, importance: Importance
) -> None:
    for name, gp in plan.groups.items():
        if gp.structure not in (Structure.NM, Structure.UNSTRUCTURED):
            continue
        for producer in spec.groups[name].producers:
            path, w = _param_of(model, producer)
            gamma = _gamma_for(model, spec, name, w.shape[0]) if importance.name == "bn_gamma" else None
            scores = importance.weight_scores(w, w.grad, gamma)
            if gp.structure == Structure.NM:
                mask = nm_mask(scores, gp.n, gp.m)
            else:
                mask = unstructured_mask(scores, gp.keep_ratio)
            set_mask(model, path, mask)


def _remove_blocks(model: nn.Module, plan: PruningPlan) -> None:
    for name, gp in plan.groups.items():
        if gp.structure != Structure.BLOCK:
            continue
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, nn.Identity())


def _compute_gradients(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
) -> None:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise InvalidInputError(
            "taylor importance needs batch=(inputs, labels) (a tuple of two tensors or of "
            f"inputs-tuple and labels), got {type(batch).__name__}"
        )
    x, y = batch
    xs = normalize_inputs(x)
    loss_fn = loss_fn or nn.functional.cross_entropy
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = model(*xs)
        loss = loss_fn(out, y)
        loss.backward()


def apply_plan(
    model: nn.Module,
    plan: PruningPlan,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    importance: str | Importance | None = None,
    spec: ModelSpec | None = None,
    batch: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> nn.Module:
    """A pruned copy of ``model`` following ``plan``.

    Args:
        model: the dense model (left untouched).
        plan: what to prune; validated against ``spec`` (``InvalidPlanError`` if it does not fit).
        example_inputs: inputs used to trace the model (same as given to ``analyze``).
        importance: criterion name (l1, l2, taylor, bn_gamma, random) or an ``Importance``;
            overrides ``plan.importance``.
        spec: the model's ``ModelSpec`` (analysed again if omitted).
        batch: ``(inputs, labels)`` for ``taylor`` (gradients of ``loss_fn``, default
            cross-entropy).
        seed: seed of the ``random`` criterion.

    Returns:
        a new module: channel-pruned layers are physically smaller, nm/unstructured weights
        carry masks (``autoprune.masks``), removed blocks are ``nn.Identity``.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, PruningPlan):
        raise InvalidInputError(f"plan must be a PruningPlan, got {type(plan).__name__}")
    inputs = normalize_inputs(example_inputs)
    if spec is None:
        spec = analyze(model, inputs, check=False)
    plan.validate(spec)
    imp = get_importance(importance if importance is not None else plan.importance, seed=seed)
    if imp.needs_gradients and batch is None:
        raise InvalidInputError(
            f"importance {imp.name!r} needs gradients: pass batch=(inputs, labels) "
            "(and loss_fn if the loss is not cross-entropy), or choose l1, l2, bn_gamma or random"
        )
    # a torch.nn.utils.prune model is pruned with its masks made permanent (plain weights
    # holding the zeros, what a device runs): its hooks would fight the new shapes
    new = without_torch_pruning(model)
    if new is model:
        new = copy.deepcopy(model)
    was_training = model.training
    new.eval()
    try:
        if imp.needs_gradients:
            _compute_gradients(new, batch, loss_fn)
        kept = {
            n: k for n, k in spec.kept_units(plan).items()
            if plan.structure_of(n) == Structure.CHANNEL
        }
        if any(k < spec.groups[n].units for n, k in kept.items()):
            dg = build_graphs(new, inputs, spec.ignored)
            prune_channels(new, dg, spec, kept, imp)
            del dg
        _apply_masks(new, spec, plan, imp)
        _remove_blocks(new, plan)
    finally:
        for p in new.parameters():
            p.grad = None
        new.train(was_training)
    return new


