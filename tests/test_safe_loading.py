"""Safe loading: autoprune's own code never unpickles, never loads YAML unsafely, never calls
``torch.load`` without ``weights_only=True``, and writes files only through autoprune.io;
every file it writes reads back with json / csv / ``torch.load(weights_only=True)``; a file
crafted to run code is refused without running it."""

from __future__ import annotations

import ast
import csv
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

import autoprune
from autoprune.errors import AutoPruneError, CorruptFileError

PACKAGE = Path(autoprune.__file__).resolve().parent
#: files allowed to write to disk directly, and why
DIRECT_WRITERS = {
    "io.py": "the atomic writer itself",
    "bundle_runner.py": "runs on a board without autoprune; has its own temp-file + rename writer",
    "storage.py": "cuts a torn record off Optuna's append-only journal, under the journal's lock",
}

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve",
                     "marshal"}


# --- the scanner ------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every way ``source`` could deserialise code: pickle-family imports, torch.load without
    weights_only=True, unsafe YAML loaders, numpy allow_pickle, pandas pickles, eval/exec,
    TorchScript loading."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{where}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if node.module == "yaml" and any(a.name in ("load", "unsafe_load", "full_load",
                                                        "Loader", "UnsafeLoader", "FullLoader")
                                             for a in node.names):
                found.append(f"{where}: from yaml import an unsafe loader")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("torch.load",) or (last == "load" and name.endswith("torch.load")):
                if not _is_true(_kw(node, "weights_only")):
                    found.append(f"{where}: torch.load without weights_only=True")
            elif name in ("yaml.load", "yaml.load_all"):
                loader = _kw(node, "Loader")
                loader_name = _dotted(loader) if loader is not None else ""
                if loader_name.rsplit(".", 1)[-1] not in ("SafeLoader", "CSafeLoader"):
                    found.append(f"{where}: {name} without SafeLoader")
            elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
                          "yaml.full_load_all"):
                found.append(f"{where}: {name}")
            elif last == "load" and name.split(".")[0] in ("np", "numpy"):
                if _is_true(_kw(node, "allow_pickle")):
                    found.append(f"{where}: numpy load with allow_pickle=True")
            elif last in ("read_pickle", "to_pickle"):
                found.append(f"{where}: pandas {last}")
            elif name in ("torch.jit.load", "jit.load", "torch.package.PackageImporter"):
                found.append(f"{where}: {name} (TorchScript/packages carry code)")
            elif isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec", "compile",
                                                                      "__import__"):
                found.append(f"{where}: builtin {node.func.id}()")
    return found


def direct_writes(source: str, filename: str = "<src>") -> list[str]:
    """File writes that bypass autoprune.io's atomic temp-file + rename."""
    found: list[str] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{filename}:{node.lineno}"
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if isinstance(node.func, ast.Name) and node.func.id == "open" or name in ("io.open",
                                                                                 "os.fdopen"):
            mode = node.args[1] if len(node.args) > 1 else _kw(node, "mode")
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and \
                    any(c in mode.value for c in "wax+"):
                found.append(f"{where}: open(..., {mode.value!r})")
        elif last in ("write_text", "write_bytes"):
            found.append(f"{where}: .{last}()")
        elif name == "torch.save":
            found.append(f"{where}: torch.save (use autoprune.io.atomic_torch_save)")
        elif name in ("json.dump", "np.save", "numpy.save", "np.savez", "onnx.save",
                      "onnx.save_model"):
            found.append(f"{where}: {name}")
        elif last in ("to_csv", "to_json", "to_parquet", "savefig") and node.args:
            arg = node.args[0]
            if not (isinstance(arg, ast.Name) and arg.id in ("buf", "buffer")):
                found.append(f"{where}: .{last}(<path>)")
    return found


def _package_files() -> list[Path]:
    files = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 10
    return files


def test_scanner_catches_what_it_should() -> None:
    bad = """
import pickle
from yaml import load
import torch, yaml, numpy as np, pandas as pd
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
np.load("a.npy", allow_pickle=True)
pd.read_pickle("x")
torch.jit.load("m.pt")
eval("1+1")
"""
    assert len(unsafe_loads(bad)) == 11
    good = """
import torch, yaml, json
torch.load(p, map_location="cpu", weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
model.eval()
json.loads(s)
"""
    assert unsafe_loads(good) == []
    writes = """
open(p, "w").write("x")
Path(p).write_text("x")
torch.save(sd, "m.pt")
df.to_csv("t.csv")
json.dump(obj, f)
open(p).read()
df.to_csv(index=False)
"""
    assert len(direct_writes(writes)) == 5


def test_autoprune_never_loads_unsafely() -> None:
    problems = []
    for f in _package_files():
        problems += unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))
    assert problems == []


def test_autoprune_writes_files_only_through_atomic_io() -> None:
    problems = []
    for f in _package_files():
        if f.name in DIRECT_WRITERS and f.parent == PACKAGE:
            continue
        problems += direct_writes(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))
    assert problems == []


# --- what autoprune writes reads back with safe readers -----------------------------------

PICKLE_MAGIC = {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}


def _read_safely(path: Path) -> None:
    """Parse ``path`` with a reader that cannot run code, by its extension."""
    data = path.read_bytes()
    assert data[:2] not in PICKLE_MAGIC, f"{path} is a raw pickle"
    suffix = path.suffix
    if path.name == ".lock":  # a table directory's lock: empty, or the sha256 of a CSV
        assert data == b"" or (len(data) == 64 and set(data.decode("ascii")) <= set(
            "0123456789abcdef")), f"{path}: unexpected lock file content"
    elif suffix == ".json":
        json.loads(data.decode("utf-8"))
    elif suffix == ".csv":
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
        assert rows and all(len(r) == len(rows[0]) for r in rows), f"{path}: ragged CSV"
    elif suffix in (".pt", ".pth"):
        assert zipfile.is_zipfile(path), f"{path} is not a torch zip archive"
        torch.load(path, map_location="cpu", weights_only=True)
    elif suffix in (".png", ".onnx", ".txt", ".md", ".journal", ".log"):
        if suffix == ".journal":
            for line in data.decode("utf-8").splitlines():
                json.loads(line)
    else:
        raise AssertionError(f"{path}: unexpected file type written by autoprune")


def test_plan_and_weights_files_load_with_safe_readers(tmp_path: Path) -> None:
    from autoprune.io import atomic_torch_save, safe_torch_load
    from autoprune.plan import GroupPlan, PruningPlan

    plan = PruningPlan(groups={"c1": GroupPlan("channel", 0.5)}, alignment=16)
    plan.save(tmp_path / "plan.json")
    from autoprune.zoo import mlp

    model = mlp(in_features=8, hidden=16)
    atomic_torch_save(model.state_dict(), tmp_path / "weights.pt")
    for p in tmp_path.iterdir():
        _read_safely(p)
    assert PruningPlan.load(tmp_path / "plan.json").to_dict() == plan.to_dict()
    sd = safe_torch_load(tmp_path / "weights.pt")
    assert set(sd) == set(model.state_dict())


def test_finetune_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from autoprune._finetune import finetune
    from autoprune.zoo import mlp

    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 10, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    finetune(mlp(in_features=8, hidden=16), loader, epochs=1, checkpoint_dir=tmp_path,
             progress=False)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in written)
    for p in written:
        _read_safely(p)


def test_table_and_search_files_load_with_safe_readers(tmp_path: Path) -> None:
    table_mod = pytest.importorskip("autoprune.latency._table")
    from autoprune.backends import get_backend
    from autoprune.latency._profile import profile
    from autoprune.zoo import conv1d_net

    model = conv1d_net(width=16)
    x = torch.randn(1, 1, 40)
    table = profile(model, (x,), get_backend("synthetic"), root=tmp_path / "tables",
                    progress=False)
    assert isinstance(table, table_mod.LatencyTable)
    written = [p for p in (tmp_path / "tables").rglob("*") if p.is_file()]
    assert {p.suffix for p in written} >= {".csv", ".json"}
    for p in written:
        _read_safely(p)


def test_search_run_dir_files_load_with_safe_readers(tmp_path: Path) -> None:
    from _latency_helpers import synthetic_conv1d

    import autoprune as ap

    s = synthetic_conv1d()
    result = ap.search(s["model"], s["x"], device=s["backend"], n_trials=4, table=s["table"],
                       predictor=s["predict_ms"], latency_budget_ms=0.9 * s["dense_ms"],
                       spec=s["spec"], run_dir=tmp_path / "run", progress=False,
                       verify_finalists=False)
    result.plot()
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"study.journal", "trials.csv", "search_result.json"}
    for p in written:
        _read_safely(p)


# --- files crafted to run code are refused without running it ------------------------------


class _Boom:
    """Unpickling this calls ``Path.touch`` on the marker: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.marker,))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path: Path) -> None:
    from autoprune.io import safe_torch_load

    marker = tmp_path / "code_ran"
    bad = tmp_path / "finetune_last.pt"
    buf = io.BytesIO()
    torch.save({"version": 1, "model": _Boom(marker)}, buf)
    bad.write_bytes(buf.getvalue())
    with pytest.raises(CorruptFileError, match="finetune_last.pt"):
        safe_torch_load(bad)
    assert not marker.exists()

    # the fine-tuning resume path reads the same file through the same loader
    from torch.utils.data import DataLoader, TensorDataset

    from autoprune._finetune import finetune
    from autoprune.zoo import mlp

    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.randint(0, 10, (8,))),
                        batch_size=8)
    with pytest.raises(AutoPruneError):
        finetune(mlp(in_features=8, hidden=16), loader, epochs=1, checkpoint_dir=tmp_path,
                 progress=False)
    assert not marker.exists()
    # and plain torch.load (what autoprune never does) would have run it
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_yaml_and_json_cannot_carry_code(tmp_path: Path) -> None:
    from autoprune.plan import PruningPlan

    marker = tmp_path / "code_ran"
    payload = f"!!python/object/apply:pathlib.Path.touch [{str(marker)!r}]"
    space_yaml = tmp_path / "space.yaml"
    space_yaml.write_text(f"alignment: {payload}\n")
    from autoprune._analyze import analyze
    from autoprune.space import SearchSpace
    from autoprune.zoo import conv1d_net

    spec = analyze(conv1d_net(width=16), (torch.randn(1, 1, 40),))
    with pytest.raises(AutoPruneError):
        SearchSpace.from_yaml(space_yaml, spec)
    assert not marker.exists()
    # JSON has no way to name a callable: a plan that tries is rejected as data
    with pytest.raises(AutoPruneError):
        PruningPlan.from_json(json.dumps({"groups": {"c1": {"structure": payload}}}))
    with pytest.raises(AutoPruneError):
        PruningPlan.from_json(json.dumps({"__reduce__": ["os.system", ["true"]]}))
    assert not marker.exists()
