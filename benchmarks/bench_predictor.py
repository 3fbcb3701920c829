"""Benchmark the whole-network latency predictor on the real ONNX Runtime CPU backend.

For each model: analyse it, take its latency table (a copy of the shipped table in
``latency_tables/`` when there is one, topped up by ``profile``; the shipped files are never
written), fit ``LatencyPredictor`` on random pruned variants measured on the device (paired with
the dense model), and record

* held-out accuracy of the predictor vs the plain table sum vs a FLOPs-linear model
  (share within ±5% / ±10%, MAPE, Spearman) — from ``predictor.report_``;
* the same for each regressor refitted on the same measured dataset (no new measurements);
* cost: measured plans and wall seconds of the fit;
* prediction throughput (plans/s, one core) of ``predict_many`` on 20,000 random plans
  (channel-only plans snapped to the table's alignment, and mixed-structure plans) and the
  latency of one ``predict`` call;
* the measurement noise floor: the median relative IQR of the measured plans.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_predictor.py \\
        --models resnet18 mobilenet_v2 conv1d_net --n-samples 160 --out runs/bench_predictor

Results: ``<out>/results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from autoprune.bundle_runner import cpu_fingerprint


def _model(name: str) -> tuple[Any, tuple[Any, ...]]:
    import torch

    from autoprune import zoo

    torch.manual_seed(0)
    if name == "conv1d_net":
        return zoo.conv1d_net().eval(), (torch.randn(1, 1, 40),)
    return zoo.torchvision_model(name, num_classes=10).eval(), (torch.randn(1, 3, 32, 32),)



def _table(model: Any, x: Any, spec: Any, backend: Any, shipped_root: Path, work_root: Path
           ) -> Any:
    """A working copy of the shipped table of this device (never written), topped up."""
    from autoprune.latency._profile import profile
    from autoprune.latency._table import LatencyTable

    device = backend.device_info()
    src = LatencyTable.default_dir(device, shipped_root)
    dst = LatencyTable.default_dir(device, work_root)
    if src.exists() and not dst.exists():
        dst.mkdir(parents=True)
        for f in ("table.csv", "table.json"):
            shutil.copy2(src / f, dst / f)
    return profile(model, x, backend, spec=spec, root=work_root, progress=False)


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from autoprune.analyze import analyze
    from autoprune.backends import get_backend
    from autoprune.plan import PruningPlan, random_plan
    from autoprune.latency._predictor import LatencyPredictor

    model, x = _model(name)
    spec = analyze(model, x)
    backend = get_backend("onnxruntime-cpu", threads=args.threads)
    t0 = time.perf_counter()
    table = _table(model, x, spec, backend, Path(args.shipped_root), Path(args.out) / "tables")
    table_s = time.perf_counter() - t0
    data_path = Path(args.out) / f"dataset_{name}.csv"
    t0 = time.perf_counter()
    pred = LatencyPredictor(n_samples=args.n_samples, random_state=args.seed, active=args.active,
                            max_samples=max(args.max_samples, args.n_samples),
                            aligned_share=args.aligned_share).fit(
        table=table, model=model, example_inputs=x, backend=backend, spec=spec,
        data_path=data_path, progress=not args.no_progress)
    fit_s = time.perf_counter() - t0
    ds = pred.dataset_
    measure_s = float(ds["measure_seconds"].sum()) if "measure_seconds" in ds else float("nan")
    rows: dict[str, Any] = {m: pred.report_.loc[m].to_dict() for m in pred.report_.index}
    # every regressor on the same measured plans (no new measurements)
    # (statistic "min": the same plans, fitted and scored on each measurement's fastest run)
    base = ds[[c for c in ds.columns if c not in ("latency_ms", "predicted_ms")]]

    def refit_all(data: Any, regressors: tuple[str, ...], n_samples: int | None) -> dict[str, Any]:
        """Held-out report of each regressor x statistic on ``data`` (no new measurements)."""
        out: dict[str, Any] = {}
        for statistic in ("median", "min"):
            for reg in regressors:
                extra = {} if n_samples is None else {"n_samples": n_samples}
                alt = LatencyPredictor(regressor=reg, monotone=reg != "gbr",
                                       random_state=args.seed, statistic=statistic,
                                       **extra).fit(table=table, spec=spec, dataset=data)
                row = alt.report_.loc["predictor"].to_dict()
                row["chosen"] = alt.regressor_
                out[f"{reg}/{statistic}"] = row
                if reg == "auto":
                    for m in ("table_sum", "flops_linear"):
                        out[f"{m}/{statistic}"] = alt.report_.loc[m].to_dict()
        return out

    per_regressor = refit_all(base, ("auto", "linear", "boosted", "gbr"), args.n_samples)
    # the plans the search asks about: widths snapped to the table's alignment (the dataset
    # also holds unaligned plans when it was sampled with aligned_share < 1)
    aligned = np.array([json.loads(t)["alignment"] == table.alignment or not json.loads(t)["groups"]
                        for t in base["plan_json"]])
    per_aligned: dict[str, Any] = {}
    if aligned.sum() < len(base) and aligned.sum() >= 20:
        per_aligned = refit_all(base[aligned].reset_index(drop=True), ("auto", "gbr"), None)
    # noise floor: the dense model is re-measured in every chunk; how often do those repeats
    # land within ±10% of their own median?
    noise_floor: dict[str, float] = {}
    for statistic, col in (("median", "ref_ms"), ("min", "ref_min_ms")):
        if col in ds.columns:
            refs = ds.groupby("chunk")[col].first().to_numpy(float)
            dev = np.abs(refs / np.median(refs) - 1.0)
            noise_floor[f"{statistic}_within_10pct"] = float(np.mean(dev <= 0.10))
            noise_floor[f"{statistic}_max_dev"] = float(dev.max())
    # throughput
    rng = np.random.default_rng(123)
    chan = [random_plan(spec, rng, structures=("channel",), alignment=table.alignment or 1,
                        block_probability=0.1) for _ in range(args.n_throughput)]
    mixed = [random_plan(spec, rng, alignment=int(rng.choice([1, table.alignment or 1])),
                         block_probability=0.1) for _ in range(args.n_throughput)]
    thr: dict[str, float] = {}
    for label, plans in (("channel_aligned", chan), ("mixed", mixed)):
        pred.predict_many(plans)  # fill the lookup cache once (the search pays this once too)
        best = []
        for _ in range(3):
            t = time.perf_counter()
            pred.predict_many(plans)
            best.append(time.perf_counter() - t)
        thr[f"{label}_plans_per_s"] = len(plans) / float(np.median(best))
        fresh = LatencyPredictor.load(data_path, table=table) if label == "mixed" else None
        if fresh is not None:  # cold cache: every distinct layer width looked up in the table
            t = time.perf_counter()
            fresh.predict_many(plans)
            thr[f"{label}_cold_plans_per_s"] = len(plans) / (time.perf_counter() - t)
    one = PruningPlan.uniform(spec, 0.5, alignment=table.alignment or 1)
    t = time.perf_counter()
    for _ in range(200):
        pred.predict(one)
    thr["single_predict_us"] = (time.perf_counter() - t) / 200 * 1e6
    rel_iqr = (ds["iqr_ms"] / ds["measured_ms"]).to_numpy(float)
    return {
        "model": name,
        "input": list(x[0].shape),
        "layers": len(spec.layers),
        "groups": len(spec.groups),
        "alignment": table.alignment,
        "table_entries": len(table),
        "table_seconds": table_s,
        "n_measured": int(pred.n_measured_),
        "n_holdout": int(pred.report_.loc["predictor", "n_holdout"]),
        "fit_seconds": fit_s,
        "measure_seconds": measure_s,
        "regressor": pred.regressor_,
        "cv_scores": pred.cv_scores_,
        "dense_ms": pred.dense_ms_,
        "measured_ms_range": [float(ds["measured_ms"].min()), float(ds["measured_ms"].max())],
        "rel_iqr_median": float(np.median(rel_iqr)),
        "rel_iqr_p90": float(np.quantile(rel_iqr, 0.9)),
        "dense_ref_ms_by_chunk": [float(v) for v in ds.groupby("chunk")["ref_ms"].first()],
        "report": rows,
        "per_regressor": per_regressor,
        "aligned_only": per_aligned,
        "n_aligned": int(aligned.sum()),
        "noise_floor": noise_floor,
        "throughput": thr,
        "active_rounds": int(getattr(pred, "active_rounds_", 0)),
    }


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | measured plans (held out) | fit s | method | within ±5% | within ±10% | "
        "MAPE | Spearman |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for i, (m, v) in enumerate(r["report"].items()):
            head = (f"{r['model']} | {r['n_measured']} ({r['n_holdout']}) | {r['fit_seconds']:.0f}"
                    if i == 0 else " | | ")
            name = f"predictor ({r['regressor']})" if m == "predictor" else m
            lines.append(f"| {head} | {name} | {100 * v['within_5pct']:.0f}% | "
                         f"{100 * v['within_10pct']:.0f}% | {100 * v['mape']:.1f}% | "
                         f"{v['spearman']:.3f} |")
    lines += ["", "| model | method / statistic | within ±5% | within ±10% | MAPE | Spearman |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for reg, v in r["per_regressor"].items():
            name = f"{reg} ({v['chosen']})" if "chosen" in v and reg.startswith("auto") else reg
            lines.append(f"| {r['model']} | {name} | {100 * v['within_5pct']:.0f}% | "
                         f"{100 * v['within_10pct']:.0f}% | {100 * v['mape']:.1f}% | "
                         f"{v['spearman']:.3f} |")
    lines += ["", "aligned plans only:", "",
              "| model | method / statistic | within ±5% | within ±10% | MAPE | Spearman |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for reg, v in r.get("aligned_only", {}).items():
            name = f"{reg} ({v['chosen']})" if "chosen" in v and reg.startswith("auto") else reg
            lines.append(f"| {r['model']} ({r['n_aligned']} plans) | {name} | "
                         f"{100 * v['within_5pct']:.0f}% | {100 * v['within_10pct']:.0f}% | "
                         f"{100 * v['mape']:.1f}% | {v['spearman']:.3f} |")
    lines += ["", "| model | dense repeats within ±10% of their median: median / min statistic "
              "| max deviation median / min |", "|---|---|---|"]
    for r in results:
        n = r.get("noise_floor", {})
        if n:
            lines.append(f"| {r['model']} | {100 * n['median_within_10pct']:.0f}% / "
                         f"{100 * n.get('min_within_10pct', float('nan')):.0f}% | "
                         f"{100 * n['median_max_dev']:.0f}% / "
                         f"{100 * n.get('min_max_dev', float('nan')):.0f}% |")
    lines += ["", "| model | layers | plans/s channel (warm) | plans/s mixed (warm) | "
              "plans/s mixed (cold) | one predict µs | run IQR/median (p90) |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["throughput"]
        lines.append(f"| {r['model']} | {r['layers']} | {t['channel_aligned_plans_per_s']:,.0f} | "
                     f"{t['mixed_plans_per_s']:,.0f} | {t['mixed_cold_plans_per_s']:,.0f} | "
                     f"{t['single_predict_us']:.0f} | {100 * r['rel_iqr_median']:.1f}% "
                     f"({100 * r['rel_iqr_p90']:.1f}%) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "conv1d_net"])
    ap.add_argument("--n-samples", type=int, default=160)
    ap.add_argument("--active", action="store_true")
    ap.add_argument("--max-samples", type=int, default=240)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--aligned-share", type=float, default=0.5,
                    help="share of measured plans snapped to the table's alignment (the rest "
                         "unaligned, to show what misalignment costs the predictor)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-throughput", type=int, default=20000)
    ap.add_argument("--shipped-root", default="latency_tables")
    ap.add_argument("--out", default="runs/bench_predictor")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        r = bench_model(name, args)
        results.append(r)
        print(json.dumps({k: r[k] for k in ("model", "n_measured", "fit_seconds", "regressor")}),
              flush=True)
        from autoprune.io import atomic_write_json

        atomic_write_json(out / "results.json", {
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "cpu": cpu_fingerprint()["device_name"], "threads": args.threads, "args": vars(args),
            "results": results,
        })
    print(_markdown(results))


if __name__ == "__main__":
    main()
