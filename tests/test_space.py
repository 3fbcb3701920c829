"""SearchSpace: grids on the alignment, structure rules, bounds, frozen groups, YAML presets.

Runs on a hand-built ModelSpec (plus a matching toy nn.Module, used by the other search tests),
so it needs neither analyze nor a backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from torch import nn

from autoprune.errors import SearchSpaceError
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.space import SearchSpace, list_presets
from autoprune.types import (
    Layer,
    LayerSpec,
    ModelSpec,
    OpKind,
    PrunableGroup,
    Structure,
    keep_units,
)

ALL = (Structure.NONE, Structure.CHANNEL, Structure.NM, Structure.UNSTRUCTURED)


def toy_spec() -> ModelSpec:
    """c1 (3->64) -> block blk: c2 (64->64, residual) -> c3 (64->48) -> pool -> fc (48->10)."""
    s = 16
    def conv(cin: int, cout: int) -> LayerSpec:
        return LayerSpec(OpKind.CONV2D, cin, cout, (3, 3), (1, 1), (1, 1), (1, 1), 1, (s, s))

    layers = {
        "c1": Layer("c1", conv(3, 64), ((None, 3),), (("c1", 64),)),
        "c2": Layer("c2", conv(64, 64), (("c1", 64),), (("c1", 64),), block="blk"),
        "c3": Layer("c3", conv(64, 48), (("c1", 64),), (("c3", 48),)),
        "fc": Layer("fc", LayerSpec(OpKind.LINEAR, 48, 10), (("c3", 48),), ((None, 10),)),
    }
    groups = {
        "c1": PrunableGroup("c1", "channel", 64, ALL, producers=("c1", "c2"),
                            members=("c1", "c2", "c3")),
        "c3": PrunableGroup("c3", "channel", 48, ALL, producers=("c3",), members=("c3", "fc")),
        "blk": PrunableGroup("blk", "block", 1, (Structure.NONE, Structure.BLOCK),
                             members=("c2",)),
    }
    return ModelSpec("toy", [(1, 3, s, s)], layers, groups, fixed={"fc": "classifier output"})


class ToyNet(nn.Module):
    """An nn.Module whose module names match ``toy_spec`` (for weight-based proxies)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 64, 3, padding=1)
        self.c2 = nn.Conv2d(64, 64, 3, padding=1)
        self.c3 = nn.Conv2d(64, 48, 3, padding=1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(x + self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def toy_latency(spec: ModelSpec):
    """A deterministic latency model (ms): per layer 0.01 + MACs/1e7."""
    def many(plans):
        return np.array([sum(0.01 + p.spec.macs / 1e7 for p in spec.pruned_layers(plan))
                         for plan in plans])
    return many


class FakeTable:
    """Only what SearchSpace reads from a LatencyTable: alignment and lookup."""

    def __init__(self, alignment: int, nm_factor: dict[str, float]) -> None:
        self.alignment = alignment
        self.nm_factor = nm_factor  # layer in_channels -> nm/dense time ratio

    def lookup(self, spec, structure=Structure.NONE, density=1.0, policy="raise"):
        base = spec.macs / 1e7
        if Structure(structure) == Structure.NM:
            if spec.out_channels not in self.nm_factor:
                raise KeyError("no nm entry")
            return base * self.nm_factor[spec.out_channels]
        return base


def toy_problem(run_dir, proxy=None, *, budget_ratio: float = 0.6, study: str = "s",
                seed: int = 0):
    """A small search problem for the strategy tests: the toy spec, the data-free importance
    proxy, the deterministic latency model, a budget at ``budget_ratio`` of dense."""
    from autoprune.evaluators import ImportanceProxy
    from autoprune.storage import make_storage
    from autoprune.strategies import SearchProblem

    spec = toy_spec()
    torch.manual_seed(0)
    imp = ImportanceProxy(ToyNet(), spec).fit()
    space = SearchSpace.from_spec(spec, FakeTable(8, {48: 0.6}), allow_block=True)
    lat = toy_latency(spec)
    dense = float(lat([space.dense_plan()])[0])
    return SearchProblem(space=space, latency_ms=lat, proxy=proxy or imp.evaluate_plan,
                         budget_ms=budget_ratio * dense, storage=make_storage(None, run_dir),
                         study_name=study, seed=seed, importance=imp)


class FakeBackend:
    def __init__(self, unstructured: bool) -> None:
        self.unstructured = unstructured

    def accelerates(self, structure, spec=None) -> bool:
        return Structure(structure) == Structure.UNSTRUCTURED and self.unstructured


def test_grid_is_on_the_alignment_and_round_trips_through_keep_units():
    spec = toy_spec()
    space = SearchSpace.from_spec(spec, FakeTable(16, {}), min_keep_ratio=0.25)
    c1, c3 = space.groups["c1"], space.groups["c3"]
    assert c1.widths == (16, 32, 48, 64)
    assert c3.widths == (16, 32, 48)
    for c in (c1, c3):
        for w in c.widths:
            assert keep_units(c.units, w / c.units, 16) == w
    # the plan a trial decodes to keeps exactly the grid width after the plan's own rounding
    plan = space.decode({"keep:c1": 1, "keep:c3": 0})
    assert spec.kept_units(plan) == {"c1": 32, "c3": 16}
    assert plan.alignment == 16
    plan.validate(spec)


def test_structures_follow_table_and_backend():
    spec = toy_spec()
    # nm faster than dense for c3 (48 out) only; backend does not accelerate unstructured
    space = SearchSpace.from_spec(spec, FakeTable(16, {48: 0.7, 64: 1.3}), FakeBackend(False))
    assert Structure.NM in space.groups["c3"].structures
    assert Structure.NM not in space.groups["c1"].structures
    assert all(Structure.UNSTRUCTURED not in c.structures for c in space.groups.values())
    # no table: no evidence that 2:4 helps -> not offered; user asks for unstructured
    space = SearchSpace.from_spec(spec, None, FakeBackend(False), allow_unstructured=True)
    assert space.groups["c1"].structures == (Structure.CHANNEL, Structure.UNSTRUCTURED)
    # backend that accelerates unstructured gets it automatically
    space = SearchSpace.from_spec(spec, None, FakeBackend(True))
    assert Structure.UNSTRUCTURED in space.groups["c1"].structures
    # nm=True forces it where the group allows it
    assert Structure.NM in SearchSpace.from_spec(spec, nm=True).groups["c1"].structures


def test_bounds_frozen_and_blocks():
    spec = toy_spec()
    space = SearchSpace.from_spec(spec, FakeTable(16, {}), min_keep_ratio=0.5, frozen=["c3"],
                                  allow_block=True)
    assert space.groups["c1"].widths == (32, 48, 64)
    assert not space.groups["c3"].searchable
    assert space.groups["blk"].removable
    names = [c.name for c in space.searchable_groups]
    assert names == ["c1", "blk"]
    fastest = space.fastest_plan()
    assert fastest.groups["blk"].structure == Structure.BLOCK
    assert spec.kept_units(fastest)["c1"] == 32 and "c3" not in fastest.groups
    # per-pattern override wins over the global bound
    space = SearchSpace.from_spec(spec, FakeTable(8, {}), groups={"c*": {"min_units": 40}})
    assert min(space.groups["c1"].widths) >= 40 and min(space.groups["c3"].widths) >= 40


def test_sample_encode_decode_with_optuna():
    spec = toy_spec()
    space = SearchSpace.from_spec(spec, FakeTable(16, {48: 0.5}), allow_block=True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        plan = space.sample(trial)
        plan.validate(spec)
        again = space.decode(space.encode(plan))
        assert again.to_dict() == plan.to_dict()
        seen.add(plan.to_json(indent=None))
        study.tell(trial, 0.0)
    assert len(seen) > 10
    d = space.to_dict()
    assert d["groups"]["c1"]["widths"] == [16, 32, 48, 64] and d["alignment"] == 16


def test_presets_exist_and_default_loads():
    assert {"default", "resnet", "mobilenet", "vit"} <= set(list_presets())
    spec = toy_spec()
    space = SearchSpace.from_yaml("default", spec, FakeTable(16, {}))
    assert space.groups["c1"].widths == (16, 32, 48, 64)


@pytest.mark.parametrize(
    "text,match",
    [
        ("min_keep_ratio: 1.5\n", r"min_keep_ratio must be a number in \(0, 1\], got 1.5"),
        ("colour: red\n", r"unknown key\(s\) \['colour'\]; allowed: alignment, min_keep_ratio"),
        ("structures: [diagonal]\n", r"unknown structure 'diagonal'; allowed: channel, nm"),
        ("groups:\n  'layer9*': {min_keep_ratio: 0.5}\n",
         r"pattern 'layer9\*' matches no group of this model; groups: c1, c3, blk"),
        ("groups:\n  c1: {speed: 2}\n", r"groups.c1: unknown key\(s\) \['speed'\]; allowed: "),
        ("groups:\n  c1: {min_keep_ratio: 0.8, max_keep_ratio: 0.5}\n", "is above max_keep_ratio"),
        ("alignment: -3\n", "alignment must be an integer >= 1, got -3"),
        ("frozen: [nothere]\n", "frozen: pattern 'nothere' matches no group"),
        ("- just\n- a list\n", "must be a mapping of keys"),
    ],
)
def test_bad_yaml_fails_naming_key_and_allowed_values(tmp_path: Path, text: str, match: str):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(SearchSpaceError, match=match):
        SearchSpace.from_yaml(p, toy_spec())


def test_unknown_preset_lists_presets():
    with pytest.raises(SearchSpaceError, match="unknown search-space preset 'nope'; presets: "
                                               "default, mobilenet, resnet, vit"):
        SearchSpace.from_yaml("nope", toy_spec())


def test_resnet_preset_on_a_model_without_its_groups_fails():
    with pytest.raises(SearchSpaceError, match="resnet.yaml: groups: pattern 'conv1'"):
        SearchSpace.from_yaml("resnet", toy_spec())


def test_nm_only_group_can_stay_dense():
    spec = toy_spec()
    space = SearchSpace.from_spec(spec, nm=True, structures=["nm"])
    c1 = space.groups["c1"]
    assert c1.structures == (Structure.NM, Structure.NONE) and c1.widths == (64,)
    dense = space.decode({"structure:c1": "none", "structure:c3": "none"})
    assert dense.groups == {}
    nm = space.decode({"structure:c1": "nm"})
    assert nm.groups["c1"] == GroupPlan(Structure.NM, n=2, m=4)
    assert math.isclose(nm.groups["c1"].keep_ratio, 0.5)
    assert space.encode(PruningPlan.dense(spec)) == {"structure:c1": "none",
                                                     "structure:c3": "none"}


def test_presets_load_on_the_models_they_are_for():
    """resnet/mobilenet/vit presets on analysed torchvision models (32x32 inputs): their group
    patterns match and their bounds apply."""
    from torchvision.models.vision_transformer import VisionTransformer

    import autoprune as ap
    from autoprune.zoo import torchvision_model

    x = torch.randn(1, 3, 32, 32)
    spec = ap.analyze(torchvision_model("resnet18").eval(), x)
    space = SearchSpace.from_yaml("resnet", spec, alignment=16)
    assert space.groups["conv1"].widths == (32, 48, 64)  # stem kept >= 50%
    assert min(space.groups["layer4.0.conv1"].widths) == 128  # 25% of 512
    assert all(space.groups[b].removable for b in ("layer1.0", "layer4.1"))
    spec = ap.analyze(torchvision_model("mobilenet_v2").eval(), x)
    space = SearchSpace.from_yaml("mobilenet", spec, alignment=16)
    assert space.groups["features.0.0"].widths == (16, 32)
    assert all(c.structures == (Structure.CHANNEL,) for c in space.searchable_groups)
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                            hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    space = SearchSpace.from_yaml("vit", ap.analyze(vit, x))
    mlp = space.groups["encoder.layers.encoder_layer_0.mlp.0"]
    assert mlp.widths[0] == 32 and mlp.widths[-1] == 128
