#!/usr/bin/env bash
# autoprune developer entry point: creates/reuses .venv from the lock file, then
#   ./dev.sh demo   - the main job end to end on the embedded default (CPU, ONNX Runtime)
#   ./dev.sh test   - lint (ruff), type check (mypy), then the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV="${AUTOPRUNE_VENV:-.venv}"
PY="${PYTHON:-python3}"

stamp_of() { cat requirements-dev.lock pyproject.toml | sha256sum | cut -c1-16; }

if [ ! -x "$VENV/bin/python" ]; then
    echo "[dev.sh] creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.autoprune-stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
    echo "[dev.sh] installing pinned dependencies (requirements-dev.lock)" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements-dev.lock
    "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
    stamp_of > "$VENV/.autoprune-stamp"
fi
export PYTHONUNBUFFERED=1

cmd="${1:-}"
shift || true
case "$cmd" in
    demo) exec "$VENV/bin/python" examples/quickstart.py "$@" ;;
    test)
        # lint first (pyflakes, pycodestyle errors, import order; pyproject.toml [tool.ruff]),
        # then types (mypy --strict on autoprune/; pyproject.toml [tool.mypy])
        "$VENV/bin/ruff" check autoprune tests benchmarks examples
        "$VENV/bin/python" -m mypy
        exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) echo "usage: ./dev.sh demo|test [args]" >&2; exit 2 ;;
esac
