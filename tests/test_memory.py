"""Weight streaming: the device probe finds where a model's weights outgrow the cache, the
curve is convex and never negative, and plans pay only what their micro-models did not."""

from __future__ import annotations

import math
import warnings

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
    device = ap.get_backend("synthetic", protocol=ProtocolSettings.quick())
    stream = {}
    for size in (64, 32):
        x = torch.randn(1, 3, size, size)
        spec = ap.analyze(model, (x,))
        table = ap.profile(model, x, device, spec=spec, root=False, progress=False,
                           kernel_rules=KernelRules(weight_stream=_hinge_curve()))
        frame = PlanFeaturizer(spec, table).frame([PruningPlan.dense(spec),
                                                   PruningPlan.uniform(spec, 0.25)])
        stream[size] = frame["stream_ms"].iloc[0]
        assert frame["stream_ms"].iloc[1] == pytest.approx(0.0, abs=1e-9)  # about 3 MB
    # 64²: all 44.7 MB are read (layers of at most 9.4 MB): 0.029 ms per MB beyond 16 MB
    assert stream[64] == pytest.approx(0.029 * (44.7 - 16), rel=0.02)
    # 32²: layer4's 3x3 convs run at 1x1 and read their centre tap only: about 17 MB are read
    assert stream[32] == pytest.approx(0.029 * (17.0 - 16), abs=0.01)


@pytest.fixture(scope="module")
def r18_64_on_rules():
    """resnet18 at 64² profiled on a synthetic device whose rules have an input step of 4 and
    the hinge weight-streaming curve: (model, input, spec, device, table)."""
    import torch

    from autoprune.zoo import torchvision_model

    model = torchvision_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="analyze", category=UserWarning)
        spec = ap.analyze(model, (x,))
    device = ap.get_backend("synthetic", protocol=ProtocolSettings.quick())
    rules = KernelRules(in_step=4, in_penalty=1.5, weight_stream=_hinge_curve())
    table = ap.profile(model, x, device, spec=spec, root=False, progress=False,
                       kernel_rules=rules)
    return model, x, spec, device, table


def test_the_fast_path_features_split_time_and_streaming_by_kernel_path(r18_64_on_rules):
    _, _, spec, _, table = r18_64_on_rules
    # keep 0.9 unaligned: 58, 115, 230, 461 channels, every input off the step of 4 but the
    # stem's 3; still about 36 MB of weights, past the 16 MB knee
    plans = [PruningPlan.dense(spec), PruningPlan.uniform(spec, 0.9)]
    frame = PlanFeaturizer(spec, table).frame(plans)
    np.testing.assert_allclose(frame["table_ms_fast"] + frame["table_ms_off"],
                               frame["table_ms"], rtol=1e-9)
    dense, unaligned = frame.iloc[0], frame.iloc[1]
    assert dense["table_ms_off"] == 0.0
    assert dense["stream_ms"] > 0 and dense["stream_ms_fast"] == pytest.approx(dense["stream_ms"])
    # off the fast path: the time is off-path time and almost none of the streaming is
    assert unaligned["stream_ms"] > 0
    assert unaligned["stream_ms_fast"] < 0.02 * unaligned["stream_ms"]
    assert unaligned["table_ms_fast"] < 0.1 * unaligned["table_ms"]


def test_the_miss_ramps_follow_the_devices_knee_and_split_by_kernel_path(r18_64_on_rules):
    from autoprune.latency._featurize import MISS_FEATURES, MISS_RAMPS

    model, x, spec, device, table = r18_64_on_rules
    curve = table.kernel_rules.weight_stream
    plans = [PruningPlan.dense(spec), PruningPlan.uniform(spec, 0.9),
             *(PruningPlan.uniform(spec, k, alignment=16) for k in (0.3, 0.45, 0.6))]
    frame = PlanFeaturizer(spec, table).frame(plans)
    knee = curve.knee_mb
    assert math.isfinite(knee)
    total = frame["params_m"] * 4  # at 64² every weight of resnet18 is read
    for i, (lo, hi) in enumerate(MISS_RAMPS, start=1):
        share = np.clip((total - lo * knee) / ((hi - lo) * knee), 0, 1)
        np.testing.assert_allclose(frame[f"miss{i}_mb_fast"] + frame[f"miss{i}_mb_off"],
                                   total * share, rtol=1e-6, atol=1e-9)
    dense, unaligned = frame.iloc[0], frame.iloc[1]
    assert dense["miss1_mb_off"] == 0.0 and dense["miss1_mb_fast"] == pytest.approx(
        dense["params_m"] * 4, rel=1e-6)  # far past every ramp, all on the fast path
    assert unaligned["miss1_mb_off"] > 10 * unaligned["miss1_mb_fast"]
    # the ramps differ where a model's weights sit between their ends: smaller plans miss less
    shares = frame[[f"miss{i}_mb_fast" for i in (1, 2, 3)]].to_numpy() / total.to_numpy()[:, None]
    assert np.all(np.diff(shares, axis=1) <= 1e-9)  # a later ramp never misses more
    assert len({tuple(r) for r in np.round(shares[2:], 6)}) == 3
    # no weight-streaming probe on the device: the ramps are 0, not a guess
    bare = ap.profile(model, x, device, spec=spec, root=False, progress=False,
                      kernel_rules=KernelRules(in_step=4, in_penalty=1.5))
    assert np.all(PlanFeaturizer(spec, bare).frame(plans)[list(MISS_FEATURES)].to_numpy() == 0)


def test_a_conv_reads_only_the_taps_that_meet_its_input():
    from autoprune.types import LayerSpec, OpKind

    def conv(size, k=3, stride=1, pad=1):
        return LayerSpec(op=OpKind.CONV2D, in_channels=512, out_channels=512, kernel=(k, k),
                         stride=(stride, stride), padding=(pad, pad), dilation=(1, 1),
                         input_size=(size, size), bias=False)

    assert conv(1).tap_fraction == pytest.approx(1 / 9)  # the centre tap only
    assert conv(1).touched_params == pytest.approx(conv(1).params / 9)
    assert conv(2, stride=2).tap_fraction == pytest.approx(4 / 9)  # 2x2 -> 1x1: taps 1 and 2
    assert conv(2).tap_fraction == 1.0  # 2x2 output: every tap meets the input somewhere
    assert conv(56).tap_fraction == 1.0
    assert conv(1, k=1, pad=0).tap_fraction == 1.0
    assert conv(224, k=7, stride=2, pad=3).tap_fraction == 1.0
    lin = LayerSpec(op=OpKind.LINEAR, in_channels=512, out_channels=10)
    assert lin.touched_params == lin.params


@pytest.mark.filterwarnings("ignore:analyze:UserWarning")
def test_the_table_model_prices_plans_between_its_anchors_with_the_streaming_term():
    # the synthetic device pays 0.029 ms per MB of weights read beyond 16 MB, as the hinge
    # curve says: the dense resnet18 at 64² (44.7 MB) streams, the 0.25 anchor (about 3 MB)
    # does not, so a line through the two table sums over-prices the plans between them
    import torch

    from autoprune.executor import apply_plan
    from autoprune.latency._model import TableLatencyModel
    from autoprune.zoo import torchvision_model

    model = torchvision_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    device = ap.get_backend("synthetic", protocol=ProtocolSettings.quick(), cache_mb=16.0,
                            cache_penalty_ms_per_mb=0.029)
    spec = ap.analyze(model, (x,))
    anchors = [PruningPlan.dense(spec), PruningPlan.uniform(spec, 0.25)]
    # (on the width grid the table measured: the table sum is exact there)
    mids = [PruningPlan.uniform(spec, r) for r in (0.5, 0.75)]
    truth = np.array([device.model_cost_ms(apply_plan(model, p, x, spec=spec), x) for p in mids])
    errors = {}
    for name, rules in (("with", KernelRules(weight_stream=_hinge_curve())),
                        ("without", KernelRules())):
        table = ap.profile(model, x, device, spec=spec, root=False, progress=False,
                           kernel_rules=rules)
        tm = TableLatencyModel(table, spec).fit(model, x, device, anchors)
        errors[name] = np.abs(tm.predict_many(mids) / truth - 1.0)
        if name == "with":  # the term added: the dense plan streams, the 0.25 plan does not
            extra = tm.base_ms(anchors) - tm.table_sum_ms(anchors)
            assert extra[0] == pytest.approx(0.029 * (44.7 - 16), rel=0.02)
            assert extra[1] == pytest.approx(0.0, abs=1e-9)
    assert errors["with"].max() < 1e-6  # the device's own law, on the grid
    assert errors["without"].max() > 0.01  # a line through the table sums misses it
