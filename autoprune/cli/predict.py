"""``autoprune predict``: fit (or reload) a whole-network latency predictor, print its held-out
report and predict plans.

Examples::

    # fit on the device: measures random pruned variants, stores the dataset next to the table
    autoprune predict --model torchvision.models:resnet18 --input-shape 1,3,32,32 \\
        --num-classes 10 --device onnxruntime-cpu --threads 1 --n-samples 120 --plan plan.json

    # reuse a stored dataset (refits exactly, measures nothing)
    autoprune predict --predictor latency_tables/<device_id>/predictor_ResNet_<fp>.csv \\
        --plan plan.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from autoprune.errors import InvalidInputError


def register(subparsers: Any) -> None:
    from autoprune.cli.common import add_backend_args

    p = subparsers.add_parser(
        "predict", help="fit or reload a latency predictor; print its report and predictions",
        description="Fit the whole-network latency predictor on a device (resumable: the "
                    "measured dataset is stored next to the latency table) or reload one from "
                    "its dataset CSV, print its held-out accuracy and predict plans.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="factory 'module:function' (fit on the device)")
    src.add_argument("--predictor", help="dataset CSV written by a previous fit (reload)")
    p.add_argument("--input-shape", help="e.g. 1,3,32,32 (with --model)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--root", default="latency_tables", help="latency-table root directory")
    p.add_argument("--table", default=None,
                   help="table directory (default: the CSV's directory / root/<device_id>)")
    p.add_argument("--n-samples", type=int, default=120, help="plans to measure")
    p.add_argument("--holdout", type=float, default=0.25, help="share held out for the report")
    p.add_argument("--regressor", default="auto", choices=["auto", "linear", "boosted", "gbr"])
    p.add_argument("--active", action="store_true",
                   help="measure more plans where held-out error is largest")
    p.add_argument("--max-samples", type=int, default=240, help="cap with --active")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan", action="append", default=[], help="plan JSON to predict (repeat)")
    p.add_argument("--no-progress", action="store_true")
    add_backend_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoprune.latency._predictor import LatencyPredictor
    from autoprune.plan import PruningPlan

    if args.predictor is not None:
        table = None
        if args.table is not None:
            from autoprune.latency._table import LatencyTable

            table = LatencyTable.load(args.table)
        pred = LatencyPredictor.load(args.predictor, table=table)
    else:
        pred = _fit(args)
    print(f"{pred!r}")
    print(f"dataset: {pred.data_path_}  ({pred.n_measured_} measured plans, "
          f"regressor {pred.regressor_})")
    print(pred.report_.to_string(float_format=lambda v: f"{v:.3f}"))
    for path in args.plan:
        plan = PruningPlan.load(path)
        print(f"{path}: {pred.predict(plan):.4f} ms predicted")
    return 0


def _fit(args: argparse.Namespace) -> Any:
    import torch

    from autoprune._analyze import analyze
    from autoprune.cli.common import load_model, make_backend, parse_shape
    from autoprune.latency._predictor import LatencyPredictor
    from autoprune.latency._profile import profile
    from autoprune.latency._table import LatencyTable

    if not args.input_shape:
        raise InvalidInputError("--model needs --input-shape, e.g. --input-shape 1,3,32,32")
    model = load_model(args.model, num_classes=args.num_classes)
    x = (torch.randn(parse_shape(args.input_shape)),)
    backend = make_backend(args)
    spec = analyze(model, x)
    if args.table is not None:
        table = LatencyTable.load(Path(args.table), expect_device=backend.device_info())
        table = profile(model, x, backend, table=table, spec=spec,
                        progress=not args.no_progress)
    else:
        table = profile(model, x, backend, spec=spec, root=args.root,
                        progress=not args.no_progress)
    return LatencyPredictor(
        regressor=args.regressor, monotone=args.regressor != "gbr", holdout=args.holdout,
        n_samples=args.n_samples, random_state=args.seed, active=args.active,
        max_samples=max(args.max_samples, args.n_samples),
    ).fit(table=table, model=model, example_inputs=x, backend=backend, spec=spec,
          progress=not args.no_progress)
