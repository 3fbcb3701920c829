"""Ratios to dense timed round-robin: configurations stopped one by one, or in lockstep.

The measurement campaign times a chunk of pruned plans round-robin with the dense model and
takes plan median / dense median. With the adaptive protocol each configuration used to stop
on its own once stable, so the dense model could stop after a few rounds while noisier plans
ran on for seconds: the medians came from different stretches of time. This times the same
chunk (uniform plans of one model, aligned and not) ``--repeats`` times each way, alternating,
in a new order each repeat, and prints the per-plan spread of the ratio (max - min over
repeats, relative to the median) both ways.

    python benchmarks/bench_lockstep.py --model mobilenet_v2 --size 64 --repeats 3 --rounds 2

Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import warnings

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2", help="a torchvision model name")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="chunk timings per way and round")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two ways")
    p.add_argument("--alignment", type=int, default=32)
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="autoprune")

    import torch

    import autoprune as ap
    from autoprune.executor import apply_plan
    from autoprune.measure import measure_interleaved
    from autoprune.plan import PruningPlan
    from autoprune.zoo import torchvision_model

    model = torchvision_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    spec = ap.analyze(model, (x,))
    keeps = [(0.3, args.alignment), (0.45, args.alignment), (0.6, args.alignment),
             (0.75, args.alignment), (0.9, args.alignment), (0.5, 1), (0.7, 1)]
    pruned = [apply_plan(model, PruningPlan.uniform(spec, k, alignment=a), x, spec=spec,
                         importance="random") for k, a in keeps]
    backend = ap.get_backend("onnxruntime-cpu")
    timers = [backend._timer_for_model(m, (x,)) for m in [model, *pruned]]
    rng = np.random.default_rng(0)
    print(f"{args.model} at {args.size}², 1 thread, plans (keep, alignment) {keeps}; "
          f"load average before {os.getloadavg()[0]:.2f}")
    print("| round | way | ratio to dense per plan (median of repeats) | spread per plan | "
          "median spread |")
    print("|---|---|---|---|---|")
    for rnd in range(args.rounds):
        for lockstep in (True, False):
            rows = []
            for _ in range(args.repeats):
                order = rng.permutation(len(pruned))
                s = measure_interleaved([timers[0]] + [timers[1 + i] for i in order],
                                        backend.protocol, lockstep=lockstep)
                r = np.empty(len(pruned))
                r[order] = [t.median_ms / s[0].median_ms for t in s[1:]]
                rows.append(r)
            a = np.array(rows)
            med = np.median(a, axis=0)
            spread = np.ptp(a, axis=0) / med
            way = "lockstep" if lockstep else "one by one"
            print(f"| {rnd + 1} | {way} | {' '.join(f'{v:.3f}' for v in med)} | "
                  f"{' '.join(f'{v:.3f}' for v in spread)} | {np.median(spread):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
