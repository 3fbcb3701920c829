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
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from autoprune.analyze import Graphs, analyze, build_graphs, normalize_inputs
from autoprune.errors import InvalidInputError, UnsupportedLayerError
from autoprune.importance import Importance, get_importance
from autoprune.masks import nm_mask, set_mask, unstructured_mask
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import ModelSpec, Structure

__all__ = ["apply_plan"]

_IGNORED_PREFIX = "ignored by the user"


def _ignored_paths(spec: ModelSpec) -> list[str]:
    return [p for p, why in spec.fixed.items() if why.startswith(_IGNORED_PREFIX)]


def _build_dg(model: nn.Module, inputs: tuple[torch.Tensor, ...], ignore: Sequence[str]) -> Graphs:
    return build_graphs(model, inputs, ignore)


def _root_of(model: nn.Module, group_name: str) -> nn.Module:
    """Module whose output channels anchor a group (group names are producer paths; an
    attention module's ``<path>.in_proj`` / ``.out_proj`` resolve to the attention module)."""
    try:
        m = model.get_submodule(group_name)
    except AttributeError:
        m = None
    if m is None or (group_name.endswith(".out_proj") and isinstance(
        model.get_submodule(group_name.rsplit(".", 1)[0]), nn.MultiheadAttention
    )):
        return model.get_submodule(group_name.rsplit(".", 1)[0])
    return m


def _tp_group(dg: Any, root: nn.Module, idxs: list[int]) -> Any:
    pruner = dg.get_pruner_of_module(root)
    return dg.get_pruning_group(root, pruner.prune_out_channels, idxs)


def _root_channels(dg: Any, root: nn.Module) -> int:
    return int(dg.get_pruner_of_module(root).get_out_channels(root))


def _removal_idxs(scores: torch.Tensor, units: int, unit_size: int, n_remove: int) -> list[int]:
    """Root channel indices to remove: the ``n_remove`` lowest-scored units. With
    ``unit_size`` d > 1 the root's channels form d equal partitions and a unit is the same
    position in every partition (grouped convs and attention heads shrink evenly)."""
    if n_remove <= 0:
        return []
    per_unit = scores.reshape(unit_size, units).sum(0) if unit_size > 1 else scores
    drop = torch.argsort(per_unit, stable=True)[:n_remove].tolist()
    if unit_size == 1:
        return sorted(drop)
    return sorted(p * units + j for p in range(unit_size) for j in drop)


def _prune_channels(
    model: nn.Module,
    graphs: Graphs,
    spec: ModelSpec,
    kept: dict[str, int],
    importance: Importance,
) -> None:
    """Remove channels group by group (torch-pruning keeps the graph consistent)."""
    for name, k in kept.items():
        g = spec.groups[name]
        if k >= g.units:
            continue
        root = _root_of(model, name)
        dg = graphs.for_group(name)
        n_ch = _root_channels(dg, root)
        if n_ch != g.units * g.unit_size:
            raise UnsupportedLayerError(
                name, type(root).__name__,
                f"group has {n_ch} channels in the model but {g.units * g.unit_size} in the spec; "
                "was the spec made for another model?",
            )
        full = _tp_group(dg, root, list(range(n_ch)))
        scores = importance.channel_scores(full)
        idxs = _removal_idxs(scores, g.units, g.unit_size, g.units - k)
        _subgroup(full, set(idxs)).prune()
    _fix_recorded_widths(model)


def _subgroup(full: Any, remove_root: set[int]) -> Any:
    """The part of a full-index torch-pruning group that removes ``remove_root`` (root channel
    indices); same result as asking the graph again, without re-walking it."""
    from torch_pruning.dependency.group import Group

    sub = Group()
    for item in full:
        pairs = [(i, r) for i, r in zip(item.idxs, item.root_idxs) if r in remove_root]
        if not pairs:
            continue
        sub.add_dep(item.dep, [i for i, _ in pairs])
        sub[len(sub) - 1].root_idxs = [r for _, r in pairs]
    sub._DG = full._DG
    return sub


def _fix_recorded_widths(model: nn.Module) -> None:
    """Some models cache a width in a plain attribute that their forward reshapes with
    (torchvision's VisionTransformer.hidden_dim); keep it equal to the pruned width."""
    for mod in model.modules():
        proj = getattr(mod, "conv_proj", None)
        if isinstance(getattr(mod, "hidden_dim", None), int) and isinstance(proj, nn.Conv2d):
            mod.hidden_dim = proj.out_channels


def _param_of(model: nn.Module, producer: str) -> tuple[str, torch.Tensor]:
    """The weight a producer's mask goes on: ``<path>.weight``, or an attention module's
    ``in_proj_weight`` for ``<path>.in_proj``."""
    if producer.endswith(".in_proj"):
        base = producer.rsplit(".", 1)[0]
        mha = model.get_submodule(base)
        if isinstance(mha, nn.MultiheadAttention):
            return f"{base}.in_proj_weight", mha.in_proj_weight
    mod = model.get_submodule(producer)
    return f"{producer}.weight", mod.weight


def _gamma_for(model: nn.Module, spec: ModelSpec, group: str, rows: int) -> torch.Tensor | None:
    for member in spec.groups[group].members:
        try:
            mod = model.get_submodule(member)
        except AttributeError:
            continue
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
            if mod.weight.numel() == rows:
                return mod.weight.detach()
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
            dg = _build_dg(new, inputs, _ignored_paths(spec))
            _prune_channels(new, dg, spec, kept, imp)
            del dg
        _apply_masks(new, spec, plan, imp)
        _remove_blocks(new, plan)
    finally:
        for p in new.parameters():
            p.grad = None
        new.train(was_training)
    return new


def _dry_run_channel_groups(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], spec: ModelSpec, ignore: Sequence[str]
) -> None:
    """Used by ``analyze``: remove one unit from every channel group on a copy, run it, and
    compare every layer's widths with ``spec.pruned_layers``. Groups that fail are not offered
    ``channel`` (with a warning); a failure inside a module the user did not ignore raises
    ``UnsupportedLayerError`` naming it."""
    candidates = [g.name for g in spec.groups.values() if Structure.CHANNEL in g.allowed]
    if not candidates:
        return
    failures = _try_groups(model, inputs, spec, candidates, ignore)
    if failures is None:
        return
    bad: dict[str, str] = {}
    for name in candidates:
        err = _try_groups(model, inputs, spec, [name], ignore)
        if err is not None:
            bad[name] = err[1]
            culprit = err[0]
            if culprit is not None and not any(
                culprit == p or culprit.startswith(p + ".") for p in ignore
            ):
                mod = model.get_submodule(culprit)
                raise UnsupportedLayerError(
                    culprit, type(mod).__name__,
                    f"removing channels of group {name!r} breaks its forward pass ({err[1]})",
                )
    for name, why in bad.items():
        g = spec.groups[name]
        spec.groups[name] = type(g)(
            name=g.name, kind=g.kind, units=g.units,
            allowed=tuple(s for s in g.allowed if s != Structure.CHANNEL),
            producers=g.producers, members=g.members, unit_size=g.unit_size,
            min_units=g.min_units, note=(g.note + "; " if g.note else "") + f"channel: {why}",
        )
        warnings.warn(
            f"analyze: channels of group {name!r} cannot be removed ({why}); "
            "offering only mask structures for it",
            stacklevel=3,
        )


def _try_groups(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    spec: ModelSpec,
    names: list[str],
    ignore: Sequence[str],
) -> tuple[str | None, str] | None:
    """None if removing one unit of each named group works; else (culprit module, reason)."""
    plan = PruningPlan(model_fingerprint=spec.fingerprint, model_name=spec.model_name)
    for n in names:
        g = spec.groups[n]
        plan.groups[n] = GroupPlan(Structure.CHANNEL, (g.units - 1) / g.units)
    kept = {n: k for n, k in spec.kept_units(plan).items() if n in plan.groups}
    from autoprune.analyze import custom_param_modules

    m = copy.deepcopy(model)
    m.eval()
    stack: list[str] = []
    names_of = {mod: p for p, mod in m.named_modules()}
    custom = custom_param_modules(m)
    shapes = {p: [tuple(q.shape) for q in mod.parameters(recurse=False)] for p, mod in custom}
    try:
        dg = _build_dg(m, inputs, ignore)
        _prune_channels(m, dg, spec, kept, get_importance("l1"))
        del dg
    except Exception as e:  # noqa: BLE001
        return None, f"torch-pruning failed: {type(e).__name__}: {e}"
    handles = []

    def pre(mod: nn.Module, args: Any) -> None:
        stack.append(names_of.get(mod, ""))

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    for mod in m.modules():
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    try:
        with torch.no_grad():
            m(*inputs)
    except Exception as e:  # noqa: BLE001
        # prefer a custom module whose parameters torch-pruning resized without knowing what
        # they mean; else the innermost module that was running when the forward failed
        changed = [p for p, mod in custom
                   if [tuple(q.shape) for q in mod.parameters(recurse=False)] != shapes[p]]
        culprit = changed[0] if changed else next((p for p in reversed(stack) if p), None)
        return culprit, f"{type(e).__name__}: {e}"
    finally:
        for h in handles:
            h.remove()
    expected = {p.name: p.spec for p in spec.pruned_layers(plan)}
    for path, mod in m.named_modules():
        if path not in expected:
            continue
        e = expected[path]
        if isinstance(mod, nn.Linear):
            got = (mod.in_features, mod.out_features)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            got = (mod.in_channels, mod.out_channels)
        else:
            continue
        if got != (e.in_channels, e.out_channels):
            return None, (
                f"layer {path} has in/out {got} after pruning, the spec predicts "
                f"{(e.in_channels, e.out_channels)}"
            )
    return None
