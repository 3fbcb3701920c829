"""How well do the search's accuracy proxies rank plans? Rank correlation with accuracy after
the real fine-tune (issue 13).

A dense model is trained here (``--model`` on ``--data`` at ``--size``; a fifth of the training
split is held out for the proxies, the test split is only used for the final accuracy). Then
``--n-plans`` random channel plans of about the same cost (per-group keep ratios drawn around
``--keep`` and rescaled until their MACs are within 3% of the uniform plan at ``--keep``, widths
on multiples of 8) are scored by

- ``bn``: accuracy on the holdout after BatchNorm re-calibration (the search's default proxy);
- ``ft<k>``: the same after ``k`` SGD steps on the training split (``accuracy_evaluator(...,
  finetune_steps=k)``, the costlier proxy ``search(refine_evaluator=...)`` uses), for each ``k``
  in ``--steps``;

and fine-tuned for real (``autoprune.finetune``: ``--epochs``, lr 0.01, the dense model as
teacher, the same seed for all) and scored on the test split. The table gives each proxy's
Spearman rank correlation with the final accuracy, its cost in seconds per plan, and the range
of final accuracies (a correlation over plans that all land within noise means little). No
latency is measured: plans are matched on MACs.

    python benchmarks/bench_proxy_rank.py --model resnet18 --data digits --size 32 --keep 0.35
    python benchmarks/bench_proxy_rank.py --data glyphs --size 32 --n-train 5000 --keep 0.35
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset


def data(args: argparse.Namespace) -> tuple[DataLoader, DataLoader, DataLoader, int]:
    from autoprune.data import digits_tensors, glyphs_tensors

    if args.data == "glyphs":
        train, test = glyphs_tensors(size=args.size, channels=3, n_classes=64,
                                     n_train=args.n_train, n_test=2000, seed=0)
        classes = 64
    else:
        train, test = digits_tensors(size=args.size, channels=3, seed=0)
        classes = 10
    idx = np.random.default_rng(0).permutation(len(train))
    n_hold = len(train) // 5
    fit, hold = Subset(train, idx[n_hold:].tolist()), Subset(train, idx[:n_hold].tolist())
    g = torch.Generator().manual_seed(0)
    return (DataLoader(fit, batch_size=64, shuffle=True, generator=g),
            DataLoader(hold, batch_size=256), DataLoader(test, batch_size=256), classes)


def random_plans(spec: Any, keep: float, n: int, seed: int) -> list[Any]:
    """``n`` channel plans with per-group keep ratios spread around ``keep``, each rescaled
    (bisection on a common factor) to the uniform plan's MACs within 3%."""
    from autoprune.plan import GroupPlan, PruningPlan
    from autoprune.types import Structure

    rng = np.random.default_rng(seed)
    groups = [g.name for g in spec.groups.values()
              if g.kind == "channel" and Structure.CHANNEL in g.allowed]
    target = spec.count(PruningPlan.uniform(spec, keep, alignment=8))[0]
    plans = []
    while len(plans) < n:
        base = rng.lognormal(0.0, 0.45, size=len(groups))
        lo, hi = 0.01, 10.0
        for _ in range(30):
            f = (lo * hi) ** 0.5
            plan = PruningPlan(alignment=8, model_fingerprint=spec.fingerprint,
                               model_name=spec.model_name)
            for name, b in zip(groups, base):
                plan.groups[name] = GroupPlan(Structure.CHANNEL, float(np.clip(keep * b * f,
                                                                                0.05, 1.0)))
            macs = spec.count(plan)[0]
            if abs(macs / target - 1) <= 0.03:
                plans.append(plan)
                break
            lo, hi = (f, hi) if macs < target else (lo, f)
    return plans


def task_args(p: argparse.ArgumentParser, dense_epochs: int) -> None:
    """The task options this script shares with bench_bn_recalibration.py."""
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", choices=("digits", "glyphs"), default="digits")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=10_000, help="glyphs training images")
    p.add_argument("--dense-epochs", type=int, default=dense_epochs)
    p.add_argument("--keep", type=float, default=0.35)
    p.add_argument("--epochs", type=int, default=1, help="the real fine-tune")
    p.add_argument("--threads", type=int, default=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    task_args(p, dense_epochs=5)
    p.add_argument("--n-plans", type=int, default=12)
    p.add_argument("--steps", default="30,100", help="fine-tune steps of the costlier proxies")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_proxy_rank.csv")
    args = p.parse_args()

    import autoprune as ap
    from autoprune.evaluators import accuracy_evaluator
    from autoprune.io import atomic_write_text
    from autoprune.zoo import torchvision_model

    torch.set_num_threads(args.threads)
    train, hold, test, classes = data(args)
    torch.manual_seed(0)
    dense = torchvision_model(args.model, num_classes=classes)
    t0 = time.perf_counter()
    ap.finetune(dense, train, epochs=args.dense_epochs, lr=0.05, seed=0, progress=False)
    dense.eval()
    acc_dense = ap.evaluate_accuracy(dense, test)
    print(f"dense {args.model} on {args.data} {args.size}²: test accuracy {100 * acc_dense:.2f}% "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    x = torch.randn(1, 3, args.size, args.size)
    spec = ap.analyze(dense, x)
    plans = random_plans(spec, args.keep, args.n_plans, args.seed)
    steps = [int(s) for s in args.steps.split(",") if s]
    proxies = {"bn": accuracy_evaluator(hold, calib_loader=train)}
    proxies.update({f"ft{k}": accuracy_evaluator(hold, calib_loader=train, finetune_steps=k)
                    for k in steps})
    rows = []
    for i, plan in enumerate(plans):
        row: dict[str, Any] = {"plan": i, "macs": spec.count(plan)[0]}
        for name, ev in proxies.items():
            t = time.perf_counter()
            torch.manual_seed(args.seed)
            row[name] = float(ev(ap.apply_plan(dense, plan, x, spec=spec)))
            row[f"{name}_s"] = time.perf_counter() - t
        m = ap.apply_plan(dense, plan, x, spec=spec)
        ap.finetune(m, train, epochs=args.epochs, lr=0.01, teacher=copy.deepcopy(dense),
                    seed=args.seed, progress=False)
        row["final"] = float(ap.evaluate_accuracy(m.eval(), test))
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        atomic_write_text(args.out, pd.DataFrame(rows).to_csv(index=False))
    df = pd.DataFrame(rows)
    print(f"\n{args.model}, {args.data} {args.size}², {len(df)} plans at {args.keep:.2f} of the "
          f"MACs' keep (MACs {df['macs'].min() / 1e6:.1f}-{df['macs'].max() / 1e6:.1f} M), "
          f"real fine-tune {args.epochs} epoch(s); final accuracy "
          f"{100 * df['final'].min():.1f}-{100 * df['final'].max():.1f}% (dense "
          f"{100 * acc_dense:.2f}%)\n")
    print("| proxy | Spearman with final accuracy | s per plan | proxy range |")
    print("|---|---|---|---|")
    for name in proxies:
        rho = df[name].corr(df["final"], method="spearman")
        print(f"| {name} | {rho:.2f} | {df[f'{name}_s'].mean():.1f} | "
              f"{100 * df[name].min():.1f}-{100 * df[name].max():.1f}% |")


if __name__ == "__main__":
    main()
