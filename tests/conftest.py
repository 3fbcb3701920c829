"""Shared test setup: deterministic seeds, one intra-op thread (2-core CI machine)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Per-user caches (latency tables, kernel rules) go to a session temporary directory,
    never the developer's ~/.cache; one session detects each device's rules once."""
    old = os.environ.get("AUTOPRUNE_CACHE")
    os.environ["AUTOPRUNE_CACHE"] = str(tmp_path_factory.mktemp("autoprune_cache"))
    yield
    if old is None:
        os.environ.pop("AUTOPRUNE_CACHE", None)
    else:
        os.environ["AUTOPRUNE_CACHE"] = old


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tmp_tables(tmp_path):
    """A fresh latency-table root (never the repository's shipped tables)."""
    root = tmp_path / "latency_tables"
    root.mkdir()
    return root


def pytest_collection_modifyitems(config, items):
    # GPU / TensorRT tests skip with a reason rather than fail where the hardware is absent
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except Exception:  # noqa: BLE001
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (pip install tensorrt; GPU only)"))
    os.environ.setdefault("AUTOPRUNE_TEST", "1")
