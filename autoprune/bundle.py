"""Latency bundles: profile a device that cannot run autoprune (an ARM board, a phone).

``export_bundle`` writes, into one directory:

* ``models/<id>.onnx.gz`` — one gzip-compressed ONNX micro-model per table entry (the same
  layers, widths and fused ops ``profile`` would measure). Weights follow a short periodic
  pattern so the files compress to a few KB; dense CPU kernels do not depend on weight values;
* ``manifest.json`` — bundle id, protocol settings, the ONNX opset and IR version of the
  models, the alignment (or the sweep entries that detect the device's kernel rules), and per
  entry its id, file, ``LayerSpec``, structure and density;
* ``run_bundle.py`` — the standalone runner (a copy of ``autoprune/bundle_runner.py``; needs
  only Python >= 3.8, numpy >= 1.17 and onnxruntime, checked when it starts).

On the device: ``python run_bundle.py --threads 1`` writes ``results_t1.json`` (resumable).
Back home: ``import_bundle(results_path)`` (or ``autoprune bundle import``) returns a
``LatencyTable`` with the device's fingerprint, in the same format ``profile`` writes, and
labelled by that device (its ``device_id`` directory, its ``notes``); a search on another
device refuses it.

Without ``alignment`` the bundle carries the kernel-rules sweep (the fixed layers of
``autoprune.latency._rules``, the same that ``detect_kernel_rules`` times locally) and width
grids for steps 4, 8 and 16 (NEON's 4 floats per vector, AVX2's 8, AVX-512's 16); the import
fits the device's ``KernelRules`` from the runner's timings with ``rules_from_sweep``, records
them on the table and warns when their alignment is outside those grids (then export again
with ``alignment=`` that step). With the rules sweep come the weight-streaming probe chains
(``autoprune.latency._memory``, entries of kind ``stream``, manifest ``weight_stream``): the
import records the device's curve with its rules, as ``detect_kernel_rules`` does locally.
``kernel_rules=False`` carries the older one-axis alignment
sweep instead (``fit_alignment``), which bundles written before the rules still use.
"""

from __future__ import annotations

import dataclasses
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
from autoprune.io import atomic_write_bytes, atomic_write_json, read_json
from autoprune.latency import (
    GROUP_SWEEP_WIDTHS,
    SWEEP_WIDTHS,
    KernelRules,
    rules_from_sweep,
)
from autoprune.latency._memory import PROBE_SIZES_MB, WeightStream, probe_chains
from autoprune.latency._profile import (
    ALIGNMENT_CANDIDATES,
    WidthsOption,
    enumerate_items,
    fit_alignment,
    representative_layer,
)
from autoprune.latency._rules import sweep_axes
from autoprune.latency._table import LatencyTable, entry_key
from autoprune.measure import ProtocolSettings
from autoprune.types import DeviceInfo, LatencySample, LayerSpec, ModelSpec, Structure

if TYPE_CHECKING:
    from torch import nn

BUNDLE_SCHEMA_VERSION = 1
#: width grids a bundle carries when the device's step is unknown: NEON (4 floats), AVX2 (8),
#: AVX-512 (16)
DEFAULT_BUNDLE_ALIGNMENTS: tuple[int, ...] = (4, 8, 16)


def _entry_id(spec: LayerSpec, structure: Structure, density: float) -> str:
    payload = json.dumps([spec.key(), structure.value, density])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _fill_periodic(model: torch.nn.Module, period: int = 97, distinct: bool = False) -> None:
    """Overwrite float parameters with a short periodic pattern (compressible, no denormals).
    ``distinct``: each parameter gets its own phase of the pattern, so that no two weight
    tensors are equal (ONNX export or the runtime would share equal ones, and a chain of
    layers with equal weights would read one tensor from cache instead of all of them)."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            phase = 1 + i if distinct else 0
            base = 0.05 * torch.sin((torch.arange(period, dtype=torch.float32) + phase) * 0.7) \
                + 0.01
            n = p.numel()
            reps = math.ceil(n / period)
            p.copy_(base.repeat(reps)[:n].reshape(p.shape).to(p.dtype))


def _onnx_format(data: bytes) -> tuple[int, int]:
    """(default-domain opset, IR version) of a serialized ONNX model."""
    import onnx

    m = onnx.load_model_from_string(data)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return int(opset), int(m.ir_version)


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
    kernel_rules: bool = True,
    rules_widths: Sequence[int] | None = None,
    weight_stream_sizes: Sequence[float] | None = PROBE_SIZES_MB,
) -> Path:
    """Write a bundle for ``model`` into ``out_dir``; returns the manifest path.

    ``alignment``: the target's channel step if known; None → include a sweep and grids for
    4, 8 and 16. ``kernel_rules`` (with ``alignment=None``): the sweep is the kernel-rules
    sweep (``rules_widths``, default ``SWEEP_WIDTHS`` = 40..80, three axes), else the older
    one-axis alignment sweep over widths 1..``sweep_max_width``. With the kernel-rules sweep
    the bundle also carries the weight-streaming probe chains (``autoprune.latency._memory``;
    ``weight_stream_sizes``: their total weights in MB, default 0.5–128; empty or None: no
    probe), and the import records the device's curve with its rules. Only dense entries (ONNX
    Runtime CPU has no sparse kernels).
    """
    from tqdm.auto import tqdm

    from autoprune.backends.micro import build_micro_model
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
    if alignment is not None and (not isinstance(alignment, int) or alignment < 1):
        raise InvalidInputError(f"alignment={alignment!r}; use a channel step >= 1 or None")
    rws = sorted({int(w) for w in (rules_widths if rules_widths is not None else SWEEP_WIDTHS)})
    if alignment is None and kernel_rules and (len(rws) < 12 or rws[0] < 1):
        raise InvalidInputError(
            f"rules_widths={list(rules_widths or [])!r}: the kernel-rules fit needs at least 12 "
            "distinct widths >= 1 (default: 40..80)")
    aligns = (int(alignment),) if alignment is not None else DEFAULT_BUNDLE_ALIGNMENTS
    items: dict[tuple[Any, ...], str] = {}
    for a in aligns:
        for it in enumerate_items(spec, None, a, widths, [Structure.NONE]):
            items.setdefault(it, "grid")
    sweep_layer = None
    rules_ids: dict[str, list[str]] | None = None
    if alignment is None and kernel_rules:
        rules_ids = {}
        for axis, specs in sweep_axes(rws, GROUP_SWEEP_WIDTHS).items():
            rules_ids[axis] = []
            for s in specs:
                k = entry_key(s, Structure.NONE, 1.0)
                if k not in items:
                    items[k] = "rules"
                elif "rules" not in items[k]:
                    items[k] += "+rules"
                rules_ids[axis].append(_entry_id(*k))
    elif alignment is None:
        sweep_layer = representative_layer(spec)
        for w in range(1, sweep_max_width + 1):
            s = (sweep_layer.with_channels(w, w) if sweep_layer.op.is_depthwise
                 else sweep_layer.with_channels(sweep_layer.in_channels, w))
            k = entry_key(s, Structure.NONE, 1.0)
            items[k] = "sweep" if k not in items else items[k] + "+sweep"
    entries = []
    formats: set[tuple[int, int]] = set()
    (out / "models").mkdir(parents=True, exist_ok=True)
    stream: dict[str, list[Any]] | None = None
    if rules_ids is not None and weight_stream_sizes:
        stream = {"sizes_mb": [], "ids": []}
        chains, chain_x, sizes = probe_chains(weight_stream_sizes)
        for chain, mb in zip(chains, sizes):
            eid = f"stream_{mb:.4f}mb"
            rel = f"models/{eid}.onnx.gz"
            if not (out / rel).exists():
                _fill_periodic(chain, distinct=True)
                data = to_onnx(chain, (chain_x,))
                assert isinstance(data, bytes)
                atomic_write_bytes(out / rel, gzip.compress(data, compresslevel=6, mtime=0))
            entries.append({"id": eid, "file": rel, "kind": "stream"})
            stream["sizes_mb"].append(mb)
            stream["ids"].append(eid)
    for (s, st, d), kind in tqdm(items.items(), desc="bundle export", unit="model",
                                 disable=not progress):
        eid = _entry_id(s, st, d)
        rel = f"models/{eid}.onnx.gz"
        path = out / rel
        if not path.exists():
            micro, inputs = build_micro_model(s, st, d)
            _fill_periodic(micro)
            data = to_onnx(micro, inputs)
            assert isinstance(data, bytes)  # no path given: to_onnx returns the bytes
            atomic_write_bytes(path, gzip.compress(data, compresslevel=6, mtime=0))
            formats.add(_onnx_format(data))
        elif not formats:
            formats.add(_onnx_format(gzip.decompress(path.read_bytes())))
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
        "onnx_format": {"opset": max(f[0] for f in formats),
                        "ir_version": max(f[1] for f in formats)} if formats else None,
        "alignment": alignment,
        "grid_alignments": list(aligns),
        "widths": widths if isinstance(widths, str) else list(widths),
        "sweep_layer": sweep_layer.to_dict() if sweep_layer is not None else None,
        "rules_sweep": ({"widths": rws, "group_widths": list(GROUP_SWEEP_WIDTHS), "ids": rules_ids}
                        if rules_ids is not None else None),
        "weight_stream": stream,
        "entries": entries,
    }
    runner = Path(__file__).with_name("bundle_runner.py")
    shutil.copyfile(runner, out / "run_bundle.py")
    return atomic_write_json(out / "manifest.json", manifest)


def device_label(device: DeviceInfo) -> str:
    """'<device name> [<arch>], <runtime>, <threads> thread(s)': how a table names its device."""
    return (f"{device.device_name} [{device.arch}], {device.runtime}, "
            f"{device.threads} thread{'s' if device.threads != 1 else ''}")


def import_bundle(results_path: str | Path, manifest_path: str | Path | None = None
                  ) -> LatencyTable:
    """A ``LatencyTable`` from a runner's results file (the manifest next to it by default).

    The table carries the device's fingerprint as the runner recorded it (``table.device``;
    its ``device_id`` names the table's directory) and says so in ``table.notes``, with the
    runner's environment (Python, numpy, onnxruntime, providers) and what the fingerprint
    could not trust (an emulator), which is also warned about. With a kernel-rules sweep in the
    bundle the device's ``KernelRules`` are fitted (``rules_from_sweep``) and recorded.
    """
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
        env = dict(results.get("environment") or {})
        fp_notes = [str(n) for n in results.get("fingerprint_notes") or []]
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{rpath}: malformed results ({type(e).__name__}: {e})") from None
    label = device_label(device)
    env_txt = ", ".join(f"{k} {v}" for k, v in sorted(env.items()))
    notes = (f"imported from bundle {manifest['bundle_id']} ({manifest.get('model_name', '')}); "
             f"measured on {label}" + (f"; runner environment: {env_txt}" if env_txt else "")
             + "".join(f"; NOT TRUSTED: {n}" for n in fp_notes))
    table = LatencyTable(device, protocol=results.get("protocol", manifest["protocol"]),
                         structures=[Structure.NONE], notes=notes)
    for n in fp_notes:
        warnings.warn(f"{rpath}: the device fingerprint of {label} is not trustworthy: {n}",
                      stacklevel=2)
    sweep_w: list[int] = []
    sweep_ms: list[float] = []
    rules_ms: dict[str, float] = {}
    stream_ms: dict[str, float] = {}
    for eid, r in measured.items():
        entry = by_id.get(eid)
        if entry is None:
            raise CorruptFileError(f"{rpath}: entry {eid!r} is not in the bundle manifest {mpath}")
        if entry.get("kind") == "stream":  # a weight-streaming probe chain, not a layer
            try:
                stream_ms[eid] = float(r["median_ms"])
            except (KeyError, TypeError, ValueError) as err:
                raise CorruptFileError(f"{rpath}: entry {eid!r}: {err}") from None
            continue
        try:
            spec = LayerSpec.from_dict(entry["spec"])
            sample = LatencySample(float(r["median_ms"]), float(r["iqr_ms"]), int(r["n_runs"]),
                                   float(r.get("min_ms", float("nan"))))
        except (KeyError, TypeError, ValueError) as err:
            raise CorruptFileError(f"{rpath}: entry {eid!r}: {err}") from None
        kinds = str(entry["kind"]).split("+")
        if "sweep" in kinds:
            sweep_w.append(spec.out_channels)
            sweep_ms.append(sample.median_ms)
        if "rules" in kinds:
            rules_ms[eid] = sample.median_ms
        if "grid" in kinds:
            table.add(spec, Structure(entry["structure"]), float(entry["density"]), sample,
                      r.get("measured_at"))
    missing = [e["id"] for e in manifest["entries"] if e["id"] not in measured]
    if missing:
        warnings.warn(
            f"{rpath}: {len(missing)} of {len(manifest['entries'])} bundle entries have no "
            "result yet (the runner was interrupted?); rerun it to complete them",
            stacklevel=2,
        )
    covered: Sequence[int] = manifest.get("grid_alignments", [])
    step: int | None = None
    if manifest.get("alignment") is not None:
        table.alignment = int(manifest["alignment"])
    elif manifest.get("rules_sweep"):
        rules = _fit_rules(manifest["rules_sweep"], rules_ms, rpath)
        if rules is not None:
            curve = _fit_stream(manifest.get("weight_stream"), stream_ms, rpath)
            if curve is not None:
                rules = dataclasses.replace(rules, weight_stream=curve)
            table.kernel_rules = rules
            table.alignment = step = rules.alignment
    elif sweep_w:
        order = sorted(range(len(sweep_w)), key=lambda i: sweep_w[i])
        ws = [sweep_w[i] for i in order]
        ms = [sweep_ms[i] for i in order]
        step, rss = fit_alignment(ws, ms, ALIGNMENT_CANDIDATES)
        table.alignment = step
        table.alignment_sweep = {"layer": manifest.get("sweep_layer"), "widths": ws,
                                 "median_ms": ms, "rss": {str(k): v for k, v in rss.items()},
                                 "alignment": step}
    if step is not None and step > 1 and step not in covered:  # step 1: no rule, any grid
        warnings.warn(
            f"the device's detected channel step is {step}, but the bundle's width grid "
            f"covers steps {list(covered)}; export the bundle again with alignment={step}",
            stacklevel=2,
        )
    return table


def _fit_rules(sweep: dict[str, Any], measured_ms: dict[str, float], rpath: Path
               ) -> KernelRules | None:
    """``KernelRules`` from the runner's timings of the kernel-rules sweep (None, with a
    warning, while the sweep is incomplete)."""
    try:
        widths = [int(w) for w in sweep["widths"]]
        ids = {axis: list(sweep["ids"][axis]) for axis in ("in", "out", "dw")}
        # manifests written before the grouped-conv sweep have none (the input rule per group)
        group_widths = [int(w) for w in sweep.get("group_widths") or []]
        if group_widths:
            ids["group"] = list(sweep["ids"]["group"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{rpath}: malformed rules_sweep in the manifest ({e})") from None
    if any(len(v) != len(group_widths if a == "group" else widths) for a, v in ids.items()):
        raise CorruptFileError(f"{rpath}: rules_sweep ids do not match its {len(widths)} widths")
    lacking = sum(1 for v in ids.values() for i in v if i not in measured_ms)
    if lacking:
        warnings.warn(
            f"{rpath}: {lacking} kernel-rules sweep entries have no result; the table gets no "
            "kernel rules until the runner completes them", stacklevel=3)
        return None
    ms = {axis: [measured_ms[i] for i in v] for axis, v in ids.items()}
    return rules_from_sweep(widths, ms["in"], ms["out"], ms["dw"], group_widths=group_widths,
                            group_ms=ms.get("group", []))


def _fit_stream(stream: Any, measured_ms: dict[str, float], rpath: Path) -> WeightStream | None:
    """The device's ``WeightStream`` from the runner's timings of the probe chains (None when
    the bundle has none or they are not all measured yet: the missing-entries warning says so)."""
    if not stream:
        return None
    try:
        ids = [str(i) for i in stream["ids"]]
        sizes = [float(w) for w in stream["sizes_mb"]]
        if len(ids) != len(sizes):
            raise ValueError(f"{len(ids)} ids for {len(sizes)} sizes")
        if any(i not in measured_ms for i in ids):
            return None
        return WeightStream(tuple(sizes), tuple(measured_ms[i] for i in ids))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{rpath}: malformed weight_stream in the manifest ({e})") from None
