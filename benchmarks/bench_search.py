"""Benchmark the search strategies at equal trial counts.

For resnet18 and mobilenet_v2 (sklearn digits at 32x32, trained briefly here) and budgets of
about 70% and 40% of the dense latency, run each strategy (tpe, nsga2, rl, random, greedy) for
the same number of trials with the BatchNorm-recalibrated accuracy proxy, and record:

- best feasible proxy (predicted latency within budget),
- hypervolume of the feasible front in (predicted latency / dense, proxy) space with the
  reference point (budget / dense, 0) -- larger is better,
- wall time of the search (strategy + evaluations, without re-measurement),
- share of the re-measured finalists that met the budget on the device,
- uniform pruning at the same budget (one keep ratio for every group, the widest whose
  predicted latency fits): its proxy, as "what users do today".

Then, for a handful of plans from the resnet18 trials, the Spearman rank correlation between
the proxy (BN-recalibrated accuracy, no training) and accuracy after a short fine-tune, next to
the same correlation for raw accuracy without BN re-calibration.

    python benchmarks/bench_search.py --trials 24 --out runs/bench_search

Writes ``results.csv``, ``rank_correlation.csv`` and ``summary.md`` into ``--out``.
``--gpu-check`` runs a torch-cuda check instead (see ``gpu_check``).
Latency numbers come from a shared 2-core VM: treat them as noisy.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import autoprune as ap
from autoprune._search import pareto_front
from autoprune.data import digits_loaders
from autoprune.evaluators import accuracy_evaluator
from autoprune.latency._model import TableLatencyModel
from autoprune.zoo import torchvision_model

STRATEGIES = ("tpe", "nsga2", "rl", "random", "greedy")


def train(model: torch.nn.Module, loader: Any, epochs: int, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def hypervolume(trials: pd.DataFrame, budget_ms: float, dense_ms: float) -> float:
    """2-D hypervolume of the feasible front: x = predicted latency / dense (minimise, reference
    budget / dense), y = proxy (maximise, reference 0)."""
    front = pareto_front(trials)
    if front.empty:
        return 0.0
    ref_x = budget_ms / dense_ms
    xs = (front["predicted_latency_ms"].to_numpy() / dense_ms).clip(max=ref_x)
    ys = front["proxy"].to_numpy().clip(min=0)
    hv, prev_y = 0.0, 0.0
    # front is sorted by latency ascending with proxy ascending; sweep from slow to fast
    for x, y in sorted(zip(xs, ys), key=lambda t: -t[0]):
        if y > prev_y:
            hv += (ref_x - x) * (y - prev_y)
            prev_y = y
    return float(hv)


def uniform_at_budget(space: Any, latency: Any, budget_ms: float, proxy: Any) -> dict[str, Any]:
    """The widest uniform channel plan predicted within the budget and its proxy."""
    spec = space.spec
    for r in np.linspace(1.0, 0.05, 96):
        plan = ap.PruningPlan.uniform(spec, float(r), "channel", alignment=space.alignment)
        if float(latency.predict(plan)) <= budget_ms:
            return {"uniform_keep_ratio": float(r), "uniform_proxy": float(proxy(plan)),
                    "uniform_predicted_ms": float(latency.predict(plan))}
    return {"uniform_keep_ratio": float("nan"), "uniform_proxy": float("nan"),
            "uniform_predicted_ms": float("nan")}


def gpu_check(alignments: list[int | str], trials: int) -> int:
    """torch-cuda check (needs an NVIDIA GPU): an MLP with large GEMMs (8192 tokens,
    2048 -> 8192 -> 2048), where 2:4 might pay off; prints the table's dense vs 2:4 entries,
    what the space offers, uniform plans at unaligned vs aligned widths, and a TPE search whose
    finalists are re-measured. ``alignments``: "auto" (the table's) and/or explicit steps."""
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(2048, 8192), nn.Linear(8192, 2048)
            self.fc3, self.fc4 = nn.Linear(2048, 64), nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + self.fc2(torch.relu(self.fc1(x)))
            return self.fc4(torch.relu(self.fc3(x)))

    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(1, 8192, 2048)
    backend = ap.get_backend("torch-cuda")
    spec = ap.analyze(model, x)
    table = ap.profile(model, x, backend, spec=spec, root="runs/bench_search_gpu/tables",
                       progress=False)
    print(f"{torch.cuda.get_device_name(0)}; table alignment {table.alignment}")
    for g in spec.groups.values():
        for p in g.producers:
            lay = spec.layers[p].spec
            try:
                d = table.lookup(lay, "none", 1.0, policy="raise")
                n = table.lookup(lay, "nm", 0.5, policy="raise")
                print(f"  {p}: dense {d:.4f} ms, 2:4 {n:.4f} ms")
            except ap.errors.AutoPruneError as e:
                print(f"  {p}: {e}")
    for al in alignments:
        space = ap.SearchSpace.from_spec(spec, table, backend, alignment=al)
        print(space, {k: [s.value for s in c.structures] for k, c in space.groups.items()})
        lat = TableLatencyModel(table, spec).fit(model, x, backend,
                                                 [space.dense_plan(), space.fastest_plan()])
        for r in (1.0, 0.5):
            for a in (1, 64):
                plan = ap.PruningPlan.uniform(spec, r - (0.013 if a == 1 else 0), "channel",
                                              alignment=a)
                pm = ap.apply_plan(model, plan, x, spec=spec).eval()
                ratio, iqr = backend.measure_ratio(pm, model, x)
                print(f"  uniform keep {r} alignment {a}: kept {spec.kept_units(plan)} "
                      f"latency ratio vs dense {ratio:.3f} (IQR {iqr:.3f})")
        dense = lat.predict(space.dense_plan())
        res = ap.search(model, x, device=backend, latency_budget_ms=0.7 * dense,
                        n_trials=trials, table=table, predictor=lat, space=space, spec=spec,
                        run_dir=f"runs/bench_search_gpu/tpe_align_{al}", progress=False)
        print(res)
        print(res.finalists.drop(columns=["plan"]).to_string(index=False))
    return 0


def main() -> int:
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap_.add_argument("--gpu-check", action="store_true",
                     help="run the torch-cuda check instead (needs an NVIDIA GPU)")
    ap_.add_argument("--trials", type=int, default=24)
    ap_.add_argument("--models", default="resnet18,mobilenet_v2")
    ap_.add_argument("--budgets", default="0.7,0.4", help="fractions of dense latency")
    ap_.add_argument("--strategies", default=",".join(STRATEGIES))
    ap_.add_argument("--epochs", type=int, default=2, help="training epochs of the dense model")
    ap_.add_argument("--finalists", type=int, default=2)
    ap_.add_argument("--rank-plans", type=int, default=6)
    ap_.add_argument("--finetune-steps", type=int, default=60)
    ap_.add_argument("--out", default="runs/bench_search")
    ap_.add_argument("--tables-root", default="runs/bench_search/latency_tables")
    ap_.add_argument("--seed", type=int, default=0)
    args = ap_.parse_args()
    warnings.filterwarnings("ignore")
    if args.gpu_check:
        return gpu_check(["auto", 64], 30)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_loader, test_loader = digits_loaders(size=32, batch_size=64, seed=args.seed)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    backend = ap.get_backend("onnxruntime-cpu", threads=1)
    ev = accuracy_evaluator(test_loader, calib_loader=train_loader, bn_recalibration_batches=3)
    rows: list[dict[str, Any]] = []
    rank_rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        model = torchvision_model(name, num_classes=10)
        t0 = time.perf_counter()
        train(model, train_loader, args.epochs)
        dense_acc = ev(copy.deepcopy(model))
        print(f"[{name}] trained {args.epochs} epochs in {time.perf_counter() - t0:.0f} s, "
              f"dense proxy {dense_acc:.3f}", flush=True)
        spec = ap.analyze(model, x)
        table = ap.profile(model, x, backend, spec=spec, root=args.tables_root, progress=False)
        space = ap.SearchSpace.from_spec(spec, table, backend)
        latency = TableLatencyModel(table, spec).fit(
            model, x, backend, [space.dense_plan(), space.fastest_plan()])
        dense_pred = float(latency.predict(space.dense_plan()))
        print(f"[{name}] {space}; dense predicted {dense_pred:.3f} ms "
              f"(anchors {latency.anchors_})", flush=True)

        def plan_proxy(plan: ap.PruningPlan) -> float:
            return float(ev(ap.apply_plan(model, plan, x, spec=spec)))

        for frac in (float(f) for f in args.budgets.split(",")):
            budget = frac * dense_pred
            base = uniform_at_budget(space, latency, budget, plan_proxy)
            for strat in args.strategies.split(","):
                run_dir = out / f"{name}_{frac:.2f}_{strat}"
                t0 = time.perf_counter()
                try:
                    res = ap.search(model, x, device=backend, latency_budget_ms=budget,
                                    evaluator=ev, n_trials=args.trials, strategy=strat,
                                    table=table, predictor=latency, space=space, spec=spec,
                                    run_dir=run_dir, n_finalists=args.finalists,
                                    seed=args.seed, progress=False)
                except ap.errors.AutoPruneError as e:
                    print(f"[{name} {frac} {strat}] failed: {e}", flush=True)
                    rows.append({"model": name, "budget_frac": frac, "strategy": strat,
                                 "error": str(e)})
                    continue
                wall = time.perf_counter() - t0
                t = res.trials
                done = t[t["state"] == "COMPLETE"]
                feas = done[done["feasible"]]
                fin = res.finalists
                row = {
                    "model": name, "budget_frac": frac, "budget_ms": budget,
                    "dense_predicted_ms": dense_pred, "dense_measured_ms": res.dense_latency_ms,
                    "dense_proxy": dense_acc, "strategy": strat, "trials": len(t),
                    "feasible_trials": len(feas),
                    "best_feasible_proxy": float(feas["proxy"].max()) if len(feas) else np.nan,
                    "hypervolume": hypervolume(t, budget, dense_pred),
                    "wall_s_incl_remeasure": wall,
                    "finalists": len(fin),
                    "finalists_met_share": float(fin["meets_budget"].mean()) if len(fin)
                    else np.nan,
                    "best_measured_ms": float(fin.loc[fin["chosen"], "measured_latency_ms"]
                                              .iloc[0]) if len(fin) and fin["chosen"].any()
                    else np.nan,
                    **base, "error": "",
                }
                rows.append(row)
                print(f"[{name} {frac} {strat}] best {row['best_feasible_proxy']:.3f} "
                      f"HV {row['hypervolume']:.4f} wall {wall:.0f} s finalists met "
                      f"{row['finalists_met_share']} uniform {base['uniform_proxy']:.3f}",
                      flush=True)
                pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
                if name == "resnet18" and strat == "tpe" and not rank_rows:
                    rank_rows = rank_correlation(model, x, spec, res, train_loader, test_loader,
                                                 args.rank_plans, args.finetune_steps)
                    pd.DataFrame(rank_rows).to_csv(out / "rank_correlation.csv", index=False)
    total = time.perf_counter() - t_all
    write_summary(out, pd.DataFrame(rows), pd.DataFrame(rank_rows), args, total)
    return 0


def rank_correlation(model: Any, x: Any, spec: Any, res: Any, train_loader: Any,
                     test_loader: Any, n: int, steps: int) -> list[dict[str, Any]]:
    """Proxy vs accuracy after a short fine-tune, for ``n`` plans spread over the proxy range."""
    from autoprune.evaluators import _short_finetune

    done = res.trials[res.trials["state"] == "COMPLETE"].sort_values("proxy")
    idx = np.unique(np.linspace(0, len(done) - 1, n).round().astype(int))
    picks = done.iloc[idx]
    study_rows = []
    plans_dir = res.run_dir
    import optuna

    from autoprune.storage import make_storage

    study = optuna.load_study(study_name=res.study_name, storage=make_storage(None, plans_dir))
    by_n = {t.number: t for t in study.get_trials(deepcopy=False)}
    raw_ev = accuracy_evaluator(test_loader, bn_recalibration_batches=0)
    for _, r in picks.iterrows():
        plan = ap.PruningPlan.from_dict(by_n[int(r["trial"])].user_attrs["plan"])
        raw = raw_ev(ap.apply_plan(model, plan, x, spec=spec))
        pruned = ap.apply_plan(model, plan, x, spec=spec)
        torch.manual_seed(0)
        _short_finetune(pruned, train_loader, steps, 0.01)
        tuned = accuracy_evaluator(test_loader, bn_recalibration_batches=0)(pruned)
        study_rows.append({"trial": int(r["trial"]), "proxy_bn_recal": float(r["proxy"]),
                           "raw_no_recal": raw, "finetuned_acc": tuned,
                           "predicted_latency_ms": float(r["predicted_latency_ms"])})
        print(f"  rank plan {int(r['trial'])}: proxy {r['proxy']:.3f} raw {raw:.3f} "
              f"finetuned {tuned:.3f}", flush=True)
    return study_rows


def markdown_table(df: pd.DataFrame) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}"
        return str(v)

    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def write_summary(out: Path, df: pd.DataFrame, rank: pd.DataFrame, args: Any, total: float
                  ) -> None:
    from scipy.stats import spearmanr

    lines = []
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in
                   subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                   if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        cpu = platform.processor()
    lines.append(f"machine: {cpu}, shared 2-core VM; total {total / 60:.1f} min; "
                 f"{args.trials} trials per run")
    if not df.empty:
        cols = ["model", "budget_frac", "strategy", "best_feasible_proxy", "hypervolume",
                "wall_s_incl_remeasure", "finalists_met_share", "uniform_proxy",
                "dense_proxy", "dense_measured_ms", "best_measured_ms"]
        cols = [c for c in cols if c in df.columns]
        lines.append(markdown_table(df[cols]))
    if len(rank) >= 3:
        rho, _ = spearmanr(rank["proxy_bn_recal"], rank["finetuned_acc"])
        rho_raw, _ = spearmanr(rank["raw_no_recal"], rank["finetuned_acc"])
        lines.append(f"Spearman(proxy BN-recal, fine-tuned acc) = {rho:.2f}; "
                     f"Spearman(raw acc, fine-tuned acc) = {rho_raw:.2f} over {len(rank)} plans")
    (out / "summary.md").write_text("\n\n".join(lines) + "\n")
    print("\n\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
