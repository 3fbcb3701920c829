"""The device's weight-streaming curve (``autoprune.latency._memory``), measured and printed.

    python benchmarks/bench_memory.py [--backend onnxruntime-cpu] [--repeats 3] [--out FILE.json]

Times the probe chains (8 1x1 convs at 1x1 spatial size, 0.5–128 MB of float32 weights) on the
backend, interleaved, ``--repeats`` rounds, and prints per size: the chain's median time over
rounds, the spread between rounds, its cost per MB and the extra over the in-cache line that
latency models price as ``stream_ms``. Run it alone on the machine (no other benchmark).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="onnxruntime-cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the rounds and the curve as JSON")
    args = p.parse_args()

    import autoprune as ap
    from autoprune.latency._memory import WeightStream, probe_rounds

    backend = ap.get_backend(args.backend)
    t0 = time.perf_counter()
    sizes, r = probe_rounds(backend, repeats=args.repeats)
    seconds = time.perf_counter() - t0
    med = np.median(r, axis=0)
    ws = WeightStream(tuple(sizes), tuple(med.tolist()))
    extra = ws.extra_ms(sizes)
    info = backend.device_info()
    print(f"{info.device_name} ({info.device_id}), {args.repeats} rounds, {seconds:.1f} s, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(ws)
    print(f"{'weights MB':>10} {'chain ms':>9} {'spread':>7} {'us/MB':>7} {'extra ms':>9}")
    for w, m, lo, hi, e in zip(sizes, med, r.min(axis=0), r.max(axis=0), extra):
        print(f"{w:10.2f} {m:9.4f} {100 * (hi - lo) / m:6.1f}% {1000 * m / w:7.1f} {e:9.4f}")
    if args.out:
        from autoprune.io import atomic_write_json

        atomic_write_json(args.out, {
            "device": info.to_dict(), "host": platform.node(), "seconds": seconds,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "sizes_mb": list(sizes), "rounds_ms": r.tolist(), **ws.to_dict(),
            "resident_ms_per_mb": ws.resident_ms_per_mb,
            "streaming_ms_per_mb": ws.streaming_ms_per_mb, "knee_mb": ws.knee_mb,
        })


if __name__ == "__main__":
    main()
