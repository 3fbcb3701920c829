"""``autoprune search``: search pruning plans under a latency budget and print the front.

    autoprune search --model torchvision.models:resnet18 --num-classes 10 \\
        --input-shape 1,3,32,32 --device onnxruntime-cpu --budget-ms 2.0 --trials 100

Without an evaluator (the command line has none) the proxy is the data-free weight-magnitude
share (``autoprune.evaluators.ImportanceProxy``). ``--storage postgresql://... --study NAME``
on several machines makes them workers of one study; the same ``--run-dir`` resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from autoprune.cli.common import add_backend_args


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "search", help="search per-layer pruning plans under a latency budget",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="importable factory, module:callable")
    p.add_argument("--model-kwargs", default=None,
                   help='JSON keyword arguments, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--num-classes", type=int, default=None,
                   help="shortcut for --model-kwargs '{\"num_classes\": N}'")
    p.add_argument("--weights", default=None,
                   help="state_dict file (torch.load weights_only=True)")
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,32,32")
    add_backend_args(p)
    p.add_argument("--budget-ms", type=float, required=True, help="latency budget in ms")
    p.add_argument("--trials", type=int, default=100, help="total trials of the study")
    p.add_argument("--strategy", default="tpe",
                   help="tpe (default), nsga2, motpe, random, rl, greedy")
    p.add_argument("--space", default=None,
                   help="search-space preset (default, resnet, mobilenet, vit) or YAML path")
    p.add_argument("--storage", default=None,
                   help="study storage: a .journal path or postgresql://... (default: "
                        "<run-dir>/study.journal)")
    p.add_argument("--study", default=None, help="study name (workers of one study share it)")
    p.add_argument("--run-dir", default=None,
                   help="run directory (resumed if it exists; default: runs/search-<model>-"
                        "<fingerprint>-<device>-<budget>ms-<strategy>)")
    p.add_argument("--tables-root", default="latency_tables",
                   help="latency table directory to reuse/extend")
    p.add_argument("--predictor", choices=("fit", "table"), default="fit",
                   help="fit: LatencyPredictor on measured random plans (default); table: "
                        "table sums mapped onto two measured plans (fast, less accurate)")
    p.add_argument("--predictor-samples", type=int, default=60,
                   help="plans measured to fit the latency predictor")
    p.add_argument("--finalists", type=int, default=3, help="plans re-measured on the device")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from autoprune._search import check_budget
    from autoprune.cli.common import load_model, make_backend, parse_shape

    check_budget(args.budget_ms)  # fail on a bad budget before minutes of profiling
    model = load_model(args.model, args.model_kwargs, args.weights, num_classes=args.num_classes)
    shape = parse_shape(args.input_shape)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(args.seed))
    backend = make_backend(args)
    progress = not args.quiet

    from autoprune._analyze import analyze
    from autoprune._search import run_stem, search
    from autoprune.latency._predictor import LatencyPredictor
    from autoprune.latency._profile import profile
    from autoprune.strategies import get_strategy

    spec = analyze(model, x)
    run_dir = args.run_dir
    if run_dir is None:  # the command line keeps its results; the library call would not
        device_name = getattr(backend, "name", "") or type(backend).__name__
        run_dir = Path("runs") / run_stem(spec, device_name, args.budget_ms,
                                           get_strategy(args.strategy).name)
    table = profile(model, x, backend, spec=spec, root=args.tables_root, progress=progress)
    predictor: Any = "table"
    if args.predictor == "fit":
        predictor = LatencyPredictor(n_samples=args.predictor_samples,
                                     random_state=args.seed).fit(
            table=table, model=model, example_inputs=x, backend=backend, spec=spec,
            progress=progress)
    result = search(
        model, x, device=backend, latency_budget_ms=args.budget_ms, evaluator=None,
        n_trials=args.trials, strategy=args.strategy, table=table, predictor=predictor,
        space=args.space, storage=args.storage, study_name=args.study, run_dir=run_dir,
        n_finalists=args.finalists, seed=args.seed, progress=progress, timeout_s=args.timeout_s,
        spec=spec,
    )
    front = result.pareto_front()
    cols = ["trial", "proxy", "predicted_latency_ms", "measured_latency_ms", "speedup",
            "macs", "params"]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(f"Pareto front ({len(front)} of {len(result.trials)} trials; proxy = "
              f"kept weight-magnitude share; budget {result.budget_ms:.4g} ms, dense measured "
              f"{result.dense_latency_ms:.4g} ms):")
        print(front[cols].to_string(index=False) if len(front) else "(empty)")
        if not result.finalists.empty:
            print("\nfinalists re-measured on the device:")
            print(result.finalists.drop(columns=["plan"]).to_string(index=False))
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nrun directory: {result.run_dir}")
    if result.best_plan is None:
        print("no plan met the budget when measured (see notes)")
        return 1
    print(f"best plan: {(result.run_dir or Path(run_dir)) / 'best_plan.json'}")
    return 0
