"""``synthetic``: an analytic device for tests, with a known ground truth.

Layer cost is ``cost_fn(spec, structure, density)`` (ms). The default analytic cost has a
channel staircase: output channels are rounded up to ``alignment`` before the work is counted,
like ONNX Runtime on an AVX-512 CPU::

    cost = layer_overhead_ms + ns_per_mac * 1e-6 * MACs(out rounded up) +
           ns_per_elem * 1e-6 * activation elements (out rounded up)

(nm layers cost ``nm_speedup`` times the dense MAC term when ``accelerate_nm``). Kernel
regimes like ONNX Runtime's on an AVX2 CPU: a 2-D conv whose input channels (per group, for a
grouped conv) are off a multiple of ``in_step`` costs ``in_penalty`` times more, a depthwise conv whose channels are
off a multiple of ``dw_step`` ``dw_penalty`` times more (defaults 1: no regimes); input channels
*on* the step are counted rounded up to ``in_block`` (the vector block ONNX Runtime pads them to
on the fast path; default 1: no padding); a grouped conv whose per-group input or output width
is off a multiple of ``group_step`` costs ``group_penalty`` times more (default 0: the input
rule per group).

A whole model costs the sum of its layers (found by ``autoprune.analyze``; masked layers use
their mask's structure and density) plus a nonlinear whole-model term: ``model_overhead_ms`` +
``cache_penalty_ms_per_mb`` per MB of float32 weights read (``LayerSpec.touched_params``) beyond
``cache_mb``. So a predictor that sums table entries is exact up to that term, which it has to
learn.

The device fingerprint records the options and ``cost_fn``'s qualified name (two different
lambdas share the name ``<lambda>``: give custom cost functions distinct names).

``noise`` is a relative standard deviation: every timed run is ``cost * (1 + noise * N(0, 1))``
with a generator seeded by ``seed``; a measurement reports the median and IQR of
``protocol.min_runs`` such runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import nn

from autoprune.backends.base import Backend, LayerItem, as_structure, check_layer_items
from autoprune.errors import BackendUnavailable, InvalidInputError
from autoprune.measure import ProtocolSettings, TimedCall, to_sample
from autoprune.types import DeviceInfo, LatencySample, LayerSpec, OpKind, Structure

CostFn = Callable[[LayerSpec, Structure, float], float]


class SyntheticBackend(Backend):
    """Analytic cost model standing in for a device (tests, predictor ground truth)."""

    name = "synthetic"
    requirement = "nothing (pure Python)"

    def __init__(
        self,
        cost_fn: CostFn | None = None,
        alignment: int = 16,
        noise: float = 0.0,
        seed: int = 0,
        layer_overhead_ms: float = 0.004,
        ns_per_mac: float = 0.2,
        ns_per_elem: float = 0.5,
        accelerate_nm: bool = False,
        nm_speedup: float = 0.6,
        model_overhead_ms: float = 0.05,
        cache_mb: float = 1.0,
        cache_penalty_ms_per_mb: float = 0.02,
        in_step: int = 1,
        in_penalty: float = 1.0,
        dw_step: int = 1,
        dw_penalty: float = 1.0,
        in_block: int = 1,
        group_step: int = 0,
        group_penalty: float = 1.0,
        protocol: ProtocolSettings | None = None,
    ) -> None:
        super().__init__(protocol)
        self.cost_fn = cost_fn
        self.alignment = alignment
        self.noise = noise
        self.seed = seed
        self.layer_overhead_ms = layer_overhead_ms
        self.ns_per_mac = ns_per_mac
        self.ns_per_elem = ns_per_elem
        self.accelerate_nm = accelerate_nm
        self.nm_speedup = nm_speedup
        self.model_overhead_ms = model_overhead_ms
        self.cache_mb = cache_mb
        self.cache_penalty_ms_per_mb = cache_penalty_ms_per_mb
        self.in_step, self.in_penalty = in_step, in_penalty
        self.dw_step, self.dw_penalty = dw_step, dw_penalty
        self.in_block = in_block
        self.group_step, self.group_penalty = group_step, group_penalty
        if not isinstance(alignment, int) or alignment < 1:
            raise InvalidInputError(f"alignment={alignment!r}; use an integer >= 1")
        if noise < 0:
            raise InvalidInputError(f"noise={noise!r}; use a relative std >= 0")
        self._rng = np.random.default_rng(seed)

    @classmethod
    def is_available(cls) -> bool:
        return True

    def _make_device_info(self) -> DeviceInfo:
        fn = "default" if self.cost_fn is None else getattr(
            self.cost_fn, "__qualname__", type(self.cost_fn).__name__
        )
        opts = {
            "cost_fn": fn, "alignment": self.alignment, "noise": self.noise, "seed": self.seed,
            "layer_overhead_ms": self.layer_overhead_ms, "ns_per_mac": self.ns_per_mac,
            "ns_per_elem": self.ns_per_elem, "accelerate_nm": self.accelerate_nm,
            "nm_speedup": self.nm_speedup, "model_overhead_ms": self.model_overhead_ms,
            "cache_mb": self.cache_mb, "cache_penalty_ms_per_mb": self.cache_penalty_ms_per_mb,
        }
        if (self.in_step, self.in_penalty, self.dw_step, self.dw_penalty) != (1, 1.0, 1, 1.0):
            opts.update(in_step=self.in_step, in_penalty=self.in_penalty, dw_step=self.dw_step,
                        dw_penalty=self.dw_penalty)
        if self.in_block != 1:
            opts["in_block"] = self.in_block
        if self.group_step:
            opts.update(group_step=self.group_step, group_penalty=self.group_penalty)
        return DeviceInfo(
            backend=self.name,
            device_name=f"synthetic staircase {self.alignment}",
            arch="synthetic",
            runtime="autoprune-synthetic 1",
            threads=1,
            precision="float32",
            extra=tuple(sorted((k, str(v)) for k, v in opts.items())),
        )

    def accelerates(self, structure: Structure | str, spec: LayerSpec | None = None) -> bool:
        s = as_structure(structure)
        if s == Structure.NM:
            return self.accelerate_nm and (spec is None or spec.op.value != "attention")
        return s in (Structure.NONE, Structure.CHANNEL)

    # --- ground truth ------------------------------------------------------------------
    def layer_cost_ms(self, spec: LayerSpec, structure: Structure | str = Structure.NONE,
                      density: float = 1.0) -> float:
        """Noise-free cost of one layer (ms)."""
        from autoprune.latency._table import normalize_structure

        structure = normalize_structure(structure)
        if self.cost_fn is not None:
            return float(self.cost_fn(spec, structure, density))
        a = self.alignment
        out_eff = int(math.ceil(spec.out_channels / a) * a)
        if spec.op == OpKind.DWCONV2D and spec.out_channels % self.dw_step:
            eff = spec  # the plain kernel: its own width, no padding to the block
        elif spec.op.is_depthwise:
            eff = spec.with_channels(out_eff, out_eff)
        elif spec.op == OpKind.CONV2D and spec.groups == 1 and self.in_block > 1 \
                and spec.in_channels > self.in_step and spec.in_channels % self.in_step == 0:
            eff = spec.with_channels(int(math.ceil(spec.in_channels / self.in_block)
                                         * self.in_block), out_eff)
        else:
            eff = spec.with_channels(spec.in_channels, out_eff)
        mac_ms = self.ns_per_mac * 1e-6 * eff.macs
        if structure == Structure.NM and self.accelerate_nm:
            mac_ms *= self.nm_speedup
        cost = self.layer_overhead_ms + mac_ms + self.ns_per_elem * 1e-6 * eff.activation_elems
        if spec.op == OpKind.DWCONV2D and spec.out_channels % self.dw_step:
            cost *= self.dw_penalty
        elif spec.op == OpKind.CONV2D and spec.groups > 1:  # grouped: per-group widths
            step = self.group_step or self.in_step
            if (spec.in_channels // spec.groups) % step or (spec.out_channels // spec.groups) % step:
                cost *= self.group_penalty if self.group_step else self.in_penalty
        elif spec.op == OpKind.CONV2D:
            if spec.in_channels > self.in_step and spec.in_channels % self.in_step:
                cost *= self.in_penalty
        return cost

    def model_cost_ms(self, model: nn.Module, example_inputs: Any) -> float:
        """Noise-free cost of a whole model: sum of its layers + the whole-model term."""
        try:
            from autoprune._analyze import analyze
        except ImportError as e:
            raise BackendUnavailable(
                "the synthetic backend's measure_model needs autoprune.analyze, which is not "
                "installed in this checkout"
            ) from e
        from autoprune.onnx_export import as_input_tuple

        spec = analyze(model, as_input_tuple(example_inputs))
        modules = dict(model.named_modules())
        total = 0.0
        params = 0.0
        for name, layer in spec.layers.items():
            structure, density = _mask_structure(modules.get(name))
            total += self.layer_cost_ms(layer.spec, structure, density)
            params += layer.spec.touched_params  # what a forward pass reads
        weights_mb = params * 4 / 1e6
        total += self.model_overhead_ms
        total += self.cache_penalty_ms_per_mb * max(0.0, weights_mb - self.cache_mb)
        return total

    def _noisy(self, cost_ms: float) -> LatencySample:
        n = self.protocol.min_runs
        if self.noise > 0:
            runs = cost_ms * (1.0 + self.noise * self._rng.standard_normal(n))
            runs = np.maximum(runs, cost_ms * 1e-3)
        else:
            runs = np.full(n, cost_ms)
        return to_sample(runs.tolist())

    # --- Backend API ---------------------------------------------------------------------
    def _timer_for_model(self, model: nn.Module, example_inputs: Any) -> TimedCall:
        cost = self.model_cost_ms(model, example_inputs)
        return lambda: cost * (1.0 + self.noise * float(self._rng.standard_normal()))

    def measure_layers(self, items: Sequence[LayerItem]) -> list[LatencySample]:
        return [self._noisy(self.layer_cost_ms(s, st, d)) for s, st, d in check_layer_items(items)]

    def measure_interleaved(self, models: Sequence[nn.Module], example_inputs: Any
                            ) -> list[LatencySample]:
        if not models:
            raise InvalidInputError("measure_interleaved needs at least one model")
        return [self._noisy(self.model_cost_ms(m, example_inputs)) for m in models]

    def measure_ratio(self, model: nn.Module, reference: nn.Module, example_inputs: Any
                      ) -> tuple[float, float]:
        a = self.model_cost_ms(model, example_inputs)
        b = self.model_cost_ms(reference, example_inputs)
        n = self.protocol.min_runs
        noise_a = 1.0 + self.noise * self._rng.standard_normal(n)
        noise_b = 1.0 + self.noise * self._rng.standard_normal(n)
        ratios = (a * noise_a) / np.maximum(b * noise_b, 1e-12)
        s = to_sample(ratios.tolist())
        return s.median_ms, s.iqr_ms

    def options_repr(self) -> str:
        return f"alignment={self.alignment}, noise={self.noise}, seed={self.seed}"


def _mask_structure(module: nn.Module | None) -> tuple[Structure, float]:
    """(structure, density) of a module's ``weight_mask`` buffer; dense if it has none."""
    mask = getattr(module, "weight_mask", None) if module is not None else None
    if mask is None:
        return Structure.NONE, 1.0
    density = float(mask.float().mean())
    if density >= 1.0:
        return Structure.NONE, 1.0
    from autoprune.backends.micro import nm_mask

    w = mask.float()
    if w.dim() >= 2 and bool((nm_mask(w, 2, 4) | ~mask.bool()).all()) and abs(density - 0.5) < 0.01:
        return Structure.NM, 0.5
    return Structure.UNSTRUCTURED, density
