"""Does re-estimating BatchNorm statistics around a short fine-tune matter? (``finetune``'s
``bn_recalibration_batches``, default 10, against 0.)

A dense ``--model`` is trained here on ``--data`` at ``--size``, pruned to a uniform keep ratio
(``--keep``, widths on multiples of 8), and fine-tuned for ``--epochs`` with the same seed, with
and without the dense model as teacher, with BatchNorm recalibration off (0) and on (10
batches before the first step and after the last). Test accuracy of each.

    python benchmarks/bench_bn_recalibration.py --model resnet18 --data digits --size 32
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy_rank import data, task_args  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    task_args(p, dense_epochs=3)
    args = p.parse_args()

    import autoprune as ap
    from autoprune.zoo import torchvision_model

    torch.set_num_threads(args.threads)
    train, _, test, classes = data(args)
    torch.manual_seed(0)
    dense = torchvision_model(args.model, num_classes=classes)
    ap.finetune(dense, train, epochs=args.dense_epochs, lr=0.05, seed=0, progress=False)
    dense.eval()
    print(f"dense {args.model}, {args.data} {args.size}²: {100 * ap.evaluate_accuracy(dense, test):.2f}%")
    x = torch.randn(1, 3, args.size, args.size)
    spec = ap.analyze(dense, x)
    plan = ap.PruningPlan.uniform(spec, args.keep, alignment=8)
    print(f"\nuniform keep {args.keep} (multiples of 8), {args.epochs} epoch(s), lr 0.01, seed 0\n")
    print("| teacher | BatchNorm recalibration | test accuracy | fine-tune s |")
    print("|---|---|---|---|")
    for teacher in (False, True):
        for batches in (0, 10):
            m = ap.apply_plan(dense, plan, x, spec=spec)
            t = time.perf_counter()
            ap.finetune(m, train, epochs=args.epochs, lr=0.01, seed=0, progress=False,
                        teacher=copy.deepcopy(dense) if teacher else None,
                        bn_recalibration_batches=batches)
            acc = ap.evaluate_accuracy(m.eval(), test)
            print(f"| {'dense' if teacher else 'none'} | {'off' if batches == 0 else f'{batches} batches'} "
                  f"| {100 * acc:.2f}% | {time.perf_counter() - t:.1f} |", flush=True)


if __name__ == "__main__":
    main()
