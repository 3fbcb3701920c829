"""Benchmark of ``autoprune.repair`` (issue 12): models pruned by other means, before and
after repair, on ONNX Runtime CPU (1 thread), at deployment resolution.

For each torchvision family (``--models``, default resnet18, mobilenet_v2, efficientnet_b0),
first trained here for ``--pretrain-epochs`` on ``--data`` (``glyphs``: autoprune's 64-class
glyphs task, not saturated; or sklearn ``digits``) at ``--train-size`` (default 64: training at
224² takes hours on a 2-vCPU VM; the channel widths pruning and repair choose do not depend on
the input size, so the same models are timed at ``--size``, default 224, deployment
resolution), two pruned inputs are made:

- ``tp_global``: Torch-Pruning global magnitude pruning (L1, ``global_pruning=True``) at
  ``--ratio`` (default 0.3), classifier kept;
- ``uniform``: ``autoprune.apply_plan`` of a uniform keep ratio (``--uniform-keep``, default
  0.7) with no alignment (widths off the device's steps, as other tools leave them).

Each input is repaired (``autoprune.repair``, no budget: no slower than the input, as wide as
possible). Measured, paired against the dense model (median ratio of alternate runs, IQR
beside it): dense, input and repaired latency; MACs of each. Then the input and the repaired
model are fine-tuned with the same recipe (``autoprune.finetune``: ``--epochs``, lr, seed,
dense teacher) at ``--train-size`` and their test accuracy is recorded (glyphs: 2,000 test
images, one image = 0.05 points; digits: 360, one image = 0.28 points). Goal (issue 12): every repaired model faster than its input, and faster than
dense where the input was slower than dense, at no more than 0.5 points accuracy loss.

    python benchmarks/bench_repair.py --out runs/bench_repair/results.csv
    python benchmarks/bench_repair.py --models resnet18 --size 64 --epochs 1   # a quick look
    python benchmarks/bench_repair.py --pretrain-epochs 0 --epochs 0   # latency only

Needs a quiet machine (latency). Rows are appended to the CSV as they finish; a rerun skips
rows already there; the trained dense weights are kept next to ``--out`` so a resumed run
uses the same dense model. Results: BENCHMARKS.md "Repair".
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

MODELS = ("resnet18", "mobilenet_v2", "efficientnet_b0")
KINDS = ("tp_global", "uniform")


#: classes of each ``--data`` task
N_CLASSES = {"digits": 10, "glyphs": 64}


def loaders(data: str, size: int) -> tuple[DataLoader, DataLoader]:
    from autoprune.data import digits_tensors, glyphs_tensors

    if data == "glyphs":
        train, test = glyphs_tensors(size=size, channels=3, n_classes=N_CLASSES["glyphs"],
                                     seed=0)
    else:
        train, test = digits_tensors(size=size, channels=3, seed=0)
    g = torch.Generator().manual_seed(0)
    return (DataLoader(train, batch_size=32, shuffle=True, generator=g),
            DataLoader(test, batch_size=64))


def dense_model(name: str, train: DataLoader, epochs: int, num_classes: int,
                cache_file: Path | None = None, optimizer: str = "sgd") -> nn.Module:
    """The family trained here for ``epochs``; its weights are kept in ``cache_file`` (when
    given) so that a resumed run times and fine-tunes the same dense model."""
    import autoprune as ap
    from autoprune.io import atomic_torch_save, safe_torch_load
    from autoprune.zoo import torchvision_model

    torch.manual_seed(0)
    model = torchvision_model(name, num_classes=num_classes)
    if cache_file is not None and cache_file.exists():
        model.load_state_dict(safe_torch_load(cache_file))
    elif epochs > 0:
        # SGD at lr 0.05 trains resnet18 and mobilenet_v2 here in 4 epochs; efficientnet_b0
        # stays at chance with it (2.25% after 4 epochs) and is trained with AdamW instead
        lr, wd = (0.05, 5e-4) if optimizer == "sgd" else (2e-3, 0.05)
        ap.finetune(model, train, epochs=epochs, lr=lr, weight_decay=wd,
                    optimizer=optimizer, seed=0, progress=False)  # type: ignore[arg-type]
        if cache_file is not None:
            atomic_torch_save(model.state_dict(), cache_file)
    return model.eval()


def tp_global(model: nn.Module, x: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    m = copy.deepcopy(model).eval()
    head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
    tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                              pruning_ratio=ratio, global_pruning=True,
                              ignored_layers=head).step()
    return m.eval()


def uniform(model: nn.Module, x: torch.Tensor, keep: float) -> nn.Module:
    import autoprune as ap

    spec = ap.analyze(model, x)
    return ap.apply_plan(model, ap.PruningPlan.uniform(spec, keep, alignment=1), x, spec=spec)


def macs_of(model: nn.Module, x: torch.Tensor) -> int:
    import autoprune as ap

    return int(ap.analyze(model, x, check=False).count()[0])


def finetuned_accuracy(model: nn.Module, teacher: nn.Module, train: DataLoader,
                       test: DataLoader, epochs: int) -> float:
    import autoprune as ap

    m = copy.deepcopy(model)
    ap.finetune(m, train, epochs=epochs, lr=0.01, teacher=teacher, seed=0, progress=False)
    return 100.0 * ap.evaluate_accuracy(m.eval(), test)


def run_one(name: str, kind: str, args: argparse.Namespace, backend: Any,
            cache: dict[str, Any]) -> dict[str, Any]:
    import autoprune as ap

    x = torch.randn(1, 3, args.size, args.size)
    train, test = cache["loaders"] if "loaders" in cache else cache.setdefault(
        "loaders", loaders(args.data, args.train_size))
    if name not in cache:
        weights = Path(args.out).parent / (
            f"dense_{name}_{args.data}{args.train_size}_e{args.pretrain_epochs}"
            f"{'' if args.pretrain_optimizer == 'sgd' else '_' + args.pretrain_optimizer}.pt")
        cache[name] = dense_model(name, train, args.pretrain_epochs, N_CLASSES[args.data],
                                  weights if args.pretrain_epochs > 0 else None,
                                  args.pretrain_optimizer)
    dense = cache[name]
    pruned = tp_global(dense, x, args.ratio) if kind == "tp_global" else \
        uniform(dense, x, args.uniform_keep)
    t0 = time.time()
    result = ap.repair(pruned, dense, x, device=backend)
    repair_s = time.time() - t0
    r_in, iqr_in = backend.measure_ratio(pruned, dense, x)
    r_out, iqr_out = backend.measure_ratio(result.model, dense, x)
    row = {
        "model": name, "kind": kind, "size": args.size, "data": args.data,
        "train_size": args.train_size, "changed": result.changed,
        "rebuilt_from_reference": result.rebuilt_from_reference,
        "dense_ms": result.dense_latency_ms,
        "input_ratio_to_dense": r_in, "input_ratio_iqr": iqr_in,
        "repaired_ratio_to_dense": r_out, "repaired_ratio_iqr": iqr_out,
        "repaired_ratio_to_input": result.ratio_to_input,
        "macs_dense": macs_of(dense, x), "macs_input": macs_of(pruned, x),
        "macs_repaired": macs_of(result.model, x), "repair_s": repair_s,
        "notes": " | ".join(result.notes),
    }
    if args.pretrain_epochs > 0:
        row["acc_dense"] = 100.0 * ap.evaluate_accuracy(dense, test)
    if args.epochs > 0:
        row["acc_input"] = finetuned_accuracy(pruned, dense, train, test, args.epochs)
        row["acc_repaired"] = finetuned_accuracy(result.model, dense, train, test, args.epochs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--size", type=int, default=224, help="input size latency is measured at")
    p.add_argument("--data", choices=sorted(N_CLASSES), default="glyphs")
    p.add_argument("--train-size", type=int, default=64,
                   help="input size training, fine-tuning and accuracy use")
    p.add_argument("--ratio", type=float, default=0.3, help="Torch-Pruning pruning ratio")
    p.add_argument("--uniform-keep", type=float, default=0.7)
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="training of the dense models: sgd (lr 0.05) or adamw (lr 2e-3, "
                        "weight decay 0.05; efficientnet_b0 does not learn with sgd here)")
    p.add_argument("--epochs", type=int, default=2, help="fine-tune epochs after pruning")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (latency)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads for training and fine-tuning (default: --threads); "
                        "latency is timed by ONNX Runtime with --threads either way")
    p.add_argument("--out", default="runs/bench_repair/results.csv")
    args = p.parse_args()

    import autoprune as ap

    torch.set_num_threads(args.torch_threads or args.threads)
    backend = ap.get_backend("onnxruntime-cpu", threads=args.threads)
    out = Path(args.out)
    done = pd.read_csv(out) if out.exists() else pd.DataFrame(columns=["model", "kind", "size"])
    cache: dict[str, Any] = {}
    for name in args.models.split(","):
        for kind in args.kinds.split(","):
            if ((done["model"] == name) & (done["kind"] == kind)
                    & (done["size"] == args.size)).any():
                continue
            row = run_one(name, kind, args, backend, cache)
            print(row, flush=True)
            done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
            from autoprune.io import atomic_write_text

            atomic_write_text(out, done.to_csv(index=False))


if __name__ == "__main__":
    main()
