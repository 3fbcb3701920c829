"""Layer adapters: everything autoprune knows about one ``nn.Module`` type, in one class.

``analyze``, the dry-run check and the executor never test a module's type themselves; they
ask ``ADAPTERS.for_module(module)`` and call the adapter. An adapter of a weighted layer
(``LayerAdapter``) knows

- its *sublayers*: the ``LayerSpec`` rows it contributes (one for a conv / linear; an
  attention module contributes ``in_proj``, ``attention`` and ``out_proj``);
- its widths (``widths``: in / out channels and groups per sublayer, read off the module, so
  that a pruned module reads back what the plan asked for);
- its op kind and ``LayerSpec`` (the key of a latency-table entry) from the input shape the
  forward pass saw, and so its MACs / parameters at any widths (``count``);
- how a torch-pruning group maps onto it (``coupling``), whether it produces a group's
  channels (``is_producer``), how evenly its channels must shrink (``unit_partition``: groups
  of a grouped conv, heads of an attention module), and which parameter a mask goes on
  (``mask_param``).

Companion adapters describe parameter holders torch-pruning prunes along with the layers
around them (BatchNorm, LayerNorm, ...); unsupported adapters name layer types autoprune
refuses (with the reason, raised as ``UnsupportedLayerError`` naming the module).

A new layer type is one class registered with ``@register``; ``tests/test_adapters.py`` runs
every registered layer adapter through the same conformance checks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal, cast

import torch
from torch import nn

from autoprune.errors import UnknownNameError, UnsupportedLayerError
from autoprune.types import LayerSpec, OpKind

__all__ = [
    "ADAPTERS",
    "AdapterRegistry",
    "AttentionAdapter",
    "BatchNormAdapter",
    "CompanionAdapter",
    "ConvAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "ModuleAdapter",
    "UnsupportedAdapter",
    "Widths",
    "register",
]

#: how a torch-pruning group touches a sublayer: its input channels ("in", the group's
#: indices), its output channels ("out"), or every channel on both sides ("all")
Side = Literal["in", "out", "all"]

# the registry hands an adapter only modules of its ``module_types`` (or subclasses): its
# methods take ``nn.Module`` like the base class and ``cast`` to the types they cover
_Conv = nn.Conv1d | nn.Conv2d


@dataclass(frozen=True)
class Widths:
    """A sublayer's channel widths as the module holds them."""

    in_channels: int
    out_channels: int
    groups: int = 1


class ModuleAdapter:
    """Base of every adapter: the module types it covers and its registry name."""

    name: ClassVar[str] = ""
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def channel_gamma(self, module: nn.Module) -> torch.Tensor | None:
        """Per-channel scale the ``bn_gamma`` importance reads (None: the module has none)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(t.__name__ for t in self.module_types)})"


class UnsupportedAdapter(ModuleAdapter):
    """A weighted layer type autoprune does not model: analysing a model that uses it (and
    does not ``ignore=`` it) raises ``UnsupportedLayerError`` with ``reason``."""

    reason: ClassVar[str] = "not modelled"

    def refuse(self, path: str, module: nn.Module) -> UnsupportedLayerError:
        return UnsupportedLayerError(path, type(module).__name__, self.reason)


class CompanionAdapter(ModuleAdapter):
    """A parameter holder without its own latency-table row (normalisation, PReLU,
    embeddings): torch-pruning prunes its parameters along the channels of its neighbours."""


class LayerAdapter(ModuleAdapter, ABC):
    """A weighted layer: one or more ``LayerSpec`` rows, widths, coupling, masks."""

    #: the adapter models the module's child layers itself (an attention module reads its
    #: ``out_proj`` weights without calling it): children are not analysed on their own
    owns_children: ClassVar[bool] = False
    #: torch-pruning groups are enumerated from modules of this type (``root_module_types``)
    group_root: ClassVar[bool] = True
    #: suffixes of the layers a module contributes, in execution order ("" = the module itself)
    SUBLAYERS: ClassVar[tuple[str, ...]] = ("",)

    # --- shape ------------------------------------------------------------------------------
    def sublayers(self, module: nn.Module) -> tuple[str, ...]:
        """Suffixes of the layers this module contributes, in execution order ("" = itself)."""
        return self.SUBLAYERS

    @abstractmethod
    def widths(self, module: nn.Module) -> dict[str, Widths]:
        """Per sublayer, the widths the module holds now (after pruning: the pruned ones)."""

    @abstractmethod
    def op_kind(self, module: nn.Module, suffix: str = "") -> OpKind:
        """The operator family of a sublayer (the latency table's ``op``)."""

    @abstractmethod
    def layer_spec(
        self, module: nn.Module, suffix: str, input_shape: tuple[int, ...], dtype: str,
        fused: str = "",
    ) -> LayerSpec:
        """The ``LayerSpec`` of one sublayer, given the shape of the module's first input."""

    def check(self, module: nn.Module, path: str) -> None:
        """Raise ``UnsupportedLayerError`` for a configuration the adapter cannot model."""

    # --- derived --------------------------------------------------------------------------
    def layer_specs(
        self, module: nn.Module, input_shape: tuple[int, ...], dtype: str = "float32"
    ) -> dict[str, LayerSpec]:
        return {s: self.layer_spec(module, s, input_shape, dtype) for s in self.sublayers(module)}

    def specs_at(
        self, module: nn.Module, input_shape: tuple[int, ...], in_channels: int,
        out_channels: int, dtype: str = "float32",
    ) -> dict[str, LayerSpec]:
        """The sublayers' specs with the module's input / output channels at other widths
        (each sublayer scaled by the same share as the module's own in / out channels)."""
        dense = self.layer_specs(module, input_shape, dtype)
        w = self.widths(module)
        first, last = w[self.sublayers(module)[0]], w[self.sublayers(module)[-1]]
        out: dict[str, LayerSpec] = {}
        for s, spec in dense.items():
            cin = spec.in_channels * in_channels // first.in_channels
            cout = spec.out_channels * out_channels // last.out_channels
            out[s] = spec.with_channels(cin, cout)
        return out

    def count(
        self, module: nn.Module, input_shape: tuple[int, ...], in_channels: int | None = None,
        out_channels: int | None = None,
    ) -> tuple[int, int]:
        """(MACs, parameters) of the module's layers, at its widths or at the given ones."""
        w = self.widths(module)
        subs = self.sublayers(module)
        cin = w[subs[0]].in_channels if in_channels is None else in_channels
        cout = w[subs[-1]].out_channels if out_channels is None else out_channels
        specs = self.specs_at(module, input_shape, cin, cout)
        return sum(s.macs for s in specs.values()), sum(s.params for s in specs.values())

    # --- channel groups -------------------------------------------------------------------
    def coupling(self, module: nn.Module, is_in: bool, is_out: bool) -> tuple[tuple[str, Side], ...]:
        """Which sublayer sides a torch-pruning group item on this module touches, given
        whether its handler prunes the module's input and / or output channels."""
        if is_in and not is_out:
            return (("", "in"),)
        if is_out:
            return (("", "out"),)
        return ()

    def is_producer(self, module: nn.Module, suffix: str) -> bool:
        """True if the sublayer's output channels form the group (its weights get the masks)."""
        return True

    def unit_partition(self, module: nn.Module) -> int:
        """Equal partitions the module's channels must shrink evenly across (1: none)."""
        return 1

    def mask_param(self, module: nn.Module, suffix: str) -> tuple[str, nn.Parameter]:
        """(parameter path relative to the module, parameter) a sublayer's mask goes on."""
        if suffix:
            raise KeyError(f"{type(self).__name__} has no sublayer {suffix!r}")
        return "weight", cast(nn.Parameter, module.weight)


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d`` / ``nn.Conv2d``: plain, grouped (units shrink evenly per group) and
    depthwise (``groups == in == out``: the channels pass through, it produces none)."""

    name = "conv"
    module_types = (nn.Conv1d, nn.Conv2d)

    @staticmethod
    def is_depthwise(module: nn.Module) -> bool:
        module = cast(_Conv, module)
        return module.groups == module.in_channels == module.out_channels and module.groups > 1

    def widths(self, module: nn.Module) -> dict[str, Widths]:
        module = cast(_Conv, module)
        return {"": Widths(module.in_channels, module.out_channels, module.groups)}

    def op_kind(self, module: nn.Module, suffix: str = "") -> OpKind:
        dw = self.is_depthwise(module)
        if isinstance(module, nn.Conv1d):
            return OpKind.DWCONV1D if dw else OpKind.CONV1D
        return OpKind.DWCONV2D if dw else OpKind.CONV2D

    def layer_spec(
        self, module: nn.Module, suffix: str, input_shape: tuple[int, ...], dtype: str,
        fused: str = "",
    ) -> LayerSpec:
        module = cast(_Conv, module)
        nd = len(module.kernel_size)
        pad = module.padding
        if isinstance(pad, str):  # "same" / "valid"
            if pad == "valid":
                pad = (0,) * nd
            else:
                pad = tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
        return LayerSpec(
            op=self.op_kind(module), in_channels=module.in_channels,
            out_channels=module.out_channels, kernel=tuple(module.kernel_size),
            stride=tuple(module.stride), padding=tuple(pad), dilation=tuple(module.dilation),
            groups=module.groups, input_size=tuple(input_shape[2:]), batch=input_shape[0],
            dtype=dtype, bias=module.bias is not None, fused=fused,
        )

    def coupling(self, module: nn.Module, is_in: bool, is_out: bool) -> tuple[tuple[str, Side], ...]:
        if is_in and not is_out:
            return (("", "in"),)
        if self.is_depthwise(module):  # the group's channels pass through it
            return (("", "in"), ("", "out"))
        return super().coupling(module, is_in, is_out)

    def is_producer(self, module: nn.Module, suffix: str) -> bool:
        return not self.is_depthwise(module)

    def unit_partition(self, module: nn.Module) -> int:
        module = cast(_Conv, module)
        if module.groups > 1 and not self.is_depthwise(module):
            return int(module.groups)
        return 1


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` over any number of leading token dimensions."""

    name = "linear"
    module_types = (nn.Linear,)

    def widths(self, module: nn.Module) -> dict[str, Widths]:
        module = cast(nn.Linear, module)
        return {"": Widths(module.in_features, module.out_features)}

    def op_kind(self, module: nn.Module, suffix: str = "") -> OpKind:
        return OpKind.LINEAR

    def layer_spec(
        self, module: nn.Module, suffix: str, input_shape: tuple[int, ...], dtype: str,
        fused: str = "",
    ) -> LayerSpec:
        module = cast(nn.Linear, module)
        batch = input_shape[0] if len(input_shape) >= 2 else 1
        return LayerSpec(
            op=OpKind.LINEAR, in_channels=module.in_features, out_channels=module.out_features,
            input_size=tuple(input_shape[1:-1]), batch=batch, dtype=dtype,
            bias=module.bias is not None, fused=fused,
        )


class AttentionAdapter(LayerAdapter):
    """``nn.MultiheadAttention`` with a packed in-projection: three sublayers (``in_proj``
    linear e -> 3e, the ``attention`` core, ``out_proj`` linear e -> e); the embedding shrinks
    evenly per head (torch-pruning keeps the head count, the head size shrinks)."""

    name = "attention"
    module_types = (nn.MultiheadAttention,)
    owns_children = True
    group_root = False
    SUBLAYERS = ("in_proj", "attention", "out_proj")

    def widths(self, module: nn.Module) -> dict[str, Widths]:
        module = cast(nn.MultiheadAttention, module)
        w = module.in_proj_weight
        e = int(module.embed_dim)
        return {
            "in_proj": Widths(int(w.shape[1]), int(w.shape[0])),
            "attention": Widths(e, e, int(module.num_heads)),
            "out_proj": Widths(module.out_proj.in_features, module.out_proj.out_features),
        }

    def op_kind(self, module: nn.Module, suffix: str = "") -> OpKind:
        return OpKind.ATTENTION if suffix == "attention" else OpKind.LINEAR

    def check(self, module: nn.Module, path: str) -> None:
        module = cast(nn.MultiheadAttention, module)
        e = module.embed_dim
        if module.kdim != e or module.vdim != e or module.in_proj_weight is None:
            raise UnsupportedLayerError(
                path, type(module).__name__,
                "attention with separate key/value widths is not modelled",
            )

    def layer_spec(
        self, module: nn.Module, suffix: str, input_shape: tuple[int, ...], dtype: str,
        fused: str = "",
    ) -> LayerSpec:
        module = cast(nn.MultiheadAttention, module)
        first = bool(module.batch_first)
        batch, seq = (input_shape[0], input_shape[1]) if first else (input_shape[1], input_shape[0])
        e = module.embed_dim
        if suffix == "attention":
            return LayerSpec(OpKind.ATTENTION, e, e, groups=module.num_heads, input_size=(seq,),
                             batch=batch, dtype=dtype, bias=False)
        if suffix == "in_proj":
            return LayerSpec(OpKind.LINEAR, e, 3 * e, input_size=(seq,), batch=batch,
                             dtype=dtype, bias=module.in_proj_bias is not None)
        if suffix == "out_proj":
            return LayerSpec(OpKind.LINEAR, e, e, input_size=(seq,), batch=batch, dtype=dtype,
                             bias=module.out_proj.bias is not None)
        raise KeyError(f"nn.MultiheadAttention has no sublayer {suffix!r}")

    def coupling(self, module: nn.Module, is_in: bool, is_out: bool) -> tuple[tuple[str, Side], ...]:
        # the embedding is the input, the packed q/k/v and the output of every sublayer alike
        return tuple((s, "all") for s in self.sublayers(module))

    def is_producer(self, module: nn.Module, suffix: str) -> bool:
        return suffix != "attention"  # the core has no weights

    def unit_partition(self, module: nn.Module) -> int:
        module = cast(nn.MultiheadAttention, module)
        return int(module.num_heads)

    def mask_param(self, module: nn.Module, suffix: str) -> tuple[str, nn.Parameter]:
        module = cast(nn.MultiheadAttention, module)
        if suffix == "in_proj":
            return "in_proj_weight", module.in_proj_weight
        if suffix == "out_proj":
            return "out_proj.weight", cast(nn.Parameter, module.out_proj.weight)
        raise KeyError(f"the {suffix!r} sublayer of nn.MultiheadAttention has no weights")


class BatchNormAdapter(CompanionAdapter):
    name = "batchnorm"
    module_types = (nn.modules.batchnorm._BatchNorm,)

    def channel_gamma(self, module: nn.Module) -> torch.Tensor | None:
        module = cast(nn.modules.batchnorm._BatchNorm, module)
        return module.weight.detach() if module.weight is not None else None


class NormAdapter(CompanionAdapter):
    name = "norm"
    module_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


class ElementwiseParamAdapter(CompanionAdapter):
    name = "elementwise"
    module_types = (nn.PReLU, nn.Embedding)


class Conv3dAdapter(UnsupportedAdapter):
    name = "conv3d"
    module_types = (nn.Conv3d,)
    reason = "3-D and transposed convolutions are not modelled"


class ConvTransposeAdapter(UnsupportedAdapter):
    name = "conv_transpose"
    module_types = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    reason = "3-D and transposed convolutions are not modelled"


class AdapterRegistry:
    """Module type -> adapter; a module resolves to the adapter of the most specific
    registered class in its MRO (a subclass of ``nn.Conv2d`` is a conv)."""

    def __init__(self) -> None:
        self._by_type: dict[type[nn.Module], ModuleAdapter] = {}
        self._by_name: dict[str, ModuleAdapter] = {}

    def register(self, adapter: ModuleAdapter) -> ModuleAdapter:
        if not adapter.name or not adapter.module_types:
            raise ValueError(f"{type(adapter).__name__} needs a name and module_types")
        if adapter.name in self._by_name:
            raise ValueError(f"an adapter named {adapter.name!r} is registered already")
        for t in adapter.module_types:
            if t in self._by_type:
                raise ValueError(f"{t.__name__} has an adapter already: {self._by_type[t]!r}")
        self._by_name[adapter.name] = adapter
        for t in adapter.module_types:
            self._by_type[t] = adapter
        return adapter

    def for_module(self, module: nn.Module) -> ModuleAdapter | None:
        for cls in type(module).__mro__:
            a = self._by_type.get(cls)
            if a is not None:
                return a
        return None

    def layer(self, module: nn.Module) -> LayerAdapter | None:
        """The adapter of a weighted layer autoprune models, else None."""
        a = self.for_module(module)
        return a if isinstance(a, LayerAdapter) else None

    def unsupported(self, module: nn.Module) -> UnsupportedAdapter | None:
        a = self.for_module(module)
        return a if isinstance(a, UnsupportedAdapter) else None

    def is_known_param_holder(self, module: nn.Module) -> bool:
        """True for modules torch-pruning has a pruner for (layers and companions)."""
        a = self.for_module(module)
        return a is not None and not isinstance(a, UnsupportedAdapter)

    def root_module_types(self) -> tuple[type[nn.Module], ...]:
        return tuple(t for a in self.layer_adapters() if a.group_root for t in a.module_types)

    def sublayer_rank(self, suffix: str) -> int | None:
        """1-based position of a named sublayer in its adapter's ``SUBLAYERS`` (None: no
        registered adapter has a sublayer of that name)."""
        for a in self.layer_adapters():
            if suffix in a.SUBLAYERS and suffix:
                return a.SUBLAYERS.index(suffix) + 1
        return None

    def layer_adapters(self) -> list[LayerAdapter]:
        return [a for a in self._by_name.values() if isinstance(a, LayerAdapter)]

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> ModuleAdapter:
        if name not in self._by_name:
            raise UnknownNameError("layer adapter", name, self.names())
        return self._by_name[name]

    def __iter__(self) -> Iterator[ModuleAdapter]:
        return iter(list(self._by_name.values()))

    def resolve(self, model: nn.Module, layer_path: str) -> tuple[nn.Module, LayerAdapter, str]:
        """A spec layer path -> (module, its adapter, sublayer suffix): ``conv1`` is the conv
        itself; ``blocks.0.attn.in_proj`` is the attention module's ``in_proj`` sublayer."""
        base, _, suffix = layer_path.rpartition(".")
        if suffix:
            try:
                parent = model.get_submodule(base) if base else model
            except AttributeError:
                parent = None
            pa = self.layer(parent) if parent is not None else None
            if parent is not None and pa is not None and suffix in pa.sublayers(parent):
                return parent, pa, suffix
        try:
            mod = model.get_submodule(layer_path)
        except AttributeError as e:
            raise KeyError(f"no layer {layer_path!r} in {type(model).__name__}") from e
        a = self.layer(mod)
        if a is None:
            raise KeyError(f"{layer_path!r} ({type(mod).__name__}) is not a layer autoprune models")
        return mod, a, ""


#: the registry ``analyze`` and the executor use
ADAPTERS = AdapterRegistry()


def register(cls: type[ModuleAdapter]) -> type[ModuleAdapter]:
    """Class decorator: register one instance of ``cls`` in ``ADAPTERS``."""
    ADAPTERS.register(cls())
    return cls


for _cls in (ConvAdapter, LinearAdapter, AttentionAdapter, BatchNormAdapter, NormAdapter,
             ElementwiseParamAdapter, Conv3dAdapter, ConvTransposeAdapter):
    register(_cls)
del _cls
