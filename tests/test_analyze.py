"""analyze(): group structure, layer shapes, fused ops, blocks, fixed parts, errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest
import torch
import torchvision
from torch import nn

from autoprune import zoo
from autoprune._analyze import analyze
from autoprune.errors import InvalidInputError, UnsupportedLayerError
from autoprune.types import ModelSpec, OpKind, Structure

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet18_spec():
    torch.manual_seed(0)
    model = zoo.torchvision_model("resnet18").eval()
    return model, analyze(model, torch.randn(2, 3, 32, 32), model_name="resnet18")


def test_resnet18_groups_follow_the_residual_stream(resnet18_spec):
    _, spec = resnet18_spec
    g = spec.groups["conv1"]  # stem + layer1's residual stream are one group
    assert g.kind == "channel" and g.units == 64
    assert set(g.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    assert {"layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1",
            "layer2.0.downsample.0"} <= set(g.members)
    # the stem conv reads 3 input channels: nm impossible; channel removal allowed
    assert Structure.CHANNEL in g.allowed and Structure.NM not in g.allowed
    inner = spec.groups["layer1.0.conv1"]
    assert inner.producers == ("layer1.0.conv1",)
    assert set(inner.allowed) == {Structure.NONE, Structure.CHANNEL, Structure.NM,
                                  Structure.UNSTRUCTURED}
    assert "layer2.0.conv2" in spec.groups  # layer2 stream named after its first producer
    assert sum(1 for x in spec.groups.values() if x.kind == "channel") == 12


def test_resnet18_layer_specs_from_the_forward_pass(resnet18_spec):
    _, spec = resnet18_spec
    c1 = spec.layers["conv1"].spec
    assert (c1.op, c1.in_channels, c1.out_channels) == (OpKind.CONV2D, 3, 64)
    assert (c1.kernel, c1.stride, c1.padding, c1.input_size, c1.batch) == (
        (7, 7), (2, 2), (3, 3), (32, 32), 2)
    assert c1.bias is False and c1.dtype == "float32"
    assert c1.fused == "bn+relu"
    assert spec.layers["layer1.0.conv2"].spec.fused == "bn+add+relu"
    assert spec.layers["layer1.0.conv2"].spec.input_size == (8, 8)
    fc = spec.layers["fc"].spec
    assert (fc.op, fc.in_channels, fc.out_channels, fc.input_size) == (OpKind.LINEAR, 512, 10, ())
    assert spec.layers["layer1.0.conv1"].in_segments == (("conv1", 64),)
    assert spec.layers["fc"].out_segments == ((None, 10),)


def test_resnet18_fixed_parts_and_blocks(resnet18_spec):
    _, spec = resnet18_spec
    assert "model output" in spec.fixed["fc"]
    assert "model input" in spec.fixed["conv1.in_channels"]
    assert all(g.name != "fc" for g in spec.groups.values())
    blocks = sorted(n for n, g in spec.groups.items() if g.kind == "block")
    # blocks with a downsample shortcut are not identity-residual
    assert blocks == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert spec.groups["layer1.0"].allowed == (Structure.NONE, Structure.BLOCK)
    assert spec.layers["layer1.0.conv2"].block == "layer1.0"
    assert spec.layers["layer2.0.conv1"].block is None


def test_spec_json_round_trip(resnet18_spec):
    _, spec = resnet18_spec
    back = ModelSpec.from_dict(spec.to_dict())
    assert back.fingerprint == spec.fingerprint
    assert back.groups == spec.groups and back.layers == spec.layers


def test_analyze_leaves_the_model_alone():
    model = zoo.conv1d_net().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, torch.randn(4, 1, 40))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mobilenet_v2_depthwise_chain():
    model = zoo.torchvision_model("mobilenet_v2").eval()
    spec = analyze(model, torch.randn(1, 3, 32, 32))
    dw = spec.layers["features.2.conv.1.0"].spec
    assert dw.op == OpKind.DWCONV2D and dw.groups == dw.in_channels == dw.out_channels == 96
    g = spec.groups["features.2.conv.0.0"]  # expand conv -> depthwise -> project
    assert "features.2.conv.1.0" in g.members and "features.2.conv.1.0" not in g.producers
    assert spec.layers["features.2.conv.1.0"].in_segments == (("features.2.conv.0.0", 96),)
    assert spec.layers["features.2.conv.1.0"].spec.fused == "bn+relu6"
    # inverted residuals with use_res_connect are blocks
    blocks = {n for n, x in spec.groups.items() if x.kind == "block"}
    assert "features.3" in blocks and "features.2" not in blocks


def test_densenet_concat_inputs_have_several_segments():
    model = zoo.torchvision_model("densenet121").eval()
    spec = analyze(model, torch.randn(1, 3, 32, 32), check=False)
    lay = spec.layers["features.denseblock1.denselayer3.conv1"]
    assert [c for _, c in lay.in_segments] == [64, 32, 32]
    assert lay.in_segments[1][0] == "features.denseblock1.denselayer1.conv2"
    assert lay.in_segments[2][0] == "features.denseblock1.denselayer2.conv2"


def test_regnet_grouped_convs_shrink_evenly():
    model = zoo.torchvision_model("regnet_x_400mf").eval()
    spec = analyze(model, torch.randn(1, 3, 32, 32))
    b = spec.layers["trunk_output.block1.block1-0.f.b.0"].spec
    assert b.groups == 2
    g = spec.groups["trunk_output.block1.block1-0.f.a.0"]
    assert (g.units, g.unit_size) == (16, 2) and Structure.CHANNEL in g.allowed


def test_vit_attention_and_mlp_groups():
    model = torchvision.models.vit_b_16(weights=None, image_size=32, num_classes=10).eval()
    spec = analyze(model, torch.randn(1, 3, 32, 32), check=False)
    att = spec.layers["encoder.layers.encoder_layer_0.self_attention.attention"].spec
    assert (att.op, att.in_channels, att.groups, att.input_size) == (OpKind.ATTENTION, 768, 12, (5,))  # 4 patches + class token
    inp = spec.layers["encoder.layers.encoder_layer_0.self_attention.in_proj"].spec
    assert (inp.in_channels, inp.out_channels, inp.input_size) == (768, 2304, (5,))
    stream = spec.groups["conv_proj"]
    assert (stream.units, stream.unit_size) == (64, 12)  # embed dim shrinks evenly per head
    mlp = spec.groups["encoder.layers.encoder_layer_0.mlp.0"]
    assert mlp.units == 3072 and Structure.NM in mlp.allowed
    assert spec.layers["encoder.layers.encoder_layer_0.mlp.0"].spec.fused == "gelu"
    blocks = [n for n, g in spec.groups.items() if g.kind == "block"]
    assert len(blocks) == 12 and "encoder.layers.encoder_layer_0" in blocks


class _Weird(nn.Module):
    """A custom layer torch-pruning does not understand (it guesses the pruned dim wrong)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nc,cd->nd", x, self.w)


def _weird_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), _Weird(16), nn.Linear(8, 4))


def test_unsupported_module_names_path_and_type():
    with pytest.raises(UnsupportedLayerError) as e:
        analyze(_weird_net(), torch.randn(2, 8))
    assert e.value.module_path == "2" and e.value.module_type == "_Weird"
    assert "ignore=['2']" in str(e.value)


def test_ignored_module_is_fixed_with_a_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = analyze(_weird_net(), torch.randn(2, 8), ignore=["2"])
    msgs = " ".join(str(w.message) for w in caught)
    assert "'2'" in msgs and "_Weird" in msgs
    assert "ignored" in spec.fixed["2"]
    assert spec.ignored == ("2",)
    assert Structure.CHANNEL not in spec.groups["0"].allowed  # feeds the ignored module
    assert Structure.UNSTRUCTURED in spec.groups["0"].allowed


def test_unsupported_layer_types_and_bad_ignore_paths():
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 1, 5, 5, 5)
    net(x)
    with pytest.raises(UnsupportedLayerError, match="'0' of type Conv3d"):
        analyze(net, x)
    with pytest.raises(InvalidInputError, match="not a module"):
        analyze(zoo.mlp(), torch.randn(1, 64), ignore=["nope"])
    with pytest.raises(InvalidInputError, match=r"list of module paths.*ignore=\['1'\]"):
        analyze(zoo.mlp(), torch.randn(1, 64), ignore="1")
    with pytest.raises(InvalidInputError, match="example_inputs"):
        analyze(zoo.mlp(), "not a tensor")  # type: ignore[arg-type]


def test_shufflenet_channel_shuffle_is_traced_in_parts():
    model = zoo.torchvision_model("shufflenet_v2_x0_5").eval()
    with pytest.warns(UserWarning, match="cannot trace ShuffleNetV2 as a whole"):
        spec = analyze(model, torch.randn(1, 3, 32, 32))
    inner = spec.groups["stage2.0.branch2.0"]  # conv -> depthwise inside a branch
    assert Structure.CHANNEL in inner.allowed
    crossing = spec.groups["stage2.0.branch2.5"]  # output goes through the shuffle
    assert Structure.CHANNEL not in crossing.allowed and Structure.NM in crossing.allowed


def test_inputs_that_do_not_fit_the_model_are_an_input_error():
    with pytest.raises(InvalidInputError, match=r"example_inputs of shape \(1, 3, 40\)"):
        analyze(zoo.conv1d_net(), torch.randn(1, 3, 40))
    from autoprune._analyze import build_graphs

    with pytest.raises(InvalidInputError, match=r"\(1, 32\)"):
        build_graphs(zoo.mlp(), (torch.randn(1, 32),))


def test_swin_functional_attention_needs_ignore_then_works():
    """Swin's attention reads its Linear weights functionally: an error naming it, and with
    ignore=[...] the rest (MLPs, patch merging, blocks) is analysed around it."""
    import numpy as np

    from autoprune.executor import apply_plan
    from autoprune.plan import random_plan

    model = zoo.torchvision_model("swin_t").eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(UnsupportedLayerError, match="'features.1.0.attn' of type ShiftedWindow"):
        analyze(model, x)
    ign = [n for n, m in model.named_modules() if type(m).__name__.startswith("ShiftedWindow")]
    with pytest.warns(UserWarning, match="ignored"):
        spec = analyze(model, x, ignore=ign)
    assert Structure.CHANNEL in spec.groups["features.1.0.mlp.0"].allowed
    assert sum(1 for g in spec.groups.values() if g.kind == "block") == 12
    plan = random_plan(spec, np.random.default_rng(0), structures=("channel", "block"))
    pruned = apply_plan(model, plan, x, spec=spec)
    with torch.no_grad():
        assert pruned(x).shape == (1, 10)


def test_analyze_a_model_that_carries_autoprune_masks():
    """The dry-run check used to remove a channel from a weight but not from its weight_mask
    (a 2:4-masked resnet18 failed with 'size of tensor a (47) must match ... (48)')."""
    import autoprune as ap
    from autoprune.zoo import torchvision_model

    model = torchvision_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    spec = ap.analyze(model, x)
    plan = ap.PruningPlan.dense(spec)
    nm_groups = [g.name for g in spec.groups.values() if Structure.NM in g.allowed][:3]
    assert nm_groups
    for name in nm_groups:
        plan.groups[name] = ap.GroupPlan("nm", n=2, m=4)
    masked = ap.apply_plan(model, plan, x)
    assert any(n.endswith("weight_mask") for n, _ in masked.named_buffers())
    again = ap.analyze(masked, x)
    assert set(again.groups) == set(spec.groups)
    assert {n: g.allowed for n, g in again.groups.items()} == \
        {n: g.allowed for n, g in spec.groups.items()}


class _Attn(nn.Module):
    """A token model around nn.MultiheadAttention (its layer order is part of the pin)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.mha(h, h, h)
        return self.fc(a + h).mean(1)


def test_fingerprint_is_pinned():
    """ModelSpec.fingerprint keys latency tables and measured-plan datasets on disk: these
    values were computed on main before ModelSpec.ignored and the adapter registry existed; a
    change here orphans every user's cached tables."""
    pins = [
        (zoo.mlp(), torch.randn(2, 64), None, "447758f05a048f8e"),
        (zoo.conv1d_net(), torch.randn(2, 1, 40), None, "5aa02dcc04df07cb"),
        (_Attn(), torch.randn(2, 6, 16), None, "e0f48c1320f3c54c"),
        (zoo.mlp(), torch.randn(2, 64), ["3"], "4df947393dc66567"),
        (zoo.mlp(), torch.randn(2, 64), ["3", "2"], "4df947393dc66567"),
    ]
    for model, x, ignore, want in pins:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = analyze(model.eval(), x, ignore=ignore)
        assert spec.fingerprint == want, (type(model).__name__, ignore)
        # the field itself is not hashed: only what ignore= does to layers and groups
        assert dataclasses.replace(spec, ignored=()).fingerprint == want


def test_ignored_round_trips_and_old_dicts_load():
    with pytest.warns(UserWarning, match="ignored"):
        spec = analyze(zoo.conv1d_net().eval(), torch.randn(2, 1, 40), ignore=["8", "0"])
    assert spec.ignored == ("8", "0")  # the user's order
    d = spec.to_dict()
    assert d["ignored"] == ["8", "0"]
    back = ModelSpec.from_dict(json.loads(json.dumps(d)))
    assert back.ignored == ("8", "0") and back.fingerprint == spec.fingerprint
    # a spec saved before the field existed loads with nothing ignored
    old = {k: v for k, v in d.items() if k != "ignored"}
    legacy = ModelSpec.from_dict(old)
    assert legacy.ignored == () and legacy.groups == spec.groups
    assert legacy.fingerprint == spec.fingerprint
    plain = analyze(zoo.conv1d_net().eval(), torch.randn(2, 1, 40))
    assert plain.ignored == () and plain.to_dict()["ignored"] == []
    with pytest.raises(InvalidInputError, match="tuple of module paths.*'conv1'"):
        dataclasses.replace(plain, ignored="conv1")


def test_dry_run_check_returns_a_new_spec():
    """check_channel_groups never edits the spec it is given: a failed group comes back in a
    new ModelSpec."""
    from autoprune._analyze._tpglue import check_channel_groups

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _weird_net().eval()
        x = torch.randn(2, 8)
        unchecked = analyze(model, x, ignore=["2"], check=False)
        before = copy.deepcopy(unchecked.to_dict())
        checked = check_channel_groups(model, (x,), unchecked)
    assert unchecked.to_dict() == before
    assert checked.ignored == unchecked.ignored == ("2",)



def _torch_pruned_resnet18(how: str) -> tuple[nn.Module, nn.Module]:
    """(dense, pruned copy) of a torchvision resnet18 whose convs carry torch.nn.utils.prune
    masks, after a training step and a forward pass with gradients enabled (the masked
    weights are non-leaf tensors then)."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    model = copy.deepcopy(dense)
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            if how == "l1_unstructured":
                prune.l1_unstructured(mod, "weight", amount=0.5)
            else:
                prune.ln_structured(mod, "weight", amount=0.3, n=1, dim=0)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # a training step's forward and backward
    return dense, model.eval()


@pytest.mark.parametrize("how", ["l1_unstructured", "ln_structured"])
def test_analyze_a_model_pruned_with_torch_prune_after_a_forward_pass(how):
    """torch.nn.utils.prune keeps ``weight = weight_orig * weight_mask`` as a non-leaf tensor
    recomputed by a forward pre-hook: copy.deepcopy of such a model raised "Only Tensors
    created explicitly by the user (graph leaves) support the deepcopy protocol" (issue 12).
    analyze works on it, finds the same groups as on the dense model, and leaves it alone."""
    import autoprune as ap

    dense, model = _torch_pruned_resnet18(how)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    model(x)  # a forward pass with gradients enabled: the masked weights are non-leaf again
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)  # the failure the fix has to route around
    weight_before = model.layer1[0].conv1.weight
    spec = ap.analyze(model, x)
    ref = ap.analyze(dense, x)
    assert set(spec.groups) == set(ref.groups)
    assert {n: g.allowed for n, g in spec.groups.items()} == \
        {n: g.allowed for n, g in ref.groups.items()}
    assert spec.layers.keys() == ref.layers.keys()
    # the user's model keeps its pruning reparametrisation and gives the same outputs
    conv = model.layer1[0].conv1
    assert "weight_orig" in dict(conv.named_parameters()) and "weight" not in conv._parameters
    assert "weight_mask" in dict(conv.named_buffers())
    assert conv.weight is weight_before and not conv.weight.is_leaf
    assert conv.weight_orig.grad is not None  # its autograd state is untouched too
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_plain_copy_of_a_torch_pruned_model_runs_like_it():
    from autoprune._analyze._plain import copy_module, has_torch_pruning, without_torch_pruning

    dense, model = _torch_pruned_resnet18("ln_structured")
    x = torch.randn(1, 3, 32, 32)
    model(x)
    assert has_torch_pruning(model) and not has_torch_pruning(dense)
    assert without_torch_pruning(dense) is dense
    same = copy_module(model)  # keeps the hooks: a forward recomputes weight from the copy
    plain = without_torch_pruning(model)
    assert not has_torch_pruning(plain)
    conv = plain.layer1[0].conv1
    assert "weight" in conv._parameters and not hasattr(conv, "weight_orig")
    assert conv.weight.grad is None and model.layer1[0].conv1.weight_orig.grad is not None
    # ln_structured along dim 0 zeroed 30% of the output rows in the plain weight
    zero_rows = int((conv.weight.flatten(1).abs().sum(1) == 0).sum())
    assert zero_rows == round(0.3 * 64)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(plain(x), want, rtol=0, atol=0)
        torch.testing.assert_close(same(x), want, rtol=0, atol=0)
        same.layer1[0].conv1.weight_orig.mul_(0)  # a real copy: the user's model is unchanged
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_diagnose_a_torch_pruned_model_after_a_forward_pass():
    """diagnose reaches its masked-model path on a torch.nn.utils.prune model whose masked
    weights are non-leaf (after a forward pass): masks give no speed, whole channels would."""
    import autoprune as ap

    dense, model = _torch_pruned_resnet18("l1_unstructured")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    model(x)
    cliff = ap.get_backend("synthetic", alignment=8, in_step=4, in_penalty=1.6)
    report = ap.diagnose(model, dense, x, device=cliff)
    assert report.masked and "layer1.0.conv1" in report.masked_layers
    note = " ".join(report.notes)
    assert "masks give no speed" in note and "channel" in note
    assert report.latency_ratio == pytest.approx(1.0, abs=0.02)
    row = report.layers.set_index("layer").loc["layer1.0.conv1"]
    assert row["weight_zero_share"] == pytest.approx(0.5, abs=0.01)
    conv = model.layer1[0].conv1
    assert "weight_orig" in dict(conv.named_parameters())
    assert "weight_mask" in dict(conv.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_apply_plan_and_diagnose_leave_a_torch_pruned_model_alone():
    """apply_plan copies the model it prunes (copy.deepcopy refused a torch.nn.utils.prune model
    after a forward pass); diagnose works on a copy too: the user's masked weight tensor is the
    same object afterwards (the old diagnose swapped it for a detached one)."""
    import autoprune as ap

    dense, model = _torch_pruned_resnet18("l1_unstructured")
    x = torch.randn(1, 3, 32, 32)
    model(x)
    weight_before = model.layer1[0].conv1.weight
    spec = ap.analyze(model, x)
    pruned = ap.apply_plan(model, ap.PruningPlan.uniform(spec, 0.5, alignment=8), x, spec=spec)
    assert pruned.layer1[0].conv1.out_channels == 32
    assert pruned(x).shape == (1, 10)  # plain weights (the masks made permanent), no hooks
    assert "weight" in pruned.layer1[0].conv1._parameters
    assert model.layer1[0].conv1.weight is weight_before
    rep = ap.diagnose(model, dense, x, device=ap.get_backend("synthetic"))
    assert len(rep.layers) > 0
    assert model.layer1[0].conv1.weight is weight_before and not weight_before.is_leaf
