"""Reading a pruned model against its reference: structure check, per-group widths, masks,
and which reference channels the pruned model kept.

Everything here works on models autoprune did not prune (Torch-Pruning's physically smaller
layers, ``torch.nn.utils.prune`` masks, zeroed rows): the only inputs are the two modules and
the reference's ``ModelSpec``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoprune._analyze._adapters import ADAPTERS
from autoprune.errors import InvalidInputError, ModelMismatchError
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import ModelSpec, OpKind, Structure


def check_structure(pruned: Any, reference: Any) -> None:
    """Raise ``ModelMismatchError`` naming the first module whose path or type differs."""
    if not isinstance(pruned, nn.Module) or not isinstance(reference, nn.Module):
        bad = pruned if not isinstance(pruned, nn.Module) else reference
        raise InvalidInputError(
            f"pruned and reference must be torch.nn.Module, got {type(bad).__name__}"
        )
    ref = dict(reference.named_modules())
    got = dict(pruned.named_modules())
    for path, mod in ref.items():
        other = got.get(path)
        if other is None:
            raise ModelMismatchError(path or "<root>",
                                     f"the reference has a {type(mod).__name__} there, the "
                                     "pruned model has no module at that path")
        if type(other) is not type(mod):
            raise ModelMismatchError(path or "<root>",
                                     f"the reference has a {type(mod).__name__}, the pruned "
                                     f"model a {type(other).__name__}")
    for path, mod in got.items():
        if path not in ref:
            raise ModelMismatchError(path, f"the pruned model has an extra {type(mod).__name__} "
                                           "the reference does not have")


@dataclass(frozen=True)
class LayerWidths:
    """One spec layer of the pruned model: widths as its module holds them, and its weights."""

    in_channels: int
    out_channels: int
    weight_zero_share: float  #: share of exactly-zero effective weights (masks included)
    zero_out_channels: int  #: output rows whose weights are all zero
    masked: bool  #: carries a mask buffer (autoprune's or torch.nn.utils.prune's)


def effective_weight(module: nn.Module, suffix: str) -> torch.Tensor | None:
    """The weight a layer computes with (mask applied), or None for a weightless sublayer."""
    adapter = ADAPTERS.layer(module)
    if adapter is None:
        return None
    try:
        pname, param = adapter.mask_param(module, suffix)
    except (AttributeError, KeyError, ValueError):  # no weights under that sublayer
        return None
    owner_path, _, base = pname.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    w = getattr(owner, base, None)  # torch.nn.utils.prune: the masked weight attribute
    if not isinstance(w, torch.Tensor):
        w = param
    mask = getattr(owner, f"{base}_mask", None)
    w = w.detach()
    if isinstance(mask, torch.Tensor) and mask.shape == w.shape:
        w = w * mask.to(w.dtype)
    return w


def has_mask(module: nn.Module) -> bool:
    return any(n.endswith("_mask") for n, _ in module.named_buffers(recurse=False)) or any(
        n.endswith("_orig") for n, _ in module.named_parameters(recurse=False))


def read_widths(pruned: nn.Module, spec: ModelSpec) -> dict[str, LayerWidths]:
    """Per spec layer, the pruned model's widths and weight zeros (a layer wider than the
    reference's is a ``ModelMismatchError``)."""
    out: dict[str, LayerWidths] = {}
    for name, lay in spec.layers.items():
        try:
            mod, adapter, suffix = ADAPTERS.resolve(pruned, name)
        except KeyError as e:
            raise ModelMismatchError(name, str(e).strip("'\"")) from None
        w = adapter.widths(mod).get(suffix)
        if w is None:
            raise ModelMismatchError(name, "its adapter reports no widths for this sublayer")
        ci, co = int(w.in_channels), int(w.out_channels)
        if lay.spec.op.is_depthwise:
            ci = co
        if ci > lay.spec.in_channels or co > lay.spec.out_channels:
            raise ModelMismatchError(
                name, f"it is wider than the reference's ({ci}->{co} channels, reference "
                      f"{lay.spec.in_channels}->{lay.spec.out_channels})")
        weight = effective_weight(mod, suffix)
        zero_share, zero_rows = 0.0, 0
        if weight is not None and weight.numel():
            z = weight == 0
            zero_share = float(z.float().mean())
            zero_rows = int(z.reshape(z.shape[0], -1).all(dim=1).sum())
        out[name] = LayerWidths(ci, co, zero_share, zero_rows, has_mask(mod))
    return out


def plan_from_widths(spec: ModelSpec, widths: dict[str, LayerWidths]) -> tuple[
        PruningPlan, dict[str, int]]:
    """The ``PruningPlan`` (channel structure, exact kept units per group) that reproduces the
    pruned model's widths, and the kept units per group. A pruned model whose widths no plan
    reproduces (layers pruned apart from the channels coupled to them) is a
    ``ModelMismatchError`` naming the first such layer."""
    votes: dict[str, Counter[int]] = {}
    for name, lay in spec.layers.items():
        w = widths[name]
        for segs, actual in ((lay.in_segments, w.in_channels), (lay.out_segments, w.out_channels)):
            grouped = [(g, ch) for g, ch in segs if g is not None and g in spec.groups
                       and spec.groups[g].kind == "channel"]
            fixed = sum(ch for g, ch in segs if (g, ch) not in grouped)
            if len(grouped) != 1:
                continue
            g, ch = grouped[0]
            units = spec.groups[g].units
            num = (actual - fixed) * units
            if num <= 0 or num % ch:
                continue
            votes.setdefault(g, Counter())[num // ch] += 1
    kept: dict[str, int] = {}
    for grp in spec.groups.values():
        if grp.kind != "channel":
            continue
        c = votes.get(grp.name)
        kept[grp.name] = min(grp.units, c.most_common(1)[0][0]) if c else grp.units
    plan = PruningPlan.dense(spec)
    for name, k in kept.items():
        if k < spec.groups[name].units:
            if Structure.CHANNEL not in spec.groups[name].allowed:
                raise ModelMismatchError(
                    name, f"it has {k} of {spec.groups[name].units} channels, but autoprune "
                          "cannot remove channels of this group (see analyze's warnings)")
            plan.groups[name] = GroupPlan(Structure.CHANNEL, k / spec.groups[name].units)
    got = spec.kept_units(plan)
    for name, k in kept.items():
        if got[name] != k:  # float rounding of k/units: say so rather than price another width
            raise InvalidInputError(f"group {name!r}: keep ratio {k}/{spec.groups[name].units} "
                                    f"does not round back to {k} units")
    for pl in spec.pruned_layers(plan):
        w = widths[pl.name]
        if (pl.spec.in_channels, pl.spec.out_channels) != (w.in_channels, w.out_channels):
            raise ModelMismatchError(
                pl.name, f"its widths {w.in_channels}->{w.out_channels} do not follow from "
                         f"pruning whole channel groups (the groups' widths give "
                         f"{pl.spec.in_channels}->{pl.spec.out_channels})")
    return plan, kept


# ------------------------------------------------------------------------------------------
# Which reference channels did the pruned model keep?
# ------------------------------------------------------------------------------------------
def _producer_weight(model: nn.Module, layer: str) -> tuple[torch.Tensor, OpKind] | None:
    mod, adapter, suffix = ADAPTERS.resolve(model, layer)
    w = effective_weight(mod, suffix)
    if w is None:
        return None
    return w.float(), adapter.op_kind(mod, suffix)


def match_channels(pruned: nn.Module, reference: nn.Module, spec: ModelSpec,
                   kept: dict[str, int], rtol: float = 1e-4) -> tuple[dict[str, list[int]], str]:
    """Per channel group, the sorted reference channel indices the pruned model kept, found by
    matching each producer's weight rows to the reference's (restricted to the input channels
    already matched). Returns (indices, "") or ({}, the reason no match was found)."""
    idx: dict[str, list[int]] = {n: list(range(spec.groups[n].units))
                                 for n, k in kept.items() if k >= spec.groups[n].units}
    todo = [n for n in kept if n not in idx]
    for n in todo:
        if spec.groups[n].unit_size != 1:
            return {}, f"group {n!r} prunes multi-channel units (heads / grouped convs)"
    progress = True
    while todo and progress:
        progress = False
        for n in list(todo):
            for prod in spec.groups[n].producers:
                found = _match_producer(pruned, reference, spec, prod, n, kept[n], idx, rtol)
                if found is not None:
                    idx[n] = found
                    todo.remove(n)
                    progress = True
                    break
    if todo:
        return {}, (f"the weights of group {todo[0]!r} match no reference channels (the pruned "
                    "model was trained or changed after pruning, or its channels were reordered)")
    return idx, ""


def _match_producer(pruned: nn.Module, reference: nn.Module, spec: ModelSpec, prod: str,
                    group: str, k: int, idx: dict[str, list[int]], rtol: float
                    ) -> list[int] | None:
    lay = spec.layers.get(prod)
    if lay is None or [g for g, _ in lay.out_segments] != [group]:
        return None
    a, b = _producer_weight(pruned, prod), _producer_weight(reference, prod)
    if a is None or b is None:
        return None
    wp, op = a
    wr, _ = b
    if wp.dim() < 2 or wp.shape[0] != k:
        return None
    if op.is_depthwise or lay.spec.op == OpKind.ATTENTION:
        if op.is_depthwise:
            sel = wr
        else:
            return None
    else:
        if lay.spec.groups != 1:
            return None
        cols: list[int] = []
        off = 0
        for g, ch in lay.in_segments:
            if g is None or g not in spec.groups or spec.groups[g].kind != "channel":
                cols.extend(range(off, off + ch))
            elif g in idx and ch == spec.groups[g].units:
                cols.extend(off + i for i in idx[g])
            else:
                return None
            off += ch
        if off != wr.shape[1] or len(cols) != wp.shape[1]:
            return None
        sel = wr[:, cols]
    rp = wp.reshape(k, -1)
    rr = sel.reshape(sel.shape[0], -1)
    if rp.shape[1] != rr.shape[1]:
        return None
    dist = torch.cdist(rp.double(), rr.double(), compute_mode="donot_use_mm_for_euclid_dist")
    best = dist.argmin(dim=1)
    tol = rtol * (rr.norm(dim=1).max().item() + 1e-12)
    if bool((dist.gather(1, best[:, None]).squeeze(1) > tol).any()):
        return None
    chosen = best.tolist()
    if len(set(chosen)) != len(chosen):
        return None
    return sorted(chosen) if chosen == sorted(chosen) else None


def widths_from_state_dict(state: dict[str, torch.Tensor], spec: ModelSpec
                           ) -> dict[str, LayerWidths]:
    """Per spec layer, the widths a saved state_dict's weight shapes give (conv and linear
    layers; ``torch.nn.utils.prune``'s ``weight_orig`` read as ``weight``)."""
    out: dict[str, LayerWidths] = {}
    for name, lay in spec.layers.items():
        w = state.get(f"{name}.weight")
        if w is None:
            w = state.get(f"{name}.weight_orig")
        if w is None or w.dim() < 2:
            raise ModelMismatchError(
                name, "the state_dict has no 2-D+ weight for this layer (only conv and linear "
                      "layers can be read from a state_dict; pass the pruned module itself)")
        co = int(w.shape[0])
        if lay.spec.op.is_depthwise:
            ci = co
        elif lay.spec.op.is_conv:
            ci = int(w.shape[1]) * lay.spec.groups
        else:
            ci = int(w.shape[1])
        if ci > lay.spec.in_channels or co > lay.spec.out_channels:
            raise ModelMismatchError(
                name, f"it is wider than the reference's ({ci}->{co} channels, reference "
                      f"{lay.spec.in_channels}->{lay.spec.out_channels})")
        out[name] = LayerWidths(ci, co, 0.0, 0, False)
    return out


def pruned_from_state_dict(reference: nn.Module, state: dict[str, torch.Tensor],
                           inputs: tuple[torch.Tensor, ...]) -> nn.Module:
    """The pruned model a state_dict saved from a channel-pruned copy of ``reference`` (e.g.
    by Torch-Pruning) describes: the reference pruned to its shapes, its values loaded."""
    from autoprune._analyze import analyze
    from autoprune.executor import apply_plan

    spec = analyze(reference, inputs)
    plan, _ = plan_from_widths(spec, widths_from_state_dict(state, spec))
    model = apply_plan(reference, plan, inputs, importance="l1", spec=spec)
    plain: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith("_mask"):
            continue
        if k.endswith("_orig"):
            mask = state.get(k[: -len("_orig")] + "_mask")
            k = k[: -len("_orig")]
            v = v * mask.to(v.dtype) if mask is not None else v
        plain[k] = v
    try:
        model.load_state_dict(plain)
    except RuntimeError as e:
        raise InvalidInputError(f"the pruned state_dict does not fit the reference pruned to "
                                f"its widths: {e}") from None
    return model
