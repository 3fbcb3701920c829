"""Conformance suite of the layer-adapter registry: every registered layer adapter passes it.

A new adapter gets its cases by adding entries to ``CASES`` (``test_every_layer_adapter_has_cases``
fails until it does). Each case is one layer between a producer and a consumer, so that both
its input and its output channels are prunable groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from autoprune import masks
from autoprune._analyze import analyze
from autoprune._analyze._adapters import (
    ADAPTERS,
    AttentionAdapter,
    LayerAdapter,
    LinearAdapter,
    UnsupportedAdapter,
    register,
)
from autoprune.errors import UnknownNameError, UnsupportedLayerError
from autoprune.executor import apply_plan
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import OpKind, Structure

torch.set_num_threads(1)


@dataclass(frozen=True)
class Case:
    id: str
    adapter: str  # registry name
    build: Callable[[int, int], nn.Module]  # (in channels, out channels) -> the layer
    dims: int  # input layout: 0 = tokens (B, T, C) (or (T, B, C) if not batch_first), 1, 2
    dense: tuple[int, int]
    small: tuple[int, int]  # other widths for the MACs check
    batch_first: bool = True

    def input_shape(self, c: int) -> tuple[int, ...]:
        if self.dims == 0:
            return (2, 5, c) if self.batch_first else (5, 2, c)
        return (2, c, 9) if self.dims == 1 else (2, c, 7, 6)


CASES = [
    Case("conv2d", "conv", lambda i, o: nn.Conv2d(i, o, 3, padding=1), 2, (16, 24), (8, 12)),
    Case("conv2d_strided_nobias", "conv",
         lambda i, o: nn.Conv2d(i, o, (3, 2), stride=2, padding="valid", bias=False), 2,
         (16, 24), (12, 8)),
    Case("conv2d_same_dilated", "conv",
         lambda i, o: nn.Conv2d(i, o, 3, padding="same", dilation=2), 2, (16, 24), (8, 8)),
    Case("conv2d_grouped", "conv", lambda i, o: nn.Conv2d(i, o, 3, padding=1, groups=4), 2,
         (16, 24), (8, 12)),
    Case("conv2d_depthwise", "conv", lambda i, o: nn.Conv2d(i, o, 3, padding=1, groups=i), 2,
         (16, 16), (8, 8)),
    Case("conv1d", "conv", lambda i, o: nn.Conv1d(i, o, 3, padding=1), 1, (16, 24), (8, 12)),
    Case("conv1d_depthwise", "conv", lambda i, o: nn.Conv1d(i, o, 5, padding=2, groups=i), 1,
         (16, 16), (4, 4)),
    Case("linear_tokens", "linear", lambda i, o: nn.Linear(i, o), 0, (16, 24), (8, 12)),
    Case("attention", "attention",
         lambda i, o: nn.MultiheadAttention(i, 4, batch_first=True), 0, (32, 32), (16, 16)),
    Case("attention_seq_first_nobias", "attention",
         lambda i, o: nn.MultiheadAttention(i, 2, bias=False), 0, (16, 16), (8, 8),
         batch_first=False),
]


class Sandwich(nn.Module):
    """producer -> the layer under test -> consumer."""

    def __init__(self, case: Case) -> None:
        super().__init__()
        cin, cout = case.dense
        self.is_attention = case.adapter == "attention"
        if case.dims == 0:
            self.pre, self.post = nn.Linear(6, cin), nn.Linear(cout, 3)
        else:
            conv = nn.Conv1d if case.dims == 1 else nn.Conv2d
            self.pre, self.post = conv(3, cin, 1), conv(cout, 3, 1)
        self.layer = case.build(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pre(x))
        if self.is_attention:
            h = self.layer(h, h, h, need_weights=False)[0]
        else:
            h = self.layer(h)
        return self.post(torch.relu(h))


def _sandwich(case: Case) -> tuple[Sandwich, torch.Tensor]:
    torch.manual_seed(0)
    model = Sandwich(case).eval()
    shape = list(case.input_shape(3))
    shape[-1 if case.dims == 0 else 1] = 6 if case.dims == 0 else 3
    return model, torch.randn(*shape)


def _brute_macs(module: nn.Module, x: torch.Tensor, attention: bool) -> int:
    """MACs counted by PyTorch's per-op flop formulas (2 flops = 1 MAC). PyTorch's CPU
    attention kernel is not counted by FlopCounterMode, so for attention the core is recomputed
    with explicit matmuls (q k^T and the weighted sum of v) and counted the same way."""
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        if attention:
            module.train()  # dropout is 0; the eval fast path is one fused op FlopCounter skips
            module(x, x, x, need_weights=False)
            xb = x if module.batch_first else x.transpose(0, 1)
            b, t, e = xb.shape
            h = module.num_heads
            q = k = v = torch.randn(b, h, t, e // h)
            torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)), -1), v)
        else:
            module(x)
    return fc.get_total_flops() // 2


def test_every_layer_adapter_has_cases():
    assert {c.adapter for c in CASES} == {a.name for a in ADAPTERS.layer_adapters()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_adapter_resolves_and_reads_the_module(case: Case):
    layer = case.build(*case.dense)
    adapter = ADAPTERS.layer(layer)
    assert adapter is ADAPTERS.get(case.adapter)
    widths = adapter.widths(layer)
    subs = adapter.sublayers(layer)
    assert set(widths) == set(subs)
    assert (widths[subs[0]].in_channels, widths[subs[-1]].out_channels) == case.dense
    specs = adapter.layer_specs(layer, case.input_shape(case.dense[0]))
    for s, spec in specs.items():
        assert (spec.in_channels, spec.out_channels, spec.groups) == (
            widths[s].in_channels, widths[s].out_channels, widths[s].groups)
        assert spec.op == adapter.op_kind(layer, s)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_macs_and_params_match_a_brute_force_count(case: Case):
    layer = case.build(*case.dense).eval()
    adapter = ADAPTERS.layer(layer)
    attention = isinstance(adapter, AttentionAdapter)
    x = torch.randn(case.input_shape(case.dense[0]))
    macs, params = adapter.count(layer, tuple(x.shape))
    assert macs == _brute_macs(layer, x, attention) > 0
    assert params == sum(p.numel() for p in layer.parameters())
    # at other widths: the formula for the dense module equals a count of a module built there
    small = case.build(*case.small).eval()
    xs = torch.randn(case.input_shape(case.small[0]))
    macs_s, params_s = adapter.count(layer, tuple(x.shape), *case.small)
    assert macs_s == _brute_macs(small, xs, attention) < macs
    assert params_s == sum(p.numel() for p in small.parameters()) < params


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.id)
def analysed(request):
    case = request.param
    model, x = _sandwich(case)
    return case, model, x, analyze(model, x)


def test_widths_after_shrinking_equal_the_plan(analysed):
    case, model, x, spec = analysed
    plan = PruningPlan.uniform(spec, keep_ratio=0.5, structure="channel")
    assert plan.groups, "no channel group offered around the layer"
    pruned = apply_plan(model, plan, x, spec=spec)
    with torch.no_grad():
        pruned(x)
    expected = {pl.name: pl.spec for pl in spec.pruned_layers(plan)}
    assert set(expected) == set(spec.layers)
    for name, e in expected.items():
        mod, adapter, suffix = ADAPTERS.resolve(pruned, name)
        w = adapter.widths(mod)[suffix]
        assert (w.in_channels, w.out_channels, w.groups) == (
            e.in_channels, e.out_channels, e.groups), name
    # the layer under test really shrank on both sides
    adapter = ADAPTERS.layer(pruned.layer)
    w = adapter.widths(pruned.layer)
    subs = adapter.sublayers(pruned.layer)
    assert w[subs[0]].in_channels < case.dense[0] and w[subs[-1]].out_channels < case.dense[1]
    # the spec's counts are the pruned module's counts
    macs, params = spec.count(plan)
    dense_macs, dense_params = spec.count()
    assert macs < dense_macs and params < dense_params
    layer_macs, layer_params = adapter.count(pruned.layer, _layer_input(pruned, x))
    got = sum(pl.spec.macs for pl in spec.pruned_layers(plan) if pl.name.startswith("layer"))
    assert layer_macs == got
    assert layer_params == sum(p.numel() for p in pruned.layer.parameters())


def _layer_input(model: Sandwich, x: torch.Tensor) -> tuple[int, ...]:
    seen: list[tuple[int, ...]] = []
    h = model.layer.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return seen[0]


def test_masks_go_on_the_adapters_mask_param(analysed):
    case, model, x, spec = analysed
    name = next((g.name for g in spec.groups.values()
                 if Structure.UNSTRUCTURED in g.allowed and any(
                     p.startswith("layer") for p in g.producers)), None)
    if name is None:  # a depthwise conv produces no group: its neighbours' groups mask
        assert ADAPTERS.layer(model.layer).is_producer(model.layer, "") is False
        return
    plan = PruningPlan.dense(spec)
    plan.groups[name] = GroupPlan("unstructured", 0.5)
    pruned = apply_plan(model, plan, x, spec=spec)
    got = masks.get_masks(pruned)
    producers = spec.groups[name].producers
    assert len(got) == len(producers)  # one mask per producing sublayer
    for producer in producers:
        mod, adapter, suffix = ADAPTERS.resolve(model, producer)
        pname, _ = adapter.mask_param(mod, suffix)
        base = producer[: -len(suffix) - 1] if suffix else producer
        mask = got[f"{base}.{pname}"]
        # the mask has the producer's weight shape as the spec describes the layer
        ls = spec.layers[producer].spec
        assert tuple(mask.shape) == (ls.out_channels, ls.in_channels // ls.groups, *ls.kernel)
        assert mask.float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_registry_lookup_rules():
    class MyConv(nn.Conv2d):
        pass

    assert ADAPTERS.layer(MyConv(2, 2, 1)).name == "conv"  # a subclass resolves via its MRO
    assert ADAPTERS.layer(nn.BatchNorm2d(2)) is None  # companion, not a layer
    assert ADAPTERS.for_module(nn.BatchNorm2d(2)).channel_gamma(nn.BatchNorm2d(2)) is not None
    assert ADAPTERS.is_known_param_holder(nn.LayerNorm(4))
    assert not ADAPTERS.is_known_param_holder(nn.Conv3d(1, 1, 1))
    assert isinstance(ADAPTERS.unsupported(nn.ConvTranspose2d(1, 1, 1)), UnsupportedAdapter)
    assert set(ADAPTERS.root_module_types()) == {nn.Conv1d, nn.Conv2d, nn.Linear}
    with pytest.raises(UnknownNameError, match="unknown layer adapter 'conv9'; known: .*conv"):
        ADAPTERS.get("conv9")
    with pytest.raises(ValueError, match="Linear has an adapter already"):
        ADAPTERS.register(type("Again", (LinearAdapter,), {"name": "linear2"})())


def test_a_new_layer_type_is_one_class(monkeypatch):
    """Registering one class is all analyze and the executor need for a new layer type."""

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    class ScaledAdapter(LinearAdapter):
        name = "scaled_linear_test"
        module_types = (Scaled,)

    # register on a throwaway registry state
    monkeypatch.setattr(ADAPTERS, "_by_type", dict(ADAPTERS._by_type))
    monkeypatch.setattr(ADAPTERS, "_by_name", dict(ADAPTERS._by_name))
    register(ScaledAdapter)
    assert ADAPTERS.layer(Scaled(2, 2)).name == "scaled_linear_test"
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), Scaled(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    spec = analyze(model, x)
    assert spec.layers["2"].spec.op == OpKind.LINEAR
    plan = PruningPlan.uniform(spec, 0.5)
    pruned = apply_plan(model, plan, x, spec=spec)
    assert (pruned[2].in_features, pruned[2].out_features) == (4, 4)


def test_unsupported_adapter_names_the_module():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 1, 6, 6)
    net(x)
    with pytest.raises(UnsupportedLayerError, match="'1' of type ConvTranspose2d.*transposed"):
        analyze(net, x)


def test_attention_with_separate_kv_widths_is_refused_by_its_adapter():
    class KV(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(4, 8)
            self.att = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kv = torch.randn(x.shape[0], x.shape[1], 6)
            return self.att(self.q(x), kv, kv)[0]

    with pytest.raises(UnsupportedLayerError, match="'att' of type MultiheadAttention.*key/value"):
        analyze(KV().eval(), torch.randn(2, 3, 4))


def test_layer_adapter_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        LayerAdapter()  # type: ignore[abstract]
