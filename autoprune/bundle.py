"""Latency bundles: profile a device that cannot run autoprune (an ARM board, a phone).

``export_bundle`` writes, into one directory:

* ``models/<id>.onnx.gz`` — one gzip-compressed ONNX micro-model per table entry (the same
  layers, widths and fused ops ``profile`` would measure). Weights follow a short periodic
  pattern so the files compress to a few KB; dense CPU kernels do not depend on weight values;
* ``manifest.json`` — bundle id, protocol settings, the alignment (or the sweep entries that
  detect it on the device), and per entry its id, file, ``LayerSpec``, structure and density;
* ``run_bundle.py`` — the standalone runner (a copy of ``autoprune/bundle_runner.py``; needs
  only Python, numpy and onnxruntime).

On the device: ``python run_bundle.py --threads 1`` writes ``results_t1.json`` (resumable).
Back home: ``import_bundle(results_path)`` (or ``autoprune bundle import``) returns a
``LatencyTable`` with the device's fingerprint, in the same format ``profile`` writes.

Without ``alignment`` the bundle carries the alignment sweep and the width grids for steps 8
and 16 (the common CPU steps); the import records the step the sweep detects and warns if it is
outside those (then export again with ``alignment=`` that step).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autoprune.errors import CorruptFileError, InvalidInputError
from autoprune.latency._profile import (
    ALIGNMENT_CANDIDATES,
    WidthsOption,
    enumerate_items,
    fit_alignment,
    representative_layer,
)
from autoprune.latency._table import LatencyTable, entry_key
from autoprune.measure import ProtocolSettings
from autoprune.types import DeviceInfo, LatencySample, LayerSpec, ModelSpec, Structure

if TYPE_CHECKING:
    from torch import nn

BUNDLE_SCHEMA_VERSION = 1
DEFAULT_BUNDLE_ALIGNMENTS: tuple[int, ...] = (8, 16)


def _entry_id(spec: LayerSpec, structure: Structure, density: float) -> str:
    payload = json.dumps([spec.key(), structure.value, density])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _fill_periodic(model: torch.nn.Module, period: int = 97) -> None:
    """Overwrite float parameters with a short periodic pattern (compressible, no denormals)."""
    base = 0.05 * torch.sin(torch.arange(period, dtype=torch.float32) * 0.7) + 0.01
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            reps = math.ceil(n / period)
            p.copy_(base.repeat(reps)[:n].reshape(p.shape).to(p.dtype))


def export_bundle(
    model: nn.Module,
    example_inputs: Any,
    out_dir: str | Path,
    spec: ModelSpec | None = None,
    widths: WidthsOption = "auto",
    alignment: int | None = None,
    protocol: ProtocolSettings | None = None,
    sweep_max_width: int = 96,
    progress: bool = True,
) -> Path:
    """Write a bundle for ``model`` into ``out_dir``; returns the manifest path.

    ``alignment``: the target's channel step if known; None → include the alignment sweep and
    grids for 8 and 16. Only dense entries (ONNX Runtime CPU has no sparse kernels).
    """
    from tqdm.auto import tqdm

    from autoprune.backends.micro import build_micro_model
    from autoprune.io import atomic_write_bytes, atomic_write_json
    from autoprune.onnx_export import as_input_tuple, to_onnx

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").exists():
        raise InvalidInputError(
            f"{out} exists and is not an autoprune bundle; choose an empty or new directory"
        )
    if spec is None:
        from autoprune._analyze import analyze

        spec = analyze(model, as_input_tuple(example_inputs))
    protocol = protocol or ProtocolSettings()
    aligns = (int(alignment),) if alignment is not None else DEFAULT_BUNDLE_ALIGNMENTS
    items: dict[tuple, str] = {}
    for a in aligns:
        for it in enumerate_items(spec, None, a, widths, [Structure.NONE]):
            items.setdefault(it, "grid")
    sweep_layer = None
    if alignment is None:
        sweep_layer = representative_layer(spec)
        for w in range(1, sweep_max_width + 1):
            s = (sweep_layer.with_channels(w, w) if sweep_layer.op.is_depthwise
                 else sweep_layer.with_channels(sweep_layer.in_channels, w))
            k = entry_key(s, Structure.NONE, 1.0)
            items[k] = "sweep" if k not in items else items[k] + "+sweep"
    entries = []
    (out / "models").mkdir(parents=True, exist_ok=True)
    for (s, st, d), kind in tqdm(items.items(), desc="bundle export", unit="model",
                                 disable=not progress):
        eid = _entry_id(s, st, d)
        rel = f"models/{eid}.onnx.gz"
        path = out / rel
        if not path.exists():
            micro, inputs = build_micro_model(s, st, d)
            _fill_periodic(micro)
            data = to_onnx(micro, inputs)
            atomic_write_bytes(path, gzip.compress(data, compresslevel=6, mtime=0))
        entries.append({"id": eid, "file": rel, "spec": s.to_dict(), "structure": st.value,
                        "density": d, "kind": kind})
    bundle_id = hashlib.sha256(
        json.dumps([e["id"] for e in entries] + [protocol.to_dict()], sort_keys=True).encode()
    ).hexdigest()[:16]
    manifest = {
        "bundle_schema_version": BUNDLE_SCHEMA_VERSION,
        "bundle_id": bundle_id,
        "model_name": spec.model_name,
        "model_fingerprint": spec.fingerprint,
        "protocol": protocol.to_dict(),
        "alignment": alignment,
        "grid_alignments": list(aligns),
        "widths": widths if isinstance(widths, str) else list(widths),
        "sweep_layer": sweep_layer.to_dict() if sweep_layer is not None else None,
        "entries": entries,
    }
    runner = Path(__file__).with_name("bundle_runner.py")
    shutil.copyfile(runner, out / "run_bundle.py")
    return atomic_write_json(out / "manifest.json", manifest)


def import_bundle(results_path: str | Path, manifest_path: str | Path | None = None
                  ) -> LatencyTable:
    """A ``LatencyTable`` from a runner's results file (the manifest next to it by default)."""
    from autoprune.io import read_json

    rpath = Path(results_path)
    results = read_json(rpath)
    mpath = Path(manifest_path) if manifest_path is not None else rpath.parent / "manifest.json"
    manifest = read_json(mpath)
    try:
        if manifest["bundle_id"] != results["bundle_id"]:
            raise CorruptFileError(
                f"{rpath}: results belong to bundle {results['bundle_id']!r}, but {mpath} is "
                f"bundle {manifest['bundle_id']!r}"
            )
        device = DeviceInfo.from_dict(results["device"])
        measured: dict[str, Any] = results["entries"]
        by_id = {e["id"]: e for e in manifest["entries"]}
    except (KeyError, TypeError) as e:
        raise CorruptFileError(f"{rpath}: malformed results ({type(e).__name__}: {e})") from None
    table = LatencyTable(device, protocol=results.get("protocol", manifest["protocol"]),
                         structures=[Structure.NONE],
                         notes=f"imported from bundle {manifest['bundle_id']} "
                               f"({manifest.get('model_name', '')})")
    sweep_w: list[int] = []
    sweep_ms: list[float] = []
    for eid, r in measured.items():
        e = by_id.get(eid)
        if e is None:
            raise CorruptFileError(f"{rpath}: entry {eid!r} is not in the bundle manifest {mpath}")
        try:
            spec = LayerSpec.from_dict(e["spec"])
            sample = LatencySample(float(r["median_ms"]), float(r["iqr_ms"]), int(r["n_runs"]),
                                   float(r.get("min_ms", float("nan"))))
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{rpath}: entry {eid!r}: {err}") from None
        if "sweep" in e["kind"]:
            sweep_w.append(spec.out_channels)
            sweep_ms.append(sample.median_ms)
        if "grid" in e["kind"]:
            table.add(spec, Structure(e["structure"]), float(e["density"]), sample,
                      r.get("measured_at"))
    missing = [e["id"] for e in manifest["entries"] if e["id"] not in measured]
    if missing:
        warnings.warn(
            f"{rpath}: {len(missing)} of {len(manifest['entries'])} bundle entries have no "
            "result yet (the runner was interrupted?); rerun it to complete them",
            stacklevel=2,
        )
    if manifest.get("alignment") is not None:
        table.alignment = int(manifest["alignment"])
    elif sweep_w:
        order = sorted(range(len(sweep_w)), key=lambda i: sweep_w[i])
        ws = [sweep_w[i] for i in order]
        ms = [sweep_ms[i] for i in order]
        step, rss = fit_alignment(ws, ms, ALIGNMENT_CANDIDATES)
        table.alignment = step
        table.alignment_sweep = {"layer": manifest.get("sweep_layer"), "widths": ws,
                                 "median_ms": ms, "rss": {str(k): v for k, v in rss.items()},
                                 "alignment": step}
        covered: Sequence[int] = manifest.get("grid_alignments", [])
        if step not in covered:
            warnings.warn(
                f"the device's detected channel step is {step}, but the bundle's width grid "
                f"covers steps {list(covered)}; export the bundle again with alignment={step}",
                stacklevel=2,
            )
    return table
