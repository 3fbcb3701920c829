"""Is a moved absolute latency the machine or the timing protocol?

Times a dense torchvision model and one uniformly pruned variant on ONNX Runtime CPU (1 thread)
in rounds, each round with the three protocols autoprune uses: standalone
(``measure_model``, what ``verify`` reports per model), interleaved bursts
(``measure_interleaved``, the predictor's measurement campaign) and alternating pairs
(``measure_ratio``, the paired ratio budgets are checked on). If the dense model's absolute
time moves between rounds while every protocol's ratio stays, the machine's speed moved.

    python benchmarks/bench_timing_drift.py                     # resnet18, 32², keep 0.5, 3 rounds
    python benchmarks/bench_timing_drift.py --model mobilenet_v2 --size 224 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    from autoprune import zoo
    from autoprune._analyze import analyze
    from autoprune.backends import get_backend
    from autoprune.executor import apply_plan
    from autoprune.plan import PruningPlan

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = zoo.torchvision_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, args.size, args.size)
    spec = analyze(model, (x,))
    pruned = apply_plan(model, PruningPlan.uniform(spec, args.keep, alignment=8), (x,),
                        spec=spec).eval()
    backend = get_backend("onnxruntime-cpu", threads=1)
    print(json.dumps({"model": args.model, "size": args.size, "keep": args.keep,
                      "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}))
    for _ in range(args.rounds):
        dense_alone = backend.measure_model(model, (x,)).median_ms
        pruned_alone = backend.measure_model(pruned, (x,)).median_ms
        inter = backend.measure_interleaved([model, pruned], (x,))
        ratio, iqr = backend.measure_ratio(pruned, model, (x,))
        print(json.dumps({
            "dense_standalone_ms": round(dense_alone, 4),
            "pruned_standalone_ms": round(pruned_alone, 4),
            "ratio_standalone": round(pruned_alone / dense_alone, 4),
            "ratio_interleaved": round(inter[1].median_ms / inter[0].median_ms, 4),
            "ratio_alternating": round(ratio, 4), "ratio_alternating_iqr": round(iqr, 4),
        }), flush=True)
    print(json.dumps({"load_avg": os.getloadavg()}))


if __name__ == "__main__":
    main()
