"""A plan's predicted latency and band from a stored latency-model fit, offline (no timing).

A fit leaves its measured-plan dataset (``predictor*.csv`` and its ``.json`` sidecar) beside
the latency table it was fitted on; ``LatencyPredictor.load`` refits it exactly with the code
checked out now, so running this at two commits shows what a change does to the band.

    python benchmarks/band_of_fit.py benchmarks/results/predictor_epyc_zen5/quickstart_fit/predictor.csv \\
        benchmarks/results/predictor_epyc_zen5/quickstart_fit/plan.json
"""

from __future__ import annotations

import argparse


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="a predictor CSV beside its table.csv / table.json")
    p.add_argument("plan", help="a plan JSON file (plan.json of a run)")
    args = p.parse_args()

    from autoprune.latency import LatencyPredictor
    from autoprune.plan import PruningPlan

    pred = LatencyPredictor.load(args.dataset)
    with open(args.plan) as f:
        plan = PruningPlan.from_json(f.read())
    lo, hi = pred.predict_interval([plan])
    r_lo, r_hi = pred.interval_ratio_
    print(f"regressor {pred.regressor_}: {pred.predict(plan):.4g} ms, band {lo[0]:.4g}-{hi[0]:.4g} "
          f"ms (x{r_lo:.2f}-x{r_hi:.2f})")


if __name__ == "__main__":
    main()
