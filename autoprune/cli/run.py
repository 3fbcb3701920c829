"""``autoprune run``: the whole pipeline from the command line.

    autoprune run --model torchvision.models:resnet18 --model-kwargs '{"num_classes": 10}' \\
        --input-shape 1,3,32,32 --device onnxruntime-cpu --budget-fraction 0.5 \\
        --data digits --pretrain-epochs 3 --run-dir runs/resnet18

The model is an importable factory ``module:callable`` (called with ``--model-kwargs``), with
optional weights (``--weights w.pt``, a state_dict loaded with ``torch.load(weights_only=True)``).
``--data digits|mnist1d|glyphs`` uses the bundled datasets for fine-tuning and accuracy; without data
the run stops after search and verification (no fine-tuning, no accuracy).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from autoprune.cli.common import (
    add_backend_args,
    backend_options,
    load_model,
    parse_shape,
)
from autoprune.errors import InvalidInputError
from autoprune.io import atomic_torch_save, safe_torch_load

DATASETS = ("digits", "mnist1d", "glyphs")


def data_loaders(name: str, shape: tuple[int, ...], seed: int = 0) -> tuple[Any, Any]:
    from autoprune import data

    if name == "digits":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise InvalidInputError(f"--data digits needs a square image shape N,C,H,H, got {shape}")
        return data.digits_loaders(size=shape[2], channels=shape[1], seed=seed)
    if name == "mnist1d":
        if len(shape) != 3 or shape[1:] != (1, 40):
            raise InvalidInputError(f"--data mnist1d needs --input-shape N,1,40, got {shape}")
        return data.mnist1d_loaders(seed=seed)
    if name == "glyphs":
        if len(shape) != 4 or shape[2] != shape[3]:
            raise InvalidInputError(f"--data glyphs needs a square image shape N,C,H,H, got {shape}")
        return data.glyphs_loaders(size=shape[2], channels=shape[1], seed=seed)
    raise InvalidInputError(f"unknown --data {name!r}; known: {', '.join(DATASETS)}")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="analyze, profile, search, prune, fine-tune, verify and export in one go",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="importable factory, module:callable")
    p.add_argument("--model-kwargs", default=None, help='JSON keyword arguments, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--weights", default=None, help="state_dict file (torch.load weights_only=True)")
    p.add_argument("--input-shape", required=True, help="example input shape, e.g. 1,3,32,32")
    add_backend_args(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=float, help="latency budget in ms")
    budget.add_argument("--budget-fraction", type=float,
                        help="budget as a share of the dense model's latency on the device "
                        "(0-1), checked with paired ratios (robust on a noisy machine)")
    p.add_argument("--data", choices=DATASETS, default=None, help="bundled dataset for training/accuracy")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="train the dense model on --data first (when no --weights)")
    p.add_argument("--run-dir", required=True, help="run directory (resumed if it exists)")
    p.add_argument("--n-trials", type=int, default=60)
    p.add_argument("--predictor-samples", type=int, default=60)
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--tables-root", default="latency_tables",
                   help="latency table directory to reuse/extend (default: latency_tables)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import torch

    shape = parse_shape(args.input_shape)
    model = load_model(args.model, args.model_kwargs, args.weights)
    example = torch.randn(*shape)
    train_loader = val_loader = None
    if args.data:
        train_loader, val_loader = data_loaders(args.data, shape, args.seed)
    if args.pretrain_epochs > 0:
        if train_loader is None:
            raise InvalidInputError("--pretrain-epochs needs --data")
        weights = Path(args.run_dir) / "dense.pt"

        if weights.exists():
            model.load_state_dict(safe_torch_load(weights))
        else:
            from autoprune._finetune import finetune

            finetune(model, train_loader, epochs=args.pretrain_epochs, lr=args.lr * 5,
                     seed=args.seed, progress=not args.quiet)
            atomic_torch_save(model.state_dict(), weights)
        model.eval()
    if args.budget_fraction is not None and not 0 < args.budget_fraction < 1:
        raise InvalidInputError(f"--budget-fraction must be in (0, 1), got {args.budget_fraction}")
    from autoprune.pipeline import run_pipeline

    report = run_pipeline(
        model, (example,), latency_budget_ms=args.budget_ms,
        budget_fraction=args.budget_fraction, run_dir=args.run_dir,
        train_loader=train_loader, val_loader=val_loader, device=args.device,
        backend_options=backend_options(args), n_trials=args.n_trials,
        predictor_samples=args.predictor_samples,
        finetune_epochs=args.finetune_epochs if train_loader is not None else 0,
        finetune_options={"lr": args.lr}, tables_root=args.tables_root,
        export=not args.no_export, seed=args.seed, progress=not args.quiet,
    )
    print(report)
    return 0 if report.budget_met in (True, None) else 1
