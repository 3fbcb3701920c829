"""Standalone latency runner for remote devices (needs only Python 3.8+, numpy and onnxruntime).

This file is copied as ``run_bundle.py`` into every bundle written by
``autoprune.bundle.export_bundle`` and runs on the target device::

    python run_bundle.py BUNDLE_DIR --threads 1 [--out results.json]

It loads each micro-model of the bundle's ``manifest.json`` into an ONNX Runtime session,
times them with the same adaptive, interleaved protocol as ``autoprune.measure`` and writes
``results.json`` (device fingerprint + one median/IQR per entry). The results file is rewritten
atomically after every chunk, so an interrupted run resumes where it stopped.
``autoprune bundle import results.json`` turns it into a ``LatencyTable``.

It must never import torch or autoprune. ``autoprune.measure`` and the ``onnxruntime-cpu``
backend import the protocol loop and the CPU fingerprint from here, so that a table measured
through a bundle and one measured locally use the very same code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

RESULTS_SCHEMA_VERSION = 1

#: ISA flags that change which kernels a CPU runtime picks (kept in the device fingerprint)
RELEVANT_ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    # aarch64 (/proc/cpuinfo "Features")
    "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16", "sme",
)


# --------------------------------------------------------------------------------------------
# CPU fingerprint
# --------------------------------------------------------------------------------------------
def cpu_fingerprint() -> Dict[str, Any]:
    """CPU model name, architecture and relevant ISA flags of this machine.

    Reads ``/proc/cpuinfo`` on Linux (x86 ``model name``/``flags``, ARM ``Features`` and
    ``CPU part``), falls back to :mod:`platform` elsewhere. ``neon`` is reported for every
    aarch64 CPU (Advanced SIMD is mandatory there).
    """
    arch = platform.machine() or "unknown"
    name = ""
    flags: set = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    arm_part = ""
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("model name", "hardware", "cpu model") and not name:
            name = value
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key == "cpu part" and not arm_part:
            arm_part = value
    if not name:
        name = platform.processor() or (f"{arch} cpu part {arm_part}" if arm_part else arch)
    if arch.lower() in ("aarch64", "arm64"):
        flags.add("neon")
    isa = sorted(f for f in flags if f in RELEVANT_ISA_FLAGS or f == "neon")
    return {"device_name": " ".join(name.split()), "arch": arch, "isa_flags": isa}


# --------------------------------------------------------------------------------------------
# Timing protocol (the one implementation; autoprune.measure wraps it with a dataclass)
# --------------------------------------------------------------------------------------------
def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    n = len(sorted_xs)
    if n == 0:
        return float("nan")
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Tuple[float, float, int, float]:
    """(median, IQR, count, min) of a list of times in ms."""
    xs = sorted(times_ms)
    if not xs:
        return float("nan"), float("nan"), 0, float("nan")
    return _quantile(xs, 0.5), _quantile(xs, 0.75) - _quantile(xs, 0.25), len(xs), xs[0]


def rel_iqr(times_ms: Sequence[float]) -> float:
    med, iqr, n, _ = summarize(times_ms)
    return iqr / med if n and med > 0 else float("inf")


def calibrate_calls(call: Callable[[], None], min_sample_ms: float, max_calls: int = 1000) -> int:
    """Calls per timed sample so that one sample lasts at least ``min_sample_ms``."""
    if min_sample_ms <= 0:
        return 1
    t0 = time.perf_counter()
    call()
    one_ms = (time.perf_counter() - t0) * 1e3
    if one_ms >= min_sample_ms:
        return 1
    return int(max(1, min(max_calls, -(-min_sample_ms // max(one_ms, 1e-4)))))


def burst(call: Callable[[], float], settle_ms: float = 3.0, runs: int = 5) -> List[float]:
    """Run ``call`` untimed for ``settle_ms`` (at least once when > 0), then ``runs`` timed calls.

    A small model timed right after a large one (or after any pause) runs slower for its
    first few milliseconds of work on the CPUs we measured: a pruned resnet18 took 0.40 ms on
    its first run after the dense model and 0.20 ms in steady state, and sleeping instead of
    running the dense model made it worse, not better (BENCHMARKS.md, "Paired timing"). Settling
    first and timing a short burst gives each configuration its steady-state time even when
    configurations alternate.
    """
    if settle_ms > 0:
        t0 = time.perf_counter()
        while True:
            call()
            if (time.perf_counter() - t0) * 1e3 >= settle_ms:
                break
    return [float(call()) for _ in range(max(1, int(runs)))]


def run_protocol(
    timed_calls: Sequence[Callable[[], float]],
    warmup_runs: int = 10,
    min_runs: int = 20,
    max_runs: int = 300,
    target_rel_iqr: float = 0.05,
    time_cap_s: float = 2.0,
    settle_ms: float = 3.0,
    burst_runs: int = 5,
) -> List[List[float]]:
    """Time several configurations round-robin until each is stable or the cap is hit.

    ``timed_calls[i]()`` runs configuration *i* once and returns its duration in ms. Each round
    gives every still-active configuration one burst (:func:`burst`: settle for ``settle_ms``,
    then ``burst_runs`` timed runs), in an order rotated every round, so drift of a shared
    machine lands on all of them alike while none is timed cold. A configuration stops once it
    has ``min_runs`` timed runs and its relative IQR is at most ``target_rel_iqr``; all stop at
    ``max_runs`` runs or when ``time_cap_s`` (per configuration, so the cap of a chunk is
    ``time_cap_s * len``) is spent, but never before ``min_runs``. Returns every
    configuration's list of times.
    """
    k = len(timed_calls)
    for _ in range(max(0, warmup_runs)):
        for call in timed_calls:
            call()
    times: List[List[float]] = [[] for _ in range(k)]
    active = list(range(k))
    deadline = time.perf_counter() + time_cap_s * max(1, k)
    round_no = 0
    per_round = max(1, int(burst_runs))
    check_every = max(1, min_runs // (4 * per_round))
    while active:
        shift = round_no % len(active)
        order = active[shift:] + active[:shift]
        for i in order:
            times[i].extend(burst(timed_calls[i], settle_ms, per_round))
        round_no += 1
        if min(len(times[i]) for i in active) < min_runs:
            continue
        out_of_time = time.perf_counter() > deadline
        if out_of_time or round_no % check_every == 0:
            active = [
                i
                for i in active
                if not out_of_time
                and len(times[i]) < max_runs
                and rel_iqr(times[i]) > target_rel_iqr
            ]
    return times


def ratio_protocol(
    call: Callable[[], float],
    reference: Callable[[], float],
    warmup_runs: int = 10,
    min_runs: int = 20,
    max_runs: int = 300,
    target_rel_iqr: float = 0.05,
    time_cap_s: float = 2.0,
    settle_ms: float = 3.0,
    burst_runs: int = 5,
) -> List[float]:
    """Paired alternating timing: one ratio per pair of bursts (order alternating), each
    burst's median time, ``call / reference``. ``min_runs``/``max_runs`` count pairs."""
    for _ in range(max(0, warmup_runs)):
        call()
        reference()
    ratios: List[float] = []
    deadline = time.perf_counter() + 2 * time_cap_s
    i = 0

    def med(c: Callable[[], float]) -> float:
        return _quantile(sorted(burst(c, settle_ms, burst_runs)), 0.5)

    while True:
        if i % 2 == 0:
            a = med(call)
            b = med(reference)
        else:
            b = med(reference)
            a = med(call)
        ratios.append(a / b if b > 0 else float("inf"))
        i += 1
        if i < min_runs:
            continue
        if i >= max_runs or time.perf_counter() > deadline or rel_iqr(ratios) <= target_rel_iqr:
            return ratios


# --------------------------------------------------------------------------------------------
# ONNX Runtime sessions
# --------------------------------------------------------------------------------------------
_GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}


def make_session(
    model: Any, threads: int = 1, graph_optimization_level: str = "all",
    providers: Optional[Sequence[str]] = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` with fixed intra-op threads and sequential execution."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = _GRAPH_LEVELS.get(graph_optimization_level)
    if level is None:
        raise ValueError(
            f"graph_optimization_level {graph_optimization_level!r}; "
            f"use one of {sorted(_GRAPH_LEVELS)}"
        )
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    return ort.InferenceSession(
        model, sess_options=so, providers=list(providers or ["CPUExecutionProvider"])
    )


_NP_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool",
}


def session_timer(sess: Any, feeds: Optional[Dict[str, Any]] = None, seed: int = 0,
                  calls_per_sample: int = 1) -> Callable[[], float]:
    """A zero-argument callable that runs ``sess`` once per call and returns its time in ms.

    Inputs are bound once through IOBinding (random normal data when ``feeds`` is None), so
    the timed call is the session run alone, not numpy conversion.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    if feeds is None:
        feeds = {}
        for inp in sess.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            dtype = _NP_DTYPES.get(inp.type, "float32")
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cpu")
    run = sess.run_with_iobinding
    n = max(1, int(calls_per_sample))
    perf = time.perf_counter_ns

    def timed() -> float:
        t0 = perf()
        for _ in range(n):
            run(binding)
        return (perf() - t0) / 1e6 / n

    return timed


# --------------------------------------------------------------------------------------------
# Bundle runner
# --------------------------------------------------------------------------------------------
def _atomic_write_json(path: str, obj: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_model(path: str) -> bytes:
    """Model bytes; ``.gz`` files are decompressed."""
    if path.endswith(".gz"):
        import gzip

        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def run_bundle(
    bundle_dir: str, threads: int = 1, out: Optional[str] = None,
    graph_optimization_level: str = "all", providers: Optional[Sequence[str]] = None,
    chunk: int = 8, quiet: bool = False,
) -> str:
    """Measure every entry of the bundle; returns the results path. Resumes a partial run."""
    import onnxruntime as ort

    with open(os.path.join(bundle_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    out = out or os.path.join(bundle_dir, f"results_t{threads}.json")
    protocol = dict(manifest["protocol"])
    fp = cpu_fingerprint()
    providers = list(providers or ["CPUExecutionProvider"])
    device = {
        "backend": "onnxruntime-cpu",
        "device_name": fp["device_name"],
        "arch": fp["arch"],
        "runtime": f"onnxruntime {ort.__version__}",
        "threads": int(threads),
        "precision": "float32",
        "isa_flags": fp["isa_flags"],
        "driver": "",
        "clocks": "",
        "extra": {"graph_optimization_level": graph_optimization_level,
                  "providers": ",".join(providers)},
    }
    results: Dict[str, Any] = {
        "results_schema_version": RESULTS_SCHEMA_VERSION,
        "bundle_id": manifest["bundle_id"],
        "device": device,
        "protocol": protocol,
        "entries": {},
    }
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("bundle_id") == manifest["bundle_id"] and old.get("device") == device:
            results["entries"] = dict(old.get("entries", {}))
    todo = [e for e in manifest["entries"] if e["id"] not in results["entries"]]
    total = len(manifest["entries"])
    t_start = time.time()
    for start in range(0, len(todo), max(1, chunk)):
        batch = todo[start : start + chunk]
        timers = []
        for e in batch:
            sess = make_session(_read_model(os.path.join(bundle_dir, e["file"])), threads,
                                graph_optimization_level, providers)
            call = session_timer(sess)
            n = calibrate_calls(lambda: call(), protocol.get("min_sample_ms", 0.0))
            timers.append(session_timer(sess, calls_per_sample=n))
        times = run_protocol(
            timers,
            warmup_runs=protocol["warmup_runs"],
            min_runs=protocol["min_runs"],
            max_runs=protocol["max_runs"],
            target_rel_iqr=protocol["target_rel_iqr"],
            time_cap_s=protocol["time_cap_s"],
            # bundles written before bursts existed time one cold run per sample
            settle_ms=protocol.get("settle_ms", 0.0),
            burst_runs=protocol.get("burst_runs", 1),
        )
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for e, ts in zip(batch, times):
            med, iqr, n, mn = summarize(ts)
            results["entries"][e["id"]] = {
                "median_ms": med, "iqr_ms": iqr, "n_runs": n, "min_ms": mn, "measured_at": stamp,
            }
        _atomic_write_json(out, results)
        if not quiet:
            done = len(results["entries"])
            el = time.time() - t_start
            print(f"[{done}/{total}] {el:.1f} s elapsed", file=sys.stderr, flush=True)
    if not todo:
        _atomic_write_json(out, results)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Measure an autoprune latency bundle on this device.")
    p.add_argument("bundle_dir", nargs="?", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", default=None, help="results file (default BUNDLE/results_tN.json)")
    p.add_argument("--graph-optimization-level", default="all", choices=sorted(_GRAPH_LEVELS))
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="comma-separated execution providers, e.g. XnnpackExecutionProvider,"
                        "CPUExecutionProvider")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    path = run_bundle(args.bundle_dir, args.threads, args.out, args.graph_optimization_level,
                      args.providers.split(","), quiet=args.quiet)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
