"""Every model family: analyze, apply a random plan mixing all structures, check the result.

One module-scoped fixture per family analyses the model once; the checks below share it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autoprune import masks, zoo
from autoprune._analyze import analyze
from autoprune.executor import apply_plan
from autoprune.plan import PruningPlan, random_plan
from autoprune.types import Structure

torch.set_num_threads(1)

FAMILIES = [
    "mlp",
    "conv1d_net",
    "resnet18",
    "mobilenet_v2",
    "resnet50",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "shufflenet_v2_x0_5",
    "densenet121",
    "regnet_x_400mf",
    "convnext_tiny",
    "vit_b_16",
]


def make_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if name == "mlp":
        return zoo.mlp().eval(), torch.randn(2, 64)
    if name == "conv1d_net":
        return zoo.conv1d_net().eval(), torch.randn(2, 1, 40)
    kwargs = {"image_size": 32} if name.startswith("vit") else {}
    model = zoo.torchvision_model(name, **kwargs)
    _randomize_norms(model)
    return model.eval(), torch.randn(2, 3, 32, 32)


def _randomize_norms(model: nn.Module) -> None:
    """Random BN statistics/affines so that channels differ (fresh init has gamma == 1)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def weight_counts(model: nn.Module) -> int:
    """Weight + bias elements of every conv / linear layer (attention in-projections too)."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        if isinstance(m, nn.MultiheadAttention):
            total += m.in_proj_weight.numel()
            total += m.in_proj_bias.numel() if m.in_proj_bias is not None else 0
    return total


def mods_spec(spec, plan) -> dict:
    return {pl.name: pl.spec for pl in spec.pruned_layers(plan)}


def _mixed_plan(spec, seed: int) -> PruningPlan:
    """A random plan that contains every structure the model offers (retrying seeds)."""
    offered = {s for g in spec.groups.values() for s in g.allowed} - {Structure.NONE}
    best, best_n = None, -1
    for k in range(40):
        plan = random_plan(spec, np.random.default_rng(seed + k), block_probability=0.3)
        used = {gp.structure for gp in plan.groups.values()}
        if used >= offered:
            return plan
        if len(used & offered) > best_n:
            best, best_n = plan, len(used & offered)
    assert best is not None
    return best


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    model, x = make_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = analyze(model, x, model_name=name)
    plan = _mixed_plan(spec, seed=0)
    pruned = apply_plan(model, plan, x, spec=spec)
    return {
        "name": name, "model": model, "x": x, "spec": spec, "plan": plan,
        "pruned": pruned, "before": before,
    }


def test_analyze_finds_groups_and_layers(family):
    spec, model = family["spec"], family["model"]
    channel_groups = [g for g in spec.groups.values() if g.kind == "channel"]
    assert channel_groups, "no prunable channel group found"
    assert any(Structure.CHANNEL in g.allowed for g in channel_groups)
    # every conv/linear module that ran is recorded, with segments summing to its widths
    for name, lay in spec.layers.items():
        assert sum(c for _, c in lay.in_segments) == lay.spec.in_channels, name
        assert sum(c for _, c in lay.out_segments) == lay.spec.out_channels, name
    for path, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not path.endswith("out_proj"):
            assert path in spec.layers, path
    # dense counts match the real model
    assert spec.count()[1] == weight_counts(model)
    # the classifier output and the input channels are fixed
    assert any("model output" in why for why in spec.fixed.values())
    assert any("model input" in why for why in spec.fixed.values())
    assert spec.count() == type(spec).from_dict(spec.to_dict()).count()


def test_pruned_model_runs_and_counts_match_spec(family):
    spec, plan, pruned, model, x = (family[k] for k in ("spec", "plan", "pruned", "model", "x"))
    with torch.no_grad():
        y0, y1 = model(x), pruned(x)
    assert y1.shape == y0.shape
    assert torch.isfinite(y1).all()
    macs, params = spec.count(plan)
    assert weight_counts(pruned) == params
    dense_macs, dense_params = spec.count()
    if any(gp.structure in (Structure.CHANNEL, Structure.BLOCK) for gp in plan.groups.values()):
        assert params < dense_params and macs < dense_macs
    # per-layer widths equal the spec's prediction
    mods = dict(pruned.named_modules())
    for pl in spec.pruned_layers(plan):
        m = mods.get(pl.name)
        if isinstance(m, nn.Linear):
            assert (m.in_features, m.out_features) == (pl.spec.in_channels, pl.spec.out_channels), pl.name
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            assert (m.in_channels, m.out_channels, m.groups) == (
                pl.spec.in_channels, pl.spec.out_channels, pl.spec.groups), pl.name
    for path, m in pruned.named_modules():
        if isinstance(m, nn.MultiheadAttention) and f"{path}.attention" in mods_spec(spec, plan):
            att = mods_spec(spec, plan)[f"{path}.attention"]
            assert (att.in_channels, att.groups) == (m.embed_dim, m.num_heads), path
            inp = mods_spec(spec, plan)[f"{path}.in_proj"]
            assert (inp.out_channels, inp.in_channels) == tuple(m.in_proj_weight.shape), path
    # removed blocks are identities
    for name, gp in plan.groups.items():
        if gp.structure == Structure.BLOCK:
            assert isinstance(pruned.get_submodule(name), nn.Identity)


def test_masks_hit_pattern_and_sparsity_exactly(family):
    spec, plan, pruned = family["spec"], family["plan"], family["pruned"]
    got = masks.get_masks(pruned)
    n_checked = 0
    removed = [n for n, gp in plan.groups.items() if gp.structure == Structure.BLOCK]
    for name, gp in plan.groups.items():
        if gp.structure not in (Structure.NM, Structure.UNSTRUCTURED):
            continue
        for producer in spec.groups[name].producers:
            if any(producer.startswith(b + ".") for b in removed):
                continue
            key = (producer.rsplit(".", 1)[0] + ".in_proj_weight"
                   if producer.endswith(".in_proj") else producer + ".weight")
            assert key in got, key
            owner, attr = key.rsplit(".", 1)
            w = getattr(pruned.get_submodule(owner), attr)
            if gp.structure == Structure.NM:
                assert masks.check_nm(w, gp.n, gp.m), key
                assert masks.check_nm(got[key], gp.n, gp.m), key
            else:
                n_zero = int(round(w.numel() * (1 - gp.keep_ratio)))
                assert int((got[key] == 0).sum()) == n_zero, key
                assert int((w == 0).sum()) >= n_zero, key
            n_checked += 1
    if any(gp.structure in (Structure.NM, Structure.UNSTRUCTURED) for gp in plan.groups.values()):
        assert n_checked > 0


def test_original_model_unchanged(family):
    model, before = family["model"], family["before"]
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert not masks.get_masks(model)


def test_onnx_export_matches_torch(family, tmp_path):
    from autoprune.onnx_export import to_onnx

    pruned, x = family["pruned"], family["x"]
    path = to_onnx(pruned, x, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = pruned(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_random_plans_counts_exact(family):
    """Another random plan (channels and blocks only, l1): parameter counts exactly as predicted."""
    spec, model, x = family["spec"], family["model"], family["x"]
    for seed in (11,):
        plan = random_plan(spec, np.random.default_rng(seed), structures=("channel", "block"))
        pruned = apply_plan(model, plan, x, spec=spec, importance="l1")
        assert weight_counts(pruned) == spec.count(plan)[1]
        with torch.no_grad():
            assert pruned(x).shape == model(x).shape


def test_uniform_channel_plan_with_alignment(family):
    spec, model, x = family["spec"], family["model"], family["x"]
    plan = PruningPlan.uniform(spec, keep_ratio=0.5, structure="channel", alignment=8)
    pruned = apply_plan(model, plan, x, spec=spec)
    assert weight_counts(pruned) == spec.count(plan)[1]
    kept = spec.kept_units(plan)
    for name, gp in plan.groups.items():
        g = spec.groups[name]
        if g.units > 8:
            assert kept[name] % 8 == 0 or kept[name] == g.units
