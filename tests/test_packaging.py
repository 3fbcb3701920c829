"""A regular (non-editable) install carries what the library reads at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_non_editable_install_finds_the_presets(tmp_path):
    # build from a copy of the sources: an in-tree build leaves build/ behind in the checkout,
    # whose stale files a later build would package
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(ROOT / "autoprune", src / "autoprune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-compile", "--target", str(target), str(src)],
        check=True, cwd=tmp_path, capture_output=True, timeout=300,
    )
    code = ("import autoprune, autoprune.space as s; "
            "print(autoprune.__file__); print(','.join(s.list_presets()))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target)}).stdout.split("\n")
    assert out[0].startswith(str(target)), out  # the installed copy, not the checkout
    assert set(out[1].split(",")) >= {"default", "resnet", "mobilenet", "vit"}
