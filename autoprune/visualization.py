"""Plots of search results and diagnoses. matplotlib is imported here only (``import
autoprune`` and the search never load it); ``SearchResult.plot()`` delegates to
:func:`plot_search_front`, ``DiagnosisReport.plot()`` to :func:`plot_layer_latency`."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autoprune.errors import InvalidInputError
from autoprune.io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from autoprune._diagnose import DiagnosisReport
    from autoprune._search import SearchResult

__all__ = ["plot_layer_latency", "plot_search_front", "save_png"]


def save_png(fig: Figure, path: str | Path, dpi: float | None = None) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG atomically (a reader never sees half a
    file) and close it. Returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def plot_search_front(result: SearchResult, path: str | Path | None = None) -> Path:
    """Write a PNG of proxy vs latency on one axis: all trials (predicted), the front with
    the latency model's band, the search budget and the user's budget (when they differ),
    the dense model, and the finalists as measured on the device, each joined to its
    prediction. ``path`` defaults to ``result.run_dir / "pareto.png"``. Returns the path."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidInputError("plotting needs matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if path is None:
        if result.run_dir is None:
            raise InvalidInputError("plot() needs a path (this result has no run_dir)")
        path = Path(result.run_dir) / "pareto.png"
    path = Path(path)
    t = result.trials
    done = t[t["state"] == "COMPLETE"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    feas, infeas = done[done["feasible"]], done[~done["feasible"]]
    ax.scatter(infeas["predicted_latency_ms"], infeas["proxy"], s=12, c="#bbbbbb",
               label="over budget (predicted)")
    ax.scatter(feas["predicted_latency_ms"], feas["proxy"], s=14, c="#4c72b0",
               label="within budget (predicted)")
    front = result.pareto_front()
    if not front.empty:
        ax.plot(front["predicted_latency_ms"], front["proxy"], "-o", c="#dd8452", ms=4,
                label="Pareto front (predicted)")
        if "latency_low_ms" in front and front["latency_low_ms"].notna().any():
            err = np.vstack([front["predicted_latency_ms"] - front["latency_low_ms"],
                             front["latency_high_ms"] - front["predicted_latency_ms"]])
            ax.errorbar(front["predicted_latency_ms"], front["proxy"],
                        xerr=np.clip(np.nan_to_num(err), 0, None), fmt="none",
                        ecolor="#dd8452", alpha=0.5, capsize=2,
                        label="latency model's band")
    ax.axvline(result.budget_ms, c="#c44e52", ls="--",
               label=f"search budget {result.budget_ms:.3g} ms")
    if math.isfinite(result.user_budget_ms) and \
            abs(result.user_budget_ms - result.budget_ms) > 1e-9 * result.budget_ms:
        ax.axvline(result.user_budget_ms, c="#8c1c13", ls="-",
                   label=f"your budget {result.user_budget_ms:.3g} ms")
    dense_x = result.dense_predicted_ms if math.isfinite(result.dense_predicted_ms) \
        else result.dense_latency_ms
    if math.isfinite(dense_x):
        y = result.dense_proxy if math.isfinite(result.dense_proxy) else (
            done["proxy"].max() if len(done) else 1.0)
        ax.scatter([dense_x], [y], marker="*", s=160, c="k", zorder=5, label="dense model")
    if not result.finalists.empty and "measured_latency_ms" in result.finalists:
        f = result.finalists.dropna(subset=["measured_latency_ms"])
        if "predicted_latency_ms" in f:
            for _, row in f.iterrows():
                ax.plot([row["predicted_latency_ms"], row["measured_latency_ms"]],
                        [row["proxy"], row["proxy"]], c="#55a868", lw=0.8, alpha=0.7)
        ax.scatter(f["measured_latency_ms"], f["proxy"], marker="x", s=50, c="#55a868",
                   zorder=6, label="finalists (measured; line to predicted)")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("accuracy proxy (higher is better)")
    ax.set_title(f"{result.strategy} search, budget {result.budget_ms:.3g} ms ({result.device})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return save_png(fig, path)


def plot_layer_latency(report: DiagnosisReport, path: str | Path) -> Path:
    """Write a PNG bar chart of each layer's table latency, dense vs pruned, with the layers
    off the device's fast path marked and the latency at the nearest fast widths below.
    Returns the path."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidInputError("plotting needs matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = report.layers
    n = len(df)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * n + 2), 4.5), dpi=110)
    ax.bar(x - 0.3, df["latency_before_ms"], width=0.3, color="#8c8c8c", label="dense")
    colors = ["#c44e52" if m else "#4c72b0" for m in df["misaligned"]]
    ax.bar(x, df["latency_after_ms"], width=0.3, color=colors,
           label="pruned (red: off the fast path)")
    ax.bar(x + 0.3, df["latency_down_ms"], width=0.3, color="#55a868",
           label="at the nearest fast widths below")
    ax.set_xticks(x)
    ax.set_xticklabels(df["layer"], rotation=90, fontsize=6)
    ax.set_ylabel("table latency (ms)")
    title = f"per-layer latency on {report.device}"
    if math.isfinite(report.latency_ratio):
        title += (f": measured dense {report.dense_latency_ms:.3g} ms, "
                  f"pruned {report.pruned_latency_ms:.3g} ms")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return save_png(fig, path)
