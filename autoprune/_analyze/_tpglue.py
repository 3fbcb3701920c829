"""The torch-pruning glue: dependency graphs, channel removal, and the dry-run check.

``analyze`` builds a model's dependency graphs here and checks its channel groups with a dry
run (remove one unit of every group on a copy, run it, compare widths); ``apply_plan`` removes
channels with the same primitives. Keeping them in one private module is what lets
``analyze`` and the executor share them without importing each other.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from autoprune._analyze._adapters import ADAPTERS
from autoprune.errors import InvalidInputError, UnsupportedLayerError
from autoprune.importance import get_importance
from autoprune.masks import bake
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import ModelSpec, Structure

__all__ = [
    "Graphs",
    "build_graphs",
    "check_channel_groups",
    "custom_param_modules",
    "functional_weight_modules",
    "normalize_inputs",
    "prune_channels",
]


def normalize_inputs(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors (a single tensor becomes a 1-tuple)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs and all(
        isinstance(t, torch.Tensor) for t in example_inputs
    ):
        return tuple(example_inputs)
    raise InvalidInputError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _inputs_error(model: nn.Module, inputs: tuple[torch.Tensor, ...], err: Exception) -> InvalidInputError:
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    return InvalidInputError(
        f"{type(model).__name__} cannot run on example_inputs of shape {shapes} "
        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass inputs "
        "of the shape the model is deployed with"
    )


@dataclass
class Graphs:
    """torch-pruning dependency graphs of a model: one for the whole model, or, where tracing
    the whole fails (an op torch-pruning cannot model, like ShuffleNet's channel shuffle), one
    per largest submodule that traces; channels crossing the untraced parts stay fixed."""

    graphs: dict[str, Any]  # module path ("" = whole model) -> DependencyGraph
    failures: dict[str, str]  # module path -> why torch-pruning could not trace it

    def for_group(self, group_name: str) -> Any:
        """The graph that owns a group (the longest module path prefix of its name)."""
        best = None
        for prefix in self.graphs:
            if prefix == "" or group_name == prefix or group_name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best):
                    best = prefix
        if best is None:
            raise KeyError(group_name)
        return self.graphs[best]


def _module_inputs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...]
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Positional tensor inputs of every module's first call (for tracing it alone)."""
    names = {m: n for n, m in model.named_modules()}
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = []

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        n = names[mod]
        if n not in seen:
            ok = bool(args) and all(isinstance(a, torch.Tensor) for a in args)
            seen[n] = tuple(a.detach() for a in args) if ok else ()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _one_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], ignore_mods: list[nn.Module]
) -> Any:
    import torch_pruning as tp

    mods = set(module.modules())
    ign = [m for m in ignore_mods if m in mods]
    return tp.DependencyGraph().build_dependency(
        module, args[0] if len(args) == 1 else args, ignored_layers=ign,
        ignored_params=[q for m in ign for q in m.parameters(recurse=False)], verbose=False,
    )


def functional_weight_modules(model: nn.Module, called: set[str] | dict[str, Any]) -> list[str]:
    """Modules that ran but read a modelled child layer's weights without calling it
    (torchvision Swin's ShiftedWindowAttention): neither torch-pruning nor the layer hooks can
    see those layers. A module whose adapter models its children (nn.MultiheadAttention and
    its out_proj) is not listed."""
    out = []
    for path, m in model.named_modules():
        if path not in called:
            continue
        own = ADAPTERS.layer(m)
        if own is not None and own.owns_children:
            continue
        for name, child in m.named_children():
            cpath = f"{path}.{name}" if path else name
            if ADAPTERS.layer(child) is not None and cpath not in called:
                out.append(path)
                break
    return out


def build_graphs(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], ignore: Sequence[str] = ()
) -> Graphs:
    """Dependency graph(s) of ``model`` (see ``Graphs``); the model should be in eval mode.

    Ignored modules that use their layers' weights functionally (see
    ``functional_weight_modules``) are opaque: no graph spans them, their neighbours are traced
    in parts around them."""
    ignore_mods = [m for p in ignore for m in model.get_submodule(p).modules()]
    failures: dict[str, str] = {}
    if not ignore:  # the common case: one whole-model trace, no extra forward pass
        try:
            return Graphs({"": _one_graph(model, inputs, ignore_mods)}, {})
        except Exception as e:  # noqa: BLE001 - fall back to tracing parts
            failures[""] = f"{type(e).__name__}: {e}"
    try:
        args_of = _module_inputs(model, inputs)
    except Exception as e:  # noqa: BLE001 - the inputs do not fit the model
        raise _inputs_error(model, inputs, e) from e
    opaque = [p for p in ignore
              if functional_weight_modules(model.get_submodule(p), {
                  k[len(p) + 1:] if k != p else "" for k in args_of
                  if k == p or k.startswith(p + ".")})]
    if opaque:
        failures[""] = f"contains opaque ignored modules ({', '.join(opaque[:3])})"
    elif "" not in failures:
        try:
            return Graphs({"": _one_graph(model, inputs, ignore_mods)}, {})
        except Exception as e:  # noqa: BLE001 - fall back to tracing parts
            failures[""] = f"{type(e).__name__}: {e}"
    graphs: dict[str, Any] = {}

    def spans_opaque(path: str) -> bool:
        return any(o == path or o.startswith(path + ".") for o in opaque)

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not any(True for _ in child.parameters()):
                continue  # nothing to prune in it
            if any(path == o or path.startswith(o + ".") for o in opaque):
                continue  # ignored and opaque: left alone
            args = args_of.get(path, ())
            if spans_opaque(path):
                failures[path] = "contains an opaque ignored module"
                visit(path, child)
                continue
            if not args:
                if path in args_of:  # called with non-tensor arguments: look inside
                    failures[path] = "called with non-tensor arguments"
                    visit(path, child)
                continue  # never called
            try:
                graphs[path] = _one_graph(child, args, ignore_mods)
            except Exception as e:  # noqa: BLE001
                failures[path] = f"{type(e).__name__}: {e}"
                visit(path, child)

    visit("", model)
    return Graphs(graphs, failures)


def custom_param_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning parameters directly whose type has no adapter, so torch-pruning has no
    pruner for them either (their parameters are pruned by shape guessing)."""
    out = []
    for path, m in model.named_modules():
        if ADAPTERS.is_known_param_holder(m):
            continue
        if any(True for _ in m.parameters(recurse=False)):
            out.append((path, m))
    return out


def _root_of(model: nn.Module, group_name: str) -> nn.Module:
    """Module whose output channels anchor a group (group names are producer layer paths; a
    sublayer such as an attention module's ``<path>.in_proj`` resolves to its module)."""
    try:
        return ADAPTERS.resolve(model, group_name)[0]
    except KeyError as e:
        raise InvalidInputError(
            f"group {group_name!r} names no layer of {type(model).__name__}: the spec was made "
            "for another model; pass the spec analyze() returned for this one"
        ) from e


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


class ChannelScorer(Protocol):
    """What ``prune_channels`` needs of a criterion: one score per root channel of a
    torch-pruning group (higher = keep). Every ``autoprune.importance.Importance`` is one."""

    def channel_scores(self, group: Any) -> torch.Tensor: ...


def prune_channels(
    model: nn.Module,
    graphs: Graphs,
    spec: ModelSpec,
    kept: dict[str, int],
    importance: ChannelScorer,
) -> None:
    """Remove channels group by group down to ``kept`` units (torch-pruning keeps the graph
    consistent); the executor, the dry-run check and repair share it. Only channel scores are
    read: any ``Importance`` fits, or an object that picks channels some other way."""
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
            # a plain int attribute (nn.Module's __setattr__ is typed for tensors / modules)
            setattr(mod, "hidden_dim", proj.out_channels)


def check_channel_groups(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], spec: ModelSpec
) -> ModelSpec:
    """Used by ``analyze``: remove one unit from every channel group on a copy, run it, and
    compare every layer's widths with ``spec.pruned_layers``. Returns the spec (a new one when
    a group failed: that group is not offered ``channel`` any more, with a warning; ``spec``
    itself is not changed); a failure inside a module the user did not ignore
    (``spec.ignored``) raises ``UnsupportedLayerError`` naming it."""
    ignore = spec.ignored
    candidates = [g.name for g in spec.groups.values() if Structure.CHANNEL in g.allowed]
    if not candidates:
        return spec
    failures = _try_groups(model, inputs, spec, candidates, ignore)
    if failures is None:
        return spec
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
    groups = dict(spec.groups)
    for name, why in bad.items():
        g = spec.groups[name]
        groups[name] = dataclasses.replace(
            g, allowed=tuple(s for s in g.allowed if s != Structure.CHANNEL),
            note=(g.note + "; " if g.note else "") + f"channel: {why}",
        )
        warnings.warn(
            f"analyze: channels of group {name!r} cannot be removed ({why}); "
            "offering only mask structures for it",
            stacklevel=3,
        )
    return dataclasses.replace(spec, groups=groups)


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
    # masks baked in: torch-pruning resizes a weight but not its weight_mask buffer, so a
    # model carrying autoprune's masks failed the dry run ("size of tensor a (47) must match
    # the size of tensor b (48)")
    m = bake(model)
    m.eval()
    stack: list[str] = []
    names_of = {mod: p for p, mod in m.named_modules()}
    custom = custom_param_modules(m)
    shapes = {p: [tuple(q.shape) for q in mod.parameters(recurse=False)] for p, mod in custom}
    try:
        dg = build_graphs(m, inputs, ignore)
        prune_channels(m, dg, spec, kept, get_importance("l1"))
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
    for pl in spec.pruned_layers(plan):
        path, want = pl.name, pl.spec
        try:
            mod, adapter, suffix = ADAPTERS.resolve(m, path)
        except KeyError:
            return None, f"layer {path} is missing after pruning"
        w = adapter.widths(mod)[suffix]
        got = (w.in_channels, w.out_channels)
        if got != (want.in_channels, want.out_channels):
            return None, (
                f"layer {path} has in/out {got} after pruning, the spec predicts "
                f"{(want.in_channels, want.out_channels)}"
            )
    return None
