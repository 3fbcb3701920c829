"""How much does timing a small pruned model alternately with the dense reference change it?

DESIGN.md asks for paired (alternating) timing against the dense model to cancel machine
drift. This measures the side effect: the pruned model timed alone, alternated with the dense
model, and a few runs after each dense run, plus the backend's paired ratio with bursts (the
default protocol: settle, then a burst of timed runs per model) and without them (one cold run
per model per pair, the protocol before 2026-11-22's fix).

    OMP_NUM_THREADS=1 python benchmarks/bench_pairing.py [--keep 0.4] [--repeats 5]
    OMP_NUM_THREADS=1 python benchmarks/bench_pairing.py --explore [--keep 0.4]

``--explore`` prints what led to the burst protocol and what it leaves: the pruned model's
time on its k-th consecutive run after the dense model, after a sleep or a busy-wait instead
of the dense model, paired ratios for several settle times, a long continuous series, and the
per-call spread of ``ratio_protocol`` after a pre-warm of alternating runs.

    OMP_NUM_THREADS=1 python benchmarks/bench_pairing.py --settle-sweep 3,10,30 --keep 0.67

``--settle-sweep`` calls the backend's ``measure_ratio`` ``--repeats`` times per settle time
(the settle times interleaved, so drift lands on all alike) and prints, per settle time, the
median over calls, the spread between calls (what a choice made on one call can be off by)
and the seconds per call, beside the ratio of standalone medians taken between the calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import autoprune as ap
from autoprune import bundle_runner as core
from autoprune import zoo
from autoprune.measure import ProtocolSettings


def _spin(ms: float) -> None:
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < ms:
        pass


def explore(small, big, repeats: int = 60) -> None:
    med = statistics.median
    for _ in range(20):
        small(), big()
    print(f"alone {med([small() for _ in range(200)]):.3f} ms, "
          f"dense {med([big() for _ in range(100)]):.3f} ms")
    pos: list[list[float]] = [[] for _ in range(12)]
    for _ in range(repeats):
        big()
        for k in range(12):
            pos[k].append(small())
    print("k-th run after dense (k=1..12), ms:", [round(med(v), 3) for v in pos])
    for what, wait in [("sleep", lambda ms: time.sleep(ms / 1e3)), ("busy-wait", _spin)]:
        for ms in (0.5, 2.0, 10.0):
            t = []
            for _ in range(repeats):
                big()
                wait(ms)
                t.append(small())
            print(f"after dense + {what} {ms} ms: {med(t):.3f} ms")
    for settle in (1, 3, 6, 12, 25):
        r = []
        for i in range(30):
            if i % 2:
                t_small = med(core.burst(small, settle, 5))
                t_big = med(core.burst(big, settle, 5))
            else:
                t_big = med(core.burst(big, settle, 5))
                t_small = med(core.burst(small, settle, 5))
            r.append(t_small / t_big)
        q = np.percentile(r, [25, 75])
        print(f"settle {settle} ms + burst of 5: ratio {med(r):.3f} (IQR {q[1] - q[0]:.3f})")
    series = [small() for _ in range(400)]
    print("continuous runs, median of each block of 40, ms:",
          [round(med(series[i:i + 40]), 3) for i in range(0, 400, 40)])
    for pre_ms in (0, 100, 300, 1000):
        out = []
        for _ in range(6):
            time.sleep(0.5)
            t0 = time.perf_counter()
            while (time.perf_counter() - t0) * 1e3 < pre_ms:
                small(), big()
            m, iqr, n, _ = core.summarize(core.ratio_protocol(small, big, time_cap_s=1.0))
            out.append(f"{m:.3f} ({100 * iqr / m:.0f}%, n={n})")
        print(f"pre-warm {pre_ms} ms, ratio_protocol per call (relative IQR):", ", ".join(out))


def settle_sweep(be, pruned, dense, x, settles: list[float], repeats: int, small, big) -> None:
    from dataclasses import replace

    base = be.protocol
    got: dict[float, list[float]] = {s: [] for s in settles}
    secs: dict[float, list[float]] = {s: [] for s in settles}
    alone = []
    for i in range(repeats):
        for s in settles[i % len(settles):] + settles[:i % len(settles)]:
            be.protocol = replace(base, settle_ms=s)
            t0 = time.perf_counter()
            got[s].append(float(be.measure_ratio(pruned, dense, (x,))[0]))
            secs[s].append(time.perf_counter() - t0)
        a = statistics.median([small() for _ in range(60)])
        alone.append(a / statistics.median([big() for _ in range(30)]))
    be.protocol = base
    print(f"standalone ratio (median of {repeats}): {statistics.median(alone):.3f} "
          f"(range {min(alone):.3f}-{max(alone):.3f})")
    print("| settle ms | calls | median ratio | min-max over calls | spread / median | s per call |")
    print("|---|---|---|---|---|---|")
    for s in settles:
        v = got[s]
        m = statistics.median(v)
        print(f"| {s:g} | {len(v)} | {m:.3f} | {min(v):.3f}-{max(v):.3f} | "
              f"{(max(v) - min(v)) / m:.0%} | {statistics.median(secs[s]):.1f} |")


def main() -> None:
    ap_ = argparse.ArgumentParser()
    ap_.add_argument("--model", default="resnet18")
    ap_.add_argument("--keep", type=float, default=0.4)
    ap_.add_argument("--repeats", type=int, default=5)
    ap_.add_argument("--runs", type=int, default=40)
    ap_.add_argument("--explore", action="store_true")
    ap_.add_argument("--settle-sweep", default="",
                     help="comma-separated settle times (ms): spread of measure_ratio calls")
    args = ap_.parse_args()
    torch.manual_seed(0)
    dense = zoo.torchvision_model(args.model, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = ap.analyze(dense, x)
    pruned = ap.apply_plan(dense, ap.PruningPlan.uniform(spec, args.keep, alignment=16), x)
    be = ap.get_backend("onnxruntime-cpu", threads=1)
    small, big = be._timer_for_model(pruned, (x,)), be._timer_for_model(dense, (x,))
    if args.settle_sweep:
        print(f"{args.model} 1x3x32x32, uniform keep {args.keep} (alignment 16), ORT CPU 1 thread")
        settle_sweep(be, pruned, dense, x, [float(v) for v in args.settle_sweep.split(",")],
                     args.repeats, small, big)
        return
    if args.explore:
        print(f"{args.model} 1x3x32x32, uniform keep {args.keep} (alignment 16), ORT CPU 1 thread")
        explore(small, big)
        return
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
