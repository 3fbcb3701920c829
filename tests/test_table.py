"""LatencyTable: save/load, documented errors for bad files, miss policies, staircase-aware
interpolation, merge."""

from __future__ import annotations

import dataclasses
import json

import pytest
from _latency_helpers import conv2d

import autoprune as ap
from autoprune.errors import (
    CorruptFileError,
    InvalidInputError,
    TableMismatchError,
    TableMissError,
)
from autoprune.latency._table import COLUMNS, LatencyTable
from autoprune.types import LatencySample, LayerSpec, OpKind, Structure


def _table(backend, widths=(16, 32, 48, 64), cins=(16, 32, 64)) -> LatencyTable:
    t = LatencyTable(backend.device_info(), alignment=backend.alignment,
                     protocol=backend.protocol, structures=[Structure.NONE])
    for ci in cins:
        for co in widths:
            s = conv2d(ci, co, 8)
            t.add(s, Structure.NONE, 1.0, backend.measure_layer(s))
    return t


@pytest.fixture
def syn():
    return ap.get_backend("synthetic", alignment=16, noise=0.0)


def test_save_load_round_trip(syn, tmp_tables):
    t = _table(syn)
    d = t.save(LatencyTable.default_dir(t.device, tmp_tables))
    assert d.name == syn.device_info().device_id
    assert (d / "table.csv").read_text().splitlines()[0].split(",") == list(COLUMNS)
    side = json.loads((d / "table.json").read_text())
    assert side["schema_version"] == 1 and side["alignment"] == 16
    assert side["device"]["backend"] == "synthetic" and side["protocol"]["min_runs"] == 20
    back = LatencyTable.load(d, expect_device=syn.device_info())
    assert len(back) == len(t) == 12
    for e in t:
        assert back.lookup(e.spec) == e.sample.median_ms
    df = back.df
    assert list(df.columns) == list(COLUMNS) and len(df) == 12
    assert df["kernel"].iloc[0] == (3, 3)


def test_load_refuses_other_device_and_schema(syn, tmp_tables):
    d = _table(syn).save(tmp_tables / "t")
    other = ap.get_backend("synthetic", alignment=8).device_info()
    with pytest.raises(TableMismatchError, match="device_name") as e:
        LatencyTable.load(d, expect_device=other)
    assert "extra" in str(e.value)
    meta = json.loads((d / "table.json").read_text())
    meta["schema_version"] = 99
    (d / "table.json").write_text(json.dumps(meta))
    with pytest.raises(TableMismatchError, match="schema_version is 99"):
        LatencyTable.load(d)


def test_load_reports_corrupt_files_with_file_and_line(syn, tmp_tables):
    d = _table(syn).save(tmp_tables / "t")
    csv_text = (d / "table.csv").read_text()
    # cut in the middle of a row
    (d / "table.csv").write_text(csv_text[: len(csv_text) // 2])
    with pytest.raises(CorruptFileError, match=r"table\.csv: line \d+"):
        LatencyTable.load(d)
    # cut at a row boundary: fewer rows than the sidecar records
    lines = csv_text.splitlines(keepends=True)
    (d / "table.csv").write_text("".join(lines[:5]))
    with pytest.raises(CorruptFileError, match=r"line 6: truncated: 4 rows"):
        LatencyTable.load(d)
    # a bad number
    (d / "table.csv").write_text(csv_text.replace(",3x3,", ",3xq,", 1))
    with pytest.raises(CorruptFileError, match=r"table\.csv: line 2"):
        LatencyTable.load(d)
    (d / "table.csv").write_text(csv_text)
    (d / "table.json").write_text('{"schema_version": 1,\n "device": ')
    with pytest.raises(CorruptFileError, match=r"table\.json: line 2"):
        LatencyTable.load(d)
    (d / "table.json").unlink()
    with pytest.raises(CorruptFileError, match="not found"):
        LatencyTable.load(d)


def test_lookup_policies(syn):
    t = _table(syn)
    hit = conv2d(32, 48, 8)
    assert t.lookup(hit) == pytest.approx(syn.layer_cost_ms(hit))
    miss = conv2d(32, 40, 8)
    with pytest.raises(TableMissError, match="in=32 out=40"):
        t.lookup(miss)
    with pytest.raises(InvalidInputError, match="policy"):
        t.lookup(miss, policy="guess")
    with pytest.raises(InvalidInputError, match="backend"):
        t.lookup(miss, policy="measure")
    other = ap.get_backend("synthetic", alignment=8)
    with pytest.raises(TableMismatchError):
        t.lookup(miss, policy="measure", backend=other)
    v = t.lookup(miss, policy="measure", backend=syn)
    assert v == pytest.approx(syn.layer_cost_ms(miss)) and t.has(miss)
    # channel is carried by widths; nm on a table without nm is looked up dense
    assert t.lookup(hit, Structure.CHANNEL) == t.lookup(hit)
    assert t.lookup(hit, Structure.NM, 0.5) == t.lookup(hit)
    with pytest.raises(InvalidInputError, match="block"):
        t.lookup(hit, Structure.BLOCK)


def test_interpolation_respects_staircase_and_never_extrapolates(syn):
    t = _table(syn)
    # 33..47 output channels cost like 48 on a step-16 device: rounding up first makes the
    # interpolated value exact, where naive linear interpolation from 32 would undershoot
    for co in (33, 40, 47):
        got = t.lookup(conv2d(32, co, 8), policy="interpolate")
        assert got == pytest.approx(syn.layer_cost_ms(conv2d(32, co, 8)))
        assert got == pytest.approx(t.lookup(conv2d(32, 48, 8)))
    # between in-channel grid points (32 and 64) at an aligned width: bilinear
    mid = t.lookup(conv2d(48, 32, 8), policy="interpolate")
    lo, hi = t.lookup(conv2d(32, 32, 8)), t.lookup(conv2d(64, 32, 8))
    assert mid == pytest.approx((lo + hi) / 2)
    assert mid == pytest.approx(syn.layer_cost_ms(conv2d(48, 32, 8)), rel=0.01)
    # outside the measured widths the nearest measured point is scaled by MACs (stated rule:
    # a width above or below the grid is priced, never refused, never extrapolated linearly)
    top = t.lookup(conv2d(32, 64, 8))
    assert t.lookup(conv2d(32, 80, 8), policy="interpolate") == pytest.approx(top * 80 / 64)
    # 8 in-channels cost like 16 on this staircase (16 is measured), but with 32 as the
    # smallest measured width, 8 → 16 lies below the grid: 32's cost times 16/32 of the MACs
    assert t.lookup(conv2d(8, 32, 8), policy="interpolate") == t.lookup(conv2d(16, 32, 8))
    small = _table(syn, cins=(32, 64))
    assert small.lookup(conv2d(8, 32, 8), policy="interpolate") == pytest.approx(
        small.lookup(conv2d(32, 32, 8)) * 16 / 32)
    with pytest.raises(TableMissError, match="any width"):
        t.lookup(conv2d(32, 32, 16), policy="interpolate")
    many = t.lookup_many([conv2d(32, 40, 8), conv2d(32, 48, 8)], policy="interpolate")
    assert many[0] == many[1]


def test_interpolation_caps_rounding_at_full_width():
    b = ap.get_backend("synthetic", alignment=16)
    t = LatencyTable(b.device_info(), alignment=16)
    for co in (16, 50):  # 50 = a full width that is not a multiple of 16
        s = conv2d(8, co, 8)
        t.add(s, "none", 1.0, b.measure_layer(s))
    # 49 rounds up to 64 on the staircase, but never past the measured full width 50
    assert t.lookup(conv2d(8, 49, 8), policy="interpolate") == t.lookup(conv2d(8, 50, 8))
    # depthwise: one width axis
    for w in (16, 64):
        s = conv2d(w, w, 8, groups=w)
        t.add(s, "none", 1.0, b.measure_layer(s))
    v = t.lookup(conv2d(40, 40, 8, groups=40), policy="interpolate")
    lo, hi = t.lookup(conv2d(16, 16, 8, groups=16)), t.lookup(conv2d(64, 64, 8, groups=64))
    assert lo < v < hi


def test_merge_same_device_only(syn):
    a = _table(syn, widths=(16,))
    b = _table(syn, widths=(32,))
    n = len(a) + len(b)
    assert len(a.merge(b)) == n
    other = LatencyTable(ap.get_backend("synthetic", alignment=8).device_info())
    with pytest.raises(TableMismatchError):
        a.merge(other)


def test_add_rejects_bad_samples(syn):
    t = LatencyTable(syn.device_info())
    with pytest.raises(InvalidInputError, match="positive"):
        t.add(conv2d(4, 4, 4), "none", 1.0, LatencySample(float("nan"), 0.0, 3))
    s = dataclasses.replace(conv2d(4, 4, 4), op=OpKind.CONV2D)
    t.add(s, "none", 1.0, LatencySample(1.0, 0.0, 3))
    assert s in t and LayerSpec.from_dict(s.to_dict()) in t


def test_interpolation_with_two_layers_of_one_family_on_different_grids():
    # two layers share a configuration (same kernel/size/fused) but have different width
    # grids; a query must use a rectangle whose four corners were all measured
    b = ap.get_backend("synthetic", alignment=16)
    t = LatencyTable(b.device_info(), alignment=16)
    for ci in (16, 32):
        for co in (16, 64):
            t.add(conv2d(ci, co, 4), "none", 1.0, b.measure_layer(conv2d(ci, co, 4)))
    for ci in (64, 128):
        for co in (32, 48):
            t.add(conv2d(ci, co, 4), "none", 1.0, b.measure_layer(conv2d(ci, co, 4)))
    # widths round up to 16 first; the synthetic cost is linear between steps, so exact
    v = t.lookup(conv2d(24, 40, 4), policy="interpolate")  # inside the first layer's grid
    assert v == pytest.approx(b.layer_cost_ms(conv2d(32, 48, 4)))
    v2 = t.lookup(conv2d(100, 40, 4), policy="interpolate")  # inside the second's
    assert v2 == pytest.approx(b.layer_cost_ms(conv2d(112, 48, 4)))
    # no measured rectangle around (48, 64): the nearest measured point, (32, 64), scaled by
    # MACs
    v3 = t.lookup(conv2d(40, 60, 4), policy="interpolate")
    assert v3 == pytest.approx(t.lookup(conv2d(32, 64, 4)) * 48 / 32)
