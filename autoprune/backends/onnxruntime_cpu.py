"""``onnxruntime-cpu``: ONNX Runtime on the CPU (x86 and aarch64 alike).

Models are exported with ``autoprune.onnx_export.to_onnx`` and run in an
``InferenceSession`` with a fixed number of intra-op threads, one inter-op thread, sequential
execution and the chosen graph optimisation level; inputs are bound once through IOBinding so
a timed call is the session run alone. The default provider is ``CPUExecutionProvider``;
pass ``providers=["XnnpackExecutionProvider", "CPUExecutionProvider"]`` where the build has
XNNPACK (ARM). No ONNX Runtime CPU provider speeds up sparse weights, so only dense (``none``)
is accelerated; masked weights run at dense cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from torch import nn

from autoprune import bundle_runner as _core
from autoprune.backends.base import Backend, LayerItem, check_layer_items
from autoprune.errors import BackendUnavailable, InvalidInputError
from autoprune.measure import ProtocolSettings, TimedCall, measure_interleaved
from autoprune.types import DeviceInfo, LatencySample

GraphOptimizationLevel = Literal["disable", "basic", "extended", "layout", "all"]
LayerTiming = Literal["in-context", "isolated"]
LAYER_TIMINGS: tuple[str, ...] = ("in-context", "isolated")


class OnnxRuntimeCPUBackend(Backend):
    """ONNX Runtime CPU backend.

    Options: ``threads`` (intra-op threads, default 1), ``graph_optimization_level``
    ("disable" | "basic" | "extended" | "layout" | "all"), ``providers`` (None → CPU provider),
    ``layer_timing``: how ``measure_layers`` times a layer's micro-model — ``"in-context"``
    (default: its run less the share of it spent in the layout reorders ONNX Runtime wraps
    around a blocked-layout layer, which a whole model pays only where a blocked run of layers
    starts or ends; the share is read from a profiled session of the micro-model) or
    ``"isolated"`` (the micro-model's run as it is). Whole models are always timed as they are.
    """

    name = "onnxruntime-cpu"
    requirement = "pip install onnxruntime"

    def __init__(
        self,
        threads: int = 1,
        graph_optimization_level: GraphOptimizationLevel = "all",
        providers: Sequence[str] | None = None,
        protocol: ProtocolSettings | None = None,
        layer_timing: LayerTiming = "in-context",
    ) -> None:
        super().__init__(protocol)
        self.threads = threads
        self.graph_optimization_level = graph_optimization_level
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self.layer_timing = layer_timing
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InvalidInputError(f"threads={self.threads!r}; use an integer >= 1")
        levels = ("disable", "basic", "extended", "layout", "all")
        if self.graph_optimization_level not in levels:
            raise InvalidInputError(
                f"graph_optimization_level={self.graph_optimization_level!r}; use one of {levels}"
            )
        if self.layer_timing not in LAYER_TIMINGS:
            raise InvalidInputError(
                f"layer_timing={self.layer_timing!r}; use one of {LAYER_TIMINGS}"
            )
        self._require()
        import onnxruntime as ort

        have = ort.get_available_providers()
        missing = [p for p in self.providers if p not in have]
        if missing:
            raise BackendUnavailable(
                f"execution provider(s) {missing} not in this onnxruntime build (has {have}); "
                "XNNPACK needs an onnxruntime build with it (e.g. the official aarch64 wheels)"
            )

    @classmethod
    def is_available(cls) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def _make_device_info(self) -> DeviceInfo:
        import onnxruntime as ort

        fp = _core.cpu_fingerprint()
        return DeviceInfo(
            backend=self.name,
            device_name=fp["device_name"],
            arch=fp["arch"],
            runtime=f"onnxruntime {ort.__version__}",
            threads=self.threads,
            precision="float32",
            isa_flags=tuple(fp["isa_flags"]),
            extra=tuple(sorted({
                "graph_optimization_level": self.graph_optimization_level,
                "layer_timing": self.layer_timing,
                "providers": ",".join(self.providers),
            }.items())),
        )

    def session(self, onnx_model: bytes | str) -> Any:
        """An ``InferenceSession`` configured like every timed one (threads, level, providers)."""
        return _core.make_session(
            onnx_model, self.threads, self.graph_optimization_level, self.providers
        )

    def _timer_for_model(self, model: nn.Module, example_inputs: Any) -> TimedCall:
        return self._prepare(model, example_inputs)[0]

    def _prepare(self, model: nn.Module, example_inputs: Any, reorders: bool = False
                 ) -> tuple[TimedCall, float]:
        """The timed call of ``model``, and (``reorders``) the share of a run it spends in
        layout reorders (``bundle_runner.layout_reorder_share``; 0.0 when not asked)."""
        from autoprune.onnx_export import as_input_tuple, to_onnx

        args = as_input_tuple(example_inputs)
        data = to_onnx(model, args)
        sess = self.session(data)  # type: ignore[arg-type]
        names = [i.name for i in sess.get_inputs()]
        if len(names) != len(args):
            raise InvalidInputError(
                f"exported model takes {len(names)} inputs but {len(args)} example inputs given"
            )
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        reorder_share = _core.layout_reorder_share(
            data, self.threads, self.graph_optimization_level, self.providers, feeds
        ) if reorders else 0.0
        probe = _core.session_timer(sess, feeds)

        def run_once() -> None:
            probe()

        n = _core.calibrate_calls(run_once, self.protocol.min_sample_ms)
        return _core.session_timer(sess, feeds, calls_per_sample=n), reorder_share

    def measure_layers(self, items: Sequence[LayerItem]) -> list[LatencySample]:
        """Time several table entries, interleaved round-robin; with ``layer_timing=
        "in-context"`` each less the layout reorders' share of its micro-model's run (median
        and min; the relative spread is the run's own)."""
        from autoprune.backends.micro import build_micro_model

        self._require()
        in_context = self.layer_timing == "in-context"
        prepared = [self._prepare(*build_micro_model(s, st, d), reorders=in_context)
                    for s, st, d in check_layer_items(items)]
        samples = measure_interleaved([t for t, _ in prepared], self.protocol)
        return [replace(s, median_ms=_core.in_context_ms(s.median_ms, r),
                        min_ms=_core.in_context_ms(s.min_ms, r),
                        iqr_ms=_core.in_context_ms(s.iqr_ms, r)) if r > 0 else s
                for s, (_, r) in zip(samples, prepared)]

    def options_repr(self) -> str:
        return (
            f"threads={self.threads}, graph_optimization_level={self.graph_optimization_level!r},"
            f" providers={self.providers}, layer_timing={self.layer_timing!r}"
        )
