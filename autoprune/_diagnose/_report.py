"""``diagnose``: where a pruned model's time goes on a device, layer by layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from autoprune._diagnose._context import Context, build_context
from autoprune.types import LayerSpec, OpKind

if TYPE_CHECKING:
    import pandas as pd

    from autoprune.latency._table import LatencyTable
    from autoprune.plan import PruningPlan

LAYER_COLUMNS = (
    "layer", "op", "in_before", "in_after", "out_before", "out_after", "macs_before",
    "macs_after", "latency_before_ms", "latency_after_ms", "in_fast", "out_fast", "fast",
    "misaligned", "in_down", "out_down", "latency_down_ms", "in_up", "out_up", "latency_up_ms",
    "share", "weight_zero_share", "zero_out_channels",
)


@dataclass
class DiagnosisReport:
    """Per-layer latency of a pruned model against its reference on one device.

    ``layers``: one row per layer (columns ``LAYER_COLUMNS``: widths before/after, MACs,
    table latency before/after, whether the widths are on the device's fast path, the
    latency at the nearest fast widths below (``*_down``) and above (``*_up``), the layer's
    share of the pruned model's table total, and its weight zeros). ``plan`` reproduces the
    pruned model's widths. Whole-model latencies are measured (NaN with ``measure=False``);
    ``latency_ratio`` is the paired median of pruned / dense time, ``ratio_iqr`` its spread.
    """

    device: str
    layers: pd.DataFrame
    plan: PruningPlan
    kept_units: dict[str, int]
    dense_predicted_ms: float
    pruned_predicted_ms: float
    dense_latency_ms: float = math.nan
    pruned_latency_ms: float = math.nan
    latency_ratio: float = math.nan
    ratio_iqr: float = math.nan
    masked: bool = False
    masked_layers: list[str] = field(default_factory=list)
    accelerated_structures: list[str] = field(default_factory=list)
    kernel_rules: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def misaligned(self) -> list[str]:
        """Layers whose pruned widths are off the device's fast path."""
        return [str(x) for x in self.layers.loc[self.layers["misaligned"], "layer"]]

    @property
    def speedup(self) -> float:
        """Measured dense / pruned time (>1: the pruned model is faster)."""
        return 1.0 / self.latency_ratio if self.latency_ratio > 0 else math.nan

    def summary_lines(self) -> list[str]:
        lines = [f"diagnosis on {self.device} ({self.kernel_rules})"]
        if math.isfinite(self.latency_ratio):
            lines.append(
                f"measured: dense {self.dense_latency_ms:.4g} ms, pruned "
                f"{self.pruned_latency_ms:.4g} ms; paired ratio pruned/dense "
                f"{self.latency_ratio:.3f} (IQR {self.ratio_iqr:.3f}) -> "
                f"{'faster' if self.latency_ratio < 1 else 'NOT faster'} than dense")
        macs_b, macs_a = int(self.layers["macs_before"].sum()), int(self.layers["macs_after"].sum())
        lines.append(
            f"table: dense {self.dense_predicted_ms:.4g} ms, pruned "
            f"{self.pruned_predicted_ms:.4g} ms; MACs {macs_a / 1e6:.2f}M of "
            f"{macs_b / 1e6:.2f}M ({macs_a / max(macs_b, 1):.0%})")
        mis = self.misaligned
        if mis:
            cost = float(self.layers.loc[self.layers["misaligned"], "latency_after_ms"].sum())
            lines.append(f"{len(mis)} layers off the fast path ({cost:.4g} ms of the table "
                         f"total): {', '.join(mis[:6])}{' ...' if len(mis) > 6 else ''}")
        else:
            lines.append("every pruned width is on the device's fast path")
        lines.extend(self.notes)
        return lines

    def __str__(self) -> str:
        cols = ["layer", "op", "in_after", "out_after", "latency_before_ms", "latency_after_ms",
                "fast", "latency_down_ms", "latency_up_ms", "share"]
        df = self.layers[cols].copy()
        df["share"] = (df["share"] * 100).round(1).astype(str) + "%"
        with _pd().option_context("display.width", 160, "display.max_rows", 400,
                                  "display.float_format", "{:.4g}".format):
            table = df.to_string(index=False)
        return "\n".join([*self.summary_lines(), "", table])

    def _repr_html_(self) -> str:
        import html

        head = "<br>".join(html.escape(x) for x in self.summary_lines())
        body = self.layers.to_html(index=False, float_format="{:.4g}".format)
        return f"<div><p>{head}</p>{body}</div>"

    def plot(self, path: str | Path) -> Path:
        """Write a bar chart PNG of per-layer latency, dense vs pruned; returns the path."""
        from autoprune.visualization import plot_layer_latency

        return plot_layer_latency(self, path)


def _pd() -> Any:
    import pandas as pd

    return pd


def _ceil(w: int, s: int) -> int:
    return -(-w // s) * s


def _steps(rules: Any, spec: LayerSpec) -> tuple[int, int]:
    """(input step, output step) of a layer's fast path."""
    if spec.op == OpKind.DWCONV2D:
        s = math.lcm(rules.out_step, rules.dw_step)
        return s, s
    if spec.op == OpKind.CONV2D and spec.groups == 1:
        return math.lcm(rules.in_step, rules.in_block), rules.out_step
    return 1, rules.out_step


def _round(w: int, step: int, dense: int, up: bool) -> int:
    if step <= 1 or w % step == 0 or w < step:
        return w
    return min(_ceil(w, step), dense) if up else max(step, (w // step) * step)


def layer_rows(ctx: Context) -> list[dict[str, Any]]:
    rules = ctx.rules
    after = {p.name: p for p in ctx.spec.pruned_layers(ctx.plan)}
    rows: list[dict[str, Any]] = []
    for name, lay in ctx.spec.layers.items():
        before, pl = lay.spec, after[name]
        sp = pl.spec
        si, so = _steps(rules, sp)
        in_fast = rules.effective(sp)[2] <= 1.0 and (  # no slow path, no block padding
            sp.op != OpKind.CONV2D or sp.groups > 1 or sp.in_channels % si == 0)
        out_fast = so <= 1 or sp.out_channels % so == 0
        pruned_in = sp.in_channels != before.in_channels
        pruned_out = sp.out_channels != before.out_channels
        fast = in_fast and out_fast
        misaligned = (not in_fast and pruned_in) or (not out_fast and pruned_out)
        down = [_round(sp.in_channels, si, before.in_channels, False) if pruned_in
                else sp.in_channels,
                _round(sp.out_channels, so, before.out_channels, False) if pruned_out
                else sp.out_channels]
        up = [_round(sp.in_channels, si, before.in_channels, True) if pruned_in
              else sp.in_channels,
              _round(sp.out_channels, so, before.out_channels, True) if pruned_out
              else sp.out_channels]
        if sp.op.is_depthwise:
            down[0], up[0] = down[1], up[1]
        w = ctx.widths[name]
        rows.append({
            "layer": name, "op": sp.op.value,
            "in_before": before.in_channels, "in_after": sp.in_channels,
            "out_before": before.out_channels, "out_after": sp.out_channels,
            "macs_before": before.macs, "macs_after": sp.macs,
            "latency_before_ms": ctx.price(before),
            "latency_after_ms": ctx.price(sp, pl.structure, pl.density),
            "in_fast": in_fast, "out_fast": out_fast, "fast": fast, "misaligned": misaligned,
            "in_down": down[0], "out_down": down[1],
            "latency_down_ms": ctx.price(sp.with_channels(*down), pl.structure, pl.density),
            "in_up": up[0], "out_up": up[1],
            "latency_up_ms": ctx.price(sp.with_channels(*up), pl.structure, pl.density),
            "weight_zero_share": w.weight_zero_share, "zero_out_channels": w.zero_out_channels,
        })
    after_ms = [float(r["latency_after_ms"]) for r in rows]
    total = sum(after_ms) or 1.0
    for r, ms in zip(rows, after_ms):
        r["share"] = ms / total
    return rows


def mask_notes(ctx: Context) -> list[str]:
    masked = ctx.masked_layers
    if not masked:
        return []
    helps = ctx.structures_that_help()
    nm = "accelerated" if ctx.backend.accelerates("nm") else "not accelerated"
    return [
        f"{len(masked)} layers carry masked or zeroed weights ({', '.join(masked[:4])}"
        f"{' ...' if len(masked) > 4 else ''}): masks give no speed on {ctx.device} (unstructured "
        f"sparsity runs dense there; 2:4 is {nm}); structures that would: {', '.join(helps)}. "
        "Remove whole channels instead (autoprune.apply_plan with structure='channel', or "
        "autoprune.repair on a channel-pruned model).",
    ]


def diagnose(pruned: nn.Module, reference: nn.Module, example_inputs: Any,
             device: Any = "onnxruntime-cpu", table: LatencyTable | None = None,
             measure: bool = True) -> DiagnosisReport:
    """Where the time of ``pruned`` goes on ``device``, layer by layer, against ``reference``
    (the dense model it was pruned from; by any tool: Torch-Pruning's physically smaller
    layers, ``torch.nn.utils.prune`` masks, zeroed weights).

    ``device``: a backend name or a ``Backend``. ``table``: the REFERENCE's latency table on
    that device (default: ``autoprune.profile(reference, ...)``, reused from the per-user
    cache). ``measure``: also time both whole models on the device, paired. A pruned model
    whose structure differs from the reference is a ``ModelMismatchError`` naming the first
    module that differs."""
    ctx = build_context(pruned, reference, example_inputs, device, table)
    import pandas as pd

    rows = layer_rows(ctx)
    layers = pd.DataFrame(rows, columns=list(LAYER_COLUMNS))
    report = DiagnosisReport(
        device=ctx.device, layers=layers, plan=ctx.plan, kept_units=dict(ctx.kept),
        dense_predicted_ms=float(layers["latency_before_ms"].sum()),
        pruned_predicted_ms=float(layers["latency_after_ms"].sum()),
        masked=bool(ctx.masked_layers), masked_layers=ctx.masked_layers,
        accelerated_structures=ctx.structures_that_help(), kernel_rules=str(ctx.rules),
        notes=mask_notes(ctx),
    )
    if report.misaligned:
        report.notes.append("autoprune.repair(...) rounds each group to the device's fast "
                            "widths and measures the result")
    if measure:
        dense_s, pruned_s = ctx.backend.measure_interleaved([reference, ctx.runnable],
                                                            ctx.inputs)
        ratio, iqr = ctx.backend.measure_ratio(ctx.runnable, reference, ctx.inputs)
        report.dense_latency_ms = float(dense_s.median_ms)
        report.pruned_latency_ms = float(pruned_s.median_ms)
        report.latency_ratio, report.ratio_iqr = float(ratio), float(iqr)
    return report
