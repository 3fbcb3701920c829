"""Re-evaluate ``LatencyPredictor`` variants on a finished ``bench_predictor.py`` run, offline.

No timing: each model's stored measured plans (``tables/<device>/predictor_*.csv``) are refitted
with every regressor asked for, and scored on the run's stored evaluation plans (regenerated from
the same seed; their measured latencies are in ``results.json``). Also prints, per plan kind, the
median of measured / table sum over the training plans and over the evaluation plans: when the
two disagree the table, not the regressor, is what misses.

    python benchmarks/reeval_predictor.py runs/bench_predictor_224 --regressors linear,boosted,auto

``--weight-stream FILE`` (a ``bench_memory.py --out`` JSON, or ``none``) replaces the weight-streaming
curve the run's table recorded with its kernel rules: how a run measured before the probe existed
is priced with the device's curve (the stored plans' latencies are not changed).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import KINDS, _eval_plans, _model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the --out directory of a bench_predictor.py run")
    p.add_argument("--regressors", default="linear,boosted,auto")
    p.add_argument("--weight-stream", default=None,
                   help="bench_memory.py JSON whose curve the table's rules get ('none': drop it)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    import pandas as pd

    from autoprune._analyze import analyze
    from autoprune.latency import LatencyPredictor, LatencyTable, accuracy_metrics

    run = Path(args.run)
    res = json.loads((run / "results.json").read_text())
    tabdir = next((run / "tables").glob("onnxruntime*"))
    table = LatencyTable.load(tabdir)
    if args.weight_stream is not None and table.kernel_rules is not None:
        from dataclasses import replace

        from autoprune.latency._memory import WeightStream

        stream = None if args.weight_stream == "none" else WeightStream.from_dict(
            json.loads(Path(args.weight_stream).read_text()), source=args.weight_stream)
        table.kernel_rules = replace(table.kernel_rules, weight_stream=stream)
        print(f"weight stream: {stream}")
    for r in res["results"]:
        model, x = _model(r["model"], res["args"]["size"])
        spec = analyze(model, x)
        csv = next(tabdir.glob(f"predictor_{spec.model_name}_*.csv"))
        rules = r.get("kernel_rules") or {}
        plans = _eval_plans(spec, int(r["alignment"]), res["args"]["n_space"], res["args"]["seed"],
                            group_step=int(rules.get("group_step", 1)))
        meas = np.array([q["measured_ms"] for q in r["plans"]])
        kinds = np.array([q["kind"] for q in r["plans"]])
        for reg in args.regressors.split(","):
            pred = LatencyPredictor(regressor=reg, random_state=res["args"]["seed"]).fit(
                table=table, spec=spec, dataset=csv, data_path=None)
            y = pred.predict_many([q for _, q in plans])
            cells = []
            for kind in (*KINDS, None):
                sel = kinds == kind if kind else np.ones(len(kinds), bool)
                m = accuracy_metrics(meas[sel], y[sel])
                cells.append(f"{kind or 'all'} {100 * m['within_5pct']:.0f}/"
                             f"{100 * m['within_10pct']:.0f}%")
            lo, hi = pred.interval_ratio_
            cover = np.mean((meas >= y * lo) & (meas <= y * hi))
            cells.append(f"band x{lo:.2f}-x{hi:.2f} covers {100 * cover:.0f}%")
            print(f"{r['model']:16s} {reg:8s} (chose {pred.regressor_}): " + ", ".join(cells),
                  flush=True)
        train = pd.read_csv(csv)
        tsum = np.array([q["table_sum_ms"] for q in r["plans"]])
        for kind in KINDS:
            t = train[train["kind"] == kind]
            fit_ratio = float(np.median(t["latency_ms"] / t["table_ms"])) if len(t) else float("nan")
            ev_ratio = float(np.median(meas[kinds == kind] / tsum[kinds == kind]))
            print(f"{r['model']:16s} {kind:18s} measured / table sum: fit plans {fit_ratio:.2f} "
                  f"(n={len(t)}), evaluation plans {ev_ratio:.2f}")


if __name__ == "__main__":
    main()
