"""Latency model v2: kernel rules detected per device, regime-aware pricing, and a predictor
that prices every valid plan (never raises, never <= 0, with an interval)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _latency_helpers import CountingSynthetic, conv2d
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoprune as ap
from autoprune.latency import KernelRules, LatencyPredictor, cached_kernel_rules
from autoprune.latency._featurize import PlanFeaturizer
from autoprune.latency._rules import fit_penalty, fit_staircase, rules_from_sweep
from autoprune.latency._sampler import PLAN_KINDS, PlanSampler
from autoprune.measure import ProtocolSettings
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import Structure

#: a device with ONNX Runtime's AVX2 regimes (BENCHMARKS.md "Kernel rules"): outputs step by 8,
#: inputs off a multiple of 4 cost 1.3x, depthwise channels off a multiple of 4 cost 3x
REGIMES = dict(alignment=8, in_step=4, in_penalty=1.3, dw_step=4, dw_penalty=3.0)


def _device(**kw):
    return ap.get_backend("synthetic", protocol=ProtocolSettings.quick(), **{**REGIMES, **kw})


# ------------------------------------------------------------------------------------------
# Rule fitting and detection
# ------------------------------------------------------------------------------------------
def test_rule_fits_find_staircase_penalty_and_nothing_in_noise():
    rng = np.random.default_rng(0)
    w = np.arange(40, 81)
    stair = 0.1 + 0.01 * np.ceil(w / 8) * 8 * (1 + 0.01 * rng.standard_normal(len(w)))
    assert fit_staircase(w, stair)[0] == 8
    pen = (0.1 + 0.01 * w) * np.where(w % 4 == 0, 1.0, 1.3)
    step, factor, _ = fit_penalty(w, pen * (1 + 0.01 * rng.standard_normal(len(w))))
    assert step == 4 and factor == pytest.approx(1.3, rel=0.05)
    noise = 1.0 + 0.02 * rng.standard_normal(len(w))  # flat and noisy: no rule
    assert fit_staircase(w, noise)[0] == 1
    assert fit_penalty(w, noise)[0] == 1
    # off-step widths that are *cheaper* are not a penalty rule
    assert fit_penalty(w, (0.1 + 0.01 * w) * np.where(w % 4 == 0, 1.0, 0.8))[0] == 1


def test_kernel_rules_are_detected_from_fixed_layers_once_per_device(tmp_path):
    device = CountingSynthetic(protocol=ProtocolSettings.quick(), **REGIMES)
    rules = cached_kernel_rules(device, cache=tmp_path)
    assert (rules.out_step, rules.in_step, rules.dw_step) == (8, 4, 4)
    assert rules.in_penalty == pytest.approx(1.3, rel=0.05)
    assert rules.dw_penalty == pytest.approx(3.0, rel=0.05)
    assert rules.alignment == 8
    swept = len(device.measured)
    assert swept > 0
    # the second call (any model, any process) reads the per-device cache: no new sweep
    again = cached_kernel_rules(device, cache=tmp_path)
    assert again == rules and len(device.measured) == swept
    path = tmp_path / "devices" / device.device_info().device_id / "kernel_rules.json"
    assert path.exists()
    path.write_text("{not json")
    with pytest.raises(ap.errors.CorruptFileError, match="kernel_rules.json"):
        cached_kernel_rules(device, cache=tmp_path)


@pytest.mark.filterwarnings("ignore:analyze:UserWarning")
def test_every_model_on_one_device_gets_the_same_alignment(tmp_path):
    import torch

    from autoprune import zoo

    device = _device()
    tables = {}
    for name, model, x in (
        ("conv1d", zoo.conv1d_net().eval(), torch.randn(1, 1, 40)),
        ("resnet18", zoo.torchvision_model("resnet18", num_classes=10).eval(),
         torch.randn(1, 3, 32, 32)),
        ("mobilenet_v2", zoo.torchvision_model("mobilenet_v2", num_classes=10).eval(),
         torch.randn(1, 3, 32, 32)),
    ):
        tables[name] = ap.profile(model, x, device, root=tmp_path / name, progress=False,
                                  max_entries=0)
    rules = {n: t.kernel_rules for n, t in tables.items()}
    assert len(set(rules.values())) == 1, rules
    assert {t.alignment for t in tables.values()} == {8}
    # recorded with the table and read back
    reloaded = ap.LatencyTable.load(tables["resnet18"].path)
    assert reloaded.kernel_rules == rules["resnet18"]


# ------------------------------------------------------------------------------------------
# Regime-aware table pricing
# ------------------------------------------------------------------------------------------
def _regime_table(**kw):
    device = _device(**kw)
    rules = rules_from_sweep(range(40, 81), *(
        [device.layer_cost_ms(s) for s, _, _ in items]
        for items in _sweep_parts()))
    table = ap.LatencyTable(device.device_info(), alignment=rules.alignment)
    table.kernel_rules = rules
    for ci in (16, 32, 64, 96):
        for co in (16, 32, 64, 96):
            s = conv2d(ci, co, 14)
            table.add(s, "none", 1.0, device.measure_layer(s))
    for c in (16, 32, 64, 96):
        s = conv2d(c, c, 14, groups=c)
        table.add(s, "none", 1.0, device.measure_layer(s))
    return device, table


def _sweep_parts():
    from autoprune.latency._rules import sweep_items

    items = sweep_items()
    n = len(items) // 3
    return items[:n], items[n:2 * n], items[2 * n:]


def test_widths_straddling_a_regime_boundary_are_priced_on_the_right_side():
    device, table = _regime_table()

    def price(ci, co=64, groups=1):
        return table.lookup(conv2d(ci, co, 14, groups=groups), policy="interpolate")

    # 61 input channels run the slow path: dearer than 64, which is dearer than 60
    assert price(61) > price(64) > price(60)
    assert price(61) == pytest.approx(device.layer_cost_ms(conv2d(61, 64, 14)), rel=0.05)
    # 57..64 output channels sit on one step of the staircase
    assert price(64, 57) == pytest.approx(price(64, 64))
    # a depthwise conv off its step costs about 3x the fast path, at its own width (the plain
    # kernel pads nothing): 65 channels cost less than 71, though both round up to 72
    assert price(90, 90, 90) == pytest.approx(3.0 * price(92, 92, 92) * 90 / 96, rel=0.05)
    assert price(92, 92, 92) < price(90, 90, 90)
    for c in (65, 71, 90):
        s = conv2d(c, c, 14, groups=c)
        assert price(c, c, c) == pytest.approx(device.layer_cost_ms(s), rel=0.05), c
    assert price(65, 65, 65) < 0.95 * price(71, 71, 71)
    # a grouped conv (8 groups) follows the input rule per group: 8 x 14 = 112 channels sit
    # off the step of 4 per group, 8 x 16 = 128 on it
    for c in (64, 128):
        s = conv2d(c, c, 14, groups=8)
        table.add(s, "none", 1.0, device.measure_layer(s))
    s = conv2d(112, 112, 14, groups=8)
    assert table.kernel_rules.off_fast_path(s)
    assert not table.kernel_rules.off_fast_path(conv2d(128, 128, 14, groups=8))
    grouped = table.lookup(s, policy="interpolate")
    assert grouped == pytest.approx(device.layer_cost_ms(s), rel=0.05)
    # a rounding-up table without rules cannot see the input-channel cliff
    plain = ap.LatencyTable(table.device, alignment=8)
    for e in table:
        plain.add(e.spec, e.structure, e.density, e.sample)
    assert plain.lookup(conv2d(61, 64, 14), policy="interpolate") <= \
        plain.lookup(conv2d(64, 64, 14))
    assert grouped > 1.2 * plain.lookup(s, policy="interpolate")  # nor the per-group rule


def test_input_widths_on_the_step_are_priced_at_their_padded_block():
    """An AVX-512 Xeon (BENCHMARKS.md "Kernel rules"): inputs on the step of 4 still cost the
    vector block of 16 they are padded to (52 in costs what 64 in costs); off the step (61) they
    run the plain kernel at their own width. A device with blocks of 16 here."""
    device, table = _regime_table(alignment=16, in_block=16)
    rules = table.kernel_rules
    assert (rules.out_step, rules.in_step, rules.in_block) == (16, 4, 16)
    assert rules.alignment == 16 and not rules.is_fast_width(52)

    def price(ci):
        return table.lookup(conv2d(ci, 64, 14), policy="interpolate")

    truth = {ci: device.layer_cost_ms(conv2d(ci, 64, 14)) for ci in (52, 60, 61, 64)}
    assert truth[52] == pytest.approx(truth[64]) and truth[61] > truth[64]
    for ci, want in truth.items():  # a table grid of 16, 32, 64, 96 and the rules
        assert price(ci) == pytest.approx(want, rel=0.05), ci
    # without the block (rules fitted before it existed) 52 is interpolated, 20% too cheap
    flat = ap.LatencyTable(table.device, alignment=16)
    flat.kernel_rules = KernelRules(out_step=16, in_step=4, in_penalty=rules.in_penalty)
    for e in table:
        flat.add(e.spec, e.structure, e.density, e.sample)
    assert flat.lookup(conv2d(52, 64, 14), policy="interpolate") < 0.9 * truth[52]


def test_rules_stored_before_the_block_are_refitted_from_their_sweep():
    device, table = _regime_table(alignment=16, in_block=16)
    old = table.kernel_rules.to_dict()
    del old["in_block"]
    assert KernelRules.from_dict(old) == table.kernel_rules
    no_sweep = {k: v for k, v in old.items() if k != "sweep"}
    assert KernelRules.from_dict(no_sweep).in_block == 1


def test_grouped_convs_follow_their_own_per_group_step(tmp_path):
    """The AVX-512 Xeon (BENCHMARKS.md "Kernel rules"): a grouped conv runs the blocked kernel
    only when its per-group width is a multiple of the 16-float block (12 per group is on the
    input step of 4, yet slow), as ONNX Runtime's NCHWc transformer requires. Detected by its
    own sweep; the search space then offers RegNet's group-width-16 groups only 16."""
    import torch

    from autoprune import zoo
    from autoprune.space import SearchSpace

    device = CountingSynthetic(protocol=ProtocolSettings.quick(),
                               **{**REGIMES, "alignment": 16, "group_step": 16,
                                  "group_penalty": 2.0})
    rules = cached_kernel_rules(device, cache=tmp_path)
    assert (rules.in_step, rules.group_step) == (4, 16)
    assert rules.group_penalty == pytest.approx(2.0, rel=0.05)
    assert rules.off_fast_path(conv2d(96, 96, 14, groups=8))  # 12 per group
    assert not rules.off_fast_path(conv2d(128, 128, 14, groups=8))
    assert rules.off_fast_path(conv2d(96, 128, 14, groups=8))  # the output side counts too

    model = zoo.torchvision_model("regnet_x_400mf", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = ap.analyze(model, x)
    table = ap.profile(model, x, device, spec=spec, root=tmp_path / "t", progress=False,
                       max_entries=0)
    space = SearchSpace.from_spec(spec, table)
    grouped = [c for g, c in space.groups.items() if spec.groups[g].unit_size > 1]
    assert grouped and all(c.widths == (16,) for c in grouped)
    # so do the predictor's sampled search-space plans
    sampler = PlanSampler(spec, 16, group_step=16)
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert not {c.name for c in grouped} & set(sampler.plan_of_kind("space", rng).groups)
    # a table whose rules apply the input step per group (rules cached before the sweep)
    table.kernel_rules = KernelRules.from_dict({"out_step": 16, "in_step": 4, "in_penalty": 1.3,
                                                "dw_step": 1, "dw_penalty": 1.0, "in_block": 1})
    assert table.kernel_rules.group_step == 4
    space4 = SearchSpace.from_spec(spec, table)
    assert all(set(space4.groups[c.name].widths) <= {4, 8, 12, 16} for c in grouped)
    assert any(len(space4.groups[c.name].widths) > 1 for c in grouped)


# ------------------------------------------------------------------------------------------
# The predictor on a real torchvision model: every valid plan priced
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def regnet(tmp_path_factory):
    """regnet_x_400mf (whose keep-0.3 plan once made predict raise) on the regime device,
    fitted on a dataset whose 'measurements' are a known function of the table (no timing)."""
    import torch

    from autoprune import zoo

    model = zoo.torchvision_model("regnet_x_400mf", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = ap.analyze(model, x)
    device = _device()
    table = ap.profile(model, x, device, spec=spec, root=tmp_path_factory.mktemp("t"),
                       progress=False)
    sampler = PlanSampler(spec, table.alignment)
    plans = sampler.sample(np.random.default_rng(0), 40)
    feats = PlanFeaturizer(spec, table).frame([p for _, p in plans])
    measured = 1.1 * feats["table_ms"] + 0.3 * feats["off_act_m"] + 0.05
    rows = pd.DataFrame({"plan_json": [p.to_json(indent=None) for _, p in plans],
                         "kind": [k for k, _ in plans], "measured_ms": measured})
    pred = LatencyPredictor(random_state=0).fit(table=table, spec=spec, dataset=rows)
    return spec, table, pred


def test_sampler_covers_every_plan_kind(regnet):
    spec, table, _ = regnet
    kinds = {k for k, _ in PlanSampler(spec, table.alignment).sample(
        np.random.default_rng(1), 60)}
    assert kinds == {"dense", *PLAN_KINDS}


def test_predictor_reports_by_kind_and_an_interval(regnet):
    _, _, pred = regnet
    assert set(pred.report_by_kind_.index.get_level_values("kind")) <= {"dense", *PLAN_KINDS}
    lo, hi = pred.interval_ratio_
    assert 0 < lo <= 1.0 <= hi
    assert 0.0 <= pred.report_.attrs["interval_coverage"] <= 1.0
    assert pred.report_.loc["predictor", "mape"] < 0.05  # the target is a function of features


def test_cross_validation_trains_on_the_dense_plan_in_every_fold(regnet, monkeypatch):
    """The dense plan reads the most weights of any plan and is in every real fit: a fold
    without it scored extrapolations no prediction makes (the quickstart's band once fell to
    0.18x its prediction). It trains in every fold and gets no out-of-fold prediction."""
    _, _, pred = regnet
    rows = pred.dataset_[pred.dataset_["split"] == "train"]
    x = rows[pred.feature_names_].to_numpy(float)
    y = rows["latency_ms"].to_numpy(float)
    anchor = rows["kind"].to_numpy() == "dense"
    assert anchor.sum() == 1
    dense_row = x[anchor][0]
    fitted_on: list[np.ndarray] = []
    make = pred._make

    def recording(name):
        reg = make(name)
        fit = reg.fit

        def fit_and_record(xs, ys):
            fitted_on.append(xs)
            return fit(xs, ys)

        reg.fit = fit_and_record
        return reg

    monkeypatch.setattr(pred, "_make", recording)
    _, _, oof = pred._choose(x, y, anchor)
    assert len(fitted_on) >= pred.cv_folds
    assert all((xs == dense_row).all(axis=1).any() for xs in fitted_on)
    assert np.isnan(oof[anchor]).all() and np.isfinite(oof[~anchor]).all()


def test_a_plan_below_the_table_grid_is_priced(regnet):
    spec, _, pred = regnet
    for ratio in (0.3, 0.05, 0.01):  # 0.3 once raised TableMissError; far below the grid too
        plan = PruningPlan.uniform(spec, ratio, alignment=1)
        v = pred.predict(plan)
        assert np.isfinite(v) and v > 0
        lo, hi = pred.predict_interval([plan])
        assert lo[0] <= v <= hi[0]


@st.composite
def _plans(draw, spec):
    plan = PruningPlan(alignment=draw(st.sampled_from([1, 2, 3, 4, 8, 16])),
                       model_fingerprint=spec.fingerprint, model_name=spec.model_name)
    for g in spec.groups.values():
        choice = draw(st.sampled_from([s for s in g.allowed]))
        if choice == Structure.BLOCK:
            plan.groups[g.name] = GroupPlan(Structure.BLOCK)
        elif choice in (Structure.CHANNEL, Structure.UNSTRUCTURED):
            plan.groups[g.name] = GroupPlan(choice, draw(st.floats(0.001, 1.0)))
        elif choice == Structure.NM:
            plan.groups[g.name] = GroupPlan(Structure.NM, 0.5)
    return plan


def test_valid_plans_never_raise_and_are_positive(regnet):
    spec, _, pred = regnet

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_plans(spec))
    def check(plan):
        plan.validate(spec)
        v = pred.predict(plan)
        assert np.isfinite(v) and v > 0

    check()


def test_kernel_rules_round_trip_and_refuse_bad_files():
    rules = KernelRules(out_step=8, in_step=4, in_penalty=1.3, dw_step=4, dw_penalty=3.0)
    assert KernelRules.from_dict(rules.to_dict()) == rules
    with pytest.raises(ap.errors.CorruptFileError, match="rules.json"):
        KernelRules.from_dict({"out_step": 0, "in_step": 1, "in_penalty": 1, "dw_step": 1,
                               "dw_penalty": 1}, source="rules.json")
