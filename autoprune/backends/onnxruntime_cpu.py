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
from typing import Any, Literal

from torch import nn

from autoprune import bundle_runner as _core
from autoprune.backends.base import Backend
from autoprune.errors import BackendUnavailable, InvalidInputError
from autoprune.measure import ProtocolSettings, TimedCall
from autoprune.types import DeviceInfo

GraphOptimizationLevel = Literal["disable", "basic", "extended", "layout", "all"]


class OnnxRuntimeCPUBackend(Backend):
    """ONNX Runtime CPU backend.

    Options: ``threads`` (intra-op threads, default 1), ``graph_optimization_level``
    ("disable" | "basic" | "extended" | "layout" | "all"), ``providers`` (None → CPU provider).
    """

    name = "onnxruntime-cpu"
    requirement = "pip install onnxruntime"

    def __init__(
        self,
        threads: int = 1,
        graph_optimization_level: GraphOptimizationLevel = "all",
        providers: Sequence[str] | None = None,
        protocol: ProtocolSettings | None = None,
    ) -> None:
        super().__init__(protocol)
        self.threads = threads
        self.graph_optimization_level = graph_optimization_level
        self.providers = list(providers) if providers else ["CPUExecutionProvider"]
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InvalidInputError(f"threads={self.threads!r}; use an integer >= 1")
        levels = ("disable", "basic", "extended", "layout", "all")
        if self.graph_optimization_level not in levels:
            raise InvalidInputError(
                f"graph_optimization_level={self.graph_optimization_level!r}; use one of {levels}"
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
                "providers": ",".join(self.providers),
            }.items())),
        )

    def session(self, onnx_model: bytes | str) -> Any:
        """An ``InferenceSession`` configured like every timed one (threads, level, providers)."""
        return _core.make_session(
            onnx_model, self.threads, self.graph_optimization_level, self.providers
        )

    def _timer_for_model(self, model: nn.Module, example_inputs: Any) -> TimedCall:
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
        probe = _core.session_timer(sess, feeds)
        def run_once() -> None:
            probe()

        n = _core.calibrate_calls(run_once, self.protocol.min_sample_ms)
        return _core.session_timer(sess, feeds, calls_per_sample=n)

    def options_repr(self) -> str:
        return (
            f"threads={self.threads}, graph_optimization_level={self.graph_optimization_level!r},"
            f" providers={self.providers}"
        )
