"""Remote-device bundle: export → standalone runner in a subprocess → import = a table in the
same format and with the same device fingerprint as local profiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _latency_helpers import small_spec

import autoprune as ap
from autoprune.bundle import export_bundle, import_bundle
from autoprune.errors import CorruptFileError
from autoprune.latency._profile import profile
from autoprune.latency._table import COLUMNS, LatencyTable
from autoprune.measure import ProtocolSettings
from autoprune.zoo import conv1d_net

QUICK = ProtocolSettings.quick()


def _run_runner(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    # a clean environment: the runner must not need autoprune or torch on its path
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-I", str(bundle / "run_bundle.py"), str(bundle),
                           "--quiet", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_runner_is_standalone():
    import ast

    src = (Path(ap.__file__).parent / "bundle_runner.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "argparse", "json", "os", "platform", "sys", "tempfile",
                        "time", "typing", "gzip", "numpy", "onnxruntime"}, imported


def test_bundle_round_trip_with_sweep(tmp_path, tmp_tables):
    model = conv1d_net().eval()
    x = torch.randn(1, 1, 40)
    spec = small_spec(32)  # hand-built spec: no dependency on analyze
    manifest = export_bundle(model, x, tmp_path / "b", spec=spec, protocol=QUICK,
                             sweep_max_width=48, progress=False)
    man = json.loads(manifest.read_text())
    kinds = [e["kind"] for e in man["entries"]]
    assert any("sweep" in k for k in kinds) and any("grid" in k for k in kinds)
    size = sum(p.stat().st_size for p in (tmp_path / "b" / "models").iterdir())
    assert size < 2_000_000  # compressed micro-models
    proc = _run_runner(tmp_path / "b", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    results = Path(proc.stdout.strip())
    assert results.name == "results_t1.json"
    table = import_bundle(results)
    # same device fingerprint as profiling here with the onnxruntime-cpu backend
    local = ap.get_backend("onnxruntime-cpu", threads=1, protocol=QUICK)
    assert table.device_id == local.device_info().device_id
    assert table.alignment in (1, 2, 4, 8, 16, 32) and table.alignment_sweep is not None
    grid = [e for e in man["entries"] if "grid" in e["kind"]]
    assert len(table) == len(grid)
    assert all(e.sample.median_ms > 0 and e.sample.n_runs >= QUICK.min_runs for e in table)
    # same format as a profiled table; saved/loaded like one; merges with one
    d = table.save(LatencyTable.default_dir(table.device, tmp_tables))
    back = LatencyTable.load(d, expect_device=local.device_info())
    assert list(back.df.columns) == list(COLUMNS) and len(back) == len(table)
    prof = profile(model, x, local, spec=spec, root=False, widths="full", alignment=16,
                   progress=False)
    assert list(prof.df.columns) == list(back.df.columns)
    assert len(back.merge(prof)) >= len(table)
    # rerunning the runner resumes: nothing left to do, same results
    before = json.loads(results.read_text())["entries"]
    assert _run_runner(tmp_path / "b", "--threads", "1").returncode == 0
    assert json.loads(results.read_text())["entries"] == before


def test_bundle_with_known_alignment_and_cli(tmp_path, tmp_tables, capsys):
    pytest.importorskip("autoprune._analyze")
    from autoprune.cli import main

    out = tmp_path / "cb"
    assert main(["bundle", "export", "--model", "autoprune.zoo:conv1d_net", "--input-shape",
                 "1,1,40", "--out", str(out), "--alignment", "16", "--widths", "full",
                 "--quick"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["alignment"] == 16 and all(e["kind"] == "grid" for e in man["entries"])
    assert _run_runner(out, "--threads", "2").returncode == 0
    capsys.readouterr()
    assert main(["bundle", "import", str(out / "results_t2.json"), "--root",
                 str(tmp_tables)]) == 0
    t = LatencyTable.load(next(tmp_tables.iterdir()))
    assert t.device.threads == 2 and t.alignment == 16 and len(t) == len(man["entries"])


def test_import_rejects_mismatched_or_corrupt_results(tmp_path):
    model = conv1d_net().eval()
    manifest = export_bundle(model, torch.randn(1, 1, 40), tmp_path / "b", spec=small_spec(16),
                             alignment=16, widths="full", protocol=QUICK, progress=False)
    bad = tmp_path / "b" / "results.json"
    bad.write_text('{"bundle_id": "other", "device": {}, "entries": {}}')
    with pytest.raises(CorruptFileError, match="belong to bundle"):
        import_bundle(bad, manifest)
    bad.write_text("{not json")
    with pytest.raises(CorruptFileError, match="line 1"):
        import_bundle(bad, manifest)


@pytest.mark.parametrize("old_manifest", [False, True])
def test_runner_uses_bursts_unless_the_bundle_predates_them(tmp_path, old_manifest):
    """A bundle records settle_ms/burst_runs and the runner times bursts of that size (7 runs
    asked, bursts of 5 -> 10 timed); a manifest written before bursts existed (no such keys)
    is timed one run per sample, as when it was made (exactly 7)."""
    proto = ProtocolSettings(warmup_runs=0, min_runs=7, max_runs=7, target_rel_iqr=1.0,
                             time_cap_s=0.1, min_sample_ms=0.0, settle_ms=0.0, burst_runs=5)
    out = tmp_path / "b"
    export_bundle(conv1d_net().eval(), torch.randn(1, 1, 40), out, spec=small_spec(32),
                  alignment=16, widths=[0.5, 1.0], protocol=proto, progress=False)
    if old_manifest:
        man = json.loads((out / "manifest.json").read_text())
        del man["protocol"]["settle_ms"], man["protocol"]["burst_runs"]
        (out / "manifest.json").write_text(json.dumps(man))
    proc = _run_runner(out, "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(Path(proc.stdout.strip()).read_text())["entries"].values()
    assert entries and {e["n_runs"] for e in entries} == ({7} if old_manifest else {10})
