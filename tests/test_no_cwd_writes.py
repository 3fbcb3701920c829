"""Library calls write nothing into the working directory unless given a path there: latency
tables (and what is kept next to them) go to the user cache, a search without ``run_dir`` keeps
its study in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import autoprune as ap
from autoprune.io import cache_dir
from autoprune.latency._table import LatencyTable
from autoprune.zoo import conv1d_net


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


@pytest.mark.timeout(300)
def test_profile_predictor_and_search_leave_the_cwd_empty(tmp_path, monkeypatch) -> None:
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(cache))
    torch.manual_seed(0)
    model = conv1d_net(width=16).eval()
    x = (torch.randn(1, 1, 40),)
    backend = ap.get_backend("synthetic")
    spec = ap.analyze(model, x)

    table = ap.profile(model, x, backend, spec=spec, progress=False)
    d = cache / "latency_tables" / backend.device_info().device_id
    assert table.path == d == LatencyTable.default_dir(backend.device_info())
    assert (d / "table.csv").is_file() and (d / "table.json").is_file()
    assert len(LatencyTable.load(d)) == len(table) > 0

    pred = ap.LatencyPredictor(n_samples=12, random_state=0).fit(
        table=table, model=model, example_inputs=x, backend=backend, spec=spec,
        progress=False)
    assert pred.data_path_ is not None and pred.data_path_.parent == d

    space = ap.SearchSpace.from_spec(spec, table, backend)
    budget = 0.5 * (pred.predict(space.fastest_plan()) + pred.predict(space.dense_plan()))
    result = ap.search(model, x, device=backend, latency_budget_ms=budget, table=table,
                       predictor=pred, n_trials=4, spec=spec, progress=False)
    assert result.run_dir is None and len(result.trials) == 4
    # without table= the search profiles itself, into the cache (the same table, reused)
    again = ap.search(model, x, device=backend, latency_budget_ms=budget, predictor=pred,
                      n_trials=3, spec=spec, progress=False, verify_finalists=False)
    assert len(again.trials) == 3  # a fresh in-memory study, nothing resumed
    assert _files(cwd) == []
    assert len(LatencyTable.load(d)) == len(table)

    # memory only when asked: root=False reads and writes nothing
    before = _files(cache)
    mem = ap.profile(model, x, backend, spec=spec, root=False, progress=False)
    assert mem.path is None and len(mem) == len(table)
    assert _files(cache) == before and _files(cwd) == []


def test_cache_dir_follows_the_environment_at_call_time(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("AUTOPRUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "autoprune"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: absolute only
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "autoprune"
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    dev = ap.get_backend("synthetic").device_info()
    assert LatencyTable.default_dir(dev) == tmp_path / "mine" / "latency_tables" / dev.device_id
    with pytest.raises(ap.errors.InvalidInputError, match="root=True"):
        ap.profile(None, None, ap.get_backend("synthetic"), spec=ap.analyze(
            conv1d_net(width=16), (torch.randn(1, 1, 40),)), root=True, progress=False)
