"""A 1-D CNN on MNIST-1D, pruned to a latency budget on the CPU.

    python examples/mnist1d_example.py [--budget-fraction 0.5]

MNIST-1D (generated locally by the ``mnist1d`` package, nothing downloaded) has 4,000 training
and 1,000 test sequences of length 40. The model is ``autoprune.zoo.conv1d_net`` (three
conv-BN-ReLU stages). This example uses the stages one by one instead of ``run_pipeline``,
to show what each returns:

analyze → profile → fit predictor → search → apply → fine-tune → verify → export.

``verify`` is a fresh measurement; on a busy machine it can disagree with the search's own
finalist check by a few percent. ``run_pipeline(..., budget_fraction=, budget_headroom=)``
selects with a safety margin and checks both with paired ratios against the dense model.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import torch

import autoprune as ap
from autoprune._finetune import evaluate_accuracy, finetune
from autoprune.data import mnist1d_loaders
from autoprune.evaluators import accuracy_evaluator
from autoprune.export import export_onnx, verify
from autoprune.zoo import conv1d_net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-fraction", type=float, default=0.5)
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--run-dir", default="runs/mnist1d")
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    run_dir = Path(args.run_dir)
    train_loader, test_loader = mnist1d_loaders(batch_size=64)

    model = conv1d_net(num_classes=10, width=64)
    print("training the dense 1-D CNN (8 epochs) ...")
    finetune(model, train_loader, epochs=8, lr=0.05, progress=False)
    model.eval()
    acc_dense = evaluate_accuracy(model, test_loader)
    x = torch.randn(1, 1, 40)

    spec = ap.analyze(model, x)
    print(spec)
    backend = ap.get_backend("onnxruntime-cpu", threads=1)
    table = ap.profile(model, x, backend, spec=spec, progress=False)
    predictor = ap.LatencyPredictor(n_samples=40).fit(table=table, model=model,
                                                      example_inputs=x, backend=backend,
                                                      spec=spec, progress=False)
    dense_pred = predictor.predict(ap.PruningPlan.dense(spec))
    budget_ms = args.budget_fraction * dense_pred
    print(f"dense predicted {dense_pred:.4g} ms; budget {budget_ms:.4g} ms "
          f"({args.budget_fraction:.0%})")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # finalists missing the budget are reported in notes
        result = ap.search(model, x, device=backend, latency_budget_ms=budget_ms,
                           evaluator=accuracy_evaluator(test_loader, calib_loader=train_loader),
                           n_trials=args.trials, table=table, predictor=predictor, spec=spec,
                           run_dir=run_dir / "search", progress=False)
    print(result.pareto_front()[["trial", "proxy", "predicted_latency_ms", "macs"]].head(8))
    result.plot(run_dir / "front.png")
    if result.best_plan is None:
        raise SystemExit("no plan met the budget when measured:\n" + "\n".join(result.notes))

    pruned = ap.apply_plan(model, result.best_plan, x)
    finetune(pruned, train_loader, epochs=3, teacher=copy.deepcopy(model), progress=False)
    pruned.eval()
    acc_pruned = evaluate_accuracy(pruned, test_loader)
    rep = verify(pruned, x, backend, reference=model, budget_fraction=args.budget_fraction,
                 predicted_ms=predictor.predict(result.best_plan))
    export_onnx(pruned, x, run_dir / "conv1d_pruned.onnx")
    macs_d, _ = spec.count()
    macs_p, _ = spec.count(result.best_plan)
    print()
    print(rep)
    print(f"accuracy: dense {100 * acc_dense:.2f}% -> pruned {100 * acc_pruned:.2f}% "
          f"(after 3 fine-tuning epochs)")
    print(f"MACs: {macs_d / 1e6:.3f} M -> {macs_p / 1e6:.3f} M ({macs_d / macs_p:.2f}x fewer)")
    print(f"finished in {time.perf_counter() - t0:.0f}s; ONNX at {run_dir}/conv1d_pruned.onnx")


if __name__ == "__main__":
    main()
