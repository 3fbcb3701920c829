"""End-to-end benchmark: accuracy at equal measured latency, autoprune vs two peers.

For each model (trained here: resnet18 and mobilenet_v2 on ``--data`` — sklearn ``digits``
or autoprune's 64-class ``glyphs`` task, which is not saturated — and a 1-D CNN on MNIST-1D)
and each budget (a share of the dense model's latency measured on ONNX Runtime CPU, 1 thread),
the methods are brought to the budget and fine-tuned with the same recipe
(``autoprune.finetune``, dense model as teacher, same epochs/lr/seed):

- ``autoprune``: ``autoprune.search`` with the budget (predictor + table), accuracy proxy on a
  held-out split of the training data (never the test set) after BatchNorm re-calibration;
- ``autoprune_ftproxy``: the same, but the proxy first fine-tunes each candidate for
  ``--proxy-finetune-steps`` SGD steps (a proxy that still carries signal at hard budgets);
- ``autoprune_refined``: two fidelities: the cheap proxy for every trial, then the 8 best
  distinct feasible plans re-scored after ``--proxy-finetune-steps`` SGD steps
  (``search(refine_evaluator=..., refine_top_k=8)``), the choice made among those;
- ``autoprune_greedy`` / ``autoprune_random``: the same search with the ``greedy`` (knapsack on
  weight magnitude) or ``random`` strategy and the same trial count;
- ``autoprune_sensitivity`` / ``autoprune_greedy_sensitivity``: the TPE / greedy search whose
  greedy path (TPE's warm start) trades latency against the proxy's measured drop per group
  (``search(importance=<table>)``, ``SensitivityProxy``: one group pruned at a time, measured
  once per model and space in ``--work`` and reused by every budget and seed);
- ``uniform16``: the same keep ratio on every channel group, widths rounded to 16, the largest
  ratio whose measured latency fits the budget (bisection on measured latency);
- ``uniform_aligned``: the same, widths rounded to the device's alignment (kernel rules);
- ``tp_global``: Torch-Pruning's global magnitude pruning (L2, ``global_pruning=True``), the
  smallest pruning ratio whose measured latency fits the budget (bisection);
- ``tp_global_rounded``: the same with Torch-Pruning's ``round_to`` set to the device alignment.

Every latency is a paired ratio against the dense model (timed alternately, median of the
per-pair ratios, IQR beside it); ``latency_ms = ratio x dense median``. Accuracy is top-1 on the
test split (digits: 360 images, one image = 0.28 points; glyphs: 2,000 images, 0.05 points;
MNIST-1D: 1,000 sequences).

    python benchmarks/bench_end_to_end.py --models resnet18,mobilenet_v2,conv1d \\
        --budgets 0.7,0.5,0.35,0.2 --epochs 3 --seeds 0 --out runs/bench_e2e/results.csv
    python benchmarks/bench_end_to_end.py --budgets 0.2 --epochs 1 --seeds 0,1,2   # hard regime
    python benchmarks/bench_end_to_end.py --data glyphs --size 64 --models resnet18 \
        --budgets 0.5,0.35,0.2 --epochs 1 --seeds 0,1,2 --out runs/bench_e2e_glyphs/results.csv
    # the CPU-sized configuration of the same (2-vCPU VM, about an hour; BENCHMARKS.md):
    python benchmarks/bench_end_to_end.py --data glyphs --size 32 --models resnet18 \
        --methods autoprune,uniform_aligned,tp_global,tp_global_rounded --budgets 0.5,0.35,0.2 \
        --epochs 1 --dense-epochs 8 --glyphs-train 8000 --seeds 0,1,2 --n-trials 24 \
        --predictor-samples 24 --torch-threads 2 --work runs/bench_e2e_glyphs32 \
        --out runs/bench_e2e_glyphs32/results.csv

Rows are appended to the CSV as they finish (a rerun skips rows already there).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

MODELS = ("resnet18", "mobilenet_v2", "conv1d")
METHODS = ("autoprune", "autoprune_ftproxy", "autoprune_refined", "autoprune_greedy",
           "autoprune_random", "autoprune_sensitivity", "autoprune_greedy_sensitivity",
           "uniform16", "uniform_aligned", "tp_global", "tp_global_rounded")
#: the search strategy of each autoprune method
STRATEGY = {"autoprune": "tpe", "autoprune_ftproxy": "tpe", "autoprune_refined": "tpe",
            "autoprune_greedy": "greedy", "autoprune_random": "random",
            "autoprune_sensitivity": "tpe", "autoprune_greedy_sensitivity": "greedy"}
#: classes of each image task
N_CLASSES = {"digits": 10, "glyphs": 64}


# --- data and dense models -------------------------------------------------------------------
#: glyphs generation options set from the command line (``--glyphs-train``)
GLYPHS: dict[str, Any] = {}


def loaders(model_name: str, seed: int, size: int, data: str = "digits"
            ) -> tuple[DataLoader, DataLoader, DataLoader]:
    """(train, search-holdout, test): the holdout is 20% of the training split."""
    from autoprune.data import digits_tensors, glyphs_tensors, mnist1d_tensors

    if model_name == "conv1d":
        train, test = mnist1d_tensors(seed=0)
    elif data == "glyphs":
        train, test = glyphs_tensors(size=size, channels=3, n_classes=N_CLASSES["glyphs"],
                                     seed=0, **GLYPHS)
    else:
        train, test = digits_tensors(size=size, channels=3, seed=0)
    n = len(train)
    idx = np.random.default_rng(0).permutation(n)
    n_hold = n // 5
    fit, hold = Subset(train, idx[n_hold:].tolist()), Subset(train, idx[:n_hold].tolist())
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(fit, batch_size=64, shuffle=True, generator=g),
            DataLoader(hold, batch_size=256),
            DataLoader(test, batch_size=256))


def make_model(name: str, data: str = "digits") -> nn.Module:
    from autoprune.zoo import conv1d_net, torchvision_model

    if name == "conv1d":
        return conv1d_net(num_classes=10, width=64)
    return torchvision_model(name, num_classes=N_CLASSES[data])


def example_input(name: str, size: int) -> torch.Tensor:
    return torch.randn(1, 1, 40) if name == "conv1d" else torch.randn(1, 3, size, size)


def dense_model(name: str, size: int, work: Path, epochs: int, device: str = "cpu",
                data: str = "digits") -> nn.Module:
    """Train (once; cached in ``work``) the dense model with seed 0."""
    from autoprune._finetune import finetune
    from autoprune.io import atomic_torch_save, safe_torch_load

    tag = "" if data == "digits" or name == "conv1d" else f"_{data}"
    if data == "glyphs" and GLYPHS:
        tag += "".join(f"_{k}{v}" for k, v in sorted(GLYPHS.items()))
    path = work / f"dense_{name}_{size}{tag}.pt"
    torch.manual_seed(0)
    model = make_model(name, data)
    if path.exists():
        model.load_state_dict(safe_torch_load(path))
        return model.eval()
    train, _, _ = loaders(name, 0, size, data)
    finetune(model, train, epochs=epochs, lr=0.05, seed=0, progress=False, device=device)
    model.cpu()
    atomic_torch_save(model.state_dict(), path)
    return model.eval()


# --- latency ------------------------------------------------------------------------------------
def paired(backend: Any, model: nn.Module, dense: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(median ratio model/dense, IQR of the ratios)."""
    r, iqr = backend.measure_ratio(model.eval(), dense.eval(), (x,))
    return float(r), float(iqr)


def bisect_to_budget(build: Any, backend: Any, dense: nn.Module, x: torch.Tensor,
                     target_ratio: float, lo: float, hi: float, iters: int) -> tuple[float, nn.Module,
                                                                                      float, float]:
    """Largest knob in [lo, hi] (knob = kept share; latency grows with it) whose measured ratio
    is <= target. Returns (knob, model, ratio, iqr); falls back to ``lo`` if nothing fits."""
    best: tuple[float, nn.Module, float, float] | None = None
    a, b = lo, hi
    for _ in range(iters):
        mid = 0.5 * (a + b)
        m = build(mid)
        r, iqr = paired(backend, m, dense, x)
        if r <= target_ratio:
            if best is None or mid > best[0]:
                best = (mid, m, r, iqr)
            a = mid
        else:
            b = mid
    if best is None:
        m = build(lo)
        r, iqr = paired(backend, m, dense, x)
        best = (lo, m, r, iqr)
    return best


def uniform16(model: nn.Module, x: torch.Tensor, spec: Any, keep: float) -> nn.Module:
    from autoprune.executor import apply_plan
    from autoprune.plan import PruningPlan

    plan = PruningPlan.uniform(spec, keep_ratio=keep, structure="channel", alignment=16)
    return apply_plan(model, plan, (x,))


def uniform_aligned(model: nn.Module, x: torch.Tensor, spec: Any, keep: float,
                    alignment: int) -> nn.Module:
    from autoprune.executor import apply_plan
    from autoprune.plan import PruningPlan

    plan = PruningPlan.uniform(spec, keep_ratio=keep, structure="channel", alignment=alignment)
    return apply_plan(model, plan, (x,))


def tp_global(model: nn.Module, x: torch.Tensor, keep: float, round_to: int | None = None
              ) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        m, x, importance=tp.importance.MagnitudeImportance(p=2), global_pruning=True,
        pruning_ratio=1.0 - keep, ignored_layers=[last], max_pruning_ratio=0.95,
        round_to=round_to,
    )
    pruner.step()
    return m.eval()


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), x)
    return int(macs)


# --- autoprune ----------------------------------------------------------------------------------
def search_with_fallbacks(run_search: Any, budget_ms: float) -> tuple[Any, str]:
    """``run_search(latency_budget_ms, space_options, subdir)`` with the benchmark's fallbacks,
    in order, until one does not raise ``InfeasibleBudgetError``:

    1. the default space at ``budget_ms``;
    2. narrower widths allowed (``min_keep_ratio=0.05``) at ``budget_ms``;
    3. that space at 1.15x the predicted fastest plan (the predictor's floor can be pessimistic
       for overhead-bound models: the measured paired ratio then decides).

    Returns (SearchResult or None when all fail, a note on which fallback was taken)."""
    import warnings

    from autoprune.errors import InfeasibleBudgetError

    attempts: list[tuple[dict[str, Any], float | None]] = [({}, None),
                                                           ({"min_keep_ratio": 0.05}, None)]
    note = ""
    for i, (opts, floor_ms) in enumerate(attempts, start=1):  # attempts may grow in the loop
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = run_search(budget_ms if floor_ms is None else floor_ms, opts,
                                    f"space{len(opts)}_{i}")
        except InfeasibleBudgetError as e:
            note = f" budget below the predicted fastest plan ({e.fastest_ms:.4g} ms);"
            if opts and floor_ms is None:
                attempts.append((opts, 1.15 * e.fastest_ms))
            continue
        if opts:
            note += " searched with min_keep_ratio=0.05;"
        if floor_ms is not None:
            note += (f" searched at 1.15x the predicted floor ({floor_ms:.4g} ms), plans then "
                     "selected by measured ratio;")
        return result, note
    return None, note + " below the fastest plan of the space: fastest plan taken"


def autoprune_model(model: nn.Module, x: torch.Tensor, backend: Any, frac: float,
                    hold: DataLoader, train: DataLoader, n_trials: int, seed: int,
                    cache: dict[str, Any], work: Path, name: str, spec: Any,
                    predictor_samples: int, proxy_steps: int = 0,
                    tag: str = "autoprune", tables_root: Path | None = None,
                    train_device: str = "cpu", strategy: str = "tpe", refine_steps: int = 0,
                    budget_rounds: int = 1, sensitivity: bool = False
                    ) -> tuple[nn.Module, Any, str]:
    """The pipeline's ``budget_fraction`` mode: search at the anchored budget (predicted latency
    of the widest uniform plan measured within ``frac``; ``frac x predicted dense`` if none) and
    take the best-proxy feasible plan whose paired measured ratio is <= frac (no headroom here
    so all methods face the same criterion); with ``budget_rounds=2`` a chosen plan measured
    under 95% of the budget triggers a second search at the budget scaled by measurement, as
    ``SearchConfig(budget_rounds=2)`` does in the pipeline. Table and predictor are built once
    per model."""
    from autoprune._search import search, select_finalists
    from autoprune.budget import Budget
    from autoprune.evaluators import accuracy_evaluator
    from autoprune.executor import apply_plan
    from autoprune.io import atomic_write_text
    from autoprune.latency._predictor import LatencyPredictor
    from autoprune.latency._profile import profile
    from autoprune.pipeline._anchor import budget_use, keep_second, second_round_budget_ms
    from autoprune.plan import PruningPlan
    from autoprune.space import SearchSpace

    if "predictor" not in cache:
        t0 = time.perf_counter()
        cache["table"] = profile(model, (x,), backend, spec=spec,
                                 root=tables_root or work / "latency_tables", progress=False)
        pred_path = work / f"predictor_{name}.csv"
        if pred_path.exists():  # fitted by an earlier run of this script (same model, device)
            cache["predictor"] = LatencyPredictor.load(pred_path, table=cache["table"])
        else:
            cache["predictor"] = LatencyPredictor(n_samples=predictor_samples,
                                                  random_state=0).fit(
                table=cache["table"], model=model, example_inputs=(x,), backend=backend,
                spec=spec, progress=False)
            cache["predictor"].save(pred_path)
        cache["setup_s"] = time.perf_counter() - t0
        print(f"  [{name}] table + predictor in {cache['setup_s']:.0f}s", flush=True)
    predictor = cache["predictor"]
    # the pipeline's budget anchoring: the predicted latency of the widest uniform plan whose
    # measured ratio fits (cached per model and budget: it does not depend on the seed)
    from autoprune.pipeline import anchor_budget_ms

    key = f"anchor_{frac}"
    if key not in cache:
        cache[key] = (anchor_budget_ms(model, (x,), spec, cache["table"], backend, predictor, frac)
                      or anchor_budget_ms(model, (x,), spec, cache["table"], backend, predictor,
                                          frac, {"min_keep_ratio": 0.05}))
    anchor = cache[key]
    budget_ms = (anchor.budget_ms if anchor is not None
                 else frac * float(predictor.predict(PruningPlan.dense(spec))))
    run_dir = work / f"search_{name}_{frac:g}_s{seed}" / tag
    note = (f"budget anchored at uniform keep {anchor.keep_ratio:.3f} (measured ratio "
            f"{anchor.measured_ratio:.3f}, predicted {budget_ms:.4g} ms);" if anchor else "")
    evaluator = accuracy_evaluator(hold, calib_loader=train, finetune_steps=proxy_steps,
                                   device=train_device)
    refine = (accuracy_evaluator(hold, calib_loader=train, finetune_steps=refine_steps,
                                 device=train_device) if refine_steps else None)
    def importance(opts: dict[str, Any]) -> Any:
        if not sensitivity:
            return "magnitude"
        return work / ("_".join([f"sensitivity_{name}", *(f"{k}{v}" for k, v in opts.items())])
                       + ".csv")

    def run_search(trials: int, root: Path) -> Any:
        return lambda ms, opts, sub: search(
            model, (x,), device=backend, latency_budget_ms=ms, evaluator=evaluator,
            n_trials=trials, strategy=strategy, table=cache["table"], predictor=predictor,
            run_dir=root / sub, seed=seed, progress=False, spec=spec,
            verify_finalists=False, space_options=opts, refine_evaluator=refine,
            refine_top_k=8, importance=importance(opts))

    def finalists_of(res: Any) -> Any:
        return select_finalists(res.trials, model, (x,), spec, backend,
                                Budget.of(budget_fraction=frac), n_finalists=1,
                                max_remeasure=8, proxy_tolerance=0.01)

    result, why = search_with_fallbacks(run_search(n_trials, run_dir), budget_ms)
    note += why
    if result is None:
        space = SearchSpace.from_spec(spec, cache["table"], backend, min_keep_ratio=0.05)
        plan = space.fastest_plan()
        return apply_plan(model, plan, (x,), spec=spec), plan, note
    fin = finalists_of(result)
    result = result.with_finalists(fin)
    use = budget_use(fin.table, Budget.of(budget_fraction=frac))
    second_ms = second_round_budget_ms(budget_ms, use) if budget_rounds > 1 else None
    if second_ms is not None:  # the pipeline's closed loop on the measured budget use
        second, _ = search_with_fallbacks(run_search(max(1, n_trials // 2), run_dir / "round2"),
                                          second_ms)
        fin2 = finalists_of(second) if second is not None else None
        if fin2 is not None:
            atomic_write_text(run_dir / "round2" / "finalists_measured.csv",
                              fin2.table.to_csv(index=False))
        kept = fin2 is not None and keep_second(fin.table, fin2.table)
        note += (f" first choice used {use:.0%} of the budget: second search at "
                 f"{second_ms:.4g} ms {'kept' if kept else 'not kept'};")
        if kept:
            fin, result = fin2, second.with_finalists(fin2)
    atomic_write_text(run_dir / "finalists.csv", result.finalists.to_csv(index=False))
    plan = fin.chosen
    if plan is None and len(result.finalists):  # none met the budget: the fastest measured
        fin = result.finalists.sort_values("measured_ratio")
        plan = PruningPlan.from_json(fin["plan"].iloc[0])
        note += " no finalist within budget; fastest finalist taken"
    elif plan is None:  # no trial was even predicted within the budget
        plan = SearchSpace.from_spec(spec, cache["table"], backend,
                                     min_keep_ratio=0.05).fastest_plan()
        note += " no trial predicted within budget; fastest plan of the space taken"
    return apply_plan(model, plan, (x,), spec=spec), plan, note


# --- main -----------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    from autoprune._analyze import analyze
    from autoprune._finetune import evaluate_accuracy, finetune
    from autoprune.backends import get_backend

    torch.set_num_threads(args.torch_threads)
    if args.glyphs_train:
        GLYPHS["n_train"] = args.glyphs_train
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    done: set[tuple[str, float, str, int, int]] = set()
    if out.exists():
        old = pd.read_csv(out)
        done = {(r.model, round(r.budget_fraction, 3), r.method, int(r.seed), int(r.epochs))
                for r in old.itertuples()}
    backend = get_backend("onnxruntime-cpu", threads=1)
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    for name in args.models.split(","):
        x = example_input(name, args.size)
        dense = dense_model(name, args.size, work, args.dense_epochs, args.train_device,
                            args.data)
        _, _, test = loaders(name, 0, args.size, args.data)
        acc_dense = evaluate_accuracy(dense, test)
        dense_sample = backend.measure_model(dense, (x,))
        spec = analyze(dense, (x,))
        macs_dense = macs_of(dense, x)
        from autoprune.latency import cached_kernel_rules

        align = int(cached_kernel_rules(backend).alignment)  # the device's, for every model
        print(f"== {name}: dense {dense_sample}, accuracy {100 * acc_dense:.2f}%", flush=True)
        cache: dict[str, Any] = {}
        for frac in budgets:
            budget_ms = frac * dense_sample.median_ms
            for seed in seeds:
                train, hold, test = loaders(name, seed, args.size, args.data)
                for method in methods:
                    key = (name, round(frac, 3), method, seed, args.epochs)
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    torch.manual_seed(seed)
                    plan_note = ""
                    if method in STRATEGY:
                        steps = args.proxy_finetune_steps if method == "autoprune_ftproxy" else 0
                        rsteps = (args.proxy_finetune_steps if method == "autoprune_refined"
                                  else 0)
                        pruned, plan, note = autoprune_model(
                            dense, x, backend, frac, hold, train, args.n_trials, seed, cache,
                            work, name, spec, args.predictor_samples, steps, method,
                            Path(args.tables_root) if args.tables_root else None,
                            args.train_device, STRATEGY[method], rsteps, args.budget_rounds,
                            sensitivity=method.endswith("_sensitivity"))
                        ratio, iqr = paired(backend, pruned, dense, x)
                        plan_note = (note + " " if note else "") + plan.to_json(indent=None)
                    elif method == "uniform16":
                        _, pruned, ratio, iqr = bisect_to_budget(
                            lambda k: uniform16(dense, x, spec, k), backend, dense, x, frac,
                            0.05, 1.0, args.bisect_iters)
                    elif method == "uniform_aligned":
                        _, pruned, ratio, iqr = bisect_to_budget(
                            lambda k: uniform_aligned(dense, x, spec, k, align), backend, dense,
                            x, frac, 0.05, 1.0, args.bisect_iters)
                    elif method in ("tp_global", "tp_global_rounded"):
                        rt = align if method == "tp_global_rounded" else None
                        _, pruned, ratio, iqr = bisect_to_budget(
                            lambda k: tp_global(dense, x, k, rt), backend, dense, x, frac,
                            0.05, 1.0, args.bisect_iters)
                    else:
                        raise SystemExit(f"unknown method {method!r}; known: {METHODS}")
                    t_prune = time.perf_counter() - t0
                    acc_before = evaluate_accuracy(pruned, test)
                    finetune(pruned, train, epochs=args.epochs, lr=args.lr, seed=seed,
                             teacher=copy.deepcopy(dense), progress=False,
                             device=args.train_device)
                    pruned.cpu().eval()
                    acc = evaluate_accuracy(pruned, test)
                    # re-measure after fine-tuning (weights changed, shapes did not)
                    ratio2, iqr2 = paired(backend, pruned, dense, x)
                    macs = macs_of(pruned, x)
                    row = {
                        "model": name, "budget_fraction": frac, "method": method, "seed": seed,
                        "epochs": args.epochs, "acc_dense": acc_dense, "acc_before_ft": acc_before,
                        "acc": acc, "ratio": ratio2, "ratio_iqr": iqr2, "ratio_at_selection": ratio,
                        "speedup": 1.0 / ratio2, "mac_reduction": macs_dense / max(1, macs),
                        "dense_ms": dense_sample.median_ms, "dense_iqr_ms": dense_sample.iqr_ms,
                        "latency_ms": ratio2 * dense_sample.median_ms, "budget_ms": budget_ms,
                        "meets_budget": bool(ratio2 <= frac), "prune_s": round(t_prune, 1),
                        "total_s": round(time.perf_counter() - t0, 1), "plan": plan_note,
                        "cpu": backend.device_info().device_name, "data": args.data,
                        "alignment": align,
                    }
                    print(f"  {name} {frac:.2f} {method:9s} seed {seed}: acc {100 * acc:.2f}% "
                          f"(before ft {100 * acc_before:.1f}%), ratio {ratio2:.3f}±{iqr2:.3f}, "
                          f"MACs /{row['mac_reduction']:.2f}, {row['total_s']}s", flush=True)
                    pd.DataFrame([row]).to_csv(out, mode="a", header=not out.exists(), index=False)


def summarize(paths: list[Path]) -> str:
    """Markdown table: mean ± std over seeds per model/budget/epochs/method."""
    df = pd.concat([pd.read_csv(p) for p in paths if p.exists()], ignore_index=True)
    rows = []
    for (model, frac, epochs, method), g in df.groupby(["model", "budget_fraction", "epochs",
                                                         "method"], sort=True):
        def ms(col: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
            v = g[col].to_numpy() * scale
            if len(v) == 1:
                return fmt.format(v[0])
            return f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"

        rows.append(
            f"| {model} | {frac:.2f} | {epochs} | {method} | {len(g)} | {ms('acc', 100)} "
            f"| {g['ratio_at_selection'].mean():.3f} "
            f"| {ms('ratio', 1, '{:.3f}')} (IQR {g['ratio_iqr'].median():.3f}) "
            f"| {ms('speedup')} | {ms('mac_reduction')} | {int(g['meets_budget'].sum())}/{len(g)} |"
        )
    head = ("| model | budget (× dense) | ft epochs | method | seeds | accuracy % "
            "| ratio at selection (mean) | measured ratio after fine-tuning "
            "| speed-up | MAC reduction | within budget |\n|---|---|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def paired_summary(paths: list[Path], method: str = "autoprune") -> str:
    """Markdown table: per model/budget/epochs, ``method``'s accuracy minus each other method's
    on the same seed (same dense model, data order and fine-tuning), mean ± standard error and
    how often ``method`` was ahead."""
    df = pd.concat([pd.read_csv(p) for p in paths if p.exists()], ignore_index=True)
    rows = []
    for (model, frac, epochs), g in df.groupby(["model", "budget_fraction", "epochs"], sort=True):
        wide = g.pivot_table(index="seed", columns="method", values="acc") * 100
        if method not in wide:
            continue
        for other in [c for c in wide.columns if c != method]:
            d = (wide[method] - wide[other]).dropna()
            if len(d) < 2:
                continue
            se = d.std(ddof=1) / np.sqrt(len(d))
            rows.append(f"| {model} | {frac:.2f} | {epochs} | {other} | {len(d)} | "
                        f"{d.mean():+.1f} ± {se:.1f} | {int((d > 0).sum())}/{int((d < 0).sum())} |")
    head = (f"| model | budget | ft epochs | vs | seeds | {method} − other, points (mean ± SE) "
            "| ahead/behind |\n|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def plot(paths: list[Path], png: Path) -> Path:
    """Accuracy after fine-tuning against measured latency (ratio to dense, paired), one
    panel per model and fine-tune length, one marker per method (mean over seeds, bars: the
    seeds' standard deviation on both axes); dashed lines mark the budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoprune.visualization import save_png

    df = pd.concat([pd.read_csv(p) for p in paths if p.exists()], ignore_index=True)
    panels = sorted(df.groupby(["model", "epochs"]).groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    markers = dict(zip(sorted(df["method"].unique()), "osD^v<>ph*"))
    for ax, (model, epochs) in zip(axes[0], panels):
        g = df[(df["model"] == model) & (df["epochs"] == epochs)]
        for frac in sorted(g["budget_fraction"].unique()):
            ax.axvline(frac, color="0.7", ls="--", lw=0.8)
        for method, gm in g.groupby("method"):
            stats = gm.groupby("budget_fraction").agg(
                x=("ratio", "mean"), xe=("ratio", "std"), y=("acc", "mean"), ye=("acc", "std"))
            ax.errorbar(stats["x"], 100 * stats["y"], xerr=stats["xe"].fillna(0),
                        yerr=100 * stats["ye"].fillna(0), marker=markers[method], ls="-",
                        lw=0.8, capsize=2, label=method)
        task = f"{g['data'].iloc[0]}, " if "data" in g else ""  # older CSVs: no column
        dense = 100 * g["acc_dense"].mean()
        ax.axhline(dense, color="k", lw=0.8, ls=":", label=f"dense {dense:.1f}%")
        ax.set(xlabel="measured latency / dense (paired, after fine-tuning)",
               ylabel="test accuracy %", title=f"{model}, {task}"
               f"{epochs}-epoch fine-tune, {g['seed'].nunique()} seed(s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_png(fig, png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budgets", default="0.7,0.5,0.35,0.2")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (same for all)")
    p.add_argument("--dense-epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--size", type=int, default=32, help="image size (digits, glyphs)")
    p.add_argument("--data", choices=sorted(N_CLASSES), default="digits",
                   help="image task of the torchvision models")
    p.add_argument("--n-trials", type=int, default=40)
    p.add_argument("--bisect-iters", type=int, default=6)
    p.add_argument("--predictor-samples", type=int, default=40)
    p.add_argument("--proxy-finetune-steps", type=int, default=30,
                   help="SGD steps per trial in the accuracy proxy of autoprune_ftproxy (and "
                        "per refined plan of autoprune_refined)")
    p.add_argument("--train-device", default="cpu",
                   help="where dense training, fine-tuning and the search proxy run (latency is "
                        "always ONNX Runtime CPU, 1 thread)")
    p.add_argument("--budget-rounds", type=int, default=1,
                   help="autoprune methods: 2 = search again when the choice measures under "
                        "95%% of the budget (SearchConfig(budget_rounds=2)), 1 = one search "
                        "(the pipeline's default)")
    p.add_argument("--glyphs-train", type=int, default=0,
                   help="training images of the glyphs task (0: its default, 10,000)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="threads of training and fine-tuning on the CPU (latency is always "
                        "measured with 1 ONNX Runtime thread; 1 when streams share a machine)")
    p.add_argument("--tables-root", default="latency_tables",
                   help="latency tables root (the shipped tables; a new CPU gets its own "
                        "directory there); empty for WORK/latency_tables")
    p.add_argument("--work", default="runs/bench_e2e")
    p.add_argument("--out", default="runs/bench_e2e/results.csv")
    p.add_argument("--summarize", action="store_true", help="print the markdown table and exit")
    p.add_argument("--plot", default="",
                   help="with --summarize: also write accuracy vs measured latency to this PNG")
    p.add_argument("--vs", default="autoprune",
                   help="with --summarize: the method the paired table compares to the others")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.summarize:
        paths = [Path(p) for p in args.out.split(",")]
        print(summarize(paths))
        print()
        print(paired_summary(paths, args.vs))
        if args.plot:
            print(f"plot: {plot(paths, Path(args.plot))}")
        return 0
    run(args)
    print(summarize([Path(args.out)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
