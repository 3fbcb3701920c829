"""Weight streaming: what a model pays when its weights no longer fit in the device's caches.

A batch-1 inference reads every weight once. While a model's weights fit in the caches, repeated
inferences find them there; once they do not, every layer's weights come from memory again on
every inference. Single-layer micro-models (the latency table) keep their own weights in cache,
so a table sum under-counts a model whose weights, together, outgrow the cache: on the AVX-512
EPYC Zen 4 VM (32 MiB L3 shared with other tenants), ResNet-18 at 32² (44.7 MB of weights)
measured 1.83 ms where its table sum is 0.68 ms, while its plans below about 16 MB of weights
measured 0.5–1.1x their table sums (BENCHMARKS.md, "Weight streaming").

``detect_weight_stream`` times, on the device, chains of ``CHAIN_LAYERS`` 1x1 convolutions at
1x1 spatial size (pure weight traffic: one multiply-add per weight) whose total weights span
``PROBE_SIZES_MB``. The chain's time is a line ``a + b·W`` while the weights fit (``b``: the
cache's cost per MB, ``a``: per-call overhead) and bends up to the memory's cost per MB beyond;
``WeightStream.extra_ms(W)`` is what lies above that line, made convex and non-decreasing
(isotonic slopes), 0 below the knee. A plan's streaming cost is then
``extra_ms(W_model) - Σ extra_ms(W_layer)`` — what the whole model pays beyond what its
micro-models already paid for their own weights (≥ 0 because a convex curve through 0 is
superadditive, and non-decreasing in every width). The latency models see it as a feature
(``stream_ms``); they learn how much of it the layers' compute hides.

Measured on the Zen 4 VM (``benchmarks/bench_memory.py`` and the probes of BENCHMARKS.md "Weight
streaming"): 11–12 µs/MB while the chain's weights fit (about 85 GB/s), 43–61 µs/MB (16–23 GB/s)
beyond 45 MB, the knee at 12–20 MB (other tenants share the L3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from autoprune.errors import CorruptFileError
from autoprune.measure import ProtocolSettings

if TYPE_CHECKING:
    from autoprune.backends.base import Backend

#: total float32 weights (MB) of the probe chains: fine steps below 4 MB (small boards' caches)
PROBE_SIZES_MB: tuple[float, ...] = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48,
                                     64, 96, 128)
#: 1x1 convolutions per chain (the same in every chain: equal per-call overhead)
CHAIN_LAYERS = 8
#: input channels of the chains' shared first layer (every chain takes one input tensor, so all
#: are timed interleaved)
STEM_CHANNELS = 16
#: protocol of the probe (bigger chains run for milliseconds: few runs each)
PROBE_PROTOCOL = ProtocolSettings(warmup_runs=5, min_runs=15, max_runs=60, target_rel_iqr=0.03,
                                  time_cap_s=0.5, min_sample_ms=0.05)


@dataclass(frozen=True)
class WeightStream:
    """A device's measured weight-streaming curve (see the module docstring). Plain data."""

    #: total weights of each probe chain (MB, ascending) and its measured latency (ms)
    sizes_mb: tuple[float, ...]
    chain_ms: tuple[float, ...]

    def __post_init__(self) -> None:
        w, t = np.asarray(self.sizes_mb, float), np.asarray(self.chain_ms, float)
        if len(w) < 3 or len(w) != len(t) or not np.all(np.diff(w) > 0) \
                or not np.all(np.isfinite(t)) or np.any(t <= 0) or w[0] <= 0:
            raise ValueError("need >= 3 ascending positive sizes with as many positive times")

    # -- the curve -------------------------------------------------------------------------
    @cached_property
    def _fit(self) -> tuple[float, float, np.ndarray, np.ndarray]:
        """(a, b, knots W, extra at the knots): the resident line and the convex curve above it."""
        from sklearn.isotonic import IsotonicRegression

        w, t = np.asarray(self.sizes_mb, float), np.asarray(self.chain_ms, float)
        # the resident cost per MB: the cheapest slope over pairs two sizes apart (steadier than
        # neighbours); the line's offset puts it under every point
        span = 2 if len(w) > 3 else 1
        b = float(max(0.0, np.min((t[span:] - t[:-span]) / (w[span:] - w[:-span]))))
        a = float(np.min(t - b * w))
        extra = np.maximum(0.0, t - a - b * w)
        knots = np.concatenate([[0.0], w])
        vals = np.concatenate([[0.0], extra])
        # non-decreasing slopes (convex), none negative: isotonic on the segment slopes,
        # weighted by segment length, then integrated from 0
        dw = np.diff(knots)
        slopes = np.diff(vals) / dw
        slopes = IsotonicRegression(y_min=0.0, increasing=True).fit_transform(
            knots[1:], slopes, sample_weight=dw)
        curve = np.concatenate([[0.0], np.cumsum(slopes * dw)])
        return a, b, knots, curve

    @property
    def resident_ms_per_mb(self) -> float:
        """Cost per MB of weights that stay in cache (the line's slope)."""
        return self._fit[1]

    @property
    def streaming_ms_per_mb(self) -> float:
        """Cost per MB beyond the largest probe (resident cost + the curve's last slope)."""
        _, b, knots, curve = self._fit
        return b + float((curve[-1] - curve[-2]) / (knots[-1] - knots[-2]))

    @property
    def knee_mb(self) -> float:
        """Weights (MB) at which the extra cost reaches a tenth of the streaming cost's excess
        over the resident cost (where a model starts to notice; ``inf`` if it never does)."""
        _, b, knots, curve = self._fit
        excess = self.streaming_ms_per_mb - b
        if excess <= 0:
            return math.inf
        per_mb = np.divide(curve, knots, out=np.zeros_like(curve), where=knots > 0)
        hit = np.flatnonzero(per_mb >= 0.1 * excess)
        return float(knots[hit[0]]) if len(hit) else math.inf

    def extra_ms(self, weights_mb: Any) -> np.ndarray:
        """Extra ms a forward pass pays over the resident line for ``weights_mb`` of weights
        (array-like, >= 0): the convex curve, extended past the largest probe at its last slope."""
        _, _, knots, curve = self._fit
        w = np.maximum(0.0, np.asarray(weights_mb, dtype=float))
        last = (curve[-1] - curve[-2]) / (knots[-1] - knots[-2])
        out = np.interp(w, knots, curve)
        beyond = w > knots[-1]
        return np.asarray(np.where(beyond, curve[-1] + last * (w - knots[-1]), out), dtype=float)

    def plan_stream_ms(self, layer_weights_mb: np.ndarray) -> np.ndarray:
        """[P] streaming cost of plans from their per-layer weights [P, L] (MB, 0 for a removed
        layer): the whole model's extra minus what each layer's micro-model already paid."""
        lw = np.asarray(layer_weights_mb, dtype=float)
        whole = self.extra_ms(lw.sum(axis=1))
        own = self.extra_ms(lw).sum(axis=1)
        return np.asarray(np.maximum(0.0, whole - own), dtype=float)

    # -- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"sizes_mb": list(self.sizes_mb), "chain_ms": list(self.chain_ms)}

    @classmethod
    def from_dict(cls, d: Any, source: str = "weight stream") -> WeightStream:
        try:
            return cls(tuple(float(x) for x in d["sizes_mb"]),
                       tuple(float(x) for x in d["chain_ms"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{source}: malformed weight-stream probe ({e})") from None

    def __str__(self) -> str:
        return (f"WeightStream({1000 * self.resident_ms_per_mb:.1f} us/MB in cache, "
                f"{1000 * self.streaming_ms_per_mb:.1f} us/MB streamed, knee ~{self.knee_mb:g} MB)")


def probe_chains(sizes_mb: Sequence[float] = PROBE_SIZES_MB, layers: int = CHAIN_LAYERS
                 ) -> tuple[list[Any], Any, list[float]]:
    """(chain models, their shared input, their exact weights in MB) for ``sizes_mb``."""
    import torch
    from torch import nn

    models, sizes = [], []
    for s in sizes_mb:
        c = max(8, int(round(math.sqrt(s * 1e6 / 4 / layers) / 8)) * 8)
        chain = [nn.Conv2d(STEM_CHANNELS, c, 1, bias=False)]
        chain += [nn.Conv2d(c, c, 1, bias=False) for _ in range(layers)]
        models.append(nn.Sequential(*chain).eval())
        sizes.append((STEM_CHANNELS * c + layers * c * c) * 4 / 1e6)
    return models, torch.randn(1, STEM_CHANNELS, 1, 1), sizes


def probe_rounds(backend: Backend, sizes_mb: Sequence[float] = PROBE_SIZES_MB,
                 repeats: int = 2, protocol: Any = None) -> tuple[list[float], np.ndarray]:
    """(exact chain weights in MB, [repeats, sizes] medians): the probe chains timed on
    ``backend`` interleaved, ``repeats`` rounds, under ``protocol`` (default ``PROBE_PROTOCOL``)."""
    models, x, sizes = probe_chains(sizes_mb)
    old = backend.protocol
    backend.protocol = protocol or PROBE_PROTOCOL
    try:
        runs = [[s.median_ms for s in backend.measure_interleaved(models, x)]
                for _ in range(max(1, int(repeats)))]
    finally:
        backend.protocol = old
    return sizes, np.asarray(runs, dtype=float)


def detect_weight_stream(backend: Backend, sizes_mb: Sequence[float] = PROBE_SIZES_MB,
                         repeats: int = 2, protocol: Any = None) -> WeightStream:
    """The device's curve from ``probe_rounds`` (median per size over rounds). About 10 s per
    round on ORT CPU, 1 thread."""
    sizes, runs = probe_rounds(backend, sizes_mb, repeats, protocol)
    med = np.median(runs, axis=0)
    return WeightStream(tuple(round(s, 4) for s in sizes), tuple(float(v) for v in med))


__all__ = ["PROBE_SIZES_MB", "WeightStream", "detect_weight_stream", "probe_chains",
           "probe_rounds"]
