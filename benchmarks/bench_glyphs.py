"""Difficulty calibration of the glyphs task: train a torchvision ResNet-18 from scratch.

Generates (or reads from the cache) ``autoprune.data.glyphs_tensors`` with the given
parameters, trains ``torchvision.models.resnet18(num_classes=n_classes)`` with plain SGD
(momentum 0.9, Nesterov, weight decay 5e-4, one-cycle learning rate, batch 64, no extra
augmentation), and prints per epoch the training accuracy (on the batches as they were
trained), the test accuracy and the wall time. The target of the defaults is 80-95% test
accuracy: hard enough that pruning methods can be told apart, not 99%.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 1 \\
        python benchmarks/bench_glyphs.py --n-train 10000 --epochs 4

``--out`` appends one CSV row per epoch (the parameters beside the numbers).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn


def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def main(argv: list[str] | None = None) -> None:
    from autoprune import data, zoo

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n-classes", type=int, default=64)
    p.add_argument("--difficulty", default=str(data.GLYPHS_DEFAULT_DIFFICULTY),
                   help="0..1 or easy/medium/hard/extreme")
    p.add_argument("--n-train", type=int, default=10_000)
    p.add_argument("--n-test", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV file to append one row per epoch to")
    args = p.parse_args(argv)
    try:
        difficulty: float | str = float(args.difficulty)
    except ValueError:
        difficulty = args.difficulty

    t0 = time.perf_counter()
    train_loader, test_loader = data.glyphs_loaders(
        size=args.size, n_classes=args.n_classes, difficulty=difficulty, n_train=args.n_train,
        n_test=args.n_test, batch_size=args.batch_size, seed=args.seed)
    t_data = time.perf_counter() - t0
    print(f"data: {args.n_train} train / {args.n_test} test, {args.size}px, "
          f"{args.n_classes} classes, difficulty {difficulty}: {t_data:.1f} s "
          f"(generation or cache read); torch threads {torch.get_num_threads()}", flush=True)

    torch.manual_seed(args.seed)
    model = zoo.torchvision_model("resnet18", num_classes=args.n_classes)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=len(train_loader))
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    t_train = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        correct = total = 0
        loss_sum = 0.0
        for x, y in train_loader:
            opt.zero_grad(set_to_none=True)
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
            loss_sum += loss.item() * len(y)
        train_acc = correct / total
        test_acc = evaluate(model, test_loader)
        wall = time.perf_counter() - t_train
        print(f"epoch {epoch}: loss {loss_sum / total:.3f}  train acc {100 * train_acc:.1f}%  "
              f"test acc {100 * test_acc:.1f}%  wall {wall:.0f} s", flush=True)
        rows.append({"epoch": epoch, "loss": loss_sum / total, "train_acc": train_acc,
                     "test_acc": test_acc, "wall_s": wall, "data_s": t_data,
                     "size": args.size, "n_classes": args.n_classes,
                     "difficulty": difficulty, "n_train": args.n_train, "n_test": args.n_test,
                     "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                     "machine": platform.node(), "threads": torch.get_num_threads(),
                     "cpus": os.cpu_count()})
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
