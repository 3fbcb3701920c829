"""Standalone latency runner for remote devices (needs only Python, numpy and onnxruntime).

This file is copied as ``run_bundle.py`` into every bundle written by
``autoprune.bundle.export_bundle`` and runs on the target device::

    python run_bundle.py BUNDLE_DIR --threads 1 [--out results.json]

It loads each micro-model of the bundle's ``manifest.json`` into an ONNX Runtime session,
times them with the same adaptive, interleaved protocol as ``autoprune.measure`` and writes
``results.json`` (device fingerprint + one median/IQR per entry, timed *in context*: less the
layout reorders' share of the micro-model's run, which a whole model does not pay, see
``layout_reorder_share``; the share is kept per entry as ``reorder_share``). The results file
is rewritten atomically after every chunk, so an interrupted run resumes where it stopped.
``autoprune bundle import results.json`` turns it into a ``LatencyTable``.

Requirements, checked at start (``check_requirements``) with a message naming what to
install: Python >= 3.8, numpy >= 1.17 (``numpy.random.default_rng``), and an onnxruntime with
IOBinding that can load the bundle's models (the manifest records their ONNX opset and IR
version; an older runtime is refused naming them). Run on aarch64 (QEMU user mode) with
onnxruntime 1.20.1 and 1.27.0 and on x86_64 with 1.32.0; ``--graph-optimization-level layout``
needs a runtime that has that level (1.20 does not).

It must never import torch or autoprune. ``autoprune.measure`` and the ``onnxruntime-cpu``
backend import the protocol loop and the CPU fingerprint from here, so that a table measured
through a bundle and one measured locally use the very same code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

RESULTS_SCHEMA_VERSION = 1
#: oldest Python and numpy the runner supports (checked at start by ``check_requirements``)
MIN_PYTHON = (3, 8)
MIN_NUMPY = (1, 17)

#: ISA flags that change which kernels a CPU runtime picks (kept in the device fingerprint)
RELEVANT_ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    # aarch64 (/proc/cpuinfo "Features")
    "asimd", "asimdhp", "asimddp", "asimdfhm", "fphp", "sve", "sve2", "svei8mm", "svebf16",
    "i8mm", "bf16", "sme", "sme2",
)


# --------------------------------------------------------------------------------------------
# CPU fingerprint
# --------------------------------------------------------------------------------------------
#: ``CPU implementer`` codes of /proc/cpuinfo on ARM (the MIDR_EL1 implementer byte), as named
#: by the Arm Architecture Reference Manual and util-linux's lscpu tables
ARM_IMPLEMENTERS = {
    0x41: "ARM", 0x42: "Broadcom", 0x43: "Cavium", 0x46: "Fujitsu", 0x48: "HiSilicon",
    0x4E: "NVIDIA", 0x50: "APM", 0x51: "Qualcomm", 0x53: "Samsung", 0x61: "Apple",
    0x6D: "Microsoft", 0xC0: "Ampere",
}
#: (implementer, ``CPU part``) -> core name, for the cores boards and servers ship with
ARM_PARTS = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76", (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD40): "Neoverse-V1", (0x41, 0xD41): "Cortex-A78",
    (0x41, 0xD44): "Cortex-X1", (0x41, 0xD46): "Cortex-A510", (0x41, 0xD47): "Cortex-A710",
    (0x41, 0xD48): "Cortex-X2", (0x41, 0xD49): "Neoverse-N2", (0x41, 0xD4F): "Neoverse-V2",
    (0x41, 0xD80): "Cortex-A520", (0x41, 0xD81): "Cortex-A720", (0x41, 0xD82): "Cortex-X4",
    (0x41, 0xD84): "Neoverse-V3", (0x41, 0xD8E): "Neoverse-N3",
    (0x48, 0xD01): "TaiShan-v110", (0x4E, 0x004): "Carmel", (0xC0, 0xAC3): "Ampere-1",
    (0xC0, 0xAC4): "Ampere-1a",
}
_ARM_MACHINES = ("aarch64", "arm64", "armv8l", "armv8b")
_X86_MACHINES = ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86")
_NO_BOARD = ("", "not specified", "to be filled by o.e.m.", "default string", "none")
_X86_VENDORS = ("genuineintel", "authenticamd", "hygongenuine", "centaurhauls")


def _key_values(text: str) -> List[Tuple[str, str]]:
    """``key: value`` lines of /proc/cpuinfo or ``lscpu`` (keys lower-cased, in order)."""
    out = []
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        out.append((" ".join(key.split()).lower(), value.strip()))
    return out


def _hex(value: str) -> Optional[int]:
    try:
        return int(value, 0)
    except ValueError:
        return None


def _arm_core_name(implementer: Optional[int], part: Optional[int]) -> str:
    if implementer is None or part is None:
        return ""
    vendor = ARM_IMPLEMENTERS.get(implementer, f"implementer 0x{implementer:02x}")
    core = ARM_PARTS.get((implementer, part), f"part 0x{part:03x}")
    return f"{vendor} {core}"


def parse_cpuinfo(text: str) -> Dict[str, Any]:
    """What ``/proc/cpuinfo`` says: ``model_name`` (x86 ``model name``), ``vendor`` (x86
    ``vendor_id``), ``flags`` (x86 ``flags`` or ARM ``Features``), ``cores`` (ARM: core name
    per distinct implementer/part, with its count, in order of appearance: a big.LITTLE SoC
    lists two), ``board`` (``Model``/``Hardware`` lines some ARM kernels add) and ``arm``
    (whether it has ARM ``CPU implementer`` lines)."""
    info: Dict[str, Any] = {"model_name": "", "vendor": "", "flags": [], "cores": [],
                            "board": "", "arm": False}
    counts: Dict[str, int] = {}
    order: List[str] = []
    boards: Dict[str, str] = {}
    implementer: Optional[int] = None
    for key, value in _key_values(text):
        if key == "processor":
            implementer = None
        elif key == "model name" and not info["model_name"]:
            info["model_name"] = " ".join(value.split())
        elif key == "vendor_id" and not info["vendor"]:
            info["vendor"] = value
        elif key in ("flags", "features") and not info["flags"]:
            info["flags"] = value.split()
        elif key == "cpu implementer":
            implementer = _hex(value)
            info["arm"] = True
        elif key == "cpu part":
            name = _arm_core_name(implementer, _hex(value))
            if name:
                if name not in counts:
                    order.append(name)
                counts[name] = counts.get(name, 0) + 1
        elif key in ("model", "hardware") and info["arm"] and not value.isdigit():
            boards.setdefault(key, " ".join(value.split()))
    info["cores"] = [(n, counts[n]) for n in order]
    info["board"] = boards.get("model") or boards.get("hardware", "")
    return info


def parse_lscpu(text: str) -> Dict[str, Any]:
    """What ``LC_ALL=C lscpu`` says (util-linux >= 2.32 layout): ``arch``, ``vendor``,
    ``model_names`` (one per core type: a big.LITTLE SoC lists two), ``flags``."""
    info: Dict[str, Any] = {"arch": "", "vendor": "", "model_names": [], "flags": []}
    for key, value in _key_values(text):
        if key == "architecture" and not info["arch"]:
            info["arch"] = value
        elif key == "vendor id" and not info["vendor"]:
            info["vendor"] = value
        elif key == "model name" and value and value != "-":
            if value not in info["model_names"]:
                info["model_names"].append(" ".join(value.split()))
        elif key == "flags" and not info["flags"]:
            info["flags"] = value.split()
    return info


def _isa(flags: Sequence[str], arm: bool) -> List[str]:
    keep = set(f for f in flags if f in RELEVANT_ISA_FLAGS)
    if arm:
        keep.add("neon")  # Advanced SIMD is mandatory on aarch64
    return sorted(keep)


def fingerprint_from(machine: str, cpuinfo: str = "", lscpu: str = "", board: str = ""
                     ) -> Dict[str, Any]:
    """The CPU fingerprint from the texts a machine shows (pure: unit-tested on published
    texts). ``machine``: ``platform.machine()``; ``board``: a board or instance name
    (``/proc/device-tree/model``, DMI product name) used on ARM only.

    Returns ``device_name``, ``arch``, ``isa_flags`` and ``notes`` (what could not be trusted).

    * x86: ``model name`` and the relevant ``flags`` of /proc/cpuinfo (unchanged since the
      first tables, so their device ids stay valid).
    * ARM: there is no model-name line; the core comes from ``CPU implementer``/``CPU part``
      ("ARM Cortex-A72", "ARM Cortex-A76 x4 + ARM Cortex-A55 x4" on big.LITTLE), prefixed
      by the board when one is known; ``Features`` give the ISA flags. ``lscpu``'s vendor and
      model name are used when /proc/cpuinfo has no implementer lines.
    * A contradiction (an aarch64 interpreter reading an x86 /proc/cpuinfo, as under QEMU
      user-mode emulation, which shows the host's file) is said in the name and the notes;
      the x86 text is not trusted (no x86 ISA flags on an ARM fingerprint).
    """
    arch = machine or "unknown"
    m = arch.lower()
    is_arm = m in _ARM_MACHINES or m.startswith("arm")
    cpu = parse_cpuinfo(cpuinfo)
    ls = parse_lscpu(lscpu)
    notes: List[str] = []
    x86_text = (cpu["vendor"].lower() in _X86_VENDORS
                or any(f in cpu["flags"] for f in ("sse2", "avx", "avx2"))
                or ls["vendor"].lower() in _X86_VENDORS)
    if not is_arm:
        name = cpu["model_name"] or (ls["model_names"][0] if ls["model_names"] else "")
        if cpu["arm"] and m in _X86_MACHINES:
            notes.append(f"/proc/cpuinfo describes an ARM CPU but this interpreter runs on {arch}"
                         "; the CPU text is not trusted")
            return {"device_name": f"{arch} cpu (cpuinfo contradicts the machine)", "arch": arch,
                    "isa_flags": [], "notes": notes}
        flags = cpu["flags"] or ls["flags"]
        return {"device_name": name or arch, "arch": arch, "isa_flags": _isa(flags, False),
                "notes": notes}
    if x86_text and not cpu["arm"]:
        host = cpu["model_name"] or (ls["model_names"][0] if ls["model_names"] else "x86")
        notes.append(
            f"platform.machine() is {arch} but /proc/cpuinfo describes an x86 CPU ({host}): "
            "this is an emulator (QEMU user mode shows the host's /proc/cpuinfo); the CPU "
            "model and flags are unknown and timings are not the board's")
        return {"device_name": f"emulated {arch} on x86 host ({host})",
                "arch": arch, "isa_flags": _isa([], True), "notes": notes}
    if cpu["cores"]:
        core = " + ".join(n if len(cpu["cores"]) == 1 else f"{n} x{c}" for n, c in cpu["cores"])
        flags = cpu["flags"]
    elif ls["model_names"]:
        vendor = ls["vendor"]
        core = " + ".join(f"{vendor} {n}".strip() for n in ls["model_names"])
        flags = ls["flags"] or cpu["flags"]
    else:
        core = ""
        flags = cpu["flags"] or ls["flags"]
        notes.append("no CPU implementer/part in /proc/cpuinfo and no lscpu model name: the "
                     "core is unknown (tables of different ARM boards may share this name)")
    if "implementer 0x00" in core:
        notes.append("CPU implementer 0x00 is reserved for software: an emulator's CPU "
                     "model, not a board's")
    board = " ".join((board or cpu["board"]).replace("\x00", " ").split())
    if board.lower() in _NO_BOARD:
        board = ""
    parts = [p for p in (board, core) if p]
    name = " / ".join(parts) if parts else f"{arch} cpu"
    return {"device_name": name, "arch": arch, "isa_flags": _isa(flags, True), "notes": notes}


def _read_text(path: str, limit: int = 1 << 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(limit)
    except OSError:
        return ""


def _lscpu_text() -> str:
    """``LC_ALL=C lscpu`` output, or "" where lscpu is missing or fails."""
    import shutil
    import subprocess

    exe = shutil.which("lscpu")
    if exe is None:
        return ""
    try:
        proc = subprocess.run([exe], capture_output=True, text=True, timeout=10,
                              env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")})
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def cpu_fingerprint() -> Dict[str, Any]:
    """This machine's CPU fingerprint (``fingerprint_from`` on its own texts).

    Reads ``/proc/cpuinfo`` on Linux; on ARM also the board name (``/proc/device-tree/model``,
    else the DMI product name: a cloud instance type) and, when /proc/cpuinfo has no
    implementer lines, ``lscpu``; falls back to :mod:`platform` elsewhere.
    """
    machine = platform.machine() or "unknown"
    cpuinfo = _read_text("/proc/cpuinfo")
    m = machine.lower()
    board = lscpu = ""
    if m in _ARM_MACHINES or m.startswith("arm"):
        board = (_read_text("/proc/device-tree/model", 256)
                 or _read_text("/sys/class/dmi/id/product_name", 256))
        low = cpuinfo.lower()
        if "cpu implementer" not in low and "vendor_id" not in low:
            lscpu = _lscpu_text()  # no ARM lines, and not an emulator's x86 host file either
    fp = fingerprint_from(machine, cpuinfo, lscpu, board)
    if fp["device_name"] == machine and platform.processor():
        fp["device_name"] = " ".join(platform.processor().split())
    return fp


# --------------------------------------------------------------------------------------------
# Timing protocol (the one implementation; autoprune.measure wraps it with a dataclass)
# --------------------------------------------------------------------------------------------
def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    n = len(sorted_xs)
    if n == 0:
        return float("nan")
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Tuple[float, float, int, float]:
    """(median, IQR, count, min) of a list of times in ms."""
    xs = sorted(times_ms)
    if not xs:
        return float("nan"), float("nan"), 0, float("nan")
    return _quantile(xs, 0.5), _quantile(xs, 0.75) - _quantile(xs, 0.25), len(xs), xs[0]


def rel_iqr(times_ms: Sequence[float]) -> float:
    med, iqr, n, _ = summarize(times_ms)
    return iqr / med if n and med > 0 else float("inf")


def median_rel_se(times_ms: Sequence[float]) -> float:
    """Estimated standard error of the median, relative to the median: ``1.2533 * sigma /
    sqrt(n)`` with ``sigma = IQR / 1.349`` (normal-theory, robust to outliers). The median of
    300 runs with a 10% IQR is known to about 0.4%, of 90 runs to 0.8%."""
    med, iqr, n, _ = summarize(times_ms)
    if not n or med <= 0:
        return float("inf")
    return float(1.2533 * (iqr / 1.349) / (n ** 0.5) / med)


def _warm_up(call: Callable[[], object], runs: int, budget_s: float) -> None:
    """``runs`` untimed calls, stopping early (after at least one) once ``budget_s`` is spent."""
    t0 = time.perf_counter()
    for _ in range(max(0, int(runs))):
        call()
        if time.perf_counter() - t0 >= budget_s:
            break


def calibrate_calls(call: Callable[[], object], min_sample_ms: float, max_calls: int = 1000) -> int:
    """Calls per timed sample so that one sample lasts at least ``min_sample_ms``."""
    if min_sample_ms <= 0:
        return 1
    t0 = time.perf_counter()
    call()
    one_ms = (time.perf_counter() - t0) * 1e3
    if one_ms >= min_sample_ms:
        return 1
    return int(max(1, min(max_calls, -(-min_sample_ms // max(one_ms, 1e-4)))))


def burst(call: Callable[[], float], settle_ms: float = 3.0, runs: int = 5) -> List[float]:
    """Run ``call`` untimed for ``settle_ms`` (at least once when > 0), then ``runs`` timed calls.

    A small model timed right after a large one (or after any pause) runs slower for its
    first few milliseconds of work on the CPUs we measured: a pruned resnet18 took 0.40 ms on
    its first run after the dense model and 0.20 ms in steady state, and sleeping instead of
    running the dense model made it worse, not better (BENCHMARKS.md, "Paired timing"). Settling
    first and timing a short burst gives each configuration its steady-state time even when
    configurations alternate.
    """
    if settle_ms > 0:
        t0 = time.perf_counter()
        while True:
            call()
            if (time.perf_counter() - t0) * 1e3 >= settle_ms:
                break
    return [float(call()) for _ in range(max(1, int(runs)))]


def run_protocol(
    timed_calls: Sequence[Callable[[], float]],
    warmup_runs: int = 10,
    min_runs: int = 20,
    max_runs: int = 300,
    target_rel_iqr: float = 0.05,
    time_cap_s: float = 2.0,
    settle_ms: float = 3.0,
    burst_runs: int = 5,
    target_rel_se: float = 0.0,
    lockstep: bool = False,
) -> List[List[float]]:
    """Time several configurations round-robin until each is stable or the cap is hit.

    ``timed_calls[i]()`` runs configuration *i* once and returns its duration in ms. Each round
    gives every still-active configuration one burst (:func:`burst`: settle for ``settle_ms``,
    then ``burst_runs`` timed runs), in an order rotated every round, so drift of a shared
    machine lands on all of them alike while none is timed cold. A configuration stops once it
    has ``min_runs`` timed runs and its relative IQR is at most ``target_rel_iqr``, or its median
    is known to ``target_rel_se`` (:func:`median_rel_se`; 0 turns this rule off); all stop at
    ``max_runs`` runs or when ``time_cap_s`` (per configuration, so the cap of a chunk is
    ``time_cap_s * len``) is spent, but never before ``min_runs``. The warm-up gives each
    configuration ``warmup_runs`` runs, but spends at most a fifth of ``time_cap_s`` on one
    (at least one run): every timed burst settles first anyway. ``lockstep``: no configuration
    stops before the others (all stop together once every one of them is stable, or at the
    cap), so all medians come from the same stretch of time; timings that are compared with
    each other (a plan against the dense model) need it: stopped one by one, the stable ones
    early, a chunk's ratios to dense moved 4-23% between repeats on a 2-vCPU VM, in lockstep
    1-6% (BENCHMARKS.md, "Ratios from the same stretch of time"). Returns every
    configuration's list of times.
    """
    k = len(timed_calls)
    for call in timed_calls:
        _warm_up(call, warmup_runs, time_cap_s / 5)
    times: List[List[float]] = [[] for _ in range(k)]
    active = list(range(k))
    deadline = time.perf_counter() + time_cap_s * max(1, k)
    round_no = 0
    per_round = max(1, int(burst_runs))
    check_every = max(1, min_runs // (4 * per_round))
    while active:
        shift = round_no % len(active)
        order = active[shift:] + active[:shift]
        for i in order:
            times[i].extend(burst(timed_calls[i], settle_ms, per_round))
        round_no += 1
        if min(len(times[i]) for i in active) < min_runs:
            continue
        out_of_time = time.perf_counter() > deadline
        if out_of_time or round_no % check_every == 0:
            going = [
                i
                for i in active
                if not out_of_time
                and len(times[i]) < max_runs
                and rel_iqr(times[i]) > target_rel_iqr
                and median_rel_se(times[i]) > target_rel_se
            ]
            # in lockstep every active configuration has as many runs as the others, so
            # out of time or at max_runs all of them leave ``going``: stop when none is left
            active = (active if going else []) if lockstep else going
    return times


def ratio_protocol(
    call: Callable[[], float],
    reference: Callable[[], float],
    warmup_runs: int = 10,
    min_runs: int = 20,
    max_runs: int = 300,
    target_rel_iqr: float = 0.05,
    time_cap_s: float = 2.0,
    settle_ms: float = 3.0,
    burst_runs: int = 5,
) -> List[float]:
    """Paired alternating timing: one ratio per pair of bursts (order alternating), each
    burst's median time, ``call / reference``. ``min_runs``/``max_runs`` count pairs."""
    for c in (call, reference):
        _warm_up(c, warmup_runs, time_cap_s / 5)
    ratios: List[float] = []
    deadline = time.perf_counter() + 2 * time_cap_s
    i = 0

    def med(c: Callable[[], float]) -> float:
        return _quantile(sorted(burst(c, settle_ms, burst_runs)), 0.5)

    while True:
        if i % 2 == 0:
            a = med(call)
            b = med(reference)
        else:
            b = med(reference)
            a = med(call)
        ratios.append(a / b if b > 0 else float("inf"))
        i += 1
        if i < min_runs:
            continue
        if i >= max_runs or time.perf_counter() > deadline or rel_iqr(ratios) <= target_rel_iqr:
            return ratios


# --------------------------------------------------------------------------------------------
# Requirements (checked before any work, with what to install)
# --------------------------------------------------------------------------------------------
class RequirementError(RuntimeError):
    """The device's Python, numpy or onnxruntime cannot run the bundle (the message says why
    and what to install)."""


def _version_tuple(version: str) -> Tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _fmt(v: Sequence[int]) -> str:
    return ".".join(str(x) for x in v)


def check_requirements(python_version: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """Check Python, numpy and onnxruntime; the versions found (for the results file).

    Raises ``RequirementError`` naming the version found, the floor and the pip command.
    onnxruntime has no fixed floor: it must have IOBinding, and ``run_bundle`` refuses it with
    the bundle's opset/IR version when it cannot load the first model.
    """
    py = tuple(python_version or sys.version_info[:3])
    if py[:2] < MIN_PYTHON:
        raise RequirementError(
            f"Python {_fmt(py)} is too old for this runner: it needs Python >= "
            f"{_fmt(MIN_PYTHON)} (run it with python3.8 or newer)")
    try:
        import numpy as np
    except ImportError:
        raise RequirementError(
            f"numpy is not installed for {sys.executable}; install it with: "
            f"{sys.executable} -m pip install 'numpy>={_fmt(MIN_NUMPY)}'") from None
    if _version_tuple(np.__version__)[:2] < MIN_NUMPY:
        raise RequirementError(
            f"numpy {np.__version__} is too old: the runner needs numpy >= {_fmt(MIN_NUMPY)}; "
            f"upgrade with: {sys.executable} -m pip install -U 'numpy>={_fmt(MIN_NUMPY)}'")
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RequirementError(
            f"onnxruntime cannot be imported for {sys.executable} ({e}); install it with: "
            f"{sys.executable} -m pip install onnxruntime") from None
    sess_cls = getattr(ort, "InferenceSession", None)
    if sess_cls is None or not hasattr(sess_cls, "io_binding") \
            or not hasattr(sess_cls, "run_with_iobinding"):
        raise RequirementError(
            f"onnxruntime {getattr(ort, '__version__', '?')} has no IOBinding API; install a "
            f"current onnxruntime: {sys.executable} -m pip install -U onnxruntime")
    return {"python": _fmt(py), "numpy": str(np.__version__),
            "onnxruntime": str(ort.__version__),
            "providers_available": ",".join(ort.get_available_providers())}


# --------------------------------------------------------------------------------------------
# ONNX Runtime sessions
# --------------------------------------------------------------------------------------------
_GRAPH_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "layout": "ORT_ENABLE_LAYOUT",
    "all": "ORT_ENABLE_ALL",
}


def make_session(
    model: Any, threads: int = 1, graph_optimization_level: str = "all",
    providers: Optional[Sequence[str]] = None, profile_prefix: Optional[str] = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` with fixed intra-op threads and sequential execution
    (profiling each node into ``<profile_prefix>_<time>.json`` when a prefix is given)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = _GRAPH_LEVELS.get(graph_optimization_level)
    if level is None:
        raise ValueError(
            f"graph_optimization_level {graph_optimization_level!r}; "
            f"use one of {sorted(_GRAPH_LEVELS)}"
        )
    if not hasattr(ort.GraphOptimizationLevel, level):
        have = [k for k, v in _GRAPH_LEVELS.items() if hasattr(ort.GraphOptimizationLevel, v)]
        raise ValueError(
            f"graph_optimization_level {graph_optimization_level!r} ({level}) is not in "
            f"onnxruntime {ort.__version__}; use one of {have} or a newer onnxruntime"
        )
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    return ort.InferenceSession(
        model, sess_options=so, providers=list(providers or ["CPUExecutionProvider"])
    )


_NP_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool",
}


def session_timer(sess: Any, feeds: Optional[Dict[str, Any]] = None, seed: int = 0,
                  calls_per_sample: int = 1) -> Callable[[], float]:
    """A zero-argument callable that runs ``sess`` once per call and returns its time in ms.

    Inputs are bound once through IOBinding (random normal data when ``feeds`` is None), so
    the timed call is the session run alone, not numpy conversion.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    if feeds is None:
        feeds = {}
        for inp in sess.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            dtype = _NP_DTYPES.get(inp.type, "float32")
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(value))
    for out in sess.get_outputs():
        binding.bind_output(out.name, "cpu")
    run = sess.run_with_iobinding
    n = max(1, int(calls_per_sample))
    perf = time.perf_counter_ns

    def timed() -> float:
        t0 = perf()
        for _ in range(n):
            run(binding)
        return (perf() - t0) / 1e6 / n

    return timed


# --------------------------------------------------------------------------------------------
# In-context layer timing: the layout reorders a micro-model pays and a whole model does not
# --------------------------------------------------------------------------------------------
#: ONNX Runtime's conversions between the plain NCHW layout and its blocked NCHWc layout. The
#: CPU provider runs a convolution blocked when its channel counts allow; a single-layer
#: micro-model then converts its input into the blocked layout and its output back, which a
#: whole model does only where a blocked run of layers starts or ends. (mobilenet_v2 at 224²
#: on an AVX-512 Xeon, profiled: 4.86 of the 11.74 ms its micro-models add up to are
#: reorders; the whole model spends 0.007 ms in them, ``benchmarks/profile_in_context.py``.)
LAYOUT_REORDER_OPS = ("ReorderInput", "ReorderOutput")
#: how layer entries are timed: the micro-model's run less its layout reorders' share of it
LAYER_TIMING = "in-context"


def reorder_share_from_profile(events: Sequence[Dict[str, Any]], runs: int,
                               op_names: Sequence[str] = LAYOUT_REORDER_OPS) -> float:
    """Share of a session run that an ONNX Runtime profile (``end_profiling``'s JSON events)
    spent in the nodes of ``op_names``: per node the median of its last ``runs`` kernel times,
    summed, over the median of the last ``runs`` whole runs (``model_run``); 0.0 without any.

    A share, not a time: the profiler's own cost inflates small runs (a 0.8 ms model profiles
    at 1.6 ms), and a share carries over to the un-profiled timing."""
    per_node: Dict[str, List[float]] = {}
    run_us: List[float] = []
    for e in events:
        args = e.get("args") or {}
        if (e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")
                and args.get("op_name") in op_names):
            per_node.setdefault(str(e["name"]), []).append(float(e.get("dur", 0.0)))
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            run_us.append(float(e.get("dur", 0.0)))
    k = max(1, int(runs))
    if not per_node or not run_us:
        return 0.0
    reorder_us = sum(_quantile(sorted(d[-k:]), 0.5) for d in per_node.values())
    total_us = _quantile(sorted(run_us[-k:]), 0.5)
    return min(reorder_us / total_us, 1.0) if total_us > 0 else 0.0


def profiled_events(model: Any, threads: int = 1, graph_optimization_level: str = "all",
                    providers: Optional[Sequence[str]] = None,
                    feeds: Optional[Dict[str, Any]] = None, runs: int = 10
                    ) -> List[Dict[str, Any]]:
    """ONNX Runtime's profile events (``end_profiling``'s JSON) of ``runs`` runs of ``model``
    (ONNX bytes or path) after two warm-up runs, in a profiled session of its own; [] when the
    profile cannot be read. The profile file is removed."""
    d = tempfile.mkdtemp(prefix="autoprune-prof-")
    try:
        sess = make_session(model, threads, graph_optimization_level, providers,
                            profile_prefix=os.path.join(d, "layer"))
        call = session_timer(sess, feeds)
        for _ in range(2 + int(runs)):
            call()
        path = sess.end_profiling()
        try:
            with open(path, encoding="utf-8") as f:
                events: List[Dict[str, Any]] = json.load(f)
        except (OSError, ValueError):
            return []
        return events
    finally:
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


def layout_reorder_share(model: Any, threads: int = 1, graph_optimization_level: str = "all",
                         providers: Optional[Sequence[str]] = None,
                         feeds: Optional[Dict[str, Any]] = None, runs: int = 10) -> float:
    """Share of one run of ``model`` (ONNX bytes or path) spent in layout reorders, from
    ``profiled_events``; 0.0 when the runtime inserted none (a layer off the blocked path, or
    a provider without the layout) or the profile could not be read."""
    events = profiled_events(model, threads, graph_optimization_level, providers, feeds, runs)
    return reorder_share_from_profile(events, runs)


def in_context_ms(wall_ms: float, reorder_share: float) -> float:
    """A micro-model's time less its layout reorders' share (at most nine tenths taken off)."""
    return float(wall_ms) * (1.0 - min(max(float(reorder_share), 0.0), 0.9))


# --------------------------------------------------------------------------------------------
# Bundle runner
# --------------------------------------------------------------------------------------------
def _atomic_write_json(path: str, obj: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _batches(todo: Sequence[Dict[str, Any]], chunk: int) -> List[List[Dict[str, Any]]]:
    """Entries timed together (round-robin), in order: the kernel-rules sweep as one batch and
    the weight-streaming probe chains as one batch (each fit compares its entries with each
    other, so a slow spell of the device must hit all of them alike, as local detection's
    interleaved sweep does: timed chunk by chunk, spells of 1.3x landed on some widths and made
    a step vanish), then the table entries in chunks of ``chunk`` (written after each)."""
    def kinds(e: Dict[str, Any]) -> List[str]:
        return str(e.get("kind", "")).split("+")

    rules = [e for e in todo if "rules" in kinds(e)]
    stream = [e for e in todo if "stream" in kinds(e)]
    rest = [e for e in todo if "rules" not in kinds(e) and "stream" not in kinds(e)]
    step = max(1, chunk)
    out = [b for b in (rules, stream) if b]
    return out + [rest[i : i + step] for i in range(0, len(rest), step)]


def _read_model(path: str) -> bytes:
    """Model bytes; ``.gz`` files are decompressed."""
    if path.endswith(".gz"):
        import gzip

        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _load_session(bundle_dir: str, entry: Dict[str, Any], manifest: Dict[str, Any],
                  threads: int, level: str, providers: Sequence[str]) -> Tuple[Any, bytes]:
    """A session for one entry and the model's bytes; a model this onnxruntime cannot load is
    a RequirementError naming the bundle's ONNX opset and IR version."""
    import onnxruntime as ort

    path = os.path.join(bundle_dir, entry["file"])
    data = _read_model(path)
    try:
        return make_session(data, threads, level, providers), data
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        fmt = manifest.get("onnx_format") or {}
        raise RequirementError(
            f"onnxruntime {ort.__version__} cannot load {path} (bundle models: ONNX opset "
            f"{fmt.get('opset', '?')}, IR version {fmt.get('ir_version', '?')}): "
            f"{type(e).__name__}: {str(e).strip()[:300]}; install a newer onnxruntime "
            f"({sys.executable} -m pip install -U onnxruntime) or export the bundle with an "
            "older opset") from None


def run_bundle(
    bundle_dir: str, threads: int = 1, out: Optional[str] = None,
    graph_optimization_level: str = "all", providers: Optional[Sequence[str]] = None,
    chunk: int = 8, quiet: bool = False,
) -> str:
    """Measure every entry of the bundle; returns the results path. Resumes a partial run.

    Checks the requirements first (``RequirementError`` with what to install); what the
    fingerprint could not trust (an emulator's host /proc/cpuinfo) is printed and kept in the
    results' ``fingerprint_notes``."""
    mpath = os.path.join(bundle_dir, "manifest.json")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise RequirementError(f"{mpath}: cannot read the bundle manifest ({e}); pass the "
                               "bundle directory (the one holding manifest.json)") from None
    env = check_requirements()
    import onnxruntime as ort

    out = out or os.path.join(bundle_dir, f"results_t{threads}.json")
    protocol = dict(manifest["protocol"])
    fp = cpu_fingerprint()
    providers = list(providers or ["CPUExecutionProvider"])
    have = ort.get_available_providers()
    missing = [p for p in providers if p not in have]
    if missing:
        raise RequirementError(
            f"execution provider(s) {missing} not in onnxruntime {ort.__version__} on this "
            f"device (it has {have}); pass --providers with some of those")
    for note in fp.get("notes", []):
        print(f"run_bundle.py: warning: {note}", file=sys.stderr, flush=True)
    device = {
        "backend": "onnxruntime-cpu",
        "device_name": fp["device_name"],
        "arch": fp["arch"],
        "runtime": f"onnxruntime {ort.__version__}",
        "threads": int(threads),
        "precision": "float32",
        "isa_flags": fp["isa_flags"],
        "driver": "",
        "clocks": "",
        "extra": {"graph_optimization_level": graph_optimization_level,
                  "layer_timing": LAYER_TIMING, "providers": ",".join(providers)},
    }
    results: Dict[str, Any] = {
        "results_schema_version": RESULTS_SCHEMA_VERSION,
        "bundle_id": manifest["bundle_id"],
        "device": device,
        "protocol": protocol,
        "entries": {},
        "environment": {**env, "machine": platform.machine(),
                        "system": f"{platform.system()} {platform.release()}"},
        "fingerprint_notes": list(fp.get("notes", [])),
    }
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("bundle_id") == manifest["bundle_id"] and old.get("device") == device:
            results["entries"] = dict(old.get("entries", {}))
    todo = [e for e in manifest["entries"] if e["id"] not in results["entries"]]
    total = len(manifest["entries"])
    t_start = time.time()
    for batch in _batches(todo, chunk):
        timers, reorders = [], []
        for entry in batch:
            sess, data = _load_session(bundle_dir, entry, manifest, threads,
                                       graph_optimization_level, providers)
            reorders.append(layout_reorder_share(data, threads, graph_optimization_level,
                                                 providers))
            call = session_timer(sess)
            n = calibrate_calls(lambda: call(), protocol.get("min_sample_ms", 0.0))
            timers.append(session_timer(sess, calls_per_sample=n))
        times = run_protocol(
            timers,
            warmup_runs=protocol["warmup_runs"],
            min_runs=protocol["min_runs"],
            max_runs=protocol["max_runs"],
            target_rel_iqr=protocol["target_rel_iqr"],
            time_cap_s=protocol["time_cap_s"],
            # bundles written before bursts existed time one cold run per sample
            settle_ms=protocol.get("settle_ms", 0.0),
            burst_runs=protocol.get("burst_runs", 1),
            target_rel_se=protocol.get("target_rel_se", 0.0),
        )
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for entry, ts, reorder in zip(batch, times, reorders):
            med, iqr, n, mn = summarize(ts)
            results["entries"][entry["id"]] = {
                "median_ms": in_context_ms(med, reorder), "iqr_ms": iqr, "n_runs": n,
                "min_ms": in_context_ms(mn, reorder), "reorder_share": reorder,
                "measured_at": stamp,
            }
        _atomic_write_json(out, results)
        if not quiet:
            done = len(results["entries"])
            el = time.time() - t_start
            print(f"[{done}/{total}] {el:.1f} s elapsed", file=sys.stderr, flush=True)
    if not todo:
        _atomic_write_json(out, results)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Measure an autoprune latency bundle on this device.")
    p.add_argument("bundle_dir", nargs="?", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", default=None, help="results file (default BUNDLE/results_tN.json)")
    p.add_argument("--graph-optimization-level", default="all", choices=sorted(_GRAPH_LEVELS))
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="comma-separated execution providers, e.g. XnnpackExecutionProvider,"
                        "CPUExecutionProvider")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    try:
        path = run_bundle(args.bundle_dir, args.threads, args.out,
                          args.graph_optimization_level, args.providers.split(","),
                          quiet=args.quiet)
    except (RequirementError, ValueError) as e:
        print(f"run_bundle.py: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
