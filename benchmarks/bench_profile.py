"""Profiling cost and measurement noise on this machine (ONNX Runtime CPU).

For each model: a fresh table is profiled into a temporary root (alignment sweep + width grid),
and the script reports

* wall seconds of the alignment sweep and of the whole profile, number of entries;
* the measured spread per entry (relative IQR = IQR / median): median, p10/p90, max, and the
  share of entries that hit the time cap before reaching the target spread;
* the detected alignment;
* interpolation check: ``n_check`` random off-grid (in, out) widths of random conv layers,
  each measured interleaved with the grid corners it is interpolated from; error of
  ``lookup(policy="interpolate")`` on those fresh corners against the direct measurement
  (median / p90 of |relative error|), and the median error against the stored table;
* layer sum vs whole model: the dense model's layers and the whole model timed interleaved;
  the per-layer sum against the whole (the gap the predictor's correction has to learn).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_profile.py --threads 1 [--models resnet18 mobilenet_v2]
        [--out bench_profile.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch

from autoprune.bundle_runner import cpu_fingerprint


def bench_model(name: str, threads: int, n_check: int, seed: int) -> dict[str, Any]:
    import torchvision

    import autoprune as ap
    from autoprune._analyze import analyze
    from autoprune.latency._profile import detect_alignment, profile
    from autoprune.latency._table import LatencyTable

    model = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    backend = ap.get_backend("onnxruntime-cpu", threads=threads)
    spec = analyze(model, x)
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        step, sweep = detect_alignment(backend, spec=spec, return_sweep=True)
        t_sweep = time.perf_counter() - t0
        table = LatencyTable(backend.device_info(), alignment=step, protocol=backend.protocol)
        table.alignment_sweep = sweep
        table.path = LatencyTable.default_dir(table.device, root)
        t1 = time.perf_counter()
        profile(model, x, backend, table=table, spec=spec, progress=False)
        t_grid = time.perf_counter() - t1
    spreads = np.array([e.sample.spread for e in table])
    runs = np.array([e.sample.n_runs for e in table])
    target = backend.protocol.target_rel_iqr
    # interpolation check at random off-grid widths: each point is measured interleaved with
    # the grid corners it is interpolated from, so machine drift does not pose as error
    from autoprune.latency._table import _bracket, _family

    rng = np.random.default_rng(seed)
    layers = [lay for lay in spec.layers.values()
              if lay.spec.op.value in ("conv2d", "dwconv2d") and lay.spec.out_channels > 16]
    fams: dict[Any, set[tuple[int, int]]] = {}
    for e in table:
        fams.setdefault(_family(e.spec), set()).add((e.spec.in_channels, e.spec.out_channels))
    groups = []
    for _ in range(n_check):
        lay = layers[int(rng.integers(len(layers)))]
        full_in, full_out = lay.spec.in_channels, lay.spec.out_channels
        cin = full_in if full_in <= 3 else int(rng.integers(max(1, full_in // 8), full_in + 1))
        cout = int(rng.integers(max(1, full_out // 8), full_out + 1))
        s = lay.spec.with_channels(cin, cout)
        pts = fams.get(_family(s), set())
        key = (s, ap.Structure.NONE, 1.0)
        try:
            co = _bracket(s.out_channels, sorted({c for _, c in pts}), step, key, "out")
            if s.op.is_depthwise:
                corners = {(w, w) for w in co[:2]}
            else:
                ci = _bracket(s.in_channels, sorted({c for c, _ in pts}), step, key, "in")
                corners = {(a, b) for a in ci[:2] for b in co[:2]}
        except ap.errors.TableMissError:
            continue
        groups.append((s, [s.with_channels(a, b) for a, b in sorted(corners)]))
    items = [(x, ap.Structure.NONE, 1.0) for s, cs in groups for x in (s, *cs)]
    fresh = backend.measure_layers(items)
    errs, stale_errs = [], []
    k = 0
    for s, cs in groups:
        direct = fresh[k].median_ms
        mini = LatencyTable(backend.device_info(), alignment=step)
        for c, smp in zip(cs, fresh[k + 1 : k + 1 + len(cs)]):
            mini.add(c, "none", 1.0, smp)
        k += 1 + len(cs)
        errs.append(abs(mini.lookup(s, policy="interpolate") - direct) / direct)
        stale_errs.append(abs(table.lookup(s, policy="interpolate") - direct) / direct)
    # table sum vs whole model, timed interleaved (whole model + every distinct dense layer)
    from autoprune.measure import measure_interleaved

    dense_specs = [lay.spec for lay in spec.layers.values()]
    uniq = list(dict.fromkeys(dense_specs))
    timers = [backend._timer_for_model(model, x)] + [
        backend._timer_for_layer(u, ap.Structure.NONE, 1.0) for u in uniq]
    samples = measure_interleaved(timers, backend.protocol)
    whole = samples[0]
    by_spec = {u: smp.median_ms for u, smp in zip(uniq, samples[1:])}
    dense_sum = sum(by_spec[sp] for sp in dense_specs)
    stored_sum = sum(table.lookup(sp) for sp in dense_specs)
    return {
        "model": name,
        "threads": threads,
        "entries": len(table),
        "alignment": step,
        "sweep_s": round(t_sweep, 1),
        "profile_s": round(t_grid, 1),
        "total_s": round(t_sweep + t_grid, 1),
        "spread_median": float(np.median(spreads)),
        "spread_p10": float(np.percentile(spreads, 10)),
        "spread_p90": float(np.percentile(spreads, 90)),
        "spread_max": float(spreads.max()),
        "share_above_target": float((spreads > target).mean()),
        "runs_median": float(np.median(runs)),
        "interp_checks": len(errs),
        "interp_err_median": float(np.median(errs)) if errs else float("nan"),
        "interp_err_p90": float(np.percentile(errs, 90)) if errs else float("nan"),
        "interp_err_vs_stored_median": float(np.median(stale_errs)) if errs else float("nan"),
        "stored_table_sum_ms": stored_sum,
        "dense_table_sum_ms": dense_sum,
        "whole_model_ms": whole.median_ms,
        "whole_model_spread": whole.spread,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-check", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = [bench_model(m, args.threads, args.n_check, args.seed) for m in args.models]
    meta = {"cpu": cpu_fingerprint()["device_name"],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__}
    print(json.dumps({"meta": meta, "results": results}, indent=1))
    print()
    print("| model | threads | entries | alignment | sweep s | profile s | spread median "
          "(p10-p90, max) | above target | interp. error median / p90 (vs stored table) | "
          "layer sum / whole model ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['threads']} | {r['entries']} | {r['alignment']} | "
              f"{r['sweep_s']} | {r['profile_s']} | {100 * r['spread_median']:.1f}% "
              f"({100 * r['spread_p10']:.1f}-{100 * r['spread_p90']:.1f}%, "
              f"{100 * r['spread_max']:.0f}%) | {100 * r['share_above_target']:.0f}% | "
              f"{100 * r['interp_err_median']:.1f}% / {100 * r['interp_err_p90']:.1f}% "
              f"({100 * r['interp_err_vs_stored_median']:.1f}%, n={r['interp_checks']}) | "
              f"{r['dense_table_sum_ms']:.3f} / "
              f"{r['whole_model_ms']:.3f} (±{100 * r['whole_model_spread']:.0f}%) |")
    if args.out:
        from autoprune.io import atomic_write_json

        atomic_write_json(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
