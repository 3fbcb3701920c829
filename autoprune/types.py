"""Core data types shared by every stage: plain, typed, serialisable.

``LayerSpec`` is the key of a latency-table entry; ``ModelSpec`` is what ``analyze`` returns
and what a ``PruningPlan`` is validated against. ``ModelSpec.pruned_layers(plan)`` turns a
plan into the exact per-layer shapes the pruned model will run with, so the predictor and the
search never need to touch the model itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from autoprune.errors import InvalidInputError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from autoprune.plan import PruningPlan


def keep_units(units: int, keep_ratio: float, alignment: int = 1, minimum: int = 1) -> int:
    """Units kept of ``units`` at ``keep_ratio``, snapped to a multiple of ``alignment``.

    The full width is always allowed (it is what the model has); any smaller width is rounded
    to the nearest multiple of ``alignment`` (at least one multiple). A group narrower than the
    alignment rounds to the nearest unit instead. The result is never below ``minimum``.
    """
    if units <= 0:
        return units
    k = max(1, round(units * keep_ratio))
    if k >= units:
        return units
    if alignment > 1 and units > alignment:
        k = max(alignment, int(round(k / alignment)) * alignment)
        k = min(k, units)
    return max(min(minimum, units), k)


class Structure(str, Enum):
    """How a group is pruned."""

    NONE = "none"  #: left dense
    CHANNEL = "channel"  #: channels physically removed (torch-pruning)
    NM = "nm"  #: N:M semi-structured mask (2:4 by default) on the producing layers' weights
    UNSTRUCTURED = "unstructured"  #: element-wise mask at an exact sparsity
    BLOCK = "block"  #: a residual block replaced by its identity shortcut

    def __str__(self) -> str:
        return self.value


class OpKind(str, Enum):
    """Operator families a ``LayerSpec`` can describe."""

    CONV1D = "conv1d"
    CONV2D = "conv2d"
    DWCONV1D = "dwconv1d"  #: depthwise: groups == in_channels == out_channels
    DWCONV2D = "dwconv2d"
    LINEAR = "linear"  #: applied to ``input_size`` tokens (() for a plain vector)
    ATTENTION = "attention"  #: scaled-dot-product core of multi-head attention (no weights)

    def __str__(self) -> str:
        return self.value

    @property
    def is_conv(self) -> bool:
        return self in (OpKind.CONV1D, OpKind.CONV2D, OpKind.DWCONV1D, OpKind.DWCONV2D)

    @property
    def is_depthwise(self) -> bool:
        return self in (OpKind.DWCONV1D, OpKind.DWCONV2D)


def _prod(xs: tuple[int, ...]) -> int:
    return math.prod(xs) if xs else 1


@dataclass(frozen=True)
class LayerSpec:
    """Shape of one layer as the runtime executes it; hashable, the key of a table entry.

    ``fused`` names the ops the runtime fuses into this layer ("bn+relu", "bn+add+relu", ...),
    so that the table measures the block the way it really runs.
    For ``ATTENTION``, ``in_channels`` is the embedding width, ``out_channels`` the number of
    heads x head size, ``groups`` the number of heads and ``input_size`` the sequence length.
    """

    op: OpKind
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    input_size: tuple[int, ...] = ()
    batch: int = 1
    dtype: str = "float32"
    bias: bool = True
    fused: str = ""

    # --- derived -------------------------------------------------------------------------
    @property
    def output_size(self) -> tuple[int, ...]:
        if not self.op.is_conv:
            return self.input_size
        out = []
        for i, n in enumerate(self.input_size):
            k, s, p, d = self.kernel[i], self.stride[i], self.padding[i], self.dilation[i]
            out.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(out)

    @property
    def params(self) -> int:
        if self.op == OpKind.ATTENTION:
            return 0
        w = self.out_channels * (self.in_channels // self.groups) * _prod(self.kernel)
        return w + (self.out_channels if self.bias else 0)

    @property
    def tap_fraction(self) -> float:
        """Share of the kernel's taps that meet the input at some output position: 1.0 but for
        a conv whose input is smaller than its kernel's reach. ONNX Runtime's CPU convolutions
        never read a tap that only ever meets padding: a 3x3 conv at 1x1 spatial size (padding
        1) multiplies its centre tap only (four 3x3 512->512 convs at 1x1 cost 0.20 ms against
        5.0 ms at 2x2 on the Zen 2 VM: ``benchmarks/bench_taps.py``, BENCHMARKS.md "A fourth
        device")."""
        if not self.op.is_conv or not self.kernel or len(self.input_size) != len(self.kernel):
            return 1.0
        frac = 1.0
        for i, (n, n_out) in enumerate(zip(self.input_size, self.output_size)):
            k, s, p, d = self.kernel[i], self.stride[i], self.padding[i], self.dilation[i]
            if n_out <= 0:
                return 1.0
            used = 0
            for t in range(k):  # tap t reads input o*s - p + t*d of output o
                lo, hi = p - t * d, n - 1 + p - t * d  # o*s must lie in [lo, hi]
                o = max(0, -(-lo // s))
                used += int(o <= n_out - 1 and o * s <= hi)
            frac *= used / k
        return frac

    @property
    def touched_params(self) -> float:
        """Parameters a forward pass reads: the weights of the taps that meet the input
        (``tap_fraction``) and the bias."""
        bias = self.out_channels if self.bias and self.op != OpKind.ATTENTION else 0
        return (self.params - bias) * self.tap_fraction + bias

    @property
    def macs(self) -> int:
        if self.op == OpKind.ATTENTION:
            seq = _prod(self.input_size)
            return 2 * self.batch * seq * seq * self.out_channels
        per_pos = self.out_channels * (self.in_channels // self.groups) * _prod(self.kernel)
        return self.batch * per_pos * _prod(self.output_size)

    @property
    def activation_elems(self) -> int:
        """Elements read and written (input + output activations)."""
        return self.batch * (
            self.in_channels * _prod(self.input_size) + self.out_channels * _prod(self.output_size)
        )

    def with_channels(self, in_channels: int, out_channels: int) -> LayerSpec:
        """The same layer at other widths (a depthwise conv keeps groups == channels)."""
        groups = self.groups
        if self.op.is_depthwise:
            groups = out_channels
            in_channels = out_channels
        elif self.op == OpKind.ATTENTION:
            # torch-pruning shrinks nn.MultiheadAttention along the embedding, evenly per head:
            # the head count stays whenever it divides the new width (head size shrinks)
            if out_channels % self.groups != 0:
                head = self.out_channels // self.groups
                groups = max(1, out_channels // head)
        return dataclasses.replace(
            self, in_channels=in_channels, out_channels=out_channels, groups=groups
        )

    def key(self) -> str:
        """Stable text key (used in tables and caches); computed once per instance."""
        cached = self.__dict__.get("_key")
        if cached is None:
            cached = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
            object.__setattr__(self, "_key", cached)  # frozen: cache outside the fields
        return cached

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["op"] = self.op.value
        for k in ("kernel", "stride", "padding", "dilation", "input_size"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        d = dict(d)
        d["op"] = OpKind(d["op"])
        for k in ("kernel", "stride", "padding", "dilation", "input_size"):
            d[k] = tuple(int(v) for v in d.get(k, ()))
        return cls(**d)


# A channel dimension is a concatenation of segments; each segment either belongs to a
# prunable group (its channel count scales with the group's kept units) or is fixed (None).
Segment = tuple["str | None", int]


@dataclass(frozen=True)
class Layer:
    """One layer of the analysed model: module path, dense shape, and how plans resize it."""

    name: str
    spec: LayerSpec
    in_segments: tuple[Segment, ...]
    out_segments: tuple[Segment, ...]
    #: name of the block group this layer lives in (dropped with it), if any
    block: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "in_segments": [list(s) for s in self.in_segments],
            "out_segments": [list(s) for s in self.out_segments],
            "block": self.block,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layer:
        return cls(
            name=d["name"],
            spec=LayerSpec.from_dict(d["spec"]),
            in_segments=tuple((g, int(c)) for g, c in d["in_segments"]),
            out_segments=tuple((g, int(c)) for g, c in d["out_segments"]),
            block=d.get("block"),
        )


@dataclass(frozen=True)
class PrunableGroup:
    """A set of coupled channels (or one residual block) that is pruned as a unit.

    ``units`` counts what a keep amount refers to (channels, or attention heads with
    ``unit_size`` channels each). ``producers`` are the layers whose output channels form the
    group; ``nm`` and ``unstructured`` masks go on their weights. ``members`` are every layer
    touched when the group's channels are removed.
    """

    name: str
    kind: str  # "channel" or "block"
    units: int
    allowed: tuple[Structure, ...]
    producers: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    unit_size: int = 1
    min_units: int = 1
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["allowed"] = [s.value for s in self.allowed]
        d["producers"], d["members"] = list(self.producers), list(self.members)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunableGroup:
        d = dict(d)
        d["allowed"] = tuple(Structure(s) for s in d["allowed"])
        d["producers"], d["members"] = tuple(d["producers"]), tuple(d["members"])
        return cls(**d)


@dataclass(frozen=True)
class PrunedLayer:
    """A layer's shape and structure under a plan (what the latency table is asked for)."""

    name: str
    spec: LayerSpec
    structure: Structure  # NONE, NM or UNSTRUCTURED (channel pruning is in the spec's widths)
    density: float = 1.0  # kept share of weights for NM / UNSTRUCTURED


@dataclass
class ModelSpec:
    """What ``analyze`` found in a model: layers, prunable groups, fixed parts."""

    model_name: str
    input_shapes: list[tuple[int, ...]]
    layers: dict[str, Layer]
    groups: dict[str, PrunableGroup]
    #: module path -> reason it is kept unpruned (classifier output, ignored module, ...);
    #: for people to read: code asks ``ignored``
    fixed: dict[str, str] = field(default_factory=dict)
    #: module paths the user passed as ``analyze(..., ignore=...)``, in that order: they and
    #: everything coupled to them stay unpruned, and the executor leaves them out of its
    #: dependency graphs the same way (a spec saved before this field loads with ``()``)
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ignored: str | Iterable[object] = self.ignored  # whatever the caller passed
        if isinstance(ignored, str) or not all(isinstance(p, str) for p in ignored):
            raise InvalidInputError(
                f"ModelSpec.ignored must be a tuple of module paths, got {self.ignored!r}; "
                "pass e.g. ignored=('blocks.0.attn',)"
            )
        self.ignored = tuple(self.ignored)

    @property
    def fingerprint(self) -> str:
        """Hash of the model's layer shapes and groups: a plan records it to catch mix-ups.

        It keys latency tables and measured-plan datasets on disk, so it covers only layers
        and groups: ``fixed`` and ``ignored`` are left out (what ``ignore=`` changes shows in
        the groups already)."""
        payload = json.dumps(
            {
                "layers": [[n, lay.spec.key()] for n, lay in self.layers.items()],
                "groups": sorted([g.name, g.kind, g.units] for g in self.groups.values()),
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def feeds_grouped_conv(self, group: str) -> bool:
        """Whether a channel group's units are per-group widths of a grouped (not depthwise)
        2-D conv (``KernelRules.group_step`` governs them)."""
        g = self.groups[group]
        if g.unit_size <= 1:
            return False
        return any(n in self.layers and self.layers[n].spec.op == OpKind.CONV2D
                   and self.layers[n].spec.groups > 1 for n in (*g.producers, *g.members))

    def kept_units(self, plan: PruningPlan) -> dict[str, int]:
        """Units each channel group keeps under ``plan`` (after alignment rounding)."""
        out: dict[str, int] = {}
        for g in self.groups.values():
            if g.kind != "channel":
                continue
            gp = plan.groups.get(g.name)
            if gp is None or gp.structure != Structure.CHANNEL:
                out[g.name] = g.units
            else:
                out[g.name] = keep_units(
                    g.units, gp.keep_ratio, plan.alignment_for(g), minimum=g.min_units
                )
        return out

    def pruned_layers(self, plan: PruningPlan) -> list[PrunedLayer]:
        """Every layer's spec under ``plan``; layers of removed blocks are left out."""
        kept = self.kept_units(plan)
        removed_blocks = {
            name for name, gp in plan.groups.items() if gp.structure == Structure.BLOCK
        }
        mask_of: dict[str, tuple[Structure, float]] = {}
        for name, gp in plan.groups.items():
            if gp.structure in (Structure.NM, Structure.UNSTRUCTURED) and name in self.groups:
                for p in self.groups[name].producers:
                    mask_of[p] = (gp.structure, gp.density)

        def width(segments: tuple[Segment, ...]) -> int:
            total = 0
            for gname, ch in segments:
                if gname is None or gname not in kept:
                    total += ch
                else:
                    g = self.groups[gname]
                    total += ch * kept[gname] // g.units
            return total

        result = []
        for lay in self.layers.values():
            if lay.block is not None and lay.block in removed_blocks:
                continue
            spec = lay.spec.with_channels(width(lay.in_segments), width(lay.out_segments))
            structure, density = mask_of.get(lay.name, (Structure.NONE, 1.0))
            result.append(PrunedLayer(lay.name, spec, structure, density))
        return result

    def count(self, plan: PruningPlan | None = None) -> tuple[int, int]:
        """(MACs, parameters) of the analysed layers under ``plan`` (dense if None).

        Masked weights (nm / unstructured) still count: they are stored and, on most devices,
        computed. Normalisation layers and biases outside conv/linear layers are not counted.
        """
        if plan is None:
            layers = [PrunedLayer(n, lay.spec, Structure.NONE) for n, lay in self.layers.items()]
        else:
            layers = self.pruned_layers(plan)
        return sum(p.spec.macs for p in layers), sum(p.spec.params for p in layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "input_shapes": [list(s) for s in self.input_shapes],
            "layers": [lay.to_dict() for lay in self.layers.values()],
            "groups": [g.to_dict() for g in self.groups.values()],
            "fixed": dict(self.fixed),
            "ignored": list(self.ignored),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        layers = [Layer.from_dict(x) for x in d["layers"]]
        groups = [PrunableGroup.from_dict(x) for x in d["groups"]]
        return cls(
            model_name=d["model_name"],
            input_shapes=[tuple(s) for s in d["input_shapes"]],
            layers={lay.name: lay for lay in layers},
            groups={g.name: g for g in groups},
            fixed=dict(d.get("fixed", {})),
            ignored=tuple(d.get("ignored", ())),
        )

    def __repr__(self) -> str:
        n_ch = sum(1 for g in self.groups.values() if g.kind == "channel")
        n_bl = len(self.groups) - n_ch
        macs, params = self.count()
        return (
            f"ModelSpec({self.model_name}: {len(self.layers)} layers, {n_ch} channel groups, "
            f"{n_bl} removable blocks, {macs / 1e6:.1f} MMACs, {params / 1e6:.2f} M params)"
        )


@dataclass(frozen=True)
class DeviceInfo:
    """Fingerprint of where a number was measured. Two tables merge only if ``device_id`` matches."""

    backend: str
    device_name: str  # CPU model string or GPU name
    arch: str  # x86_64, aarch64, sm_90 ...
    runtime: str  # "onnxruntime 1.23.2", "tensorrt 10.x", "torch 2.14.1+cu128"
    threads: int = 1
    precision: str = "float32"
    isa_flags: tuple[str, ...] = ()  # avx512f, avx2, neon, sve ...
    driver: str = ""
    clocks: str = ""
    extra: tuple[tuple[str, str], ...] = ()  # backend options that change timings

    @property
    def device_id(self) -> str:
        """Directory-safe id: readable prefix + hash of every field that affects timings.

        ARM devices (``arch`` aarch64/arm64/armv*) carry the architecture in the prefix
        (``onnxruntime-cpu_aarch64_arm-cortex-a72_t1_float32_<hash>``) so an ARM table is
        told apart from an x86 one at a glance; other ids keep their original form."""
        payload = json.dumps(self.to_dict(), sort_keys=True)
        h = hashlib.sha256(payload.encode()).hexdigest()[:10]
        name = "".join(c if c.isalnum() else "-" for c in self.device_name.lower())
        name = "-".join(p for p in name.split("-") if p)[:40]
        if self.is_arm:
            arch = "".join(c if c.isalnum() else "-" for c in self.arch.lower())
            name = f"{arch}_{name}"
        return f"{self.backend}_{name}_t{self.threads}_{self.precision}_{h}"

    @property
    def is_arm(self) -> bool:
        """Whether the device is an ARM CPU (by ``arch``: aarch64, arm64, armv7l, ...)."""
        a = self.arch.lower()
        return a in ("aarch64", "arm64") or a.startswith("armv")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["isa_flags"] = list(self.isa_flags)
        d["extra"] = {k: v for k, v in self.extra}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceInfo:
        d = dict(d)
        d["isa_flags"] = tuple(d.get("isa_flags", ()))
        d["extra"] = tuple(sorted((str(k), str(v)) for k, v in dict(d.get("extra", {})).items()))
        return cls(**d)

    def diff(self, other: DeviceInfo) -> list[str]:
        """Names of the fields that differ (for 'table from another device' messages)."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b.get(k)]


@dataclass(frozen=True)
class LatencySample:
    """One measurement: median and spread (interquartile range) in milliseconds."""

    median_ms: float
    iqr_ms: float
    n_runs: int
    min_ms: float = float("nan")

    @property
    def spread(self) -> float:
        """Relative spread: IQR / median."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("nan")

    def __str__(self) -> str:
        return f"{self.median_ms:.4g} ms ± {100 * self.spread:.1f}% (IQR, n={self.n_runs})"
