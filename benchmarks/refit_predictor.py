"""Refit ``LatencyPredictor`` on one stored measured-plan dataset, offline, with repeated random
hold-outs: how well does a feature set predict plans it was not fitted on?

A dataset is the ``predictor_*.csv`` a fit leaves beside its table (plan JSON, kind, measured
ms). ``--stream-weights all`` prices weight streaming from every parameter of each layer (the
feature before 2026-12-03); ``touched`` (the code now) from the parameters a forward pass reads
(``LayerSpec.touched_params``: a 3x3 conv at 1x1 spatial size reads its centre tap only).

    python benchmarks/refit_predictor.py \\
        --dataset benchmarks/results/predictor_epyc_zen2/glyphs32_predictor_resnet18.csv \\
        --table latency_tables/onnxruntime-cpu_amd-epyc_t1_float32_16896a00ac \\
        --model resnet18 --classes 64 --size 32
"""

from __future__ import annotations

import argparse
import warnings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--table", required=True, help="the latency table directory it was fitted on")
    p.add_argument("--model", default="resnet18", help="a torchvision model name")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--stream-weights", default="all,touched")
    p.add_argument("--repeats", type=int, default=20, help="random hold-outs (a quarter each)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    import numpy as np
    import pandas as pd
    import torch

    import autoprune as ap
    from autoprune.latency import LatencyPredictor
    from autoprune.latency._table import LatencyTable
    from autoprune.plan import PruningPlan
    from autoprune.types import LayerSpec
    from autoprune.zoo import torchvision_model

    rows = pd.read_csv(args.dataset)[["plan_json", "kind", "measured_ms"]]
    table = LatencyTable.load(args.table)
    model = torchvision_model(args.model, num_classes=args.classes).eval()
    spec = ap.analyze(model, (torch.randn(1, 3, args.size, args.size),))
    touched = LayerSpec.touched_params
    dense = int(np.flatnonzero(rows["kind"] == "dense")[0]) if (rows["kind"] == "dense").any() \
        else -1
    try:
        for mode in args.stream_weights.split(","):
            LayerSpec.touched_params = (  # type: ignore[method-assign]
                property(lambda s: float(s.params)) if mode == "all" else touched)
            errs: list[float] = []
            for rep in range(args.repeats):
                rng = np.random.default_rng(rep)
                hold = rng.choice(len(rows), size=len(rows) // 4, replace=False)
                hold = hold[hold != dense]  # a fit always measures the dense plan
                fit = np.setdiff1d(np.arange(len(rows)), hold)
                pred = LatencyPredictor(random_state=rep).fit(
                    table=table, spec=spec, dataset=rows.iloc[fit].reset_index(drop=True))
                plans = [PruningPlan.from_json(s) for s in rows["plan_json"].iloc[hold]]
                errs += list(pred.predict_many(plans) / rows["measured_ms"].iloc[hold] - 1)
            e = np.abs(np.array(errs))
            print(f"stream weights {mode:8s}: {len(e)} held-out predictions ({args.repeats} "
                  f"hold-outs of {len(rows) // 4}): within ±10% {np.mean(e <= .10):.0%}, within "
                  f"±5% {np.mean(e <= .05):.0%}, MAPE {e.mean():.1%}, worst {e.max():.0%}")
    finally:
        LayerSpec.touched_params = touched  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
