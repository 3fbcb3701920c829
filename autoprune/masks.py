"""Weight masks for ``nm`` and ``unstructured`` pruning.

A mask lives as a buffer named ``<param>_mask`` on the module that owns the parameter (so it is
part of ``state_dict()``), and a forward pre-hook re-zeroes the masked weights before each
forward pass (so optimiser steps cannot revive them). Unlike ``torch.nn.utils.prune`` the
parameter itself stays a plain ``nn.Parameter`` named as before holding the masked values: the
state_dict keys of the dense model are unchanged, exported weights already carry the pattern,
and modules whose weights are read by a parent (``nn.MultiheadAttention.out_proj``) work too.

Helpers: ``set_mask``, ``get_masks``, ``enforce``, ``bake``, ``load_masked_state_dict``,
``check_nm``, ``sparsity``, ``nm_mask``, ``unstructured_mask``.
"""

from __future__ import annotations

import copy
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
    "load_masked_state_dict",
    "nm_mask",
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
    if name in owner._buffers:
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


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Mask keeping the ``n`` highest-scored of every ``m`` consecutive weights along the input
    dimension (dim 1; for a conv: along input channels at each output channel and kernel
    position). A row whose length is not a multiple of ``m`` is treated as zero-padded: its last
    partial chunk of r weights keeps min(n, r)."""
    if not (0 < n < m):
        raise InvalidInputError(f"n:m must satisfy 0 < n < m, got {n}:{m}")
    s = _in_dim_last(scores.detach().float())
    length = s.shape[-1]
    pad = (-length) % m
    if pad:
        s = torch.cat([s, s.new_full((*s.shape[:-1], pad), float("-inf"))], dim=-1)
    chunks = s.reshape(*s.shape[:-1], -1, m)
    idx = chunks.topk(n, dim=-1).indices
    mask = torch.zeros_like(chunks).scatter_(-1, idx, 1.0).reshape(s.shape)[..., :length]
    return _in_dim_back(mask, scores.shape).contiguous().to(scores.dtype)


def unstructured_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Mask with exactly ``round(numel * (1 - keep_ratio))`` zeros at the lowest scores."""
    if not 0.0 <= keep_ratio <= 1.0:
        raise InvalidInputError(f"keep_ratio must be in [0, 1], got {keep_ratio!r}")
    numel = scores.numel()
    n_zero = int(round(numel * (1.0 - keep_ratio)))
    flat = torch.ones(numel, dtype=scores.dtype, device=scores.device)
    if n_zero > 0:
        s = scores.detach().float().reshape(-1)
        t = torch.kthvalue(s, n_zero).values  # n_zero-th smallest score
        below = s < t
        flat[below] = 0
        need = n_zero - int(below.sum())  # ties at the threshold: zero just enough of them
        if need > 0:
            flat[(s == t).nonzero().reshape(-1)[:need]] = 0
    return flat.reshape(scores.shape)


def check_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every ``m`` consecutive weights along the input dimension (zero-padded to a
    multiple of ``m``) hold at most ``n`` non-zeros."""
    w = _in_dim_last(weight.detach())
    pad = (-w.shape[-1]) % m
    if pad:
        w = torch.cat([w, w.new_zeros((*w.shape[:-1], pad))], dim=-1)
    nz = (w.reshape(*w.shape[:-1], -1, m) != 0).sum(-1)
    return bool((nz <= n).all())


def sparsity(model: nn.Module) -> dict[str, float]:
    """Parameter path -> share of zero weights, for every masked parameter."""
    out: dict[str, float] = {}
    for path in get_masks(model):
        owner, attr = _resolve(model, path)
        w = getattr(owner, attr).detach()
        out[path] = float((w == 0).sum()) / max(1, w.numel())
    return out
