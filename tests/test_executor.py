"""apply_plan: errors, importance criteria, plan/call precedence, mask persistence."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from autoprune import masks, zoo
from autoprune._analyze import analyze
from autoprune.errors import InvalidInputError, InvalidPlanError, UnknownNameError
from autoprune.executor import apply_plan
from autoprune.importance import Importance, MagnitudeImportance, get_importance
from autoprune.plan import GroupPlan, PruningPlan

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = zoo.torchvision_model("resnet18").eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # distinct BN gammas so that bn_gamma differs from magnitude
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.1)
    x = torch.randn(2, 3, 32, 32)
    return model, x, analyze(model, x, model_name="resnet18")


def _plan(spec, **groups: GroupPlan) -> PruningPlan:
    plan = PruningPlan.dense(spec)
    plan.groups.update({k.replace("__", "."): v for k, v in groups.items()})
    return plan


def _kept_rows(original: nn.Conv2d, pruned: nn.Conv2d) -> list[int]:
    """Indices of the original output channels that survive in ``pruned``."""
    out = []
    for row in pruned.weight:
        hits = [i for i, r in enumerate(original.weight) if torch.equal(r[: row.shape[0]], row)]
        assert len(hits) == 1
        out.append(hits[0])
    return out


def test_invalid_plans_name_group_and_allowed_values(resnet):
    model, x, spec = resnet
    with pytest.raises(InvalidPlanError, match="unknown group 'layer9.conv1'"):
        apply_plan(model, _plan(spec, layer9__conv1=GroupPlan("channel", 0.5)), x, spec=spec)
    with pytest.raises(InvalidPlanError, match=r"'nm' not allowed for group 'conv1'; allowed: "
                                                r"none, channel, unstructured"):
        apply_plan(model, _plan(spec, conv1=GroupPlan("nm")), x, spec=spec)
    with pytest.raises(InvalidPlanError, match=r"keep_ratio of group 'layer1.0.conv1'.*1.5"):
        apply_plan(model, _plan(spec, layer1__0__conv1=GroupPlan("channel", 1.5)), x, spec=spec)
    with pytest.raises(InvalidPlanError, match="'block' not allowed for group 'layer1.0.conv1'"):
        apply_plan(model, _plan(spec, layer1__0__conv1=GroupPlan("block")), x, spec=spec)
    other = analyze(zoo.mlp(), torch.randn(1, 64), model_name="mlp")
    with pytest.raises(InvalidPlanError, match="another model"):
        apply_plan(model, PruningPlan.dense(other), x, spec=spec)
    with pytest.raises(InvalidInputError, match="PruningPlan"):
        apply_plan(model, {"groups": {}}, x, spec=spec)  # type: ignore[arg-type]


def test_taylor_without_batch_errors_clearly(resnet):
    model, x, spec = resnet
    plan = _plan(spec, layer1__0__conv1=GroupPlan("channel", 0.5))
    with pytest.raises(InvalidInputError, match=r"taylor.*batch=\(inputs, labels\)"):
        apply_plan(model, plan, x, importance="taylor", spec=spec)
    plan.importance = "taylor"
    with pytest.raises(InvalidInputError, match="batch="):
        apply_plan(model, plan, x, spec=spec)
    with pytest.raises(UnknownNameError, match="known: bn_gamma, l1, l2, random, taylor"):
        get_importance("l3")


def test_importance_criteria_pick_different_channels(resnet):
    model, x, spec = resnet
    plan = _plan(spec, layer1__0__conv1=GroupPlan("channel", 0.5))
    y = torch.tensor([1, 7])
    kept = {}
    for name in ("l1", "l2", "taylor", "bn_gamma", "random"):
        pruned = apply_plan(model, plan, x, importance=name, spec=spec, batch=(x, y))
        conv = pruned.get_submodule("layer1.0.conv1")
        assert conv.out_channels == 32
        kept[name] = frozenset(_kept_rows(model.get_submodule("layer1.0.conv1"), conv))
    assert kept["l1"] != kept["random"]
    assert kept["l2"] != kept["bn_gamma"]
    assert kept["taylor"] != kept["l2"]
    assert len(set(kept.values())) >= 4
    # magnitude keeps the strongest channels of the group root's own weights more often
    w = model.get_submodule("layer1.0.conv1").weight.detach().flatten(1).norm(dim=1)
    assert w[list(kept["l2"])].mean() > w[list(kept["random"])].mean()


def test_argument_overrides_plan_importance(resnet):
    model, x, spec = resnet
    plan = _plan(spec, layer1__0__conv1=GroupPlan("channel", 0.5))
    plan.importance = "random"
    conv0 = model.get_submodule("layer1.0.conv1")
    by_plan = _kept_rows(conv0, apply_plan(model, plan, x, spec=spec).get_submodule("layer1.0.conv1"))
    by_arg = _kept_rows(conv0, apply_plan(model, plan, x, importance="l2", spec=spec)
                        .get_submodule("layer1.0.conv1"))
    plan.importance = "l2"
    by_l2 = _kept_rows(conv0, apply_plan(model, plan, x, spec=spec).get_submodule("layer1.0.conv1"))
    assert by_arg == by_l2 and by_plan != by_l2
    custom = apply_plan(model, plan, x, importance=MagnitudeImportance(2), spec=spec)
    assert _kept_rows(conv0, custom.get_submodule("layer1.0.conv1")) == by_l2
    assert isinstance(get_importance(MagnitudeImportance(1)), Importance)


def test_nm_and_unstructured_masks_follow_importance(resnet):
    model, x, spec = resnet
    plan = _plan(spec, layer1__0__conv1=GroupPlan("nm"),
                 layer2__0__conv1=GroupPlan("unstructured", 0.3))
    pruned = apply_plan(model, plan, x, spec=spec, importance="l1")
    w0 = model.get_submodule("layer1.0.conv1").weight
    w1 = pruned.get_submodule("layer1.0.conv1").weight
    assert masks.check_nm(w1, 2, 4)
    kept = w1 != 0
    # every kept weight is among the two largest |w| of its group of 4 input channels
    chunks = w0.abs().permute(0, 2, 3, 1).reshape(-1, 4)
    kept_c = kept.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.all(kept_c.sum(-1) == 2)
    thr = chunks.sort(-1).values[:, 2:3]
    assert torch.all(chunks[kept_c] >= thr.expand_as(chunks)[kept_c])
    u = pruned.get_submodule("layer2.0.conv1").weight
    assert int((u == 0).sum()) == round(u.numel() * 0.7)
    assert torch.equal(w1[kept], w0[kept])  # surviving weights are untouched


def test_block_removal_and_channel_widths(resnet):
    model, x, spec = resnet
    plan = _plan(spec, layer1__1=GroupPlan("block"), conv1=GroupPlan("channel", 0.4))
    plan.alignment = 8
    pruned = apply_plan(model, plan, x, spec=spec)
    assert isinstance(pruned.layer1[1], nn.Identity)
    kept = spec.kept_units(plan)["conv1"]
    assert kept == 24 and pruned.conv1.out_channels == 24
    assert pruned.layer1[0].conv2.out_channels == 24 and pruned.layer2[0].conv1.in_channels == 24
    assert pruned(x).shape == (2, 10)


def test_pruned_masked_model_state_dict_round_trip(resnet, tmp_path):
    model, x, spec = resnet
    plan = _plan(spec, layer1__0__conv1=GroupPlan("nm"), layer3__0__conv2=GroupPlan("channel", 0.5),
                 layer2__1__conv1=GroupPlan("unstructured", 0.2))
    a = apply_plan(model, plan, x, spec=spec, importance="l2")
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    # a fresh copy of the pruned architecture (different masks) gets a's masks and weights back
    b = apply_plan(model, plan, x, spec=spec, importance="random")
    b = masks.bake(b)
    masks.load_masked_state_dict(b, sd)
    assert masks.get_masks(b).keys() == masks.get_masks(a).keys()
    for k, v in masks.get_masks(a).items():
        assert torch.equal(masks.get_masks(b)[k], v)
    torch.testing.assert_close(b(x), a(x))


def test_train_mode_preserved_and_input_untouched():
    model = zoo.conv1d_net().train()
    x = torch.randn(4, 1, 40)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = analyze(model, x)
    plan = PruningPlan.uniform(spec, 0.5, "channel")
    pruned = apply_plan(model, plan, x, spec=spec)
    assert pruned.training and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in pruned.parameters())


def test_apply_plan_analyses_when_no_spec_is_given():
    model = zoo.mlp().eval()
    x = torch.randn(3, 64)
    spec = analyze(model, x)
    plan = PruningPlan.uniform(spec, 0.25, "channel")
    pruned = apply_plan(model, plan, x)
    assert pruned[1].out_features == 64 and pruned[3].in_features == 64


def test_executor_honours_ignore_from_the_spec_field(monkeypatch):
    """apply_plan hands spec.ignored to the dependency graphs; the human-readable reasons in
    spec.fixed play no part (they used to be parsed for an 'ignored by the user' prefix)."""
    import dataclasses
    import warnings

    from autoprune import executor

    model = zoo.conv1d_net().eval()
    x = torch.randn(2, 1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = analyze(model, x, ignore=["0"])
    assert spec.ignored == ("0",) and "0" not in spec.groups
    seen: list[tuple[str, ...]] = []
    real = executor.build_graphs

    def spy(m, inputs, ignore=()):  # noqa: ANN001, ANN202
        seen.append(tuple(ignore))
        return real(m, inputs, ignore)

    monkeypatch.setattr(executor, "build_graphs", spy)
    plan = PruningPlan.uniform(spec, 0.5, "channel")
    assert "3" in plan.groups
    # reasons rewritten: the executor still ignores "0"
    scrubbed = dataclasses.replace(spec, fixed={k: "kept" for k in spec.fixed})
    pruned = apply_plan(model, plan, x, spec=scrubbed)
    assert seen == [("0",)]
    assert pruned[0].out_channels == 64 and pruned[3].out_channels == 32
    # the old reason text without the field ignores nothing
    seen.clear()
    apply_plan(model, plan, x, spec=dataclasses.replace(spec, ignored=()))
    assert seen == [()]


def test_no_reason_string_is_parsed_anywhere():
    from pathlib import Path

    import autoprune

    root = Path(autoprune.__file__).parent
    hits = [str(p.relative_to(root)) for p in root.rglob("*.py")
            if "ignored by the user" in p.read_text(encoding="utf-8")]
    assert hits == [str(Path("_analyze") / "_core.py")]  # where the reason is written
    text = (root / "_analyze" / "_core.py").read_text(encoding="utf-8")
    assert text.count("ignored by the user") == 1
    assert "startswith(" not in (root / "executor.py").read_text(encoding="utf-8")
