"""``PipelineReport``: what ``run_pipeline`` found; ``str(report)`` is ``report.txt``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from autoprune.export import VerifyReport
    from autoprune.plan import PruningPlan


@dataclass
class PipelineReport:
    """What ``run_pipeline`` found; ``str(report)`` is the text written to ``report.txt``."""

    run_dir: Path
    budget_ms: float
    budget_fraction: float | None
    plan: PruningPlan
    model: nn.Module = field(repr=False)
    verify: VerifyReport | None
    predicted_ms: float | None
    accuracy_dense: float | None
    accuracy_pruned: float | None
    accuracy_before_finetune: float | None
    macs_dense: int
    macs_pruned: int
    params_dense: int
    params_pruned: int
    steps: dict[str, str]
    seconds: dict[str, float]
    onnx_path: Path | None = None
    #: the latency model's band for the chosen plan (``predict_interval``)
    predicted_band_ms: tuple[float, float] | None = None

    @property
    def budget_met(self) -> bool | None:
        return None if self.verify is None else self.verify.budget_met

    @property
    def budget_used(self) -> float | None:
        """Share of the budget the chosen model uses when measured: its paired ratio over the
        fraction, or its measured ms over the budget in ms (None when not verified). Close
        under 1 is the aim: a model far under its budget left accuracy unused."""
        v = self.verify
        if v is None:
            return None
        if self.budget_fraction is not None and v.ratio is not None:
            return float(v.ratio) / self.budget_fraction
        return float(v.latency_ms) / self.budget_ms if self.budget_ms > 0 else None

    @property
    def mac_reduction(self) -> float:
        return self.macs_dense / max(1, self.macs_pruned)

    @property
    def param_reduction(self) -> float:
        return self.params_dense / max(1, self.params_pruned)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "budget_ms": self.budget_ms,
            "budget_fraction": self.budget_fraction,
            "budget_met": self.budget_met,
            "budget_used": self.budget_used,
            "predicted_ms": self.predicted_ms,
            "predicted_band_ms": None if self.predicted_band_ms is None
            else list(self.predicted_band_ms),
            "verify": None if self.verify is None else self.verify.to_dict(),
            "accuracy_dense": self.accuracy_dense,
            "accuracy_pruned": self.accuracy_pruned,
            "accuracy_before_finetune": self.accuracy_before_finetune,
            "macs_dense": self.macs_dense,
            "macs_pruned": self.macs_pruned,
            "mac_reduction": self.mac_reduction,
            "params_dense": self.params_dense,
            "params_pruned": self.params_pruned,
            "param_reduction": self.param_reduction,
            "steps": dict(self.steps),
            "seconds": dict(self.seconds),
            "onnx_path": None if self.onnx_path is None else str(self.onnx_path),
            "plan": self.plan.to_dict(),
        }

    def __str__(self) -> str:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.2f}%"

        v = self.verify
        lines = ["autoprune report", "================",
                 f"run directory     {self.run_dir}",
                 f"latency budget    {self.budget_ms:.4g} ms"
                 + (f" ({self.budget_fraction:.0%} of dense, checked as a paired ratio)"
                    if self.budget_fraction is not None else "")]
        if v is not None:
            if v.reference is not None:
                lines.append(f"dense   measured  {v.reference}")
            lines.append(f"pruned  measured  {v.measured}")
            if v.ratio is not None:
                rel = (v.ratio_iqr or 0.0) / v.ratio
                lines.append(
                    f"paired ratio      {v.ratio:.3f} ± {100 * rel:.1f}% (IQR; pruned/dense, timed "
                    f"alternately) -> {v.paired_ms:.4g} ms, speed-up {v.speedup:.2f}x"
                )
            band = "" if self.predicted_band_ms is None else (
                f", band {self.predicted_band_ms[0]:.4g}-{self.predicted_band_ms[1]:.4g}")
            lines += v.prediction_lines(band=band, width=17)
            verdict = {True: "MET", False: "NOT MET", None: "n/a"}[v.budget_met]
            used = self.budget_used
            lines.append(f"budget            {verdict} ({v.latency_ms:.4g} ms vs "
                         f"{self.budget_ms:.4g} ms"
                         + ("" if used is None else f"; {used:.0%} of the budget used") + ")")
        lines += [
            f"accuracy dense    {pct(self.accuracy_dense)}",
            f"accuracy pruned   {pct(self.accuracy_pruned)} after fine-tuning "
            f"({pct(self.accuracy_before_finetune)} before)",
            f"MACs              {self.macs_dense / 1e6:.2f} M -> {self.macs_pruned / 1e6:.2f} M "
            f"({self.mac_reduction:.2f}x fewer)",
            f"parameters        {self.params_dense / 1e6:.3f} M -> {self.params_pruned / 1e6:.3f} M "
            f"({self.param_reduction:.2f}x fewer)",
        ]
        structures: dict[str, int] = {}
        for gp in self.plan.groups.values():
            structures[gp.structure.value] = structures.get(gp.structure.value, 0) + 1
        lines.append("plan              " + (", ".join(f"{n} {s}" for s, n in
                                                      sorted(structures.items())) or "dense"))
        lines.append("steps             " + ", ".join(f"{k}: {v}" for k, v in self.steps.items()))
        if self.onnx_path is not None:
            lines.append(f"ONNX              {self.onnx_path}")
        if v is not None:
            lines.append("(latency on a shared machine is noisy; the paired ratio is the steadier "
                         "number)")
        return "\n".join(lines)

