"""Building a repaired model from the pruned model's own weights.

The repaired model is the reference pruned (by torch-pruning, through the executor's glue) to
explicit reference channel indices per group; then every value whose channels the pruned model
also kept is overwritten with the pruned model's value. Which reference channel each position
of each tensor holds is read off "tag" copies of the reference: every parameter and buffer
filled with its index along dim 0 (resp. dim 1) and pruned with the same indices, so the
surviving values *are* the reference indices (concatenations, flattens and residual couplings
included: torch-pruning moved them).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from autoprune._analyze._adapters import ADAPTERS
from autoprune._analyze._tpglue import build_graphs, prune_channels
from autoprune._diagnose._match import effective_weight
from autoprune.types import ModelSpec


class _KeepIndices:
    """Scores 1 for the root channels to keep, 0 for the others (``prune_channels`` removes
    the lowest): prunes a group to exactly ``keep`` (a ``ChannelScorer``)."""

    def __init__(self, units: int, keep: list[int]) -> None:
        self.scores = torch.zeros(units)
        self.scores[torch.as_tensor(keep, dtype=torch.long)] = 1.0

    def channel_scores(self, group: Any) -> torch.Tensor:
        return self.scores.clone()


def prune_to_indices(model: nn.Module, spec: ModelSpec, inputs: tuple[torch.Tensor, ...],
                     keep: dict[str, list[int]]) -> nn.Module:
    """A copy of ``model`` (the reference) keeping exactly the channels ``keep`` names per
    group (groups not named, or named with every channel, stay whole)."""
    new = copy.deepcopy(model).eval()
    todo = {n: ix for n, ix in keep.items() if len(ix) < spec.groups[n].units}
    if not todo:
        return new
    dg = build_graphs(new, inputs, spec.ignored)
    for name, ix in todo.items():
        g = spec.groups[name]
        prune_channels(new, dg, spec, {name: len(ix)}, _KeepIndices(g.units, ix))
    del dg
    return new


def _tagged(model: nn.Module, dim: int) -> nn.Module:
    tag = copy.deepcopy(model).eval()
    with torch.no_grad():
        for t in [*tag.parameters(), *tag.buffers()]:
            if t.is_floating_point() and t.dim() > dim:
                shape = [1] * t.dim()
                shape[dim] = t.shape[dim]
                t.copy_(torch.arange(t.shape[dim], dtype=t.dtype).reshape(shape).expand_as(t))
    return tag


def _positions(tag_state: dict[str, torch.Tensor], key: str, dim: int) -> list[int]:
    t = tag_state[key]
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)[:, 0].round().long().tolist()


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the reference's state-dict keys, masks applied
    (``torch.nn.utils.prune``'s ``weight_orig``/``weight_mask`` read as ``weight``)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner_path, _, name = key.rpartition(".")
        if name.endswith("_orig"):
            name = name[: -len("_orig")]
        elif name.endswith("_mask"):
            continue
        owner = model.get_submodule(owner_path) if owner_path else model
        v = getattr(owner, name, value)
        if not isinstance(v, torch.Tensor):
            v = value
        mask = getattr(owner, f"{name}_mask", None)
        if isinstance(mask, torch.Tensor) and mask.shape == v.shape:
            v = v * mask.to(v.dtype)
        out[f"{owner_path}.{name}" if owner_path else name] = v.detach()
    return out


def graft(pruned: nn.Module, reference: nn.Module, spec: ModelSpec,
          inputs: tuple[torch.Tensor, ...], kept_idx: dict[str, list[int]],
          new_idx: dict[str, list[int]]) -> nn.Module | None:
    """The reference pruned to ``new_idx``, carrying the pruned model's values wherever its
    channels (``kept_idx``, reference indices) survive; None if a tensor of the pruned model
    does not have the shape its channels imply (it was not pruned from this reference)."""
    repaired = prune_to_indices(reference, spec, inputs, new_idx)
    src = plain_state(pruned)
    tags_new = [prune_to_indices(_tagged(reference, d), spec, inputs, new_idx).state_dict()
                for d in (0, 1)]
    tags_old = [prune_to_indices(_tagged(reference, d), spec, inputs, kept_idx).state_dict()
                for d in (0, 1)]
    state = repaired.state_dict()
    with torch.no_grad():
        for key, dst in state.items():
            s = src.get(key)
            if s is None:
                return None
            if not dst.is_floating_point() or dst.dim() == 0:
                if s.shape == dst.shape:
                    dst.copy_(s)
                continue
            if tuple(s.shape) != tuple(tags_old[0][key].shape):
                return None
            sel_dst: list[torch.Tensor] = []
            sel_src: list[torch.Tensor] = []
            for d in range(min(dst.dim(), 2)):
                old = {r: i for i, r in enumerate(_positions(tags_old[d], key, d))}
                new = _positions(tags_new[d], key, d)
                pairs = [(j, old[r]) for j, r in enumerate(new) if r in old]
                sel_dst.append(torch.tensor([j for j, _ in pairs], dtype=torch.long))
                sel_src.append(torch.tensor([i for _, i in pairs], dtype=torch.long))
            if any(len(x) == 0 for x in sel_dst):
                continue
            if dst.dim() == 1:
                dst[sel_dst[0]] = s[sel_src[0]].to(dst.dtype)
            else:
                block = s[sel_src[0]][:, sel_src[1]]
                dst[sel_dst[0][:, None], sel_dst[1][None, :]] = block.to(dst.dtype)
    repaired.load_state_dict(state)
    return repaired


def group_scores(model: nn.Module, spec: ModelSpec, group: str) -> torch.Tensor | None:
    """L1 magnitude per output channel of a group's producers in ``model`` (summed over the
    producers whose output is exactly the group), or None if none has weights."""
    total: torch.Tensor | None = None
    for prod in spec.groups[group].producers:
        lay = spec.layers.get(prod)
        if lay is None or [g for g, _ in lay.out_segments] != [group]:
            continue
        mod, _, suffix = ADAPTERS.resolve(model, prod)
        w = effective_weight(mod, suffix)
        if w is None or w.dim() < 1:
            continue
        s = w.float().abs().reshape(w.shape[0], -1).sum(1)
        if total is None:
            total = s
        elif total.shape == s.shape:
            total = total + s
    return total


def choose_indices(pruned: nn.Module, reference: nn.Module, spec: ModelSpec,
                   kept_idx: dict[str, list[int]], widths: dict[str, int]) -> dict[str, list[int]]:
    """Reference channel indices per group at the new ``widths``: the pruned model's channels
    (its lowest-L1 ones dropped where a group shrinks), plus the highest-L1 reference channels
    it had dropped where a group grows."""
    out: dict[str, list[int]] = {}
    for name, k in widths.items():
        have = kept_idx[name]
        if k == len(have):
            out[name] = list(have)
        elif k < len(have):
            sc = group_scores(pruned, spec, name)
            order = (torch.argsort(sc, descending=True, stable=True).tolist()
                     if sc is not None and len(sc) == len(have) else list(range(len(have))))
            out[name] = sorted(have[i] for i in order[:k])
        else:
            sc = group_scores(reference, spec, name)
            dropped = [i for i in range(spec.groups[name].units) if i not in set(have)]
            if sc is not None:
                dropped.sort(key=lambda i: -float(sc[i]))
            out[name] = sorted([*have, *dropped[: k - len(have)]])
    return out
