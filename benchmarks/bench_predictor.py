"""Benchmark the latency model on the real ONNX Runtime CPU backend, against whole models.

For each model (torchvision families, 10 classes, random weights: latency does not depend on
the values) at one input size, batch 1, one intra-op thread:

1. profile a fresh latency table (the device's kernel rules come from the per-device cache,
   detected once) and fit ``LatencyPredictor`` with its defaults; the wall time of both is the
   cost a user pays;
2. build an **independent evaluation set** (never seen by the fit) of three plan kinds —
   ``space`` (per-group widths on the device alignment, as the search proposes),
   ``uniform_aligned`` and ``uniform_unaligned`` (one keep ratio for all groups, widths not
   snapped: what other toolkits hand out, including plans slower than dense);
3. time every evaluation plan against the dense model in the same interleaved chunk, twice
   (``--repeats``, in different chunks), and take the median of ``plan / dense-in-chunk`` ×
   the fit's dense median as its measured latency (the scale the
   predictor is fitted on, so drift between fit and evaluation is not counted as error); the
   dense model's re-measurements across chunks are the noise floor;
4. score, per kind, the predictor, the plain table sum and a FLOPs-linear model fitted on the
   same training plans (share within ±5% / ±10%, MAPE, Spearman), and the predictor's interval
   coverage.

Usage::

    python benchmarks/bench_predictor.py --size 224 --models resnet18 mobilenet_v2 \\
        efficientnet_b0 mnasnet1_0 regnet_x_400mf --out runs/bench_predictor_224

Results: ``<out>/results.json`` (every plan with measured and predicted ms) and Markdown on
stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from autoprune.bundle_runner import cpu_fingerprint

UNIFORM_ALIGNED = (0.3, 0.5, 0.7, 0.85)
UNIFORM_UNALIGNED = (0.33, 0.45, 0.6, 0.72, 0.9)


def _model(name: str, size: int) -> tuple[Any, tuple[Any, ...]]:
    import torch

    from autoprune import zoo

    torch.manual_seed(0)
    return zoo.torchvision_model(name, num_classes=10).eval(), (torch.randn(1, 3, size, size),)


def _eval_plans(spec: Any, alignment: int, n_space: int, seed: int,
                group_step: int = 1) -> list[tuple[str, Any]]:
    from autoprune.latency._sampler import PlanSampler
    from autoprune.plan import PruningPlan

    rng = np.random.default_rng(seed + 1000)  # not the fit's stream
    sampler = PlanSampler(spec, alignment, group_step=group_step)
    plans = [("space", sampler.plan_of_kind("space", rng)) for _ in range(n_space)]
    plans += [("uniform_aligned", PruningPlan.uniform(spec, r, alignment=alignment))
              for r in UNIFORM_ALIGNED]
    plans += [("uniform_unaligned", PruningPlan.uniform(spec, r, alignment=1))
              for r in UNIFORM_UNALIGNED]
    return plans


def _reference_rows(dataset: Any, n: int) -> Any:
    """``n`` of the fit's measured plans (not the dense one) to time in every evaluation chunk
    beside the dense model: the ones nearest the (i + 1) / (n + 1) quantiles of the fit's
    latencies, so the references span light to heavy plans."""
    rows = dataset[dataset["kind"] != "dense"].sort_values("latency_ms")
    if n <= 0 or rows.empty:
        return rows.iloc[:0]
    idx = sorted({int(round(q * (len(rows) - 1))) for q in np.arange(1, n + 1) / (n + 1)})
    return rows.iloc[idx]


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from autoprune._analyze import analyze
    from autoprune.backends import get_backend
    from autoprune.executor import apply_plan
    from autoprune.latency import LatencyPredictor, accuracy_metrics, profile
    from autoprune.plan import PruningPlan

    model, x = _model(name, args.size)
    spec = analyze(model, x)
    backend = get_backend("onnxruntime-cpu", threads=args.threads)
    root = Path(args.out) / "tables"
    t0 = time.perf_counter()
    table = profile(model, x, backend, spec=spec, root=root, progress=False)
    table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    extra = {} if args.n_samples is None else {"n_samples": args.n_samples}
    pred = LatencyPredictor(random_state=args.seed, **extra).fit(
        table=table, model=model, example_inputs=x, backend=backend, spec=spec,
        progress=not args.no_progress)
    fit_s = time.perf_counter() - t0

    plans = _eval_plans(spec, int(table.alignment or 1), args.n_space, args.seed,
                        group_step=int(getattr(table.kernel_rules, "group_step", 1) or 1))
    pruned_models = [apply_plan(model, p, x, spec=spec) for _, p in plans]
    ref_rows = _reference_rows(pred.dataset_, args.refs)
    ref_models = [apply_plan(model, PruningPlan.from_json(j), x, spec=spec)
                  for j in ref_rows["plan_json"]]
    ref_fit = np.r_[float(pred.dense_ms_), ref_rows["latency_ms"].to_numpy(float)]
    ratios = np.empty((args.repeats, len(plans)))  # plan / dense in the chunk
    scaled = np.empty((args.repeats, len(plans)))  # plan / the chunk's speed (all references)
    refs: list[float] = []
    speeds: list[list[float]] = []  # per chunk: each reference now / at the fit
    chunk = 6
    for rep in range(args.repeats):  # each repeat in another order, so chunks differ
        order = np.random.default_rng(rep).permutation(len(plans))
        for start in range(0, len(plans), chunk):
            part = order[start:start + chunk]
            samples = backend.measure_interleaved(
                [model, *ref_models, *(pruned_models[i] for i in part)], x)
            refs.append(samples[0].median_ms)
            speed = np.array([s.median_ms for s in samples[:len(ref_fit)]]) / ref_fit
            speeds.append(speed.tolist())
            for i, s in zip(part, samples[len(ref_fit):]):
                ratios[rep, i] = s.median_ms / samples[0].median_ms
                scaled[rep, i] = s.median_ms / float(np.median(speed))
    measured_dense = np.median(ratios, axis=0)
    repeat_spread = (np.ptp(ratios, axis=0) / measured_dense) if args.repeats > 1 \
        else np.zeros(len(plans))
    dense_ms = float(np.median(refs))
    # on the fit's scale: the predictor learnt plan / dense-in-chunk x the dense median of the
    # fit; the evaluation plans are put on the same scale, so machine drift between the fit and
    # the evaluation (minutes apart) does not count as prediction error. With --refs the
    # chunk's speed is the median over the dense model and the reference plans of (now / at
    # the fit), so a move of the dense model alone does not rescale every plan of the chunk
    measured_dense *= float(pred.dense_ms_)
    measured = np.median(scaled, axis=0) if len(ref_rows) else measured_dense
    plan_list = [p for _, p in plans]
    kinds = np.array([k for k, _ in plans])
    predicted = pred.predict_many(plan_list)
    low, high = pred.predict_interval(plan_list)
    table_sum = pred.table_sum_ms(plan_list)
    macs = pred.features(plan_list)["macs_m"].to_numpy(float)
    flops = pred.flops_coef_[0] * macs + pred.flops_coef_[1]
    by_kind: dict[str, Any] = {}
    for kind in sorted(set(kinds.tolist())) + ["all"]:
        sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        by_kind[kind] = {
            m: accuracy_metrics(measured[sel], p[sel])
            for m, p in (("predictor", predicted), ("table_sum", table_sum),
                         ("flops_linear", flops))
        }
        by_kind[kind]["interval_coverage"] = float(np.mean(
            (measured[sel] >= low[sel]) & (measured[sel] <= high[sel])))
        by_kind[kind]["predictor_dense_anchor"] = accuracy_metrics(measured_dense[sel],
                                                                   predicted[sel])
    dev = np.abs(np.asarray(refs) / dense_ms - 1.0)
    return {
        "model": name, "size": args.size, "layers": len(spec.layers),
        "alignment": table.alignment,
        "kernel_rules": table.kernel_rules.to_dict() if table.kernel_rules else None,
        "table_entries": len(table), "table_seconds": table_s, "fit_seconds": fit_s,
        "n_measured": int(pred.n_measured_), "regressor": pred.regressor_,
        "estimated_fit_seconds": float(pred.estimated_seconds_),
        "holdout_report": {m: pred.report_.loc[m].to_dict() for m in pred.report_.index},
        "dense_ms": dense_ms, "dense_ms_at_fit": float(pred.dense_ms_),
        "load_avg": os.getloadavg(),
        "eval_repeat_spread_median": float(np.median(repeat_spread)),
        "eval_repeat_spread_max": float(np.max(repeat_spread)),
        "noise_floor": {"dense_repeats": [float(r) for r in refs],
                        "within_5pct": float(np.mean(dev <= 0.05)),
                        "within_10pct": float(np.mean(dev <= 0.10)),
                        "max_dev": float(dev.max()),
                        "reference_speeds": speeds,
                        "reference_plans": [str(k) for k in ref_rows["kind"]]},
        "by_kind": by_kind,
        "plans": [{"kind": k, "measured_ms": float(m), "predicted_ms": float(p),
                   "measured_dense_anchor_ms": float(md),
                   "low_ms": float(lo), "high_ms": float(hi), "table_sum_ms": float(t),
                   "slower_than_dense": bool(m > pred.dense_ms_)}
                  for k, m, md, p, lo, hi, t in zip(kinds, measured, measured_dense, predicted,
                                                    low, high, table_sum)],
    }


def _markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | size | table+fit s | kind (plans; slower than dense) | method | "
             "within ±5% | within ±10% | MAPE | Spearman |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        first = True
        for kind, row in r["by_kind"].items():
            n = sum(1 for p in r["plans"] if kind == "all" or p["kind"] == kind)
            slow = sum(1 for p in r["plans"] if (kind == "all" or p["kind"] == kind)
                       and p["slower_than_dense"])
            for m in ("predictor", "table_sum", "flops_linear"):
                v = row[m]
                head = (f"{r['model']} | {r['size']} | "
                        f"{r['table_seconds'] + r['fit_seconds']:.0f}") if first else " | | "
                first = False
                lines.append(f"| {head} | {kind} ({n}; {slow}) | {m} | "
                             f"{100 * v['within_5pct']:.0f}% | {100 * v['within_10pct']:.0f}% "
                             f"| {100 * v['mape']:.1f}% | {v['spearman']:.3f} |")
    lines += ["", "| model | dense ms (fit / eval) | dense repeats within ±5% / ±10% (max dev) "
              "| eval plan repeat spread median (max) | interval coverage (all) | kernel rules |",
              "|---|---|---|---|---|---|"]
    for r in results:
        n = r["noise_floor"]
        k = r["kernel_rules"] or {}
        lines.append(f"| {r['model']} | {r['dense_ms_at_fit']:.3f} / {r['dense_ms']:.3f} | "
                     f"{100 * n['within_5pct']:.0f}% / "
                     f"{100 * n['within_10pct']:.0f}% ({100 * n['max_dev']:.1f}%) | "
                     f"{100 * r['eval_repeat_spread_median']:.1f}% "
                     f"({100 * r['eval_repeat_spread_max']:.1f}%) | "
                     f"{100 * r['by_kind']['all']['interval_coverage']:.0f}% | "
                     f"out {k.get('out_step')}, in {k.get('in_step')} "
                     f"(x{k.get('in_penalty')}, block {k.get('in_block', 1)}), "
                     f"dw {k.get('dw_step')} (x{k.get('dw_penalty')}), "
                     f"grouped {k.get('group_step', k.get('in_step'))} "
                     f"(x{k.get('group_penalty', k.get('in_penalty'))}) |")
    return "\n".join(lines)


KINDS = ("space", "uniform_aligned", "uniform_unaligned")


def _summary(results: list[dict[str, Any]]) -> str:
    """One row per model (the BENCHMARKS.md tables) and the counts over all plans by kind."""
    lines = ["| model | table + fit | space: ±5% / ±10% | uniform aligned | uniform unaligned "
             "(slower than dense) | all: MAPE, Spearman | table sum MAPE | FLOPs-linear MAPE "
             "| dense re-measured: max deviation |", "|---|---|---|---|---|---|---|---|---|"]
    counts = {k: [0, 0, 0] for k in KINDS}
    for r in results:
        cells = []
        for kind in KINDS:
            ps = [p for p in r["plans"] if p["kind"] == kind]
            err = [abs(p["predicted_ms"] / p["measured_ms"] - 1.0) for p in ps]
            c = counts[kind]
            c[0] += sum(e <= 0.05 for e in err)
            c[1] += sum(e <= 0.10 for e in err)
            c[2] += len(ps)
            v = r["by_kind"][kind]["predictor"]
            cells.append(f"{100 * v['within_5pct']:.0f}% / {100 * v['within_10pct']:.0f}%")
        slow = sum(p["slower_than_dense"] for p in r["plans"] if p["kind"] == KINDS[2])
        n_un = sum(p["kind"] == KINDS[2] for p in r["plans"])
        a = r["by_kind"]["all"]
        lines.append(f"| {r['model']} | {r['table_seconds']:.0f} + {r['fit_seconds']:.0f} s | "
                     f"{cells[0]} | {cells[1]} | {cells[2]} ({slow} of {n_un}) | "
                     f"{100 * a['predictor']['mape']:.1f}%, {a['predictor']['spearman']:.3f} | "
                     f"{100 * a['table_sum']['mape']:.1f}% | {100 * a['flops_linear']['mape']:.1f}% "
                     f"| {100 * r['noise_floor']['max_dev']:.1f}% |")
    tot = [sum(c[i] for c in counts.values()) for i in range(3)]
    lines.append("")
    lines.append(f"all plans: {tot[1]}/{tot[2]} within ±10%, {tot[0]}/{tot[2]} within ±5%; "
                 + ", ".join(f"{k} {c[1]}/{c[2]} and {c[0]}/{c[2]}" for k, c in counts.items()))
    anchored = [(p["predicted_ms"], p["measured_dense_anchor_ms"]) for r in results
                for p in r["plans"] if "measured_dense_anchor_ms" in p]
    if anchored and any(r["noise_floor"].get("reference_plans") for r in results):
        err = [abs(pr / m - 1.0) for pr, m in anchored]
        lines.append(f"the same plans on the dense model alone as the chunk's speed: "
                     f"{sum(e <= 0.10 for e in err)}/{len(err)} within ±10%, "
                     f"{sum(e <= 0.05 for e in err)}/{len(err)} within ±5%")
        for r in results:
            sp = np.asarray(r["noise_floor"]["reference_speeds"], float)
            med = np.median(sp, axis=1)
            lines.append(f"  {r['model']}: chunk speed (median of references, now / fit) "
                         f"{med.min():.3f}-{med.max():.3f}; dense alone "
                         f"{sp[:, 0].min():.3f}-{sp[:, 0].max():.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+",
                    default=["resnet18", "mobilenet_v2", "efficientnet_b0", "mnasnet1_0",
                             "regnet_x_400mf"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--n-samples", type=int, default=None,
                    help="plans the predictor measures (default: LatencyPredictor's)")
    ap.add_argument("--n-space", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2,
                    help="times every evaluation plan is measured (in different chunks); "
                         "its measured ratio is the median")
    ap.add_argument("--refs", type=int, default=2,
                    help="fit plans timed in every evaluation chunk beside the dense model; "
                         "the chunk's speed is the median of their (now / at the fit); 0: the "
                         "dense model alone")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench_predictor")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--summarize", metavar="RESULTS_JSON",
                    help="print the per-model summary of a finished run's results.json; no timing")
    args = ap.parse_args()
    if args.summarize:
        print(_summary(json.loads(Path(args.summarize).read_text())["results"]))
        return
    import torch

    from autoprune.io import atomic_write_json

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        r = bench_model(name, args)
        results.append(r)
        print(json.dumps({k: r[k] for k in ("model", "table_seconds", "fit_seconds")}),
              flush=True)
        atomic_write_json(out / "results.json", {
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "cpu": cpu_fingerprint()["device_name"], "threads": args.threads,
            "load_avg": os.getloadavg(), "args": vars(args), "results": results,
        })
    print(_markdown(results))
    print()
    print(_summary(results))


if __name__ == "__main__":
    main()
