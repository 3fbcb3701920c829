"""How much does timing a small pruned model alternately with the dense reference change it?

DESIGN.md asks for paired (alternating) timing against the dense model to cancel machine
drift. This measures the side effect: the pruned model timed alone, alternated with the dense
model, and a few runs after each dense run, plus the backend's paired ratio with bursts (the
default protocol: settle, then a burst of timed runs per model) and without them (one cold run
per model per pair, the protocol before 2026-11-22's fix).

    OMP_NUM_THREADS=1 python benchmarks/bench_pairing.py [--keep 0.4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

import autoprune as ap
from autoprune import zoo
from autoprune.measure import ProtocolSettings


def main() -> None:
    ap_ = argparse.ArgumentParser()
    ap_.add_argument("--model", default="resnet18")
    ap_.add_argument("--keep", type=float, default=0.4)
    ap_.add_argument("--repeats", type=int, default=5)
    ap_.add_argument("--runs", type=int, default=40)
    args = ap_.parse_args()
    torch.manual_seed(0)
    dense = zoo.torchvision_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = ap.analyze(dense, x)
    pruned = ap.apply_plan(dense, ap.PruningPlan.uniform(spec, args.keep, alignment=16), x)
    be = ap.get_backend("onnxruntime-cpu", threads=1)
    small, big = be._timer_for_model(pruned, (x,)), be._timer_for_model(dense, (x,))
    rows = {"alone_ms": [], "alternated_ms": [], "third_run_after_dense_ms": [],
            "dense_ms": [], "ratio_alone": [], "paired_ratio": [], "paired_ratio_cold": []}
    cold = ProtocolSettings(settle_ms=0.0, burst_runs=1)
    bursts = be.protocol
    for _ in range(10):
        small(), big()
    for _ in range(args.repeats):
        alone = float(np.median([small() for _ in range(args.runs)]))
        dense_ms = float(np.median([big() for _ in range(args.runs)]))
        alt = []
        for _ in range(args.runs):
            big()
            alt.append(small())
        after = []
        for _ in range(args.runs):
            big(), small(), small()
            after.append(small())
        rows["alone_ms"].append(alone)
        rows["dense_ms"].append(dense_ms)
        rows["alternated_ms"].append(float(np.median(alt)))
        rows["third_run_after_dense_ms"].append(float(np.median(after)))
        rows["ratio_alone"].append(alone / dense_ms)
        be.protocol = bursts
        rows["paired_ratio"].append(be.measure_ratio(pruned, dense, (x,))[0])
        be.protocol = cold
        rows["paired_ratio_cold"].append(be.measure_ratio(pruned, dense, (x,))[0])
        be.protocol = bursts
    print(f"{args.model} 1x3x32x32, uniform keep {args.keep} (alignment 16), ORT CPU 1 thread, "
          f"{args.repeats} repeats x {args.runs} runs")
    for k, v in rows.items():
        q = np.percentile(v, [25, 75])
        print(f"  {k:26s} median {statistics.median(v):.4f}  IQR {q[1] - q[0]:.4f}")


if __name__ == "__main__":
    main()
