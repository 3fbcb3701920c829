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
from autoprune.types import LayerSpec
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
                        "time", "typing", "gzip", "numpy", "onnxruntime", "shutil",
                        "subprocess"}, imported


def test_bundle_round_trip_with_sweep(tmp_path, tmp_tables):
    model = conv1d_net().eval()
    x = torch.randn(1, 1, 40)
    spec = small_spec(32)  # hand-built spec: no dependency on analyze
    manifest = export_bundle(model, x, tmp_path / "b", spec=spec, protocol=QUICK,
                             sweep_max_width=48, progress=False, kernel_rules=False)
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


# --------------------------------------------------------------------------------------------
# ARM: fingerprints from published /proc/cpuinfo and lscpu formats, the emulator contradiction
# --------------------------------------------------------------------------------------------
FIXTURES = Path(__file__).parent / "fixtures" / "cpu"


def _fixture(name: str) -> str:
    """A fixture text without its '#' header (the header cites the text's source)."""
    lines = (FIXTURES / name).read_text().splitlines()
    assert lines[0].startswith("#") and any("Source:" in ln for ln in lines[:3]), name
    return "\n".join(ln for ln in lines if not ln.startswith("#")) + "\n"


@pytest.mark.parametrize("name, core, must_have", [
    ("rpi4_cpuinfo.txt", "ARM Cortex-A72", {"asimd", "neon"}),
    ("rpi5_cpuinfo.txt", "ARM Cortex-A76", {"asimd", "asimddp", "asimdhp", "fphp", "neon"}),
    ("neoverse_n1_cpuinfo.txt", "ARM Neoverse-N1",
     {"asimd", "asimddp", "asimdhp", "fphp", "neon"}),
    # verbatim published text (see the fixture's header)
    ("imx93_cpuinfo.txt", "ARM Cortex-A55", {"asimd", "asimddp", "asimdhp", "fphp", "neon"}),
])
def test_fingerprint_of_arm_cpuinfo(name, core, must_have):
    from autoprune.bundle_runner import fingerprint_from

    fp = fingerprint_from("aarch64", _fixture(name))
    assert fp["device_name"] == core and fp["arch"] == "aarch64" and fp["notes"] == []
    assert set(fp["isa_flags"]) == must_have  # only kernel-relevant flags, no crc32/cpuid
    assert not {"avx", "avx2", "sse4_2"} & set(fp["isa_flags"])


@pytest.mark.parametrize("name, cpuinfo, core, must_have", [
    ("rpi4_lscpu.txt", "rpi4_cpuinfo.txt", "ARM Cortex-A72", {"asimd", "neon"}),
    ("rpi5_lscpu.txt", "rpi5_cpuinfo.txt", "ARM Cortex-A76", {"asimddp", "neon"}),
    ("neoverse_v1_lscpu.txt", None, "ARM Neoverse-V1", {"sve", "i8mm", "bf16", "asimddp"}),
])
def test_fingerprint_of_arm_lscpu_names_the_same_core(name, cpuinfo, core, must_have):
    """Without implementer lines in /proc/cpuinfo (a container, a restricted /proc) lscpu's
    vendor and model name give the same core name as the implementer/part table does."""
    from autoprune.bundle_runner import fingerprint_from

    fp = fingerprint_from("aarch64", "", _fixture(name))
    assert fp["device_name"] == core and must_have <= set(fp["isa_flags"])
    if cpuinfo is not None:
        assert fingerprint_from("aarch64", _fixture(cpuinfo))["device_name"] == core


def test_fingerprint_board_big_little_and_unknown_parts():
    from autoprune.bundle_runner import fingerprint_from

    # the board (device-tree model, NUL-terminated as the kernel exposes it) prefixes the core
    fp = fingerprint_from("aarch64", _fixture("rpi4_cpuinfo.txt"),
                          board="Raspberry Pi 4 Model B Rev 1.1\x00")
    assert fp["device_name"] == "Raspberry Pi 4 Model B Rev 1.1 / ARM Cortex-A72"
    assert fingerprint_from("aarch64", _fixture("rpi4_cpuinfo.txt"),
                            board="Not Specified")["device_name"] == "ARM Cortex-A72"
    # big.LITTLE: both core types with their counts (RK3588-style 4x A55 + 4x A76)
    a55 = _fixture("rpi4_cpuinfo.txt").replace("0xd08", "0xd05")
    a76 = _fixture("rpi5_cpuinfo.txt")
    fp = fingerprint_from("aarch64", a55 + a76)
    assert fp["device_name"] == "ARM Cortex-A55 x4 + ARM Cortex-A76 x4"
    # an unknown part keeps its numbers; implementer 0x00 (software: QEMU's own CPU model)
    fp = fingerprint_from("aarch64", a76.replace("0xd0b", "0xd99"))
    assert fp["device_name"] == "ARM part 0xd99"
    fp = fingerprint_from("aarch64", a76.replace("CPU implementer\t: 0x41",
                                                 "CPU implementer\t: 0x00"))
    assert "implementer 0x00" in fp["device_name"] and "emulator" in fp["notes"][0]
    # nothing to go on: said, not guessed
    fp = fingerprint_from("aarch64", "")
    assert fp["device_name"] == "aarch64 cpu" and fp["isa_flags"] == ["neon"] and fp["notes"]


def test_fingerprint_detects_the_emulator_contradiction():
    """QEMU user mode shows the host's /proc/cpuinfo to an aarch64 interpreter: the
    fingerprint says so, keeps no x86 flags, and the x86 host itself is read as before."""
    from autoprune.bundle_runner import fingerprint_from

    host = _fixture("qemu_host_x86_cpuinfo.txt")
    fp = fingerprint_from("aarch64", host)
    assert fp["device_name"].startswith("emulated aarch64") and "AMD EPYC" in fp["device_name"]
    assert fp["isa_flags"] == ["neon"] and "QEMU" in fp["notes"][0]
    x86 = fingerprint_from("x86_64", host)
    assert x86["device_name"] == "AMD EPYC" and "avx2" in x86["isa_flags"] and not x86["notes"]
    # the other way round: an x86 interpreter reading an ARM cpuinfo
    odd = fingerprint_from("x86_64", _fixture("rpi4_cpuinfo.txt"))
    assert odd["isa_flags"] == [] and odd["notes"] and "contradicts" in odd["device_name"]


def test_x86_device_ids_unchanged_and_arm_ids_carry_the_arch():
    """The shipped x86 tables' directory names are still their device ids (nothing about the
    ARM work changed an x86 id); an ARM device's id names its architecture."""
    from autoprune.types import DeviceInfo

    shipped = sorted((Path(ap.__file__).parent.parent / "latency_tables").glob("*/table.json"))
    assert shipped
    for f in shipped:
        dev = DeviceInfo.from_dict(json.loads(f.read_text())["device"])
        assert not dev.is_arm and dev.device_id == f.parent.name
    arm = DeviceInfo("onnxruntime-cpu", "ARM Cortex-A72", "aarch64", "onnxruntime 1.20.1",
                     isa_flags=("asimd", "neon"))
    assert arm.is_arm and arm.device_id.startswith("onnxruntime-cpu_aarch64_arm-cortex-a72_t1_")


def test_runner_requirements_are_checked_with_what_to_install(tmp_path, monkeypatch):
    from autoprune import bundle_runner as br

    with pytest.raises(br.RequirementError, match=r"Python 3\.7\.9 .*>= 3\.8"):
        br.check_requirements(python_version=(3, 7, 9))
    import numpy

    monkeypatch.setattr(numpy, "__version__", "1.16.6")
    with pytest.raises(br.RequirementError, match=r"numpy 1\.16\.6 .*>= 1\.17.*pip install"):
        br.check_requirements()
    monkeypatch.undo()
    env = br.check_requirements()
    assert "CPUExecutionProvider" in env["providers_available"] and env["numpy"]
    # the runner itself, without site-packages (no numpy): exit 2 and the pip command
    out = tmp_path / "b"
    export_bundle(conv1d_net().eval(), torch.randn(1, 1, 40), out, spec=small_spec(16),
                  alignment=16, widths=[1.0], protocol=QUICK, progress=False)
    proc = subprocess.run([sys.executable, "-I", "-S", str(out / "run_bundle.py"), str(out)],
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "")})
    assert proc.returncode == 2 and "numpy" in proc.stderr and "pip install" in proc.stderr
    # a provider this onnxruntime lacks is refused naming the ones it has
    proc = _run_runner(out, "--providers", "NoSuchExecutionProvider")
    assert proc.returncode == 2 and "NoSuchExecutionProvider" in proc.stderr
    assert "CPUExecutionProvider" in proc.stderr
    # a model this onnxruntime cannot load: named, with the bundle's opset and IR version
    man = json.loads((out / "manifest.json").read_text())
    assert man["onnx_format"]["opset"] >= 17 and man["onnx_format"]["ir_version"] >= 7
    victim = out / man["entries"][0]["file"]
    import gzip

    victim.write_bytes(gzip.compress(b"not an onnx model"))
    proc = _run_runner(out)
    assert proc.returncode == 2 and victim.name in proc.stderr and "opset" in proc.stderr


def _fake_arm_results(results: Path, emulated: bool) -> None:
    """Rewrite a runner's results as an aarch64 board (or the emulator) would have written them
    (the timings stay; only the fingerprint changes)."""
    r = json.loads(results.read_text())
    host = "AMD EPYC"
    r["device"].update(arch="aarch64", isa_flags=["neon"] if emulated else ["asimd", "neon"],
                       device_name=(f"emulated aarch64 on x86 host ({host})"
                                    if emulated else "ARM Cortex-A72"),
                       runtime="onnxruntime 1.20.1")
    r["fingerprint_notes"] = (["platform.machine() is aarch64 but /proc/cpuinfo describes an x86"
                               " CPU: this is an emulator"] if emulated else [])
    results.write_text(json.dumps(r))


@pytest.mark.parametrize("emulated", [False, True])
def test_arm_table_is_labelled_and_refused_for_an_x86_search(tmp_path, tmp_tables, emulated):
    from autoprune._search._facade import _check_table_device
    from autoprune.errors import TableMismatchError

    out = tmp_path / "b"
    export_bundle(conv1d_net().eval(), torch.randn(1, 1, 40), out, spec=small_spec(16),
                  alignment=16, widths=[0.5, 1.0], protocol=QUICK, progress=False)
    proc = _run_runner(out)
    assert proc.returncode == 0, proc.stderr
    results = Path(proc.stdout.strip())
    env = json.loads(results.read_text())["environment"]
    assert env["onnxruntime"] and env["machine"] and env["python"].startswith("3.")
    _fake_arm_results(results, emulated)
    if emulated:
        with pytest.warns(UserWarning, match="not trustworthy.*emulator"):
            table = import_bundle(results)
        assert "NOT TRUSTED" in table.notes
    else:
        table = import_bundle(results)
    assert table.device.arch == "aarch64" and "_aarch64_" in table.device_id
    assert "[aarch64]" in table.notes and "onnxruntime 1.20.1" in table.notes
    d = table.save(LatencyTable.default_dir(table.device, tmp_tables))
    back = LatencyTable.load(d)
    local = ap.get_backend("onnxruntime-cpu", threads=1, protocol=QUICK)
    with pytest.raises(TableMismatchError) as err:
        _check_table_device(back, local)
    msg = str(err.value)
    assert back.device_id in msg and str(d) in msg
    assert "measured on aarch64, this search runs on x86_64" in msg or \
        local.device_info().arch == "aarch64"
    with pytest.raises(TableMismatchError, match="another device"):
        LatencyTable.load(d, expect_device=local.device_info())


def test_bundle_kernel_rules_round_trip(tmp_path):
    """The bundle carries the kernel-rules sweep layers; the import fits the device's
    KernelRules from the runner's timings (latency's own rules_from_sweep)."""
    from autoprune.latency import KernelRules
    from autoprune.latency._rules import sweep_layers

    widths = list(range(48, 73))
    manifest = export_bundle(conv1d_net().eval(), torch.randn(1, 1, 40), tmp_path / "b",
                             spec=small_spec(16), protocol=QUICK, rules_widths=widths,
                             progress=False, weight_stream_sizes=(0.5, 1, 2, 4))
    man = json.loads(manifest.read_text())
    assert man["grid_alignments"] == [4, 8, 16] and man["rules_sweep"]["widths"] == widths
    ids = man["rules_sweep"]["ids"]
    assert {k: len(v) for k, v in ids.items()} == {"in": 25, "out": 25, "dw": 25, "group": 49}
    by_id = {e["id"]: e for e in man["entries"]}
    conv = sweep_layers()["in"]
    assert LayerSpec.from_dict(by_id[ids["in"][0]]["spec"]).with_channels(64, 64) == conv
    assert not any("sweep" in e["kind"].split("+") for e in man["entries"])
    proc = _run_runner(tmp_path / "b")
    assert proc.returncode == 0, proc.stderr
    table = import_bundle(Path(proc.stdout.strip()))
    assert isinstance(table.kernel_rules, KernelRules)
    assert table.alignment == table.kernel_rules.alignment
    assert table.kernel_rules.sweep["widths"] == widths
    # the weight-streaming probe chains ran on the device and their curve is in its rules
    assert len(man["weight_stream"]["ids"]) == 4
    # no two layers of a chain carry equal weights: equal initializers are shared by the
    # exporter or the runtime, and the chain would then stream one tensor, not eight (seen:
    # 128 MB "streamed" at 64 GB/s on the Zen 4 VM, 21 GB/s with distinct weights)
    import gzip

    import onnx

    chain = by_id[man["weight_stream"]["ids"][-1]]
    graph = onnx.load_from_string(gzip.decompress((tmp_path / "b" / chain["file"]).read_bytes())).graph
    blobs = [onnx.numpy_helper.to_array(t).tobytes() for t in graph.initializer]
    assert len(blobs) >= 8 and len(set(blobs)) == len(blobs)
    curve = table.kernel_rules.weight_stream
    assert curve is not None and len(curve.sizes_mb) == 4
    assert curve.sizes_mb[0] == pytest.approx(0.5, rel=0.1) and min(curve.chain_ms) > 0
    # too few widths for a fit: refused at export, naming the value
    with pytest.raises(ap.errors.InvalidInputError, match="rules_widths"):
        export_bundle(conv1d_net().eval(), torch.randn(1, 1, 40), tmp_path / "c",
                      spec=small_spec(16), protocol=QUICK, rules_widths=[8, 16], progress=False)



# --------------------------------------------------------------------------------------------
# The round trip on an emulated aarch64 userland (QEMU user mode)
# --------------------------------------------------------------------------------------------
def _arm_userland() -> dict:
    """The userland ``benchmarks/arm_emulated.sh`` built (its env.json), or a skip saying how
    to get one."""
    import shutil

    how = ("needs qemu-user-static and an arm64 root filesystem with the aarch64 numpy and "
           "onnxruntime wheels: apt-get install -y qemu-user-static mmdebstrap, then run "
           "benchmarks/arm_emulated.sh once (it writes $AUTOPRUNE_ARM_ROOT/env.json, default "
           "~/.cache/autoprune-arm)")
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip(f"qemu-aarch64-static not found; {how}")
    root = Path(os.environ.get("AUTOPRUNE_ARM_ROOT") or Path.home() / ".cache/autoprune-arm")
    env_file = root / "env.json"
    if not env_file.exists():
        pytest.skip(f"no arm64 userland at {root}; {how}")
    env = json.loads(env_file.read_text())
    if not all(Path(env[k]).exists() for k in ("rootfs", "python", "site")):
        pytest.skip(f"{env_file} names paths that are gone; {how}")
    return env


@pytest.mark.arm
@pytest.mark.slow
def test_bundle_round_trip_on_emulated_aarch64(tmp_path, tmp_tables):
    """Export here, run the runner with the aarch64 interpreter and the aarch64 onnxruntime
    under QEMU, import: the table is labelled aarch64, the emulator is detected and said, the
    import warns, and the table is refused for this x86 search."""
    import platform

    from autoprune._search._facade import _check_table_device
    from autoprune.errors import TableMismatchError

    env = _arm_userland()
    out = tmp_path / "b"
    export_bundle(conv1d_net().eval(), torch.randn(1, 1, 40), out, spec=small_spec(16),
                  alignment=16, widths=[0.5, 1.0], protocol=QUICK, progress=False)
    proc = subprocess.run(
        ["qemu-aarch64-static", "-L", env["rootfs"], env["python"], "-S",
         str(out / "run_bundle.py"), str(out), "--threads", "1", "--quiet"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": env["site"], "LC_ALL": "C.UTF-8"},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(Path(proc.stdout.strip()).read_text())
    dev = results["device"]
    assert dev["arch"] == "aarch64" and results["environment"]["machine"] == "aarch64"
    assert dev["runtime"].startswith("onnxruntime ")
    assert "CPUExecutionProvider" in results["environment"]["providers_available"]
    if platform.machine() == "x86_64":  # QEMU shows the host's /proc/cpuinfo: detected
        assert dev["device_name"].startswith("emulated aarch64") and dev["isa_flags"] == ["neon"]
        assert "emulator" in proc.stderr and results["fingerprint_notes"]
    with pytest.warns(UserWarning, match="not trustworthy"):
        table = import_bundle(Path(proc.stdout.strip()))
    assert len(table) == sum(1 for e in json.loads((out / "manifest.json").read_text())
                             ["entries"] if "grid" in e["kind"])
    assert "_aarch64_" in table.device_id and "[aarch64]" in table.notes
    d = table.save(LatencyTable.default_dir(table.device, tmp_tables))
    local = ap.get_backend("onnxruntime-cpu", threads=1, protocol=QUICK)
    if local.device_info().arch != "aarch64":
        with pytest.raises(TableMismatchError, match="measured on aarch64"):
            _check_table_device(LatencyTable.load(d), local)


@pytest.mark.parametrize("step, warns", [(4, False), (32, True)])
def test_import_fits_neon_style_rules_from_runner_timings(tmp_path, step, warns):
    """Results as a NEON board's runner would write them (the output staircase steps every 4
    channels: 4 floats per vector; inputs and depthwise channels off a multiple of 4 cost
    1.3x): the import finds step 4, which the bundle's grids cover; a step the grids do not
    cover (32) is warned about with the export to redo."""
    import math
    import warnings as _w

    widths = list(range(40, 81))
    manifest = export_bundle(conv1d_net().eval(), torch.randn(1, 1, 40), tmp_path / "b",
                             spec=small_spec(16), protocol=QUICK, rules_widths=widths,
                             progress=False, weight_stream_sizes=())
    man = json.loads(manifest.read_text())
    ids = man["rules_sweep"]["ids"]
    gw = man["rules_sweep"]["group_widths"]
    axis_of = {i: (axis, (gw if axis == "group" else widths)[k])
               for axis, v in ids.items() for k, i in enumerate(v)}

    def ms(eid: str) -> float:
        axis, w = axis_of.get(eid, ("grid", 16))
        if axis == "out":
            return 0.1 + 0.01 * math.ceil(w / step) * step
        if axis in ("in", "dw", "group"):
            return (0.1 + 0.01 * w) * (1.3 if w % 4 else 1.0)
        return 0.5
    results = {"results_schema_version": 1, "bundle_id": man["bundle_id"],
               "protocol": man["protocol"],
               "device": {"backend": "onnxruntime-cpu", "device_name": "ARM Cortex-A72",
                          "arch": "aarch64", "runtime": "onnxruntime 1.20.1", "threads": 1,
                          "precision": "float32", "isa_flags": ["asimd", "neon"], "driver": "",
                          "clocks": "", "extra": {"graph_optimization_level": "all",
                                                  "providers": "CPUExecutionProvider"}},
               "entries": {e["id"]: {"median_ms": ms(e["id"]), "iqr_ms": 0.0, "n_runs": 20,
                                     "min_ms": ms(e["id"]), "measured_at": "2026-12-01T00:00:00Z"}
                           for e in man["entries"]}}
    rpath = tmp_path / "b" / "results_t1.json"
    rpath.write_text(json.dumps(results))
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        table = import_bundle(rpath)
    rules = table.kernel_rules
    assert rules.out_step == step and rules.in_step == 4 and rules.dw_step == 4
    assert rules.group_step == 4 and "group_widths" in rules.sweep
    assert rules.in_penalty == pytest.approx(1.3, rel=1e-3)
    assert table.alignment == max(step, 4)
    step_warnings = [w for w in caught if "channel step" in str(w.message)]
    assert bool(step_warnings) == warns
    if warns:
        assert "alignment=32" in str(step_warnings[0].message)


def test_fingerprint_of_a_published_pi4_cpuinfo_under_a_32_bit_kernel():
    """A verbatim published text (osdev wiki): a Pi 4 on a 32-bit kernel reports ARMv7
    fields ('model name', neon, vfpv4) but the same implementer/part as on arm64."""
    from autoprune.bundle_runner import fingerprint_from

    fp = fingerprint_from("armv7l", _fixture("rpi4_armv7l_osdev_cpuinfo.txt"))
    assert fp["device_name"] == "ARM Cortex-A72"
    assert fp["arch"] == "armv7l" and "neon" in fp["isa_flags"]
    assert not {"avx", "avx2", "sse4_2"} & set(fp["isa_flags"])


def test_runner_times_each_sweep_as_one_interleaved_batch():
    """The rules sweep and the probe chains are each timed in one round-robin batch (a slow
    spell must hit every width alike); table entries go in resumable chunks."""
    from autoprune.bundle_runner import _batches

    todo = ([{"id": f"g{i}", "kind": "grid"} for i in range(10)]
            + [{"id": f"r{i}", "kind": "rules"} for i in range(20)]
            + [{"id": "gr", "kind": "grid+rules"}]
            + [{"id": f"s{i}", "kind": "stream"} for i in range(5)])
    batches = _batches(todo, 8)
    assert [e["id"] for e in batches[0]] == [f"r{i}" for i in range(20)] + ["gr"]
    assert [e["id"] for e in batches[1]] == [f"s{i}" for i in range(5)]
    assert [len(b) for b in batches[2:]] == [8, 2]
    assert sorted(e["id"] for b in batches for e in b) == sorted(e["id"] for e in todo)
