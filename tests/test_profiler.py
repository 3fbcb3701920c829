"""profile(): width grids, alignment detection, incremental + resumable profiling (a real
SIGKILL mid-run), the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _latency_helpers import CountingSynthetic, small_spec

import autoprune as ap
from autoprune.latency import detect_kernel_rules
from autoprune.latency._profile import (
    enumerate_items,
    fit_alignment,
    profile,
    width_grid,
)
from autoprune.latency._table import LatencyTable
from autoprune.measure import ProtocolSettings
from autoprune.types import Structure

QUICK = ProtocolSettings.quick()
REPO = Path(__file__).resolve().parents[1]


def test_width_grid_covers_alignment_steps_and_full():
    spec = small_spec(64)
    assert width_grid(((None, 3),), spec, 16) == [3]
    assert width_grid((("g1", 64),), spec, 16) == [16, 32, 48, 64]
    assert width_grid((("g1", 64),), spec, 16, "full") == [64]
    assert width_grid((("g1", 64),), spec, 1, [0.5]) == [1, 32, 64]
    # a fixed segment next to a prunable one scales only the prunable part
    assert width_grid((("g1", 64), (None, 10)), spec, 16) == [26, 42, 58, 74]
    narrow = small_spec(12)  # narrower than the alignment: unit steps
    assert width_grid((("g1", 12),), narrow, 16) == [1, 3, 6, 9, 12]


def test_enumerate_items_structures():
    spec = small_spec(64)
    dense = enumerate_items(spec, ap.get_backend("synthetic"), 16)
    # c1: 1 in x 4 out; c2: 4 in x 1 out; fc: 1
    assert len(dense) == 9 and all(st == Structure.NONE for _, st, _ in dense)
    nm = enumerate_items(spec, ap.get_backend("synthetic", accelerate_nm=True), 16)
    extra = [it for it in nm if it[1] == Structure.NM]
    assert len(extra) == 4 and all(s.in_channels == 3 and d == 0.5 for s, _, d in extra)


def test_fit_alignment_on_known_staircases():
    widths = list(range(1, 97))
    for step in (1, 4, 8, 16, 32):
        lat = [0.01 + 0.002 * (-(-w // step) * step) for w in widths]
        assert fit_alignment(widths, lat)[0] == step


@pytest.mark.parametrize("step", [8, 16])
def test_kernel_rules_find_the_synthetic_staircase(step):
    b = ap.get_backend("synthetic", alignment=step, noise=0.02, seed=1)
    rules = detect_kernel_rules(b, repeats=1)
    assert rules.out_step == step and rules.in_step == 1 and rules.alignment == step


def test_fit_alignment_flat_noisy_sweep_has_no_staircase():
    # a launch-bound GPU sweep: flat plus noise; the residuals would otherwise rank noise
    rng = np.random.default_rng(0)
    widths = list(range(1, 97))
    lat = 0.07 + 0.004 * rng.standard_normal(len(widths))
    assert fit_alignment(widths, lat)[0] == 1


def test_kernel_rules_never_below_backend_min_alignment():
    # a flat (launch-bound) sweep fits step 1; a GPU backend's tensor-core floor still applies
    b = ap.get_backend("synthetic", alignment=1, noise=0.0, seed=1)
    assert detect_kernel_rules(b, repeats=1).out_step == 1
    b.min_alignment = 8  # what TorchCUDABackend reports for fp16
    rules = detect_kernel_rules(b, repeats=1)
    assert rules.out_step == 8 and rules.sweep["min_step"] == 8
    b16 = ap.get_backend("synthetic", alignment=16, noise=0.0, seed=1)
    b16.min_alignment = 8  # a coarser measured step wins over the floor
    assert detect_kernel_rules(b16, repeats=1).out_step == 16


def test_kernel_rules_run_on_real_cpu(record_property):
    b = ap.get_backend("onnxruntime-cpu", threads=1)
    rules = detect_kernel_rules(b, repeats=1)
    # recorded, not asserted: the steps depend on the CPU (8 / 4 / 4 on an AVX2 EPYC VM)
    print(f"kernel rules on this CPU: {rules}")
    record_property("kernel_rules", str(rules))
    assert {rules.out_step, rules.in_step, rules.dw_step} <= {1, 2, 4, 8, 16, 32}
    assert all(m > 0 for m in rules.sweep["in_ms"] + rules.sweep["dw_ms"])


def test_profile_twice_measures_nothing_the_second_time(tmp_tables):
    b = CountingSynthetic(alignment=16, noise=0.05)
    spec = small_spec(64)
    t1 = profile(None, None, b, spec=spec, root=tmp_tables, progress=False)
    # the grid (3 x 3 widths of c2, c1 and fc) and nothing off a fast path (no input rule here);
    # the kernel-rule sweep, if this device's rules were not cached yet, is not a table entry
    assert len(t1) == 9 and t1.alignment == 16 and t1.kernel_rules is not None
    assert t1.kernel_rules.out_step == 16 and t1.kernel_rules.in_step == 1
    from autoprune.latency._rules import GROUP_SWEEP_WIDTHS, sweep_items

    assert len(b.measured) in (9, 9 + 2 * len(sweep_items(group_widths=GROUP_SWEEP_WIDTHS)))
    b.measured.clear()
    d = LatencyTable.default_dir(b.device_info(), tmp_tables)
    stamps = [(d / f).stat().st_mtime_ns for f in ("table.csv", "table.json")]
    t2 = profile(None, None, b, spec=spec, root=tmp_tables, progress=False)
    assert b.measured == [] and len(t2) == 9
    # nothing measured, nothing rewritten (shipped tables stay untouched by no-op runs)
    assert [(d / f).stat().st_mtime_ns for f in ("table.csv", "table.json")] == stamps
    on_disk = LatencyTable.load(LatencyTable.default_dir(b.device_info(), tmp_tables))
    assert len(on_disk) == 9


def test_profile_resnet18_twice_on_real_cpu(tmp_tables):
    pytest.importorskip("autoprune._analyze")
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    b = ap.get_backend("onnxruntime-cpu", threads=1, protocol=QUICK)
    t1 = profile(model, x, b, root=tmp_tables, widths="full", alignment=16, progress=False)
    assert len(t1) >= 15 and all(e.sample.median_ms > 0 for e in t1)
    calls = []
    orig = b.measure_layers
    b.measure_layers = lambda items: calls.append(list(items)) or orig(items)  # type: ignore
    t2 = profile(model, x, b, root=tmp_tables, widths="full", progress=False)
    assert calls == [] and len(t2) == len(t1)
    from autoprune._analyze import analyze

    spec = analyze(model, x)
    for lay in spec.layers.values():  # every dense layer of the model is in the table
        assert t2.has(lay.spec)


def test_profile_refuses_table_of_other_device():
    t = LatencyTable(ap.get_backend("synthetic", alignment=8).device_info())
    with pytest.raises(ap.errors.TableMismatchError):
        profile(None, None, ap.get_backend("synthetic"), table=t, spec=small_spec(), root=False)


_KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from autoprune.zoo import conv1d_net
    from autoprune.backends import get_backend
    from autoprune.measure import ProtocolSettings
    from autoprune.latency._profile import profile
    torch.set_num_threads(1)
    model = conv1d_net().eval()
    b = get_backend("onnxruntime-cpu", threads=1, protocol=ProtocolSettings(
        warmup_runs=2, min_runs=20, max_runs=20, target_rel_iqr=0.0, time_cap_s=0.5,
        min_sample_ms=0.0))
    profile(model, torch.randn(1, 1, 40), b, root=sys.argv[1], widths="fine", alignment=16,
            progress=False, max_entries=int(sys.argv[2]), save_every=2)
    print("DONE")
""")


def _rows(csv_path: Path) -> list[str]:
    return csv_path.read_text().splitlines()[1:]


def test_sigkill_midway_then_resume_loses_nothing_and_duplicates_nothing(tmp_tables):
    pytest.importorskip("autoprune._analyze")
    n_target = 40
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_tables), str(n_target)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    b = ap.get_backend("onnxruntime-cpu", threads=1, protocol=QUICK)
    d = LatencyTable.default_dir(b.device_info(), tmp_tables)
    deadline = time.time() + 120
    saved = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            saved = json.loads((d / "table.json").read_text())["n_entries"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            saved = 0
        if saved >= 6:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the profiler finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = LatencyTable.load(d)  # whatever was saved is a whole, loadable table
    assert 6 <= len(before) < n_target
    rows_before = set(_rows(d / "table.csv"))

    import autoprune.zoo

    model = autoprune.zoo.conv1d_net().eval()
    calls: list = []
    orig = b.measure_layers
    b.measure_layers = lambda items: calls.extend(items) or orig(items)  # type: ignore
    after = profile(model, torch.randn(1, 1, 40), b, root=tmp_tables, widths="fine",
                    progress=False, max_entries=n_target - len(before))
    assert len(calls) == n_target - len(before)  # only what was missing
    assert not any(before.has(*it) for it in calls)
    rows_after = _rows(d / "table.csv")
    assert len(rows_after) == len(set(rows_after)) == n_target == len(after)  # no duplicate
    keys = [tuple(r.split(",")[:15]) for r in rows_after]
    assert len(set(keys)) == n_target
    assert rows_before <= set(rows_after)  # no lost entry, values unchanged


def test_cli_profile(tmp_tables, capsys):
    pytest.importorskip("autoprune._analyze")
    from autoprune.cli import main

    rc = main(["profile", "--model", "autoprune.zoo:conv1d_net", "--input-shape", "1,1,40",
               "--num-classes", "10", "--device", "onnxruntime-cpu", "--threads", "1",
               "--root", str(tmp_tables), "--widths", "full", "--alignment", "16", "--quick",
               "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "4 entries" in out
    dirs = list(tmp_tables.iterdir())
    assert len(dirs) == 1 and (dirs[0] / "table.csv").exists()
    rc = main(["profile", "--model", "nosuchmodule:f", "--input-shape", "1,1,40"])
    assert rc == 2
    assert "cannot import" in capsys.readouterr().err
