"""PruningPlan: keep-unit rounding, JSON round trip, validation errors (no model needed)."""

from __future__ import annotations

import pytest

from autoprune.errors import CorruptFileError, InvalidPlanError
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import (
    Layer,
    LayerSpec,
    ModelSpec,
    OpKind,
    PrunableGroup,
    Structure,
    keep_units,
)


def _spec() -> ModelSpec:
    conv = LayerSpec(OpKind.CONV2D, 3, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))
    conv2 = LayerSpec(OpKind.CONV2D, 64, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))
    layers = {
        "c1": Layer("c1", conv, ((None, 3),), (("c1", 64),)),
        "c2": Layer("c2", conv2, (("c1", 64),), ((None, 32),)),
    }
    groups = {
        "c1": PrunableGroup("c1", "channel", 64,
                            (Structure.NONE, Structure.CHANNEL, Structure.UNSTRUCTURED),
                            producers=("c1",), members=("c1", "c2")),
    }
    return ModelSpec("toy", [(1, 3, 16, 16)], layers, groups)


@pytest.mark.parametrize(
    "units,ratio,align,expected",
    [(64, 0.5, 1, 32), (64, 0.3, 16, 16), (64, 0.99, 16, 64), (64, 0.8, 16, 48),
     (10, 0.5, 16, 5), (512, 0.001, 16, 16), (7, 0.01, 1, 1)],
)
def test_keep_units_snaps_to_alignment(units, ratio, align, expected):
    assert keep_units(units, ratio, align) == expected


def test_json_round_trip_and_fingerprint():
    spec = _spec()
    plan = PruningPlan.uniform(spec, 0.5, "channel", alignment=16)
    again = PruningPlan.from_json(plan.to_json())
    assert again.to_dict() == plan.to_dict()
    assert again.model_fingerprint == spec.fingerprint
    assert spec.kept_units(again) == {"c1": 32}


def test_pruned_layers_follow_the_plan():
    spec = _spec()
    plan = PruningPlan.uniform(spec, 0.25, "channel")
    shapes = {p.name: p.spec for p in spec.pruned_layers(plan)}
    assert shapes["c1"].out_channels == 16 and shapes["c2"].in_channels == 16
    macs0, params0 = spec.count()
    macs1, params1 = spec.count(plan)
    assert macs1 < macs0 and params1 < params0


def test_validation_names_group_and_allowed_values():
    spec = _spec()
    with pytest.raises(InvalidPlanError, match="unknown group 'nope'"):
        PruningPlan(groups={"nope": GroupPlan("channel", 0.5)}).validate(spec)
    with pytest.raises(InvalidPlanError, match="allowed: none, channel, unstructured"):
        PruningPlan(groups={"c1": GroupPlan("nm")}).validate(spec)
    with pytest.raises(InvalidPlanError, match=r"keep_ratio of group 'c1' must be in \(0, 1\]"):
        PruningPlan(groups={"c1": GroupPlan("channel", 1.5)}).validate(spec)
    with pytest.raises(InvalidPlanError, match="unknown structure 'diagonal'"):
        GroupPlan("diagonal")
    other = PruningPlan(model_fingerprint="0" * 16, model_name="resnet50")
    with pytest.raises(InvalidPlanError, match="another model"):
        other.validate(spec)


def test_load_corrupt_plan_names_the_file(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text('{"groups": {"c1": ')
    with pytest.raises(CorruptFileError, match="plan.json"):
        PruningPlan.load(p)
