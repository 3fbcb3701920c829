"""Weight masks for ``nm`` and ``unstructured`` pruning.

A mask lives as a buffer named ``<param>_mask`` on the module that owns the parameter (so it is
part of ``state_dict()``), and a forward pre-hook re-zeroes the masked weights before each
forward pass (so optimiser steps cannot revive them). Unlike ``torch.nn.utils.prune`` the
parameter itself stays a plain ``nn.Parameter`` named as before holding the masked values: the
state_dict keys of the dense model are unchanged, exported weights already carry the pattern,
and modules whose weights are read by a parent (``nn.MultiheadAttention.out_proj``) work too.

Helpers: ``set_mask``, ``get_masks``, ``enforce``, ``bake``, ``load_masked_state_dict``,
``check_nm``, ``is_nm_mask``, ``sparsity``, ``overall_sparsity``.

All mask maths of the package lives here, one implementation each (the executor, the latency
micro-models in ``backends/micro.py`` and fine-tuning's gradual pruning call these):

- ``nm_mask(scores, n, m)``: keep the ``n`` highest of every ``m`` consecutive weights along
  the input dimension (dim 1).
- ``unstructured_mask(scores, keep_ratio | sparsity=)``: zero exactly
  ``pruned_count(numel, sparsity)`` weights at the lowest scores.
- ``pruned_count(numel, sparsity) = round(numel * sparsity)``, Python's ``round`` (halves to
  even), clipped to ``[0, numel]``.
- ``nm_from_density(density, m)``: the ``n`` of an N:M pattern of that density.

Edge rules, the same everywhere: ties are broken by position (weights ordered by (score,
index), the lowest pruned first, so of equal scores the lower index goes first); an input
length not divisible by ``m`` is zero-padded to a multiple of ``m`` (the padding counts as
pruned, so a partial group of ``r`` keeps ``min(n, r)``; ``check_nm`` pads the same way);
``n == m`` / sparsity 0 keep everything, ``n == 0`` / sparsity 1 prune everything; NaN scores
raise ``InvalidInputError``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping

import torch
from torch import nn

from autoprune.errors import InvalidInputError

__all__ = [
    "MASK_SUFFIX",
    "bake",
    "check_nm",
    "enforce",
    "get_masks",
    "is_nm_mask",
    "load_masked_state_dict",
    "nm_from_density",
    "nm_mask",
    "overall_sparsity",
    "pruned_count",
    "set_mask",
    "sparsity",
    "unstructured_mask",
]

MASK_SUFFIX = "_mask"


class MaskHook:
    """Forward pre-hook that zeroes masked weights (paths relative to the hooked module).

    It only writes when a masked weight is non-zero (after an optimiser step), so repeated
    forward passes between two backward passes do not invalidate saved tensors.
    """

    def __init__(self, params: list[str] | None = None) -> None:
        self.params: list[str] = list(params or [])

    def __call__(self, module: nn.Module, args: object) -> None:
        with torch.no_grad():
            for rel in self.params:
                owner, attr = _resolve(module, rel)
                w = getattr(owner, attr)
                mask = getattr(owner, attr + MASK_SUFFIX, None)
                if mask is None or w is None:
                    continue
                if bool((w * (1 - mask)).any()):  # noqa: SIM102 - only write when needed
                    w.mul_(mask)

    def __repr__(self) -> str:
        return f"MaskHook({self.params})"


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    if "." in path:
        mod_path, attr = path.rsplit(".", 1)
        return root.get_submodule(mod_path), attr
    return root, path


def _hook_of(module: nn.Module) -> MaskHook:
    for h in module._forward_pre_hooks.values():
        if isinstance(h, MaskHook):
            return h
    hook = MaskHook()
    module.register_forward_pre_hook(hook)
    return hook


def set_mask(model: nn.Module, param_path: str, mask: torch.Tensor) -> None:
    """Attach ``mask`` (1 = keep, 0 = pruned; same shape as the parameter) to ``param_path``
    (e.g. ``"layer1.0.conv1.weight"``), zero the masked weights now, and keep them zero."""
    owner, attr = _resolve(model, param_path)
    param = getattr(owner, attr, None)
    if not isinstance(param, torch.Tensor):
        raise InvalidInputError(f"{param_path!r} is not a parameter of {type(model).__name__}")
    if tuple(mask.shape) != tuple(param.shape):
        raise InvalidInputError(
            f"mask for {param_path!r} has shape {tuple(mask.shape)}, the parameter has "
            f"{tuple(param.shape)}"
        )
    mask = mask.detach().to(dtype=param.dtype, device=param.device).clone()
    name = attr + MASK_SUFFIX
    old = owner._buffers.get(name)
    if isinstance(old, torch.Tensor) and old.shape == mask.shape and old.dtype == mask.dtype \
            and old.device == mask.device:
        with torch.no_grad():
            old.copy_(mask)  # in place: a DDP wrapper or an optimiser keeps seeing this buffer
    elif name in owner._buffers:
        owner._buffers[name] = mask
    else:
        owner.register_buffer(name, mask)
    with torch.no_grad():
        param.mul_(mask)
    hook = _hook_of(owner)
    if attr not in hook.params:
        hook.params.append(attr)
    # a parent that reads the child's weights without calling it (MultiheadAttention.out_proj)
    mod_path = param_path.rsplit(".", 1)[0] if "." in param_path else ""
    if mod_path:
        parent_path, _, child = mod_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if isinstance(parent, nn.MultiheadAttention):
            phook = _hook_of(parent)
            rel = f"{child}.{attr}"
            if rel not in phook.params:
                phook.params.append(rel)


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter path -> mask (1 = kept) for every masked parameter."""
    out: dict[str, torch.Tensor] = {}
    for mod_path, module in model.named_modules():
        for bname, buf in module._buffers.items():
            if buf is None or not bname.endswith(MASK_SUFFIX):
                continue
            attr = bname[: -len(MASK_SUFFIX)]
            if isinstance(getattr(module, attr, None), torch.Tensor):
                out[f"{mod_path}.{attr}" if mod_path else attr] = buf
    return out


@torch.no_grad()
def enforce(model: nn.Module) -> None:
    """Re-zero every masked weight in place (call after each optimiser step)."""
    for path, mask in get_masks(model).items():
        owner, attr = _resolve(model, path)
        getattr(owner, attr).mul_(mask)


def bake(model: nn.Module) -> nn.Module:
    """A copy with the masks folded into plain weights and all mask buffers and hooks removed
    (for export: the weights carry the zero pattern, nothing else remains)."""
    out = copy.deepcopy(model)
    enforce(out)
    for _, module in out.named_modules():
        for bname in [b for b in module._buffers if b.endswith(MASK_SUFFIX)]:
            attr = bname[: -len(MASK_SUFFIX)]
            if isinstance(getattr(module, attr, None), torch.Tensor):
                del module._buffers[bname]
        for key in [k for k, h in module._forward_pre_hooks.items() if isinstance(h, MaskHook)]:
            del module._forward_pre_hooks[key]
    return out


def load_masked_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> nn.Module:
    """Load a state dict saved from a masked model into a model of the same (pruned) shapes
    that has no masks yet: the masks are attached first, then the weights are loaded."""
    params = dict(model.named_parameters())
    for key, value in state_dict.items():
        if not key.endswith(MASK_SUFFIX):
            continue
        ppath = key[: -len(MASK_SUFFIX)]
        if ppath in params:
            set_mask(model, ppath, value)
    model.load_state_dict(dict(state_dict), strict=strict)
    enforce(model)
    return model


def _in_dim_last(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(1, -1) if t.dim() > 1 else t.unsqueeze(0)


def _in_dim_back(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t.movedim(-1, 1) if len(shape) > 1 else t.reshape(shape)


def _check_scores(scores: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise InvalidInputError(f"{what} needs a tensor of scores, got {type(scores).__name__}")
    s = scores.detach().float()
    if bool(torch.isnan(s).any()):
        raise InvalidInputError(
            f"{what}: the scores hold NaN ({int(torch.isnan(s).sum())} of {s.numel()}); "
            "the weights or their importance diverged: fix training (lower the lr) first"
        )
    return s


def _check_nm_args(n: int, m: int) -> tuple[int, int]:
    try:
        n_i, m_i = operator.index(n), operator.index(m)
    except TypeError:
        raise InvalidInputError(f"n:m must be integers, got {n!r}:{m!r}") from None
    if isinstance(n, bool) or isinstance(m, bool) or m_i < 1 or not 0 <= n_i <= m_i:
        raise InvalidInputError(
            f"n:m must satisfy 0 <= n <= m and m >= 1, got {n!r}:{m!r} (2:4 is the common one)"
        )
    return n_i, m_i


def _prune_lowest(scores: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """0/1 float mask over the last dim zeroing the ``k`` lowest scores, ties to the lower index
    (a stable ascending sort: order by (score, index), prune the first k)."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    )
    return (rank >= k).to(torch.float32)


def pruned_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` prunes: ``round(numel * sparsity)`` with
    Python's ``round`` (halves to even), clipped to ``[0, numel]``. The one rounding rule of
    ``unstructured_mask`` (and so of the executor, the micro-models and fine-tuning)."""
    s = float(sparsity)
    if not 0.0 <= s <= 1.0:
        raise InvalidInputError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return max(0, min(int(numel), int(round(int(numel) * s))))


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Mask keeping the ``n`` highest-scored of every ``m`` consecutive weights along the input
    dimension (dim 1; for a conv: along input channels at each output channel and kernel
    position; a 1-D tensor along its only dim). Pass magnitudes (``w.abs()``) for magnitude
    pruning. Edge rules (the only N:M implementation in the package):

    - ties: within a group weights are ordered by (score, index) and the lowest are pruned, so
      of equal scores the one at the lower index is pruned first;
    - a length not divisible by ``m``: the last partial group of ``r`` weights is treated as
      zero-padded to ``m`` (the padding counts as pruned), so it keeps ``min(n, r)``;
    - ``n == m`` keeps everything (sparsity 0), ``n == 0`` prunes everything (sparsity 1);
    - NaN scores raise ``InvalidInputError``.

    Returns a 0/1 tensor of the scores' shape and dtype. ``check_nm`` holds for its output.
    """
    n, m = _check_nm_args(n, m)
    s = _in_dim_last(_check_scores(scores, "nm_mask"))
    length = s.shape[-1]
    full = (length // m) * m
    mask = torch.ones_like(s)
    if full and n < m:
        groups = s[..., :full].reshape(*s.shape[:-1], full // m, m)
        mask[..., :full] = _prune_lowest(groups, m - n).reshape(*s.shape[:-1], full)
    r = length - full
    if r and r > n:
        mask[..., full:] = _prune_lowest(s[..., full:], r - n)
    return _in_dim_back(mask, scores.shape).contiguous().to(scores.dtype)


def unstructured_mask(scores: torch.Tensor, keep_ratio: float | None = None, *,
                      sparsity: float | None = None) -> torch.Tensor:
    """Mask zeroing exactly ``pruned_count(numel, sparsity)`` weights at the lowest scores
    (``sparsity = 1 - keep_ratio``; give one of the two). Edge rules: ties are pruned in index
    order (order by (score, flat index), prune the first k); sparsity 0 keeps all, 1 prunes
    all; NaN scores raise ``InvalidInputError``. Returns a 0/1 tensor of the scores' dtype."""
    if (keep_ratio is None) == (sparsity is None):
        raise InvalidInputError(
            f"unstructured_mask takes keep_ratio or sparsity (one of them), got "
            f"keep_ratio={keep_ratio!r}, sparsity={sparsity!r}"
        )
    if keep_ratio is not None:
        if not 0.0 <= float(keep_ratio) <= 1.0:
            raise InvalidInputError(f"keep_ratio must be in [0, 1], got {keep_ratio!r}")
        share = 1.0 - float(keep_ratio)
    else:
        share = float(sparsity)  # type: ignore[arg-type]  # not None: checked above
    s = _check_scores(scores, "unstructured_mask").reshape(-1)
    k = pruned_count(s.numel(), share)
    return _prune_lowest(s, k).reshape(scores.shape).to(scores.dtype)


def nm_from_density(density: float, m: int = 4) -> tuple[int, int]:
    """(n, m) for an N:M density: ``n = round(density * m)`` clipped to ``[1, m]`` (0.5 → 2:4)."""
    n = max(1, min(m, int(round(float(density) * m))))
    return n, m


def is_nm_mask(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if ``mask`` (0/1) is exactly the pattern ``nm_mask`` produces: every group of ``m``
    along the input dimension keeps ``n`` (a zero-padded partial group keeps ``min(n, r)``)."""
    kept = mask.detach().float()
    return bool(torch.equal(nm_mask(kept, n, m), kept))


def check_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every ``m`` consecutive weights along the input dimension (zero-padded to a
    multiple of ``m``) hold at most ``n`` non-zeros."""
    n, m = _check_nm_args(n, m)
    w = _in_dim_last(weight.detach())
    pad = (-w.shape[-1]) % m
    if pad:
        w = torch.cat([w, w.new_zeros((*w.shape[:-1], pad))], dim=-1)
    nz = (w.reshape(*w.shape[:-1], -1, m) != 0).sum(-1)
    return bool((nz <= n).all())


def overall_sparsity(model: nn.Module) -> float:
    """Share of pruned entries over all masks of ``model`` (0.0 when nothing is masked)."""
    zeros = total = 0
    for mask in get_masks(model).values():
        zeros += int((mask == 0).sum())
        total += mask.numel()
    return zeros / total if total else 0.0


def sparsity(model: nn.Module) -> dict[str, float]:
    """Parameter path -> share of zero weights, for every masked parameter."""
    out: dict[str, float] = {}
    for path in get_masks(model):
        owner, attr = _resolve(model, path)
        w = getattr(owner, attr).detach()
        out[path] = float((w == 0).sum()) / max(1, w.numel())
    return out
