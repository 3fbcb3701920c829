"""Kernel rules of a device: how channel counts change what a layer costs there.

Runtimes pick kernels by channel count. Measured on ONNX Runtime 1.32, one thread, an AVX2
EPYC VM (``benchmarks/bench_rules.py``; 3x3 conv at 28², BENCHMARKS.md "Kernel rules"):

* **output channels** step in blocks (57–64 outputs cost the same): a staircase, priced by
  rounding the output width *up* to ``out_step``;
* **input channels** off a multiple of ``in_step`` (4 there) run another kernel path and cost
  *more* than the next multiple (61 in: 0.95 ms, 64 in: 0.74 ms): priced as the fast path at
  the same width times ``in_penalty``; input widths *on* the step still pay for the vector
  block the runtime pads them to (``in_block``: 52 inputs cost what 64 cost on an AVX-512
  Xeon, where the block is 16 floats), so the fast path rounds them up to ``in_block``;
* **depthwise channels** off a multiple of ``dw_step`` (4 there) cost about 3x the fast path:
  ``dw_penalty``, at their *own* width (the plain kernel pads nothing: on the AVX-512 EPYC 49
  channels cost 0.081 ms and 63 cost 0.140, where the fast path prices both as 64);
* **grouped convolutions** (not depthwise) whose per-group width is off a multiple of
  ``group_step`` run the plain kernel (``group_penalty``): on the AVX-512 Xeon the step is the
  vector block itself (16: per-group 12 costs more than 16), as ONNX Runtime's NCHWc
  transformer requires of grouped convolutions (per-group input and output channels a multiple
  of the block); RegNet's group-width-16 convolutions pruned to 8–14 per group take it.

These are properties of the device and runtime, not of a model, so they are detected once per
device with fixed sweep layers (``detect_kernel_rules``), recorded with every table of that
device and cached per device (``cached_kernel_rules``): every model profiled on one device
gets the same rules. The search space snaps widths to ``alignment`` (the least common multiple
of the steps, so that a snapped width is on every fast path).

Detection fits, per axis and per candidate step ``a``, two models of latency against width:
a staircase ``α + β·ceil(w/a)·a`` and a penalty model — on-step widths on the staircase
``α + β·ceil(w/b)·b`` of a block ``b`` (a multiple of ``a``; ``b = a`` is no staircase), off-step
widths ``(α + β·w)·γ``; the model that leaves the smallest residual wins, and a step is only
accepted when it explains most of what a plain linear fit leaves (else the axis has no rule:
step 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from autoprune.errors import CorruptFileError
from autoprune.io import atomic_write_json, cache_dir, read_json
from autoprune.latency._memory import WeightStream, detect_weight_stream
from autoprune.measure import ProtocolSettings
from autoprune.types import LayerSpec, OpKind, Structure

if TYPE_CHECKING:
    from autoprune.backends.base import Backend

RULES_SCHEMA_VERSION = 1
STEP_CANDIDATES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
#: share of the linear fit's residual a step must explain to count as a rule
MIN_EXPLAINED = 0.35
#: a short protocol for sweeps (many tiny configurations, interleaved)
SWEEP_PROTOCOL = ProtocolSettings(warmup_runs=3, min_runs=15, max_runs=40, target_rel_iqr=0.03,
                                  time_cap_s=0.08, min_sample_ms=0.05)
#: widths each axis is swept at (two full periods of the largest usual block, off-centre)
SWEEP_WIDTHS: tuple[int, ...] = tuple(range(40, 81))
#: per-group widths the grouped-conv sweep runs at (three multiples of 16, every step below)
GROUP_SWEEP_WIDTHS: tuple[int, ...] = tuple(range(8, 57))


@dataclass(frozen=True)
class KernelRules:
    """Channel-count rules of one device (see the module docstring). Plain, JSON-friendly."""

    out_step: int = 1
    in_step: int = 1
    in_penalty: float = 1.0
    dw_step: int = 1
    dw_penalty: float = 1.0
    sweep: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: staircase step of input widths on the fast path (1: priced at their own width)
    in_block: int = 1
    #: per-group width step of grouped (not depthwise) 2-D convs, and the cost off it
    group_step: int = 1
    group_penalty: float = 1.0
    #: the device's weight-streaming curve (``autoprune.latency._memory``; None: not probed,
    #: e.g. a bundle exported without the probe chains): what a model pays once its weights
    #: outgrow the caches
    weight_stream: WeightStream | None = field(default=None, compare=False, hash=False)

    @property
    def alignment(self) -> int:
        """The width step that is on every fast path: lcm of the steps (at most 64)."""
        a = math.lcm(self.out_step, self.in_step, self.in_block, self.dw_step)
        return int(min(a, 64))

    # -- pricing rules -----------------------------------------------------------------------
    def effective(self, spec: LayerSpec) -> tuple[int, int, float]:
        """(in width, out width, cost factor) a layer is priced at: the output width rounded up
        to the staircase step, and a factor > 1 for the slow path a width off an input or
        depthwise step takes (1.0 on the fast path; a depthwise conv off its step keeps its own
        width). The factor multiplies the fast-path cost
        *at the same widths* (what ``fit_penalty`` measures it against).

        Only 2-D convolutions have input and depthwise rules (what the sweep measures); every
        layer gets the output staircase. A grouped (not depthwise) 2-D conv whose per-group
        input or output width is off a multiple of ``group_step`` takes the slow path (RegNet's
        group-width-16 convs pruned to 14 per group); its widths are kept as they are (rounding
        would break the division into groups). A plain 2-D conv's input width on the
        input step is rounded up to ``in_block`` (the padding of the blocked layout).
        """
        ci, co = int(spec.in_channels), int(spec.out_channels)
        g = int(spec.groups)
        if spec.op == OpKind.DWCONV2D:
            if self.dw_step > 1 and co % self.dw_step != 0:  # the plain kernel: no padding
                return co, co, self.dw_penalty
            c = _ceil(co, self.out_step)
            return c, c, 1.0
        if spec.op.is_depthwise:
            c = _ceil(co, self.out_step)
            return c, c, 1.0
        if spec.op == OpKind.CONV2D and g > 1:
            fast = self.fast_group_width(ci // g) and self.fast_group_width(co // g)
            return ci, co, 1.0 if fast else self.group_penalty
        co_eff = _ceil(co, self.out_step)
        if spec.op == OpKind.CONV2D:
            if self.in_step > 1 and ci > self.in_step and ci % self.in_step != 0:
                return ci, co_eff, self.in_penalty
            if ci % self.in_step == 0:  # on the fast path: padded to the vector block
                ci = _ceil(ci, self.in_block)
            return ci, co_eff, 1.0
        return ci, co_eff, 1.0

    def off_fast_path(self, spec: LayerSpec) -> bool:
        """Whether the layer runs a slow path at its widths (``effective``'s factor > 1)."""
        return self.effective(spec)[2] > 1.0

    def fast_group_width(self, per_group: int) -> bool:
        """Whether a grouped conv's per-group width is on its fast path."""
        return per_group > 0 and per_group % self.group_step == 0

    def is_fast_width(self, width: int, op: OpKind = OpKind.CONV2D) -> bool:
        """Whether a channel count sits on every fast path of ``op`` (no penalty, no padding)."""
        if width <= 0:
            return False
        steps = [self.out_step]
        if op == OpKind.CONV2D:
            steps += [self.in_step, self.in_block]
        if op == OpKind.DWCONV2D:
            steps.append(self.dw_step)
        return all(width % s == 0 for s in steps)

    # -- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_stream"] = self.weight_stream.to_dict() if self.weight_stream else None
        d["alignment"] = self.alignment
        d["schema_version"] = RULES_SCHEMA_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "kernel rules") -> KernelRules:
        """Rules from ``to_dict``'s output. Rules written before ``in_block`` existed are
        refitted from their own stored sweep (no measuring), or get ``in_block`` 1 without one;
        rules without a grouped-conv sweep apply the input rule per group (what they did)."""
        try:
            if int(d.get("schema_version", RULES_SCHEMA_VERSION)) != RULES_SCHEMA_VERSION:
                raise ValueError(f"schema_version {d.get('schema_version')!r}")
            sweep = dict(d.get("sweep") or {})
            if "in_block" not in d and all(k in sweep for k in ("widths", "in_ms", "out_ms",
                                                                  "dw_ms")):
                rules = rules_from_sweep(sweep["widths"], sweep["in_ms"], sweep["out_ms"],
                                         sweep["dw_ms"], min_step=int(sweep.get("min_step", 1)),
                                         group_widths=sweep.get("group_widths", ()),
                                         group_ms=sweep.get("group_ms", ()))
            else:
                rules = cls(out_step=int(d["out_step"]), in_step=int(d["in_step"]),
                            in_penalty=float(d["in_penalty"]), dw_step=int(d["dw_step"]),
                            dw_penalty=float(d["dw_penalty"]), sweep=sweep,
                            in_block=int(d.get("in_block", 1)),
                            group_step=int(d.get("group_step", d["in_step"])),
                            group_penalty=float(d.get("group_penalty", d["in_penalty"])))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{source}: malformed kernel rules ({e})") from None
        if d.get("weight_stream"):
            rules = replace(rules, weight_stream=WeightStream.from_dict(
                d["weight_stream"], source=source))
        if min(rules.out_step, rules.in_step, rules.in_block, rules.dw_step,
               rules.group_step) < 1 or \
                min(rules.in_penalty, rules.dw_penalty, rules.group_penalty) <= 0:
            raise CorruptFileError(f"{source}: kernel rule steps must be >= 1, penalties > 0")
        return rules

    def __str__(self) -> str:
        block = f", block {self.in_block}" if self.in_block > 1 else ""
        return (f"KernelRules(out step {self.out_step}, in step {self.in_step}{block} "
                f"(x{self.in_penalty:.2f} off it), depthwise step {self.dw_step} "
                f"(x{self.dw_penalty:.2f} off it), grouped per-group step {self.group_step} "
                f"(x{self.group_penalty:.2f} off it); search alignment {self.alignment}"
                + (f"; {self.weight_stream}" if self.weight_stream else "") + ")")


def _ceil(w: int, step: int) -> int:
    return int(math.ceil(w / step) * step) if step > 1 else int(w)


# ------------------------------------------------------------------------------------------
# Fitting
# ------------------------------------------------------------------------------------------
def _linear_rss(w: np.ndarray, y: np.ndarray) -> float:
    design = np.stack([np.ones_like(w), w], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(((design @ coef - y) ** 2).sum())


def staircase_rss(widths: Sequence[int], latency_ms: Sequence[float],
                  candidates: Sequence[int] = STEP_CANDIDATES) -> dict[int, float]:
    """Residual sum of squares of ``latency ≈ α + β·ceil(w/a)·a`` per candidate step ``a``
    (inf where the fitted slope is not positive: latency must grow with width)."""
    w = np.asarray(widths, dtype=float)
    y = np.asarray(latency_ms, dtype=float)
    rss: dict[int, float] = {}
    for a in candidates:
        x = np.ceil(w / a) * a
        design = np.stack([np.ones_like(x), x], axis=1)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        rss[int(a)] = float(((design @ coef - y) ** 2).sum()) if coef[1] > 0 else float("inf")
    return rss


def fit_staircase(widths: Sequence[int], latency_ms: Sequence[float],
                  candidates: Sequence[int] = STEP_CANDIDATES) -> tuple[int, dict[int, float]]:
    """The step ``a`` of ``latency ≈ α + β·ceil(w/a)·a`` (1: no staircase) and every
    candidate's residual sum of squares."""
    rss = staircase_rss(widths, latency_ms, candidates)
    w = np.asarray(widths, dtype=float)
    return _pick(rss, _linear_rss(w, np.asarray(latency_ms, dtype=float))), rss


def fit_penalty(widths: Sequence[int], latency_ms: Sequence[float],
                candidates: Sequence[int] = STEP_CANDIDATES
                ) -> tuple[int, float, dict[int, float]]:
    """The step ``a`` whose off-step widths cost a constant factor more than the line through
    the on-step widths, the factor (median of measured / line over off-step widths), and every
    candidate's residual sum of squares (no block staircase: ``fit_block_penalty``)."""
    step, _, factor, rss = fit_block_penalty(widths, latency_ms, candidates, blocks=False)
    return step, factor, rss


def fit_block_penalty(widths: Sequence[int], latency_ms: Sequence[float],
                      candidates: Sequence[int] = STEP_CANDIDATES, blocks: bool = True
                      ) -> tuple[int, int, float, dict[int, float]]:
    """(step ``a``, block ``b``, factor, residual per step) of the penalty model: on-step widths
    (multiples of ``a``) cost ``α + β·ceil(w/b)·b`` (``b`` a multiple of ``a``, ``b = a``: no
    staircase), off-step widths ``(α + β·w)·factor`` (the same line at their own width, times
    the factor: the median of measured / line over them). The residual per step is that of its
    best block. ``blocks=False``: ``b = a`` only."""
    w = np.asarray(widths, dtype=float)
    y = np.asarray(latency_ms, dtype=float)
    rss: dict[int, float] = {1: _linear_rss(w, y)}
    best_of: dict[int, tuple[int, float]] = {1: (1, 1.0)}
    for a in candidates:
        on = (w % a) == 0
        if a == 1:
            continue
        if on.sum() < 3 or (~on).sum() < 3:
            rss[int(a)] = float("inf")
            continue
        fits: dict[int, tuple[float, float]] = {}
        for b in (c for c in candidates if c % a == 0 and (blocks or c == a)):
            x = np.ceil(w[on] / b) * b
            if len(np.unique(x)) < 2:
                continue
            design = np.stack([np.ones(int(on.sum())), x], axis=1)
            coef, *_ = np.linalg.lstsq(design, y[on], rcond=None)
            line = coef[0] + coef[1] * w
            if coef[1] <= 0 or np.any(line <= 0):
                continue
            factor = float(np.median(y[~on] / line[~on]))
            pred = np.where(on, coef[0] + coef[1] * np.ceil(w / b) * b, line * factor)
            fits[int(b)] = (float(((pred - y) ** 2).sum()), factor)
        if not fits:
            rss[int(a)] = float("inf")
            continue
        least = min(r for r, _ in fits.values())
        # among blocks within 5% of the best, the smallest (the same tie rule as the steps)
        b = min(k for k, (r, _) in fits.items() if r <= least * 1.05 + 1e-15)
        rss[int(a)] = fits[b][0]
        best_of[int(a)] = (b, fits[b][1])
    step = _pick(rss, rss[1])
    block, factor = best_of.get(step, (1, 1.0))
    if factor <= 1.0:  # off-step widths are not dearer: no penalty rule
        return 1, 1, 1.0, rss
    return step, block, factor, rss


def _pick(rss: dict[int, float], linear_rss: float) -> int:
    finite = {a: r for a, r in rss.items() if math.isfinite(r)}
    if not finite:
        return 1
    # the smallest residual; among steps within 5% of it the smallest step (a step that is a
    # multiple of the true one fits its on-step widths just as well on noisy sweeps)
    best = min(finite.values())
    step = min(a for a, r in finite.items() if r <= best * 1.05 + 1e-15)
    if step > 1 and finite[step] > (1.0 - MIN_EXPLAINED) * linear_rss:
        return 1
    return step


# ------------------------------------------------------------------------------------------
# Detection
# ------------------------------------------------------------------------------------------
def sweep_layers() -> dict[str, LayerSpec]:
    """The fixed layers the sweep varies: a 3x3 conv 64→64 at 28² with ReLU (its input and its
    output axis), a 3x3 depthwise conv at 28² and a 3x3 grouped conv with 2 groups of 32 output
    channels at 28² (its per-group input width: latency is linear in it; ONNX Runtime's NCHWc
    transformer puts the same condition on both per-group widths, and ``effective`` applies the
    step to both). Fixed, so every model gets the same rules."""
    conv = LayerSpec(OpKind.CONV2D, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, (28, 28),
                     fused="relu")
    dw = LayerSpec(OpKind.DWCONV2D, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 64, (28, 28),
                   fused="relu")
    grp = LayerSpec(OpKind.CONV2D, 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 2, (28, 28),
                    fused="relu")
    return {"in": conv, "out": conv, "dw": dw, "group": grp}


def sweep_axes(widths: Sequence[int] = SWEEP_WIDTHS,
               group_widths: Sequence[int] = ()) -> dict[str, list[LayerSpec]]:
    """The sweep's layers per axis, in the order ``rules_from_sweep`` fits them: the input,
    output and depthwise axes at ``widths``, the grouped conv at per-group ``group_widths``
    (left out when empty)."""
    layers = sweep_layers()
    g, grp = layers["group"].groups, layers["group"]
    axes = {"in": [layers["in"].with_channels(w, layers["in"].out_channels) for w in widths],
            "out": [layers["out"].with_channels(layers["out"].in_channels, w) for w in widths],
            "dw": [layers["dw"].with_channels(w, w) for w in widths]}
    if len(group_widths):
        axes["group"] = [grp.with_channels(g * w, grp.out_channels) for w in group_widths]
    return axes


def sweep_items(widths: Sequence[int] = SWEEP_WIDTHS,
                group_widths: Sequence[int] = ()) -> list[tuple[LayerSpec, Structure, float]]:
    """``sweep_axes`` as one list of work items (axes in order)."""
    return [(s, Structure.NONE, 1.0) for specs in sweep_axes(widths, group_widths).values()
            for s in specs]


def rules_from_sweep(widths: Sequence[int], in_ms: Sequence[float], out_ms: Sequence[float],
                     dw_ms: Sequence[float], min_step: int = 1,
                     group_widths: Sequence[int] = (), group_ms: Sequence[float] = ()
                     ) -> KernelRules:
    """Fit ``KernelRules`` to the sweeps (medians over repeats, one value per width). Without a
    grouped-conv sweep (``group_widths``), grouped convs get the input rule per group."""
    out_step, out_rss = fit_staircase(widths, out_ms)
    in_step, in_block, in_pen, in_rss = fit_block_penalty(widths, in_ms)
    dw_step, dw_pen, dw_rss = fit_penalty(widths, dw_ms)
    sweep: dict[str, Any] = {
        "widths": [int(w) for w in widths],
        "in_ms": [round(float(v), 6) for v in in_ms],
        "out_ms": [round(float(v), 6) for v in out_ms],
        "dw_ms": [round(float(v), 6) for v in dw_ms],
        "rss": {"out": _jsonable(out_rss), "in": _jsonable(in_rss), "dw": _jsonable(dw_rss)},
        "layers": {k: v.to_dict() for k, v in sweep_layers().items()},
        "min_step": int(min_step),
    }
    group_step, group_pen = in_step, in_pen
    if len(group_widths):
        group_step, group_pen, g_rss = fit_penalty(group_widths, group_ms)
        sweep["group_widths"] = [int(w) for w in group_widths]
        sweep["group_ms"] = [round(float(v), 6) for v in group_ms]
        sweep["rss"]["group"] = _jsonable(g_rss)
    return KernelRules(out_step=max(out_step, int(min_step)), in_step=in_step,
                       in_penalty=round(in_pen, 4), dw_step=dw_step,
                       dw_penalty=round(dw_pen, 4), sweep=sweep,
                       in_block=in_block if in_block > in_step else 1,
                       group_step=group_step, group_penalty=round(group_pen, 4))


def _jsonable(rss: dict[int, float]) -> dict[str, float | None]:
    return {str(k): (v if math.isfinite(v) else None) for k, v in rss.items()}


def detect_kernel_rules(backend: Backend, repeats: int = 2, protocol: Any = None,
                        widths: Sequence[int] = SWEEP_WIDTHS,
                        group_widths: Sequence[int] = GROUP_SWEEP_WIDTHS) -> KernelRules:
    """Sweep the fixed layers on ``backend`` ``repeats`` times (interleaved; each width's
    median over repeats) and fit the rules (about 8 s per repeat on ORT CPU, 1 thread), then
    probe the weight-streaming curve (``detect_weight_stream``, about 20 s)."""
    axes = sweep_axes(widths, group_widths)
    items = sweep_items(widths, group_widths)
    old = backend.protocol
    backend.protocol = protocol or SWEEP_PROTOCOL
    try:
        runs = [[s.median_ms for s in backend.measure_layers(items)]
                for _ in range(max(1, int(repeats)))]
    finally:
        backend.protocol = old
    med = np.median(np.asarray(runs, dtype=float), axis=0)
    ms: dict[str, list[float]] = {}
    start = 0
    for axis, specs in axes.items():
        ms[axis], start = med[start:start + len(specs)].tolist(), start + len(specs)
    floor = int(getattr(backend, "min_alignment", 1) or 1)
    rules = rules_from_sweep(widths, ms["in"], ms["out"], ms["dw"], min_step=floor,
                             group_widths=group_widths, group_ms=ms.get("group", ()))
    return replace(rules, weight_stream=detect_weight_stream(backend))


def cached_kernel_rules(backend: Backend, cache: Any = None, refresh: bool = False
                        ) -> KernelRules:
    """The device's rules from ``<cache>/devices/<device_id>/kernel_rules.json``, detected and
    stored on first use (``cache`` default: ``autoprune.io.cache_dir()``; ``False``: detect
    every time, store nothing). ``refresh``: detect again and overwrite. Rules cached before
    the grouped-conv sweep existed are detected again (once); rules cached before the
    weight-streaming probe get the probe added (once)."""
    from pathlib import Path

    if cache is False:
        return detect_kernel_rules(backend)
    root = Path(cache) if cache is not None else cache_dir()
    path = root / "devices" / backend.device_info().device_id / "kernel_rules.json"
    if path.exists() and not refresh:
        rules = KernelRules.from_dict(read_json(path), source=str(path))
        if "group_widths" in rules.sweep:
            if rules.weight_stream is not None:
                return rules
            rules = replace(rules, weight_stream=detect_weight_stream(backend))
            atomic_write_json(path, {**rules.to_dict(), "device": backend.device_info().to_dict()})
            return rules
    rules = detect_kernel_rules(backend)
    atomic_write_json(path, {**rules.to_dict(), "device": backend.device_info().to_dict()})
    return rules


__all__ = ["GROUP_SWEEP_WIDTHS", "KernelRules", "cached_kernel_rules", "detect_kernel_rules",
           "fit_block_penalty", "fit_penalty", "fit_staircase", "rules_from_sweep", "sweep_axes",
           "sweep_items"]
