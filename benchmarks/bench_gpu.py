"""GPU benchmarks for the ``torch-cuda`` backend (needs an NVIDIA GPU; see BENCHMARKS.md "GPU").

Stages (each writes a JSON file under ``--out``; a stage past ``--deadline-s`` is skipped):

1. ``env``: GPU name, driver, torch/CUDA versions.
2. ``alignment``: (a) ``detect_alignment`` as the profiler runs it (small representative layer,
   fitted step and the backend floor); (b) a width sweep of large, compute-bound layers around
   1024 output channels (Linear 4096->n on 4096 tokens; 3x3 conv 256->n at 56x56, batch 8),
   medians grouped by width residue (multiple of 64 / of 8 only / even not of 8 / odd), each
   relative to a straight line fitted through the multiples of 8.
3. ``profile``: a torch-cuda fp16 latency table for resnet18 and mobilenet_v2 (1x3x32x32, then
   32x3x224x224) under ``--root``.
4. ``sparse24``: 2:4 semi-structured (``torch.sparse.to_sparse_semi_structured``) vs dense
   fp16 ``F.linear`` at several token counts, and 3x3 convs lowered to GEMM (im2col: the
   weight as a [C_out, 9*C_in] matrix times the unfolded input), medians and IQR of
   CUDA-event timed samples, dense and sparse interleaved.
5. ``sparse24_diagnose`` (only when named in ``--stages``): the 2:4 path's fixed cost, default
   vs CUTLASS kernels, eager vs CUDA-graph replay, host time per call.

Usage::

    python benchmarks/bench_gpu.py --out OUT --root OUT/tables [--deadline-s 480]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

T0 = time.monotonic()


def _dump(out: Path, name: str, obj: Any) -> None:
    (out / f"{name}.json").write_text(json.dumps(obj, indent=1, default=str))
    print(f"[{time.monotonic() - T0:6.1f}s] wrote {name}.json", flush=True)


def env_info() -> dict[str, Any]:
    from autoprune.backends.torch_cuda import gpu_fingerprint

    p = torch.cuda.get_device_properties(0)
    return {"gpu": gpu_fingerprint(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "sm": f"sm_{p.major}{p.minor}", "sms": p.multi_processor_count,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def _q(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_ms": float(med), "iqr_ms": float(q3 - q1), "rel_iqr": float((q3 - q1) / med)}


def alignment_study() -> dict[str, Any]:
    import autoprune as ap
    from autoprune.latency._profile import detect_alignment
    from autoprune.measure import ProtocolSettings
    from autoprune.types import LayerSpec, OpKind

    b = ap.get_backend("torch-cuda", dtype="fp16")
    step, sweep = detect_alignment(b, return_sweep=True)  # type: ignore[misc]
    med = sweep["median_ms"]
    res: dict[str, Any] = {"detect": {"alignment": step, "fitted": sweep["fitted_alignment"],
                                      "floor": sweep["min_alignment"],
                                      "sweep_min_ms": min(med), "sweep_max_ms": max(med),
                                      "rss": sweep["rss"]}}
    b.protocol = ProtocolSettings(warmup_runs=3, min_runs=15, max_runs=40, target_rel_iqr=0.03,
                                  time_cap_s=0.3, min_sample_ms=0.2)
    widths = list(range(1024 - 64, 1024 + 65))
    layers = {
        "linear_4096_tokens4096": LayerSpec(OpKind.LINEAR, 4096, 64, input_size=(4096,)),
        "conv3x3_256_56x56_b8": LayerSpec(OpKind.CONV2D, 256, 64, (3, 3), (1, 1), (1, 1),
                                          (1, 1), 1, (56, 56), batch=8),
    }
    for name, lay in layers.items():
        samples = b.measure_layers([(lay.with_channels(lay.in_channels, w), "none", 1.0)
                                    for w in widths])
        m = np.array([s.median_ms for s in samples])
        w = np.array(widths)
        on8 = w % 8 == 0
        coef = np.polyfit(w[on8], m[on8], 1)
        rel = m / np.polyval(coef, w)
        groups = {"mult64": w % 64 == 0, "mult8_not64": on8 & (w % 64 != 0),
                  "even_not8": (w % 2 == 0) & ~on8, "odd": w % 2 == 1}
        res[name] = {
            "widths": widths, "median_ms": [round(float(x), 5) for x in m],
            "groups": {g: {"n": int(k.sum()), "median_ms": float(np.median(m[k])),
                           "rel_to_fit_median": float(np.median(rel[k])),
                           "rel_to_fit_max": float(rel[k].max())}
                       for g, k in groups.items()},
        }
        print(name, json.dumps(res[name]["groups"]), flush=True)
    return res


def profile_tables(root: Path, deadline_s: float) -> dict[str, Any]:
    import autoprune as ap
    from autoprune.latency._profile import profile
    from autoprune.measure import ProtocolSettings
    from autoprune.zoo import torchvision_model

    proto = ProtocolSettings(warmup_runs=5, min_runs=20, max_runs=100, target_rel_iqr=0.03,
                             time_cap_s=0.15, min_sample_ms=0.1)
    b = ap.get_backend("torch-cuda", dtype="fp16", protocol=proto)
    out: dict[str, Any] = {}
    for shape in ((1, 3, 32, 32), (32, 3, 224, 224)):
        for name in ("resnet18", "mobilenet_v2"):
            if time.monotonic() - T0 > deadline_s:
                out[f"{name}_{shape}"] = "skipped: deadline"
                continue
            model = torchvision_model(name, num_classes=10).eval()
            x = torch.randn(*shape)
            t = time.monotonic()
            table = profile(model, x, b, root=root, progress=False)
            whole = b.measure_model(model, x)
            out[f"{name}_{'x'.join(map(str, shape))}"] = {
                "seconds": round(time.monotonic() - t, 1), "entries_total": len(table),
                "alignment": table.alignment, "whole_model_median_ms": whole.median_ms,
                "whole_model_rel_iqr": whole.spread, "table_dir": str(table.path)}
            print(name, shape, out[f"{name}_{'x'.join(map(str, shape))}"], flush=True)
    return out


def _time_pair(fa: Any, fb: Any, reps: int = 30, calls: int = 20) -> tuple[dict, dict, dict]:
    """Interleaved CUDA-event samples of two callables; (a stats, b stats, ratio b/a stats)."""
    for _ in range(5):
        fa(), fb()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(reps):
        ev[0].record()
        for _ in range(calls):
            fa()
        ev[1].record()
        ev[2].record()
        for _ in range(calls):
            fb()
        ev[3].record()
        ev[3].synchronize()
        ta.append(ev[0].elapsed_time(ev[1]) / calls)
        tb.append(ev[2].elapsed_time(ev[3]) / calls)
    ratios = [y / x for x, y in zip(ta, tb)]
    return _q(ta), _q(tb), _q(ratios)


def _prune_2to4(w: torch.Tensor) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape_as(w)


def sparse24(deadline_s: float) -> list[dict[str, Any]]:
    from torch.sparse import to_sparse_semi_structured

    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    dev, dt = "cuda", torch.float16
    for n_feat in (4096, 8192):
        w = _prune_2to4(torch.randn(n_feat, n_feat, device=dev, dtype=dt))
        ws = to_sparse_semi_structured(w)
        for tokens in (1, 16, 64, 256, 1024, 4096, 8192):
            if time.monotonic() - T0 > deadline_s:
                rows.append({"layer": f"linear {n_feat}x{n_feat}", "tokens": tokens,
                             "skipped": "deadline"})
                continue
            x = torch.randn(tokens, n_feat, device=dev, dtype=dt)
            try:
                d, s, r = _time_pair(lambda: F.linear(x, w), lambda: F.linear(x, ws))
                err = None
            except (RuntimeError, ValueError) as e:
                d = s = r = {}
                err = str(e)[:200]
            rows.append({"layer": f"linear {n_feat}x{n_feat}", "tokens": tokens, "dense": d,
                         "sparse24": s, "ratio_sparse_over_dense": r, "error": err})
            print(rows[-1], flush=True)
    # 3x3 convs as GEMM: weight [C_out, 9*C_in] (2:4 along the reduction) x unfolded input
    for ch, hw, batch in ((256, 56, 8), (512, 28, 8), (1024, 14, 8), (256, 14, 1)):
        if time.monotonic() - T0 > deadline_s:
            rows.append({"layer": f"conv3x3 {ch}->{ch} @{hw}x{hw} b{batch}", "skipped": "deadline"})
            continue
        w = _prune_2to4(torch.randn(ch, ch * 9, device=dev, dtype=dt))
        ws = to_sparse_semi_structured(w)
        x = torch.randn(batch, ch, hw, hw, device=dev, dtype=dt)
        w4 = w.reshape(ch, ch, 3, 3)
        cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, ch * 9).contiguous()
        try:
            d, s, r = _time_pair(lambda: F.linear(cols, w), lambda: F.linear(cols, ws))
            dc, _, rc = _time_pair(lambda: F.conv2d(x, w4, padding=1), lambda: F.linear(cols, ws))
            err = None
        except (RuntimeError, ValueError) as e:
            d = s = r = dc = rc = {}
            err = str(e)[:200]
        rows.append({"layer": f"conv3x3 {ch}->{ch} @{hw}x{hw} b{batch}",
                     "gemm_mnk": [cols.shape[0], ch, ch * 9], "dense_gemm": d,
                     "sparse24_gemm": s, "ratio_sparse_over_dense_gemm": r,
                     "dense_cudnn_conv": dc, "ratio_sparse_gemm_over_cudnn_conv": rc,
                     "error": err, "note": "im2col (unfold) time not included"})
        print(rows[-1], flush=True)
    return rows


def sparse24_diagnose() -> list[dict[str, Any]]:
    """Where the 2:4 fixed cost comes from: default (cuSPARSELt) vs forced CUTLASS kernels,
    each eager and replayed from a CUDA graph (no host work per call), Linear 4096x4096."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    w = _prune_2to4(torch.randn(4096, 4096, device="cuda", dtype=torch.float16))
    for force_cutlass in (False, True):
        SparseSemiStructuredTensor._FORCE_CUTLASS = force_cutlass
        ws = to_sparse_semi_structured(w)
        for tokens in (16, 1024, 8192):
            x = torch.randn(tokens, 4096, device="cuda", dtype=torch.float16)
            row: dict[str, Any] = {"kernels": "cutlass" if force_cutlass else "default",
                                   "sparse_type": type(ws).__name__, "tokens": tokens}
            try:
                d, s, r = _time_pair(lambda: F.linear(x, w), lambda: F.linear(x, ws))
                row.update(eager_dense=d, eager_sparse=s, eager_ratio=r)
                graphs = []
                for fn in (lambda: F.linear(x, w), lambda: F.linear(x, ws)):
                    fn()
                    torch.cuda.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        fn()
                    graphs.append(g)
                d, s, r = _time_pair(graphs[0].replay, graphs[1].replay)
                row.update(graph_dense=d, graph_sparse=s, graph_ratio=r)
                t = time.perf_counter()
                for _ in range(50):
                    F.linear(x, ws)
                host_ms = (time.perf_counter() - t) / 50 * 1e3
                torch.cuda.synchronize()
                row["host_ms_per_sparse_call"] = host_ms
            except (RuntimeError, ValueError) as e:
                row["error"] = str(e)[:300]
            rows.append(row)
            print(row, flush=True)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return rows


def main() -> int:
    ap_ = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap_.add_argument("--out", type=Path, required=True)
    ap_.add_argument("--root", type=Path, required=True, help="latency table root")
    ap_.add_argument("--deadline-s", type=float, default=480.0)
    ap_.add_argument("--stages", default="env,alignment,sparse24,profile")
    args = ap_.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    if "env" in stages:
        _dump(args.out, "env", env_info())
    if "alignment" in stages:
        _dump(args.out, "alignment", alignment_study())
    if "sparse24" in stages:
        _dump(args.out, "sparse24", sparse24(args.deadline_s))
    if "sparse24_diagnose" in stages:
        _dump(args.out, "sparse24_diagnose", sparse24_diagnose())
    if "profile" in stages:
        _dump(args.out, "profile", profile_tables(args.root, args.deadline_s))
    print(f"total {time.monotonic() - T0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
