"""Quickstart: prune a ResNet-18 to half its measured CPU latency, fine-tune it, prove it.

    python examples/quickstart.py            # or ./dev.sh demo
    python examples/quickstart.py --budget-fraction 0.35 --trials 40

What happens (about 3-5 minutes on a 2-core laptop, everything measured, nothing downloaded):

1. a torchvision ResNet-18 is trained from scratch for a few epochs on scikit-learn's digits
   (1,797 8x8 images upscaled to 32x32; cached in runs/quickstart/dense.pt);
2. ``autoprune.run_pipeline`` profiles every layer on ONNX Runtime (CPU, 1 thread), fits the
   latency predictor, searches per-layer widths for the budget, re-measures the best plans
   against the dense model (paired, alternating runs), prunes, fine-tunes with the dense model
   as teacher, verifies on the device and exports ONNX;
3. the report compares dense and pruned: measured latency (with spread), predicted latency,
   budget met or not, accuracy, MACs and parameters.

Rerunning resumes: completed steps are skipped (delete runs/quickstart to start over).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import autoprune as ap
from autoprune._finetune import evaluate_accuracy, finetune
from autoprune.data import digits_loaders
from autoprune.io import atomic_torch_save, safe_torch_load
from autoprune.zoo import torchvision_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-fraction", type=float, default=0.5,
                   help="latency budget as a share of the dense model's measured latency")
    p.add_argument("--trials", type=int, default=20, help="search trials")
    p.add_argument("--epochs", type=int, default=3, help="dense training epochs")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--run-dir", default="runs/quickstart")
    args = p.parse_args()

    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # training; timing uses 1 thread
    run_dir = Path(args.run_dir)
    train_loader, test_loader = digits_loaders(size=32, channels=3, batch_size=64)

    # 1. a trained dense model (no pretrained weights are downloaded: we train it here)
    model = torchvision_model("resnet18", num_classes=10)
    weights = run_dir / "dense.pt"
    if weights.exists():
        model.load_state_dict(safe_torch_load(weights))
    else:
        print(f"training the dense ResNet-18 on digits for {args.epochs} epochs ...")
        finetune(model, train_loader, epochs=args.epochs, lr=0.05)
        atomic_torch_save(model.state_dict(), weights)
    model.eval()
    print(f"dense accuracy: {100 * evaluate_accuracy(model, test_loader):.2f}% "
          f"({time.perf_counter() - t0:.0f}s)")

    # 2. prune to the budget, measured on ONNX Runtime CPU
    example = torch.randn(1, 3, 32, 32)
    report = ap.run_pipeline(
        model, example,
        budget_fraction=args.budget_fraction,       # or latency_budget_ms=... (absolute)
        device="onnxruntime-cpu",
        run_dir=run_dir,
        train_loader=train_loader, val_loader=test_loader,
        n_trials=args.trials, predictor_samples=24,
        finetune_epochs=args.finetune_epochs,
    )

    # 3. the report (also in runs/quickstart/report.txt and report.json)
    print()
    print(report)
    print(f"\nfinished in {time.perf_counter() - t0:.0f}s; artefacts in {run_dir}/ "
          "(plan.json, pruned.pt, model.onnx, front.png, report.txt)")


if __name__ == "__main__":
    main()
