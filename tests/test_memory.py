"""Weight streaming: the device probe finds where a model's weights outgrow the cache, the
curve is convex and never negative, and plans pay only what their micro-models did not."""

from __future__ import annotations

import numpy as np
import pytest

import autoprune as ap
from autoprune.latency import KernelRules, cached_kernel_rules
from autoprune.latency._featurize import PlanFeaturizer
from autoprune.latency._memory import WeightStream, detect_weight_stream
from autoprune.measure import ProtocolSettings
from autoprune.plan import PruningPlan


def _hinge_curve(cache_mb=16.0, resident=0.011, streamed=0.040, overhead=0.01):
    """Chain times of a device with a sharp cache: the resident line, then DRAM cost."""
    w = np.array([0.5, 1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 96])
    t = overhead + resident * w + (streamed - resident) * np.maximum(0.0, w - cache_mb)
    return WeightStream(tuple(w.tolist()), tuple(t.tolist()))


def test_curve_is_zero_in_cache_then_the_memory_cost_convex_and_non_decreasing():
    ws = _hinge_curve()
    assert ws.resident_ms_per_mb == pytest.approx(0.011, rel=1e-6)
    assert ws.streaming_ms_per_mb == pytest.approx(0.040, rel=1e-6)
    assert 12 <= ws.knee_mb <= 24
    np.testing.assert_allclose(ws.extra_ms([0, 4, 16]), 0.0, atol=1e-9)
    assert ws.extra_ms(48) == pytest.approx(0.029 * 32, rel=1e-6)
    assert ws.extra_ms(200) == pytest.approx(0.029 * 184, rel=1e-6)  # past the last probe
    grid = np.linspace(0, 300, 601)
    e = ws.extra_ms(grid)
    slopes = np.diff(e)
    assert np.all(slopes >= -1e-12) and np.all(np.diff(slopes) >= -1e-9)


def test_noisy_probe_still_gives_a_convex_curve_and_round_trips():
    rng = np.random.default_rng(1)
    base = _hinge_curve()
    noisy = WeightStream(base.sizes_mb,
                         tuple(np.asarray(base.chain_ms) * (1 + 0.05 * rng.standard_normal(13))))
    e = noisy.extra_ms(np.linspace(0, 128, 257))
    assert np.all(e >= 0) and np.all(np.diff(np.diff(e)) >= -1e-9)
    assert WeightStream.from_dict(noisy.to_dict()) == noisy
    rules = KernelRules(out_step=8, weight_stream=noisy)
    assert KernelRules.from_dict(rules.to_dict()).weight_stream == noisy
    with pytest.raises(ap.errors.CorruptFileError, match="rules.json"):
        KernelRules.from_dict({**rules.to_dict(), "weight_stream": {"sizes_mb": [1, 2]}},
                              source="rules.json")


def test_a_plan_pays_only_what_its_layers_did_not_and_more_weights_never_pay_less():
    ws = _hinge_curve()
    # one layer of 30 MB alone: its micro-model already streamed it
    assert ws.plan_stream_ms(np.array([[30.0]]))[0] == pytest.approx(0.0, abs=1e-9)
    # three 10 MB layers: each fits alone, the model does not
    three = ws.plan_stream_ms(np.array([[10.0, 10.0, 10.0]]))[0]
    assert three == pytest.approx(0.029 * 14, rel=1e-6)
    rng = np.random.default_rng(0)
    lw = rng.uniform(0, 12, size=(200, 6))
    grown = lw.copy()
    grown[:, rng.integers(0, 6, 200)] += rng.uniform(0, 5, 200)[:, None]
    assert np.all(ws.plan_stream_ms(grown) >= ws.plan_stream_ms(lw) - 1e-12)
    assert np.all(ws.plan_stream_ms(lw) >= 0)


def test_probe_on_a_device_with_a_cache_finds_it(tmp_path):
    device = ap.get_backend("synthetic", protocol=ProtocolSettings.quick(), cache_mb=8.0,
                            cache_penalty_ms_per_mb=0.03)
    ws = detect_weight_stream(device, repeats=1)
    assert 4 <= ws.knee_mb <= 16
    # (the chain's in-cache time is not exactly linear in its weights there: activations grow
    # with the width, not its square)
    assert ws.extra_ms(64.0) == pytest.approx(0.03 * 56, rel=0.1)
    assert ws.extra_ms(4.0) < 0.01 * ws.extra_ms(64.0)
    # detected with the device's kernel rules and cached with them
    rules = cached_kernel_rules(device, cache=tmp_path)
    assert rules.weight_stream is not None
    assert cached_kernel_rules(device, cache=tmp_path).weight_stream == rules.weight_stream


@pytest.mark.filterwarnings("ignore:analyze:UserWarning")
def test_the_dense_resnet18_streams_and_a_small_plan_does_not():
    import torch

    from autoprune.zoo import torchvision_model

    model = torchvision_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    device = ap.get_backend("synthetic", protocol=ProtocolSettings.quick())
    spec = ap.analyze(model, (x,))
    table = ap.profile(model, x, device, spec=spec, root=False, progress=False,
                       kernel_rules=KernelRules(weight_stream=_hinge_curve()))
    f = PlanFeaturizer(spec, table)
    dense = PruningPlan.dense(spec)
    small = PruningPlan.uniform(spec, 0.25)
    frame = f.frame([dense, small])
    assert frame["stream_ms"].iloc[0] > 0.3  # 44.7 MB of weights, layers of at most 9.4 MB
    assert frame["stream_ms"].iloc[1] == pytest.approx(0.0, abs=1e-9)  # about 3 MB
