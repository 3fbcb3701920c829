"""``diagnose`` / ``repair`` on models pruned by other tools (Torch-Pruning, torch's prune
utilities, zeroed rows), on a synthetic device with a known cliff and on ONNX Runtime."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn
from torch.nn.utils import prune as torch_prune

import autoprune as ap
from autoprune.backends.synthetic import SyntheticBackend
from autoprune.errors import ModelMismatchError

X = torch.randn(1, 3, 32, 32)
#: output widths step by 8, input widths off a multiple of 4 cost 1.6x: the known cliff
CLIFF = {"alignment": 8, "in_step": 4, "in_penalty": 1.6}


def _tp_prune(model: nn.Module, ratio: float = 0.3) -> nn.Module:
    """Torch-Pruning global magnitude pruning (physically smaller layers), as users run it."""
    m = copy.deepcopy(model).eval()
    head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(
        m, X, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
        global_pruning=True, ignored_layers=head)
    pruner.step()
    return m.eval()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def tp_resnet(resnet) -> nn.Module:
    return _tp_prune(resnet)


@pytest.fixture(scope="module")
def cliff() -> SyntheticBackend:
    return ap.get_backend("synthetic", **CLIFF)


def test_diagnose_reports_misaligned_layers_of_tp_pruned_resnet18(resnet, tp_resnet, cliff, tmp_path):
    report = ap.diagnose(tp_resnet, resnet, X, device=cliff)
    df = report.layers
    assert isinstance(report, ap.DiagnosisReport)
    mods = dict(tp_resnet.named_modules())
    # widths read from the pruned model itself, for every layer
    for row in df.itertuples():
        m = mods[row.layer]
        got = (m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else \
            (m.in_features, m.out_features)
        assert (row.in_after, row.out_after) == got
    # the plan reproduces those widths
    kept = ap.analyze(resnet, X).kept_units(report.plan)
    assert kept == report.kept_units and kept["conv1"] == tp_resnet.conv1.out_channels
    # misaligned = a pruned width off the device's steps, exactly
    for row in df.itertuples():
        off_out = row.out_after != row.out_before and row.out_after % 8 != 0
        off_in = (row.op == "conv2d" and row.in_after != row.in_before
                  and row.in_after > 4 and row.in_after % 4 != 0)
        assert row.misaligned == (off_out or off_in), row.layer
    assert report.misaligned and "conv1" in report.misaligned
    # the layer's latency at the nearest fast widths: below never costs more than now
    mis = df[df["misaligned"]]
    assert (mis["latency_down_ms"] <= mis["latency_after_ms"] + 1e-12).all()
    assert ((mis["out_down"] % 8 == 0) | (mis["out_down"] == mis["out_after"])).all()
    assert df["share"].sum() == pytest.approx(1.0)
    # whole-model latency measured on the device, paired
    truth = cliff.model_cost_ms(tp_resnet, X) / cliff.model_cost_ms(resnet, X)
    assert report.latency_ratio == pytest.approx(truth)
    assert report.pruned_latency_ms == pytest.approx(cliff.model_cost_ms(tp_resnet, X))
    text = str(report)
    assert "off the fast path" in text and "layer1.0.conv1" in text
    assert "<table" in report._repr_html_()
    png = report.plot(tmp_path / "layers.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aligned_pruning_reports_no_misaligned_layer(resnet, cliff):
    spec = ap.analyze(resnet, X)
    plan = ap.PruningPlan.uniform(spec, 0.5, alignment=8)
    pruned = ap.apply_plan(resnet, plan, X, spec=spec)
    report = ap.diagnose(pruned, resnet, X, device=cliff, measure=False)
    assert report.misaligned == []
    assert report.kept_units == spec.kept_units(plan)
    assert "every pruned width is on the device's fast path" in str(report)


def test_repair_is_measured_faster_and_keeps_the_pruned_weights(resnet, tp_resnet, cliff):
    result = ap.repair(tp_resnet, resnet, X, device=cliff)
    assert isinstance(result, ap.RepairResult)
    assert result.changed and not result.rebuilt_from_reference, result.notes
    truth_in = cliff.model_cost_ms(tp_resnet, X)
    truth_out = cliff.model_cost_ms(result.model, X)
    assert truth_out < truth_in
    assert result.repaired_latency_ms == pytest.approx(truth_out)
    assert result.speedup_vs_input > 1.0
    g = result.groups.set_index("group")
    # every rounded group is on the device's step now
    moved = g[g["change"] != 0]
    assert len(moved) and (moved["repaired_units"] % 8 == 0).all()
    assert result.model.conv1.out_channels == g.loc["conv1", "repaired_units"]
    # the pruned model's surviving conv1 channels are in the repaired model, unchanged
    w_in = tp_resnet.conv1.weight.detach().flatten(1)
    w_out = result.model.conv1.weight.detach().flatten(1)
    d = torch.cdist(w_in.double(), w_out.double(), compute_mode="donot_use_mm_for_euclid_dist")
    if g.loc["conv1", "change"] >= 0:
        assert float(d.min(1).values.max()) < 1e-6
    with torch.no_grad():
        assert result.model(X).shape == (1, 10)


def test_repair_with_identity_widths_reproduces_the_pruned_model(cliff):
    """The grafting machinery (depthwise chains, residual adds) gives back the pruned model
    exactly when no width changes, and keeps its values when widths grow."""
    from autoprune._diagnose._match import match_channels, plan_from_widths, read_widths
    from autoprune._diagnose._rebuild import choose_indices, graft

    torch.manual_seed(1)
    ref = torchvision.models.mobilenet_v2(num_classes=10).eval()
    pruned = _tp_prune(ref, 0.4)
    spec = ap.analyze(ref, X)
    _, kept = plan_from_widths(spec, read_widths(pruned, spec))
    idx, why = match_channels(pruned, ref, spec, kept)
    assert idx, why
    same = graft(pruned, ref, spec, (X,), idx, idx)
    with torch.no_grad():
        assert torch.allclose(same(X), pruned(X), atol=1e-5)
    grown = {n: min(spec.groups[n].units, k + 3) for n, k in kept.items()}
    bigger = graft(pruned, ref, spec, (X,), idx, choose_indices(pruned, ref, spec, idx, grown))
    assert bigger.features[0][0].out_channels == grown["features.0.0"]
    keep = [i for i, j in enumerate(
        choose_indices(pruned, ref, spec, idx, grown)["features.0.0"]) if j in idx["features.0.0"]]
    assert torch.equal(bigger.features[0][0].weight[keep][:, :], pruned.features[0][0].weight)


def test_repair_returns_the_input_when_no_candidate_is_faster(resnet, tp_resnet):
    class EverythingSlower(SyntheticBackend):
        def measure_ratio(self, model, reference, example_inputs):
            return (1.0 if model is reference else 1.08), 0.0

    be = EverythingSlower(**CLIFF)
    result = ap.repair(tp_resnet, resnet, X, device=be)
    assert result.model is tp_resnet and not result.changed
    assert result.repaired_latency_ms == result.input_latency_ms
    assert len(result.candidates) and not result.candidates["accepted"].any()
    assert any("returned unchanged" in n for n in result.notes)


def test_repair_meets_a_budget(resnet, tp_resnet, cliff):
    input_ms = cliff.model_cost_ms(tp_resnet, X)
    budget = 0.8 * input_ms
    result = ap.repair(tp_resnet, resnet, X, device=cliff, latency_budget_ms=budget)
    assert result.changed and result.budget_ms == budget
    assert cliff.model_cost_ms(result.model, X) <= budget + 1e-9
    assert result.repaired_latency_ms == pytest.approx(cliff.model_cost_ms(result.model, X))
    # the widest candidate within the budget wins
    within = result.candidates[result.candidates["measured_latency_ms"] <= budget]
    assert ap.analyze(resnet, X).count(result.plan)[0] == within["macs"].max()
    # a budget rounding cannot reach: the fastest faster candidate, and a note saying so
    tight = ap.repair(tp_resnet, resnet, X, device=cliff, latency_budget_ms=0.1 * input_ms)
    assert tight.changed and tight.repaired_latency_ms < input_ms
    assert tight.ratio_to_input == pytest.approx(tight.candidates["ratio_to_input"].min())
    assert any("no candidate meets the budget" in n for n in tight.notes)
    with pytest.raises(ap.errors.InvalidInputError, match="latency_budget_ms"):
        ap.repair(tp_resnet, resnet, X, device=cliff, latency_budget_ms=-1.0)


def test_repair_of_a_finetuned_model_rebuilds_from_the_reference_and_says_so(
        resnet, tp_resnet, cliff):
    tuned = copy.deepcopy(tp_resnet)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    result = ap.repair(tuned, resnet, X, device=cliff)
    assert result.rebuilt_from_reference
    assert any("could not be matched" in n for n in result.notes)
    assert cliff.model_cost_ms(result.model, X) <= cliff.model_cost_ms(tuned, X)


def test_masked_model_is_recognised(resnet, cliff):
    masked = copy.deepcopy(resnet)
    for m in masked.modules():
        if isinstance(m, nn.Conv2d):
            torch_prune.l1_unstructured(m, "weight", amount=0.5)
    report = ap.diagnose(masked, resnet, X, device=cliff, measure=False)
    assert report.masked and "layer1.0.conv1" in report.masked_layers
    note = " ".join(report.notes)
    assert "masks give no speed" in note and "channel" in note
    assert report.accelerated_structures == ["channel"]
    assert report.misaligned == [] and report.kept_units == ap.analyze(resnet, X).kept_units(
        ap.PruningPlan.dense(ap.analyze(resnet, X)))
    row = report.layers.set_index("layer").loc["layer1.0.conv1"]
    assert row["weight_zero_share"] == pytest.approx(0.5, abs=0.01)
    # zeroed output rows (no mask buffer) are counted too
    zeroed = copy.deepcopy(resnet)
    with torch.no_grad():
        zeroed.layer2[0].conv1.weight[:40] = 0
    rep = ap.diagnose(zeroed, resnet, X, device=cliff, measure=False)
    assert rep.layers.set_index("layer").loc["layer2.0.conv1", "zero_out_channels"] == 40
    assert rep.masked_layers == ["layer2.0.conv1"]
    fixed = ap.repair(masked, resnet, X, device=cliff)
    assert fixed.model is masked and not fixed.changed
    assert any("masks give no speed" in n for n in fixed.notes)
    measured = ap.diagnose(masked, resnet, X, device=cliff)  # torch prune hooks: measurable
    assert measured.latency_ratio == pytest.approx(1.0, abs=0.02)
    plain = ap.diagnose(resnet, resnet, X, device=cliff, measure=False)
    assert not plain.masked and plain.notes == []


def test_mismatched_model_names_the_first_differing_module(resnet, cliff):
    other = copy.deepcopy(resnet)
    other.layer2[1].relu = nn.GELU()
    with pytest.raises(ModelMismatchError, match=r"'layer2\.1\.relu'.*ReLU.*GELU"):
        ap.diagnose(other, resnet, X, device=cliff)
    extra = copy.deepcopy(resnet)
    extra.head = nn.Linear(10, 10)
    with pytest.raises(ModelMismatchError, match="'head'.*extra Linear"):
        ap.repair(extra, resnet, X, device=cliff)
    missing = copy.deepcopy(resnet)
    missing.layer4 = missing.layer4[:1]
    with pytest.raises(ModelMismatchError, match=r"'layer4\.1'"):
        ap.diagnose(missing, resnet, X, device=cliff)
    vgg_like = torchvision.models.mobilenet_v2(num_classes=10).eval()
    with pytest.raises(ModelMismatchError):
        ap.diagnose(vgg_like, resnet, X, device=cliff)


def test_cli_diagnose_and_repair(resnet, tp_resnet, tmp_path, capsys):
    from autoprune.cli import main
    from autoprune.io import safe_torch_load

    state = tmp_path / "pruned.pt"
    torch.save(tp_resnet.state_dict(), state)
    common = ["--reference", "torchvision.models:resnet18", "--model-kwargs",
              '{"num_classes": 10}', "--pruned", str(state), "--input-shape", "1,3,32,32",
              "--device", "synthetic"]
    assert main(["diagnose", *common, "--csv", str(tmp_path / "l.csv"),
                 "--plan-out", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "off the fast path" in out and (tmp_path / "l.csv").exists()
    plan = ap.PruningPlan.load(tmp_path / "plan.json")
    assert plan.groups["conv1"].keep_ratio == pytest.approx(tp_resnet.conv1.out_channels / 64)
    assert main(["repair", *common, "--output", str(tmp_path / "rep.pt")]) == 0
    assert "repair: input" in capsys.readouterr().out
    assert isinstance(safe_torch_load(tmp_path / "rep.pt"), dict)
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.randn(80, 3, 7, 7)}, bad)
    assert main(["diagnose", *common[:4], "--pruned", str(bad), *common[6:]]) == 2
    assert "conv1" in capsys.readouterr().err


def test_diagnose_on_onnxruntime_cpu():
    from autoprune.latency import KernelRules
    from autoprune.measure import ProtocolSettings

    be = ap.get_backend("onnxruntime-cpu", threads=1, protocol=ProtocolSettings.quick())
    ref = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 48, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(48, 10)).eval()
    x = torch.randn(1, 3, 16, 16)
    spec = ap.analyze(ref, x)
    pruned = ap.apply_plan(ref, ap.PruningPlan.uniform(spec, 0.7), x, spec=spec)
    table = ap.profile(ref, x, be, root=False, progress=False,
                       kernel_rules=KernelRules(out_step=8, in_step=4, in_penalty=1.2))
    report = ap.diagnose(pruned, ref, x, device=be, table=table)
    assert report.latency_ratio > 0 and report.dense_latency_ms > 0
    assert report.pruned_latency_ms > 0
    assert report.kept_units == spec.kept_units(ap.PruningPlan.uniform(spec, 0.7))
    assert set(report.misaligned) == {"0", "3"}  # 22 and 34 channels: off the step of 8


def test_autoprune_masks_are_recognised_and_measured(resnet, cliff):
    """A model carrying autoprune's own masks analyses and measures (the dry run once failed
    on a weight_mask it did not resize) and is reported as masked."""
    spec = ap.analyze(resnet, X)
    masked = ap.apply_plan(resnet, ap.PruningPlan.uniform(spec, 0.5, "unstructured"), X,
                           spec=spec)
    assert any(n.endswith("weight_mask") for n, _ in masked.named_buffers())
    report = ap.diagnose(masked, resnet, X, device=cliff)
    assert report.masked and len(report.masked_layers) >= 10
    assert "masks give no speed on synthetic" in " ".join(report.notes)
    # unstructured masks run dense on this device: no faster than dense
    assert report.latency_ratio == pytest.approx(1.0, abs=0.02)


def test_repair_rounds_grouped_convs_to_their_per_group_step():
    """RegNet pruned uniformly to 14 of 16 channels per group, on a device whose grouped convs
    need per-group widths on 16 (the AVX-512 Xeon's rule): repair puts them back on 16."""
    from autoprune import zoo
    from autoprune.executor import apply_plan
    from autoprune.plan import PruningPlan

    torch.manual_seed(0)
    ref = zoo.torchvision_model("regnet_x_400mf", num_classes=10).eval()
    spec = ap.analyze(ref, X)
    pruned = apply_plan(ref, PruningPlan.uniform(spec, 0.85, alignment=1), X, spec=spec)
    dev = SyntheticBackend(alignment=8, in_step=4, in_penalty=1.3, group_step=16,
                           group_penalty=2.0)
    report = ap.diagnose(pruned, ref, X, device=dev, measure=False)
    grouped = [n for n, g in spec.groups.items() if g.unit_size > 1]
    assert grouped and set(grouped) <= set(report.plan.groups)
    result = ap.repair(pruned, ref, X, device=dev)
    per_group = [m.in_channels // m.groups for m in result.model.modules()
                 if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert per_group and all(w % 16 == 0 for w in per_group)
    assert result.repaired_latency_ms < result.input_latency_ms
