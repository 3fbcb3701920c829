#!/usr/bin/env bash
# Latency-bundle round trip on an emulated aarch64 userland (issue 15).
#
# Builds (or reuses) an arm64 Debian root filesystem, puts the aarch64 numpy and onnxruntime
# wheels from PyPI next to it, exports a bundle here, runs the bundle's runner with the
# *aarch64* Python under QEMU user mode, and imports the results with `autoprune bundle import`.
# It proves the runner, its fingerprint and the import work on real aarch64 binaries
# (the aarch64 onnxruntime build, its providers); the TIMINGS ARE EMULATED and mean nothing.
#
#   benchmarks/arm_emulated.sh                      # defaults below
#   ARM_ALIGNMENT=16 benchmarks/arm_emulated.sh     # skip the kernel-rules sweep (~10x faster)
#
# Needs (Debian/Ubuntu, as root): apt-get install -y qemu-user-static mmdebstrap
# No binfmt_misc registration is needed: the interpreter is run through qemu-aarch64-static.
# Environment (all optional):
#   AUTOPRUNE_ARM_ROOT  where the root filesystem and wheels live (~/.cache/autoprune-arm)
#   ARM_SUITE           Debian suite of the root filesystem (bookworm: Python 3.11)
#   ARM_ORT_VERSION     aarch64 onnxruntime wheel (1.27.0: the newest that runs under QEMU 7.2;
#                       1.28.0, 1.29.0, 1.30.0, 1.32.0 segfault there; 1.20.1, 1.22.0, 1.23.2,
#                       1.27.0 ran; a real board takes the current one)
#   ARM_NUMPY_VERSION   aarch64 numpy wheel (2.4.6)
#   MODEL, INPUT_SHAPE  what to bundle (autoprune.zoo:conv1d_net, 1,1,40)
#   ARM_ALIGNMENT       export with this channel step (no sweep); empty: kernel-rules sweep
#   ARM_THREADS         runner threads (1)
#   ARM_WORK            work directory for the bundle and tables (a new temporary directory)
#   PYTHON              the host interpreter with autoprune (.venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

ARM_ROOT="${AUTOPRUNE_ARM_ROOT:-$HOME/.cache/autoprune-arm}"
SUITE="${ARM_SUITE:-bookworm}"
ORT_VERSION="${ARM_ORT_VERSION:-1.27.0}"
NUMPY_VERSION="${ARM_NUMPY_VERSION:-2.4.6}"
MODEL="${MODEL:-autoprune.zoo:conv1d_net}"
INPUT_SHAPE="${INPUT_SHAPE:-1,1,40}"
ALIGNMENT="${ARM_ALIGNMENT:-}"
THREADS="${ARM_THREADS:-1}"
WORK="${ARM_WORK:-$(mktemp -d -t autoprune-arm.XXXXXX)}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ROOTFS="$ARM_ROOT/rootfs-$SUITE"
SITE="$ARM_ROOT/site-ort$ORT_VERSION-numpy$NUMPY_VERSION"

say() { echo "[arm_emulated] $*" >&2; }
die() { say "error: $*"; exit 3; }

command -v qemu-aarch64-static >/dev/null ||
    die "qemu-aarch64-static not found; install it with: apt-get install -y qemu-user-static"
say "$(qemu-aarch64-static --version | head -1)"

# 1. the arm64 root filesystem (Debian's own arm64 packages, unpacked without running scripts)
if ! ls "$ROOTFS"/usr/bin/python3.* >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null ||
        die "mmdebstrap not found; install it with: apt-get install -y mmdebstrap"
    say "building the arm64 root filesystem in $ROOTFS ($SUITE)"
    mkdir -p "$ARM_ROOT"
    mmdebstrap --arch=arm64 --variant=extract --include=python3,libstdc++6,libgomp1 \
        "$SUITE" "$ROOTFS" >&2
fi
ARM_PY="$(ls "$ROOTFS"/usr/bin/python3.[0-9]* | grep -E 'python3\.[0-9]+$' | sort -V | tail -1)"
ARM_PYVER="$(basename "$ARM_PY" | sed 's/python//')"
say "aarch64 interpreter: $ARM_PY"

# 2. aarch64 wheels from PyPI, unpacked into a site directory (no pip inside the emulator)
if [ ! -d "$SITE/onnxruntime" ] || [ ! -d "$SITE/numpy" ]; then
    mkdir -p "$ARM_ROOT/wheels" "$SITE.tmp"
    for req in "numpy==$NUMPY_VERSION" "onnxruntime==$ORT_VERSION"; do
        say "downloading the aarch64 wheel of $req (Python $ARM_PYVER)"
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$ARM_ROOT/wheels" \
            --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 \
            --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
            --python-version "$ARM_PYVER" "$req"
    done
    for whl in "$ARM_ROOT"/wheels/numpy-"$NUMPY_VERSION"-*aarch64*.whl \
               "$ARM_ROOT"/wheels/onnxruntime-"$ORT_VERSION"-*aarch64*.whl; do
        "$PYTHON" -m zipfile -e "$whl" "$SITE.tmp"
    done
    rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
fi

# run the aarch64 interpreter: -S (its own site-packages are empty), our site on PYTHONPATH,
# a clean environment (the runner must need nothing of the host's)
arm_python() {
    env -i PATH=/usr/bin:/bin LC_ALL=C.UTF-8 PYTHONPATH="$SITE" \
        qemu-aarch64-static -L "$ROOTFS" "$ARM_PY" -S "$@"
}
say "probing the emulated userland"
arm_python -c 'import platform, sys, numpy, onnxruntime as ort
print("machine", platform.machine(), "python", sys.version.split()[0], "numpy", numpy.__version__,
      "onnxruntime", ort.__version__, "providers", ",".join(ort.get_available_providers()))' |
    tee "$WORK/arm_probe.txt" >&2
# what later runs (and tests/test_bundle.py's arm test) need to find this userland
"$PYTHON" - "$ARM_ROOT/env.json" "$ROOTFS" "$ARM_PY" "$SITE" <<'EOF'
import json, os, sys
path, rootfs, py, site = sys.argv[1:]
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump({"rootfs": rootfs, "python": py, "site": site}, f, indent=1)
os.replace(tmp, path)
EOF

# 3. export a bundle here (host Python with autoprune)
say "exporting the bundle of $MODEL ($INPUT_SHAPE) into $WORK/bundle"
TQDM_DISABLE=1 "$PYTHON" -m autoprune bundle export --model "$MODEL" --input-shape "$INPUT_SHAPE" \
    --out "$WORK/bundle" --quick ${ALIGNMENT:+--alignment "$ALIGNMENT"} >&2

# 4. run the bundle's runner with the aarch64 interpreter (emulated: slow)
say "running run_bundle.py under qemu-aarch64 (threads=$THREADS)"
t0=$(date +%s)
arm_python "$WORK/bundle/run_bundle.py" "$WORK/bundle" --threads "$THREADS" >&2
say "runner finished in $(( $(date +%s) - t0 )) s (emulated)"

# 5. import the results back here
RESULTS="$WORK/bundle/results_t$THREADS.json"
"$PYTHON" -m autoprune bundle import "$RESULTS" --root "$WORK/latency_tables"
"$PYTHON" - "$RESULTS" "$WORK/latency_tables" <<'EOF'
import json, pathlib, sys
r = json.loads(pathlib.Path(sys.argv[1]).read_text())
print("device as the runner recorded it:", json.dumps(r["device"], sort_keys=True))
print("runner environment:", json.dumps(r.get("environment", {}), sort_keys=True))
print("fingerprint notes:", r.get("fingerprint_notes", []))
ms = sorted(e["median_ms"] for e in r["entries"].values())
print(f"{len(ms)} entries measured, EMULATED medians {ms[0]:.3g}..{ms[-1]:.3g} ms "
      "(not comparable with anything)")
for t in pathlib.Path(sys.argv[2]).glob("*/table.json"):
    meta = json.loads(t.read_text())
    print("imported table:", t.parent.name, "| alignment", meta.get("alignment"),
          "| kernel rules", (meta.get("kernel_rules") or {}).get("alignment"))
    print("table notes:", meta.get("notes"))
EOF
say "done: work directory $WORK"
