"""Single-layer micro-models: a ``LayerSpec`` (with its fused ops) as a runnable ``nn.Module``.

``spec.fused`` names the ops the runtime fuses into the layer, joined by ``+`` and applied in
order after the layer, e.g. ``"bn+relu"`` (conv → BatchNorm → ReLU) or ``"bn+add+relu"``
(conv → BatchNorm → add a residual input → ReLU). ``add`` and ``mul`` take a second model
input of the output's shape, the way a residual block feeds them. Known tokens: see
``FUSED_TOKENS``; an unknown token raises ``InvalidInputError`` naming it.

``structure``/``density`` zero the layer's weights in the pattern that structure implies, with
the mask maths of ``autoprune.masks`` on the weights' magnitudes (N:M along input channels per
kernel position for ``nm``; the lowest magnitudes for ``unstructured``), the same masks
``apply_plan`` and fine-tuning give that weight, so a backend with sparse kernels can pick them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from autoprune import masks
from autoprune.errors import InvalidInputError
from autoprune.latency._table import normalize_structure  # noqa: F401 - re-exported for backends
from autoprune.masks import nm_from_density  # noqa: F401 - re-exported (micro-model API)
from autoprune.types import LayerSpec, OpKind, Structure

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leakyrelu": nn.LeakyReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "mish": nn.Mish,
}
_NORMS = ("bn", "batchnorm", "ln", "layernorm")
_BINARY = ("add", "mul")
FUSED_TOKENS: tuple[str, ...] = tuple(sorted([*_ACTIVATIONS, *_NORMS, *_BINARY, "identity"]))


def fused_tokens(fused: str) -> list[str]:
    """``"bn+add+relu"`` → ``["bn", "add", "relu"]`` (also accepts commas)."""
    toks = [t.strip().lower() for t in fused.replace(",", "+").split("+")]
    return [t for t in toks if t and t != "identity"]


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping the ``n`` largest-magnitude of every ``m`` consecutive input
    channels: ``autoprune.masks.nm_mask(weight.abs(), n, m)`` (its edge rules: ties by
    position, a partial last group zero-padded)."""
    return masks.nm_mask(weight.detach().abs(), n, m).bool()


def random_mask(weight: torch.Tensor, density: float, seed: int = 0) -> torch.Tensor:
    """Boolean mask keeping ``density`` of the entries at random (seeded):
    ``autoprune.masks.unstructured_mask`` over random scores, so the kept count follows its
    rounding rule."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(weight.shape, generator=gen)
    return masks.unstructured_mask(scores, min(max(float(density), 0.0), 1.0)).bool()


class MicroModel(nn.Module):
    """One layer plus its fused ops, as the runtime executes the block."""

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__()
        self.spec = spec
        op = spec.op
        self.tokens = fused_tokens(spec.fused)
        for t in self.tokens:
            if t not in FUSED_TOKENS:
                raise InvalidInputError(
                    f"unknown fused op {t!r} in LayerSpec.fused={spec.fused!r}; "
                    f"known: {', '.join(FUSED_TOKENS)}"
                )
        if op in (OpKind.CONV1D, OpKind.DWCONV1D, OpKind.CONV2D, OpKind.DWCONV2D):
            # torch types kernel / stride / ... per dimension (tuple[int] / tuple[int, int]);
            # a LayerSpec holds them as tuple[int, ...] of the op's length
            cls: Callable[..., nn.Conv1d | nn.Conv2d] = (
                nn.Conv1d if op in (OpKind.CONV1D, OpKind.DWCONV1D) else nn.Conv2d
            )
            self.layer: nn.Conv1d | nn.Conv2d | nn.Linear | None = cls(
                spec.in_channels, spec.out_channels, spec.kernel, stride=spec.stride,
                padding=spec.padding, dilation=spec.dilation or 1, groups=spec.groups,
                bias=spec.bias,
            )
        elif op == OpKind.LINEAR:
            self.layer = nn.Linear(spec.in_channels, spec.out_channels, bias=spec.bias)
        elif op == OpKind.ATTENTION:
            if spec.groups < 1 or spec.out_channels % spec.groups:
                raise InvalidInputError(
                    f"attention LayerSpec needs out_channels ({spec.out_channels}) divisible by "
                    f"groups = heads ({spec.groups})"
                )
            self.layer = None
        else:  # pragma: no cover - OpKind is closed
            raise InvalidInputError(f"no micro-model for op {op!r}")
        self.post = nn.ModuleList()
        n_out = spec.out_channels
        for t in self.tokens:
            if t in ("bn", "batchnorm"):
                if op in (OpKind.CONV2D, OpKind.DWCONV2D):
                    self.post.append(nn.BatchNorm2d(n_out))
                else:
                    self.post.append(nn.BatchNorm1d(n_out))
            elif t in ("ln", "layernorm"):
                self.post.append(nn.LayerNorm(n_out))
            elif t in _ACTIVATIONS:
                self.post.append(_ACTIVATIONS[t]())
            else:  # add / mul: a marker, handled in forward
                self.post.append(nn.Identity())
        self.n_extra_inputs = sum(1 for t in self.tokens if t in _BINARY)

    def forward(self, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if self.layer is None:  # attention core
            b, s = x.shape[0], x.shape[1]
            h = spec.groups
            q = x.reshape(b, s, h, spec.out_channels // h).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, q, q)
            y = y.transpose(1, 2).reshape(b, s, spec.out_channels)
        else:
            y = self.layer(x)
        k = 0
        for t, mod in zip(self.tokens, self.post):
            if t == "add":
                y = y + others[k]
                k += 1
            elif t == "mul":
                y = y * others[k]
                k += 1
            elif isinstance(mod, nn.BatchNorm1d) and y.dim() > 3:
                y = mod(y.reshape(-1, y.shape[-1])).reshape(y.shape)
            elif isinstance(mod, nn.BatchNorm1d) and spec.op == OpKind.LINEAR and y.dim() == 3:
                y = mod(y.transpose(1, 2)).transpose(1, 2)
            else:
                y = mod(y)
        return y

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        spec = self.spec
        gen = torch.Generator().manual_seed(seed)
        if spec.op.is_conv:
            x_shape: tuple[int, ...] = (spec.batch, spec.in_channels, *spec.input_size)
            y_shape: tuple[int, ...] = (spec.batch, spec.out_channels, *spec.output_size)
        elif spec.op == OpKind.LINEAR:
            x_shape = (spec.batch, *spec.input_size, spec.in_channels)
            y_shape = (spec.batch, *spec.input_size, spec.out_channels)
        else:
            seq = math.prod(spec.input_size) if spec.input_size else 1
            x_shape = (spec.batch, seq, spec.out_channels)
            y_shape = x_shape
        x = torch.randn(x_shape, generator=gen)
        extra = tuple(torch.randn(y_shape, generator=gen) for _ in range(self.n_extra_inputs))
        return (x, *extra)


def build_micro_model(
    spec: LayerSpec, structure: Structure | str = Structure.NONE, density: float = 1.0,
    seed: int = 0,
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """(micro-model in eval mode with masked weights, example inputs) for one table entry."""
    structure = normalize_structure(structure)
    torch.manual_seed(seed)
    model = MicroModel(spec).eval()
    if structure in (Structure.NM, Structure.UNSTRUCTURED) and model.layer is not None:
        w = model.layer.weight
        # the masks apply_plan and fine-tuning give the same weight (magnitude, masks.py rules)
        if structure == Structure.NM:
            n, m = masks.nm_from_density(density)
            mask = masks.nm_mask(w.detach().abs(), n, m)
        else:
            mask = masks.unstructured_mask(w.detach().abs(), min(max(float(density), 0.0), 1.0))
        with torch.no_grad():
            w.mul_(mask.to(w.dtype))
    return model, model.example_inputs(seed)
