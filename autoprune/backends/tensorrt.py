"""``tensorrt``: NVIDIA TensorRT 10 engines built from ONNX.

Written against the TensorRT 10 Python API (``tensorrt.Builder``, ``OnnxParser``,
``IBuilderConfig`` with ``BuilderFlag.FP16`` / ``INT8`` / ``SPARSE_WEIGHTS``,
``IExecutionContext.execute_async_v3``, ``IProfiler``, ``IEngineInspector``).

* Whole-model and micro-model timings are un-profiled: CUDA events around
  ``execute_async_v3`` on the current torch stream (buffers are torch CUDA tensors).
* ``profile_layers(model, example_inputs)`` runs a *separate*, profiled execution (an
  ``IProfiler``; it slows execution, so use it for shares and names, not for table numbers) and
  maps the fused TensorRT layer names ("/layer1/layer1.0/conv1/Conv + /layer1/layer1.0/relu/Relu",
  "conv1 + bn1 + relu") back to module paths; reformatting layers are folded into the layer
  they feed.
* ``sparse_weights=True`` sets ``SPARSE_WEIGHTS``: the builder may pick sparse kernels for
  weights already in 2:4; the verbose build log says which layers were "eligible for sparse
  math" and which "picked sparse implementation" (``parse_sparsity_log``); the last build's
  report is kept in ``last_sparsity``.
* ``int8=True`` without a calibrator sets a fixed dynamic range on every tensor: the timings
  are those of INT8 kernels, the outputs are meaningless (latency tables only need timings).

Everything that needs no GPU (log parsing, name mapping, time attribution) is plain Python and
unit-tested; building and timing engines needs ``pip install tensorrt`` and an NVIDIA GPU.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from autoprune.backends.base import Backend, as_structure
from autoprune.errors import AutoPruneError, InvalidInputError
from autoprune.measure import ProtocolSettings, TimedCall
from autoprune.types import DeviceInfo, LayerSpec, Structure

_ELIGIBLE = "Layers eligible for sparse math:"
_PICKED = "picked sparse implementation for layers:"


class EngineBuildError(AutoPruneError):
    """TensorRT could not parse the ONNX model or build an engine; carries the parser errors."""


# --------------------------------------------------------------------------------------------
# Pure-Python helpers (no TensorRT needed)
# --------------------------------------------------------------------------------------------
def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside (), [] and {} brackets; parts stripped, empties dropped."""
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p]


@dataclass
class SparsityReport:
    """Which TensorRT layers could use sparse kernels and which did, from a build log."""

    eligible: list[str] = field(default_factory=list)
    picked: list[str] = field(default_factory=list)

    def eligible_modules(self) -> list[str]:
        return _modules_of(self.eligible)

    def picked_modules(self) -> list[str]:
        return _modules_of(self.picked)


def parse_sparsity_log(lines: Iterable[str]) -> SparsityReport:
    """Parse TensorRT's "(Sparsity) Layers eligible for sparse math: ..." and
    "(Sparsity) TRT inference plan picked sparse implementation for layers: ..." messages.

    Layer names are comma separated and may contain " + " (fused layers) and brackets.
    The last occurrence of each message wins (one build per log).
    """
    report = SparsityReport()
    for line in lines:
        for marker, attr in ((_ELIGIBLE, "eligible"), (_PICKED, "picked")):
            pos = line.find(marker)
            if pos >= 0:
                rest = line[pos + len(marker):].strip()
                setattr(report, attr, split_top_level(rest, ","))
    return report


def split_fused_name(layer_name: str) -> list[str]:
    """ONNX node names inside one TensorRT layer name.

    "A + B + C" → [A, B, C]; "PWN(A, B)" → [A, B]; "{ForeignNode[A...B]}" → [A, B];
    "Reformatting CopyNode for Input Tensor 0 to X" → names of X.
    """
    name = layer_name.strip()
    m = re.match(r"Reformatting CopyNode for (?:Input|Output) Tensor \d+ to (.+)$", name)
    if m:
        return split_fused_name(m.group(1))
    out: list[str] = []
    for part in split_top_level(name, "+"):
        part = part.strip()
        m = re.fullmatch(r"\{ForeignNode\[(.*)\]\}", part)
        if m:
            out.extend(p.strip() for p in m.group(1).split("...") if p.strip())
            continue
        m = re.fullmatch(r"PWN\((.*)\)", part)
        if m:
            for sub in split_top_level(m.group(1), ","):
                out.extend(split_fused_name(sub))
            continue
        out.append(part)
    return out


def onnx_node_to_module(node_name: str) -> str | None:
    """Module path of a node named by torch's exporter: "/layer1/layer1.0/conv1/Conv" →
    "layer1.0.conv1"; "/conv1/Conv" → "conv1". Names without scopes ("Conv_12") → None."""
    if not node_name.startswith("/"):
        return None
    scopes = [s for s in node_name.split("/") if s][:-1]  # drop the op type ("Conv", "Relu_1")
    # a child of a container is scoped "<parent scope>.<index>" ("layer1" → "layer1.0",
    # "conv" → "conv.0" → "conv.0.0"): it replaces its parent's component instead of nesting
    parts: list[str] = []
    for s in scopes:
        if parts and s.startswith(parts[-1] + "."):
            parts[-1] = s
        else:
            parts.append(s)
    path = ".".join(parts)
    return path or None


def _modules_of(layer_names: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for name in layer_names:
        for mod in trt_layer_modules(name):
            seen.setdefault(mod, None)
    return list(seen)


def trt_layer_modules(layer_name: str) -> list[str]:
    """Module paths fused into one TensorRT layer, in order; an unscoped ONNX name (from an
    exporter without scopes, e.g. "conv1 + bn1 + relu") is returned as it is."""
    mods: dict[str, None] = {}
    for node in split_fused_name(layer_name):
        mod = onnx_node_to_module(node)
        mods.setdefault(mod if mod is not None else node, None)
    return list(mods)


def is_reformat_layer(layer_name: str) -> bool:
    return layer_name.startswith("Reformatting CopyNode") or " reformatter" in layer_name.lower()


def attribute_layer_times(layer_times: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Fold per-TensorRT-layer times (ms, in execution order) into per-module times.

    A fused layer's time goes to its first module (the producer, e.g. the conv of
    conv+bn+relu); a reformatting layer's time goes to the next real layer (to the previous
    one if it is last).
    """
    out: dict[str, float] = {}
    pending = 0.0
    last_key: str | None = None
    for name, ms in layer_times:
        if is_reformat_layer(name):
            pending += ms
            continue
        mods = trt_layer_modules(name)
        key = mods[0] if mods else name
        out[key] = out.get(key, 0.0) + ms + pending
        pending = 0.0
        last_key = key
    if pending and last_key is not None:
        out[last_key] += pending
    return out


def engine_layer_names(inspector_json: str) -> list[str]:
    """Layer names from ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``
    (strings with ``LAYER_NAMES_ONLY``, dicts with ``Name`` under ``DETAILED`` verbosity)."""
    info = json.loads(inspector_json)
    names = []
    for layer in info.get("Layers", []):
        names.append(layer if isinstance(layer, str) else str(layer.get("Name", "")))
    return names


# --------------------------------------------------------------------------------------------
# Backend (needs TensorRT + GPU)
# --------------------------------------------------------------------------------------------
class TensorRTBackend(Backend):
    """TensorRT engines. Options: ``fp16`` (default True), ``int8``, ``sparse_weights``,
    ``workspace_mb``, ``device_index``."""

    name = "tensorrt"
    requirement = "pip install tensorrt (TensorRT 10, needs an NVIDIA GPU and driver)"

    def __init__(
        self,
        fp16: bool = True,
        int8: bool = False,
        sparse_weights: bool = False,
        workspace_mb: int = 1024,
        device_index: int = 0,
        protocol: ProtocolSettings | None = None,
    ) -> None:
        super().__init__(protocol)
        self.fp16 = fp16
        self.int8 = int8
        self.sparse_weights = sparse_weights
        self.workspace_mb = workspace_mb
        self.device_index = device_index
        self.last_sparsity: SparsityReport | None = None
        self.last_build_log: list[str] = []
        if workspace_mb < 1:
            raise InvalidInputError(f"workspace_mb={workspace_mb}; use >= 1")
        self._require()

    @classmethod
    def is_available(cls) -> bool:
        try:
            import tensorrt  # noqa: F401
            import torch
        except ImportError:
            return False
        return bool(torch.cuda.is_available())

    @classmethod
    def unavailable_reason(cls) -> str:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return f"backend 'tensorrt' needs TensorRT: {cls.requirement}"
        return "backend 'tensorrt' found no usable NVIDIA GPU (torch.cuda.is_available() is False)"

    def _make_device_info(self) -> DeviceInfo:
        import tensorrt as trt
        import torch

        from autoprune.backends.torch_cuda import gpu_fingerprint

        props = torch.cuda.get_device_properties(self.device_index)
        gpu = gpu_fingerprint(self.device_index)
        precision = "int8" if self.int8 else "float16" if self.fp16 else "float32"
        return DeviceInfo(
            backend=self.name,
            device_name=gpu["name"] or props.name,
            arch=f"sm_{props.major}{props.minor}",
            runtime=f"tensorrt {trt.__version__}",
            threads=1,
            precision=precision,
            driver=gpu["driver"],
            clocks=gpu["clocks"],
            extra=(("sparse_weights", str(bool(self.sparse_weights))),),
        )

    def accelerates(self, structure: Structure | str, spec: LayerSpec | None = None) -> bool:
        s = as_structure(structure)
        if s == Structure.NM:
            import torch

            major = torch.cuda.get_device_capability(self.device_index)[0]
            return (self.sparse_weights and major >= 8
                    and (spec is None or spec.op.value in ("conv1d", "conv2d", "linear")))
        return s in (Structure.NONE, Structure.CHANNEL)

    # --- engine --------------------------------------------------------------------------
    def build_engine(self, onnx_bytes: bytes) -> Any:
        """Parse ONNX, build and deserialize an engine; records the sparsity report."""
        import tensorrt as trt

        logger = _make_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_bytes):
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError("TensorRT could not parse the ONNX model: " + "; ".join(errs))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if self.int8:
            config.set_flag(trt.BuilderFlag.INT8)
            _set_fixed_dynamic_ranges(network)
        if self.sparse_weights:
            config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
        serialized = builder.build_serialized_network(network, config)
        self.last_build_log = [msg for _, msg in logger.records]
        self.last_sparsity = parse_sparsity_log(self.last_build_log)
        if serialized is None:
            tail = "; ".join(self.last_build_log[-5:])
            raise EngineBuildError(f"TensorRT engine build failed: {tail}")
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(serialized)
        engine._autoprune_keepalive = (runtime, logger)  # keep the runtime alive with it
        return engine

    def _prepare(self, model: nn.Module, example_inputs: Any) -> tuple[Any, Any, Any, list[Any]]:
        import tensorrt as trt
        import torch

        from autoprune.onnx_export import as_input_tuple, to_onnx

        args = as_input_tuple(example_inputs)
        engine = self.build_engine(to_onnx(model, args))  # type: ignore[arg-type]
        ctx = engine.create_execution_context()
        dev = torch.device("cuda", self.device_index)
        buffers: list[torch.Tensor] = []
        k = 0
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = _torch_dtype(trt, engine.get_tensor_dtype(name))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = args[k].to(dev, dtype).contiguous()
                k += 1
                ctx.set_input_shape(name, tuple(t.shape))
            else:
                shape = tuple(ctx.get_tensor_shape(name))
                t = torch.empty(shape, dtype=dtype, device=dev)
            ctx.set_tensor_address(name, t.data_ptr())
            buffers.append(t)
        stream = torch.cuda.current_stream(dev)
        return engine, ctx, stream, buffers

    def _timer_for_model(self, model: nn.Module, example_inputs: Any) -> TimedCall:
        import torch

        engine, ctx, stream, buffers = self._prepare(model, example_inputs)

        def run() -> None:
            ctx.execute_async_v3(stream.cuda_stream)

        for _ in range(3):
            run()
        stream.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)

        def timed() -> float:
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            return float(start.elapsed_time(end))

        timed.keepalive = (engine, ctx, buffers)  # type: ignore[attr-defined]
        return timed

    def profile_layers(self, model: nn.Module, example_inputs: Any, runs: int = 20
                       ) -> dict[str, float]:
        """Median per-module time (ms) from a profiled run (IProfiler; distorts absolute
        numbers — use for shares and names)."""
        import statistics

        import tensorrt as trt

        engine, ctx, stream, buffers = self._prepare(model, example_inputs)
        records: list[list[tuple[str, float]]] = []

        class _Profiler(trt.IProfiler):  # type: ignore[misc]
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)
                self.current: list[tuple[str, float]] = []

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                self.current.append((layer_name, float(ms)))

        prof = _Profiler()
        ctx.profiler = prof
        ctx.enqueue_emits_profile = False
        for _ in range(runs):
            prof.current = []
            ctx.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            ctx.report_to_profiler()
            records.append(prof.current)
        per_run = [attribute_layer_times(r) for r in records]
        keys = list(per_run[0]) if per_run else []
        return {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in keys}

    def options_repr(self) -> str:
        return f"fp16={self.fp16}, int8={self.int8}, sparse_weights={self.sparse_weights}"


def _make_logger(trt: Any) -> Any:
    class _Capture(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.records: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.records.append((severity, msg))

    return _Capture()


def _set_fixed_dynamic_ranges(network: Any, amax: float = 4.0) -> None:
    """INT8 without calibration, for timing only: the same range on every tensor."""
    for i in range(network.num_inputs):
        network.get_input(i).set_dynamic_range(-amax, amax)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            layer.get_output(j).set_dynamic_range(-amax, amax)


def _torch_dtype(trt: Any, dt: Any) -> Any:
    import torch

    table = {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.int8: torch.int8,
        trt.int32: torch.int32, trt.bool: torch.bool,
    }
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if hasattr(trt, "int64"):
        table[trt.int64] = torch.int64
    return table[dt]
