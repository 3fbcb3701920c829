"""Prove the result on the device (``verify``) and write deployable artefacts (``export_*``).

``verify`` times the final model on a backend and, when a reference model is given (the dense
model), times the two alternately and keeps the median of the per-pair ratios, which is far
steadier on a shared machine than two absolute medians (DESIGN.md §5). The budget check uses
that paired estimate (``ratio x reference median``) when a reference is given, otherwise the
model's own median; both numbers and their spreads are in the report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autoprune.budget import Budget
from autoprune.errors import BackendUnavailable, InvalidInputError
from autoprune.io import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from autoprune.types import LatencySample

__all__ = ["VerifyReport", "export_onnx", "export_tensorrt", "onnx_nm_report", "verify"]


@dataclass
class VerifyReport:
    """Measured latency of a model on one backend, against a budget, a prediction and a reference."""

    backend: str
    measured: LatencySample
    budget_ms: float | None = None
    predicted_ms: float | None = None
    reference: LatencySample | None = None
    #: median of per-pair (model / reference) time ratios and its IQR (None without reference)
    ratio: float | None = None
    ratio_iqr: float | None = None
    device: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: the latency model's prediction for the reference (dense) model, when known
    predicted_reference_ms: float | None = None
    #: the reference (dense) model as measured while the latency model was fitted, when known:
    #: the denominator of the predicted share of dense (else ``predicted_reference_ms``)
    fitted_reference_ms: float | None = None

    @property
    def paired_ms(self) -> float | None:
        """Latency estimated as ``ratio x reference median`` (steadier than ``measured``)."""
        if self.ratio is None or self.reference is None:
            return None
        return self.ratio * self.reference.median_ms

    @property
    def speedup(self) -> float | None:
        """Reference time / model time from the paired ratio (>1 means faster)."""
        return None if not self.ratio else 1.0 / self.ratio

    @property
    def latency_ms(self) -> float:
        """The number the budget is checked against: paired estimate if any, else the median."""
        p = self.paired_ms
        return p if p is not None else self.measured.median_ms

    @property
    def budget_met(self) -> bool | None:
        return None if self.budget_ms is None else bool(self.latency_ms <= self.budget_ms)

    @property
    def prediction_error(self) -> float | None:
        """(predicted - measured) / measured, against ``latency_ms`` (absolute: includes any
        drift of the machine's speed since the latency model was fitted)."""
        if self.predicted_ms is None:
            return None
        return (self.predicted_ms - self.latency_ms) / self.latency_ms

    @property
    def _reference_then_ms(self) -> float | None:
        """Dense as the latency model knew it: measured during its fit, else its prediction."""
        return self.fitted_reference_ms or self.predicted_reference_ms

    @property
    def predicted_ratio(self) -> float | None:
        """The prediction as a share of dense: predicted model / dense as measured during the
        latency model's fit (/ its prediction for dense when that is not known)."""
        ref = self._reference_then_ms
        if self.predicted_ms is None or not ref:
            return None
        return self.predicted_ms / ref

    @property
    def ratio_prediction_error(self) -> float | None:
        """(predicted ratio - measured paired ratio) / measured ratio: the prediction on the
        scale a drifting machine cannot move (both sides are shares of dense)."""
        if self.predicted_ratio is None or not self.ratio:
            return None
        return self.predicted_ratio / self.ratio - 1.0

    @property
    def predicted_now_ms(self) -> float | None:
        """The prediction at the device's speed now: predicted share of dense x the dense
        model measured in this run. A latency model predicts the device as it was when it was
        fitted; this is the same prediction re-anchored to the dense model measured now, so a
        machine that got faster or slower since moves both sides."""
        if self.predicted_ratio is None or self.reference is None:
            return None
        return self.predicted_ratio * self.reference.median_ms

    @property
    def device_drift(self) -> float | None:
        """Dense measured now / dense during the latency model's fit (else as it predicts
        dense), minus 1: how far the device's speed (or this run's timing of the dense model)
        moved since the fit; the part of ``prediction_error`` the share of dense cancels."""
        ref = self._reference_then_ms
        if self.reference is None or not ref:
            return None
        return self.reference.median_ms / ref - 1.0

    def to_dict(self) -> dict[str, Any]:
        def sample(s: LatencySample | None) -> dict[str, float] | None:
            if s is None:
                return None
            return {"median_ms": s.median_ms, "iqr_ms": s.iqr_ms, "n_runs": s.n_runs,
                    "min_ms": s.min_ms}

        return {
            "backend": self.backend,
            "measured": sample(self.measured),
            "reference": sample(self.reference),
            "ratio": self.ratio,
            "ratio_iqr": self.ratio_iqr,
            "paired_ms": self.paired_ms,
            "speedup": self.speedup,
            "latency_ms": self.latency_ms,
            "budget_ms": self.budget_ms,
            "budget_met": self.budget_met,
            "predicted_ms": self.predicted_ms,
            "prediction_error": self.prediction_error,
            "predicted_reference_ms": self.predicted_reference_ms,
            "fitted_reference_ms": self.fitted_reference_ms,
            "predicted_ratio": self.predicted_ratio,
            "ratio_prediction_error": self.ratio_prediction_error,
            "predicted_now_ms": self.predicted_now_ms,
            "device_drift": self.device_drift,
            "device": self.device,
        }

    def __str__(self) -> str:
        lines = [f"verify on {self.backend}:",
                 f"  measured      {self.measured}"]
        if self.reference is not None and self.ratio is not None:
            lines.append(f"  reference     {self.reference}")
            rel = (self.ratio_iqr or 0.0) / self.ratio if self.ratio else float("nan")
            lines.append(
                f"  paired ratio  {self.ratio:.3f} ± {100 * rel:.1f}% (IQR) -> "
                f"{self.paired_ms:.4g} ms, speed-up {self.speedup:.2f}x"
            )
        lines += self.prediction_lines("  ")
        if self.budget_ms is not None:
            verdict = "MET" if self.budget_met else "NOT MET"
            lines.append(f"  budget        {self.budget_ms:.4g} ms: {verdict} "
                         f"({self.latency_ms:.4g} ms)")
        return "\n".join(lines)


    def prediction_lines(self, indent: str = "", band: str = "", width: int = 13) -> list[str]:
        """The prediction against the measurement, for reports: at the device's speed now
        (re-anchored to dense measured in this run) when a reference was measured, as the
        share of dense, and as fitted (with the drift of the device's speed since)."""
        if self.predicted_ms is None:
            return []
        out = []
        now, err = self.predicted_now_ms, self.ratio_prediction_error
        if now is not None and err is not None:
            out.append(f"{indent}{'predicted':<{width}} {now:.4g} ms at the device's speed now "
                       f"({100 * err:+.1f}% vs measured {self.latency_ms:.4g} ms)")
            out.append(f"{indent}  as dense share {self.predicted_ratio:.3f} predicted vs "
                       f"{self.ratio:.3f} measured")
        drift = self.device_drift
        note = ""
        if drift is not None and self.reference is not None:
            then = (f"{self.fitted_reference_ms:.4g} ms during the fit"
                    if self.fitted_reference_ms else
                    f"{self.predicted_reference_ms:.4g} ms predicted")
            if self.fitted_reference_ms and self.predicted_reference_ms:
                then += f" ({self.predicted_reference_ms:.4g} predicted)"
            note = (f"; dense measured {self.reference.median_ms:.4g} ms now vs {then}, "
                    f"{100 * drift:+.1f}%")
        label = "  as fitted" if now is not None else "predicted"
        out.append(f"{indent}{label:<{width}} {self.predicted_ms:.4g} ms{band} "
                   f"({100 * (self.prediction_error or 0):+.1f}% vs measured now{note})")
        return out


def _backend_of(backend: Any) -> Any:
    if isinstance(backend, str):
        from autoprune.backends import get_backend

        return get_backend(backend)
    return backend


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise InvalidInputError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def _ratio_of(result: Any) -> tuple[float, float]:
    """Accept (median, iqr) tuples or objects with median/iqr attributes."""
    if isinstance(result, tuple) and len(result) >= 2:
        return float(result[0]), float(result[1])
    for a, b in (("ratio", "ratio_iqr"), ("median", "iqr"), ("median_ratio", "iqr")):
        if hasattr(result, a) and hasattr(result, b):
            return float(getattr(result, a)), float(getattr(result, b))
    raise TypeError(f"cannot read a ratio from {result!r}")


def verify(
    model: nn.Module,
    example_inputs: Any,
    backend: Any = "onnxruntime-cpu",
    budget_ms: float | None = None,
    reference: nn.Module | None = None,
    predicted_ms: float | None = None,
    budget_fraction: float | None = None,
    predicted_reference_ms: float | None = None,
    fitted_reference_ms: float | None = None,
) -> VerifyReport:
    """Measure ``model`` on ``backend`` (a name or a Backend object) and report against a budget.

    With ``reference`` (usually the dense model) both are timed alternately and the paired
    ratio is reported; ``predicted_ms`` (e.g. ``predictor.predict(plan)``) is compared to the
    measurement; ``predicted_reference_ms`` (the prediction for ``reference``) also compares
    them as shares of dense (``ratio_prediction_error``); ``fitted_reference_ms`` (the reference
    as measured when the latency model was fitted, ``autoprune.latency.fitted_dense_ms``) is
    the better denominator of that share when known. ``budget_fraction`` (instead of ``budget_ms``, needs ``reference``) sets the
    budget to that share of the reference's latency measured now, so the verdict is
    ``paired ratio <= budget_fraction`` and immune to the machine's speed drifting.
    """
    if budget_ms is not None or budget_fraction is not None:
        Budget.of(budget_ms, budget_fraction)  # the one validation (a fraction is in (0, 1])
    if budget_fraction is not None and reference is None:
        raise InvalidInputError("budget_fraction needs reference= (the dense model)")
    args = _as_tuple(example_inputs)
    be = _backend_of(backend)
    if hasattr(be, "is_available") and not be.is_available():
        raise BackendUnavailable(f"backend {getattr(be, 'name', be)!r} is not available here")
    model = model.eval()
    measured = be.measure_model(model, args)
    ref_sample = ratio = ratio_iqr = None
    if reference is not None:
        reference = reference.eval()
        ref_sample = be.measure_model(reference, args)
        ratio, ratio_iqr = _ratio_of(be.measure_ratio(model, reference, args))
        if budget_fraction is not None:
            budget_ms = budget_fraction * ref_sample.median_ms
    try:
        device = be.device_info().to_dict()
    except Exception:  # noqa: BLE001 - a report without device info is still a report
        device = {}
    return VerifyReport(
        backend=str(getattr(be, "name", type(be).__name__)),
        measured=measured,
        budget_ms=budget_ms,
        predicted_ms=predicted_ms,
        reference=ref_sample,
        ratio=ratio,
        ratio_iqr=ratio_iqr,
        device=device,
        predicted_reference_ms=predicted_reference_ms,
        fitted_reference_ms=fitted_reference_ms,
    )


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path,
                opset: int | None = None) -> Path:
    """Write ``model`` to ONNX at ``path`` (atomically), masks baked into the weights.

    ``nm`` and ``unstructured`` masks become zeros in the ONNX initializers (a Conv followed by
    BatchNorm is folded by the exporter; the fold scales whole output channels, so zeros and
    the N:M pattern stay). ``onnx_nm_report(path)`` lists which initializers follow 2:4.
    """
    from autoprune.onnx_export import to_onnx

    path = Path(path)
    out = to_onnx(model, _as_tuple(example_inputs), path, opset=opset)
    return Path(out)  # type: ignore[arg-type]


def onnx_nm_report(path: str | Path, n: int = 2, m: int = 4) -> dict[str, bool]:
    """For every conv/linear weight initializer (>=2-D) of an ONNX file: does it follow n:m?

    Groups are m consecutive input channels at each kernel position (conv ``(out, in, *k)``)
    or m consecutive inputs of a Gemm/MatMul weight (its input axis is inferred from the
    ``transB`` attribute: 1 for Gemm transB=1, otherwise 0).
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    mdl = onnx.load(str(path))
    inits = {t.name: t for t in mdl.graph.initializer}
    result: dict[str, bool] = {}
    for node in mdl.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.ndim < 2:
            continue
        if node.op_type == "Conv":
            wk = w.reshape(w.shape[0], w.shape[1], -1).transpose(0, 2, 1)  # out, k, in
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            wk = w if trans_b else w.T  # out, in
        else:  # MatMul: x @ W with W (in, out)
            wk = w.T
        cin = wk.shape[-1]
        if cin % m:
            result[name] = False
            continue
        g = (wk != 0).reshape(*wk.shape[:-1], cin // m, m).sum(-1)
        result[name] = bool(np.all(g <= n))
    return result


def export_tensorrt(onnx_path: str | Path, engine_path: str | Path, fp16: bool = True,
                    sparse_weights: bool = True, workspace_mb: int = 2048) -> Path:
    """Build a TensorRT engine from an ONNX file with the ``tensorrt`` backend's builder.

    The serialized engine is written atomically to ``engine_path``; a sidecar
    ``<engine_path>.sparsity.json`` lists the layers TensorRT found "eligible for sparse math"
    and those that "picked sparse implementation" (from the build log). ``sparse_weights``
    sets ``BuilderFlag.SPARSE_WEIGHTS``, which only lets the builder consider sparse kernels for
    weights already in 2:4 (export with ``export_onnx`` first). Raises ``BackendUnavailable``
    without TensorRT or a CUDA GPU.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise InvalidInputError(f"ONNX file {onnx_path} does not exist; run export_onnx first")
    from autoprune.backends.tensorrt import TensorRTBackend as cls

    if not cls.is_available():
        raise BackendUnavailable(cls.unavailable_reason())
    be = cls(fp16=fp16, sparse_weights=sparse_weights, workspace_mb=workspace_mb)
    engine = be.build_engine(onnx_path.read_bytes())

    out = atomic_write_bytes(engine_path, bytes(engine.serialize()))
    rep = getattr(be, "last_sparsity", None)
    atomic_write_json(Path(f"{out}.sparsity.json"), {
        "sparse_weights": sparse_weights, "fp16": fp16,
        "eligible": list(getattr(rep, "eligible", [])),
        "picked": list(getattr(rep, "picked", [])),
    })
    return out
