"""Property-based tests (hypothesis): plan and search-space parsing never crash with anything
but autoprune's own errors, whatever they are fed; whatever parses round-trips."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoprune.errors import AutoPruneError
from autoprune.plan import PruningPlan
from autoprune.types import Layer, LayerSpec, ModelSpec, OpKind, PrunableGroup, Structure

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --- strategies ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
structures = st.one_of(st.sampled_from([s.value for s in Structure]), json_like)
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(min_value=-(10**400), max_value=10**400), st.booleans(), json_like)
group_settings = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"structure": structures, "keep_ratio": numbers, "n": numbers, "m": numbers}
    ),
    json_like,
)
GROUP_NAMES = ["c1", "c2", "blk", "nope"]
plan_like = st.fixed_dictionaries(
    {},
    optional={
        "schema_version": st.one_of(st.just(1), json_like),
        "model_name": st.one_of(st.none(), st.text(max_size=8), json_like),
        "model_fingerprint": st.one_of(st.none(), st.text(max_size=16), json_like),
        "alignment": st.one_of(st.integers(-3, 64), json_like),
        "alignments": st.one_of(st.dictionaries(st.sampled_from(GROUP_NAMES), numbers, max_size=3),
                                json_like),
        "importance": st.one_of(st.sampled_from(["l1", "l2", "taylor", "bn_gamma", "random"]),
                                json_like),
        "groups": st.one_of(st.dictionaries(st.sampled_from(GROUP_NAMES), group_settings,
                                            max_size=4), json_like),
    },
)


def _spec() -> ModelSpec:
    conv = LayerSpec(OpKind.CONV2D, 3, 64, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))
    conv2 = LayerSpec(OpKind.CONV2D, 64, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))
    conv3 = LayerSpec(OpKind.CONV2D, 32, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, (16, 16))
    layers = {
        "c1": Layer("c1", conv, ((None, 3),), (("c1", 64),)),
        "c2": Layer("c2", conv2, (("c1", 64),), (("c2", 32),)),
        "blk": Layer("blk", conv3, (("c2", 32),), (("c2", 32),)),
    }
    every = (Structure.NONE, Structure.CHANNEL, Structure.NM, Structure.UNSTRUCTURED)
    groups = {
        "c1": PrunableGroup("c1", "channel", 64, every, producers=("c1",), members=("c1", "c2")),
        "c2": PrunableGroup("c2", "channel", 32, every, producers=("c2",), members=("c2", "blk")),
        "blk": PrunableGroup("blk", "block", 1, (Structure.NONE, Structure.BLOCK),
                             members=("blk",)),
    }
    return ModelSpec("toy", [(1, 3, 16, 16)], layers, groups)


SPEC = _spec()


def _same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# --- plans --------------------------------------------------------------------------------


def _parse_plan(d: Any) -> PruningPlan | None:
    try:
        return PruningPlan.from_dict(d)
    except AutoPruneError:
        return None


@SETTINGS
@given(json_like)
def test_plan_from_arbitrary_json_raises_only_autoprune_errors(d: Any) -> None:
    _parse_plan(d)


@SETTINGS
@given(plan_like)
def test_plan_like_dicts_parse_validate_and_round_trip(d: dict[str, Any]) -> None:
    plan = _parse_plan(d)
    if plan is None:
        return
    # what parses serialises, parses back to the same thing, and validates without crashing
    text = plan.to_json()
    again = PruningPlan.from_json(text)
    assert _same(again.to_dict(), plan.to_dict())
    try:
        plan.validate(SPEC)
    except AutoPruneError:
        return
    # a plan that validates can be used by the spec's own arithmetic
    SPEC.kept_units(plan)
    SPEC.count(plan)
    list(SPEC.pruned_layers(plan))


@SETTINGS
@given(st.text(max_size=200))
def test_plan_from_arbitrary_text_raises_only_autoprune_errors(text: str) -> None:
    try:
        PruningPlan.from_json(text)
    except AutoPruneError:
        pass


@pytest.mark.parametrize("text", ["[" * 100_000, '{"groups": ' * 50_000, "1e999999", "NaN",
                                  '{"alignment": 1e400}', '{"groups": {"c1": {"keep_ratio": 1e999}}}'])
def test_plan_from_pathological_json(text: str) -> None:
    try:
        plan = PruningPlan.from_json(text)
    except AutoPruneError:
        return
    try:
        plan.validate(SPEC)
    except AutoPruneError:
        pass


@SETTINGS
@given(st.binary(max_size=200))
def test_plan_load_of_arbitrary_bytes_raises_only_autoprune_errors(tmp_path: Path,
                                                                   data: bytes) -> None:
    p = tmp_path / "plan.json"
    p.write_bytes(data)
    try:
        PruningPlan.load(p)
    except AutoPruneError:
        pass


# --- search spaces ------------------------------------------------------------------------

SPACE_KEYS = ["alignment", "min_keep_ratio", "min_units", "structures", "nm", "nm_n", "nm_m",
              "allow_unstructured", "allow_block", "frozen", "importance", "max_grid", "groups",
              "name", "description", "unknown_key"]
space_values = st.one_of(
    json_like,
    st.sampled_from(["auto", "channel", "nm", "unstructured", "l1", "c*", "c1", "blk", "x*"]),
    st.lists(st.sampled_from(["channel", "nm", "unstructured", "block", "c*", "zzz"]), max_size=3),
    st.integers(-2, 70), st.floats(-1, 2),
    st.dictionaries(st.sampled_from(["c*", "c1", "blk", "q"]),
                    st.one_of(json_like, st.dictionaries(
                        st.sampled_from(["min_keep_ratio", "max_keep_ratio", "min_units",
                                         "structures", "frozen", "allow_block", "alignment",
                                         "bogus"]),
                        st.one_of(json_like, st.floats(0, 1.5), st.integers(-1, 40))),
                                  ), max_size=3),
)
space_like = st.dictionaries(st.sampled_from(SPACE_KEYS), space_values, max_size=6)


def _space_from(tmp_path: Path, text: str) -> Any:
    from autoprune.space import SearchSpace

    p = tmp_path / "space.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        return SearchSpace.from_yaml(p, SPEC)
    except AutoPruneError:
        return None


@SETTINGS
@given(space_like)
def test_space_from_arbitrary_mapping_raises_only_autoprune_errors(tmp_path: Path,
                                                                   d: dict[str, Any]) -> None:
    import optuna

    space = _space_from(tmp_path, json.dumps(d))  # JSON is YAML
    if space is None:
        return
    # a space that parses yields valid plans at its corners
    for plan in (space.dense_plan(), space.fastest_plan()):
        plan.validate(SPEC)
    trial = optuna.trial.FixedTrial({k: (d.low if hasattr(d, "low") else d.choices[-1])
                                     for k, d in space.distributions().items()})
    space.sample(trial).validate(SPEC)


@SETTINGS
@given(st.text(max_size=120))
def test_space_from_arbitrary_yaml_text_raises_only_autoprune_errors(tmp_path: Path,
                                                                     text: str) -> None:
    _space_from(tmp_path, text)


@pytest.mark.parametrize(
    "text",
    ["{1: 2, a: 3}", "alignment: 2021-02-30", "[" * 1100,  # found by this file, fixed
     "groups: auto", "frozen: null", "frozen: 5",  # in space.py
     "? [a, b]\n: 1", "min_keep_ratio: .nan",
     "groups: {c*: {min_keep_ratio: 0.9, max_keep_ratio: 0.1}}",
     "&a [*a]", "alignment: !!python/object/apply:os.system ['true']"],
)
def test_space_from_pathological_yaml(tmp_path: Path, text: str) -> None:
    _space_from(tmp_path, text)
