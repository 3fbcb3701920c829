"""Hand-built ModelSpecs and a counting backend for the latency tests (no analyze needed)."""

from __future__ import annotations

from autoprune.backends.synthetic import SyntheticBackend
from autoprune.types import Layer, LayerSpec, ModelSpec, OpKind, PrunableGroup, Structure


def conv2d(cin: int, cout: int, size: int, k: int = 3, s: int = 1, fused: str = "bn+relu",
           groups: int = 1) -> LayerSpec:
    op = OpKind.DWCONV2D if groups > 1 and groups == cin == cout else OpKind.CONV2D
    return LayerSpec(op, cin, cout, (k, k), (s, s), (k // 2, k // 2), (1, 1), groups,
                     (size, size), fused=fused)


def small_spec(width: int = 32) -> ModelSpec:
    """conv(3→w) → conv(w→w) → linear(w→10), one prunable group between the convs."""
    c1 = conv2d(3, width, 8)
    c2 = conv2d(width, width, 8)
    fc = LayerSpec(OpKind.LINEAR, width, 10)
    g = PrunableGroup("g1", "channel", width, (Structure.CHANNEL, Structure.NM),
                      producers=("c1",), members=("c1", "c2"))
    layers = {
        "c1": Layer("c1", c1, ((None, 3),), (("g1", width),)),
        "c2": Layer("c2", c2, (("g1", width),), ((None, width),)),
        "fc": Layer("fc", fc, ((None, width),), ((None, 10),)),
    }
    return ModelSpec("small", [(1, 3, 8, 8)], layers, {"g1": g})


class CountingSynthetic(SyntheticBackend):
    """A synthetic backend that counts how many layer entries it measured."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.measured: list = []

    def measure_layers(self, items):
        self.measured.extend(items)
        return super().measure_layers(items)


def synthetic_conv1d(width: int = 16) -> dict:
    """``zoo.conv1d_net`` on the synthetic device: model, inputs, backend, spec, its table and a
    table-sum latency function (no predictor fitting) with the dense plan's value — the cheap
    search set-up the reliability tests share."""
    import torch

    import autoprune as ap
    from autoprune.zoo import conv1d_net

    torch.manual_seed(0)
    model = conv1d_net(width=width)
    x = (torch.randn(1, 1, 40),)
    backend = ap.get_backend("synthetic")
    spec = ap.analyze(model, x)
    table = ap.profile(model, x, backend, spec=spec, root=False, progress=False)

    def predict_ms(plan: ap.PruningPlan) -> float:
        return float(sum(table.lookup(p.spec, p.structure, p.density, policy="interpolate")
                         for p in spec.pruned_layers(plan)))

    return {"model": model, "x": x, "backend": backend, "spec": spec, "table": table,
            "predict_ms": predict_ms, "dense_ms": predict_ms(ap.PruningPlan.dense(spec))}
