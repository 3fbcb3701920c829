"""Bad input: each case asserts autoprune's exception type and that the message names the
problem. Cases another module's tests already cover are listed here, not repeated:

- unsupported custom layer ............ test_analyze.py::test_unsupported_module_names_path_and_type,
                                         ::test_unsupported_layer_types_and_bad_ignore_paths
- plan for another model, bad structure/ratio
                                         test_executor.py::test_invalid_plans_name_group_and_allowed_values,
                                         test_plan.py::test_validation_names_group_and_allowed_values
- impossible budget (states the fastest latency), budget zero/negative/NaN/str
                                         test_search.py::test_budget_checks
- evaluator raising / returning NaN .... test_search.py::test_evaluator_errors_and_nan_fail_only_their_trial,
                                         test_strategies.py::test_failing_and_nan_proxy_fail_the_trial_and_the_search_goes_on
- table from another device / schema ... test_table.py::test_load_refuses_other_device_and_schema,
                                         test_profiler.py::test_profile_refuses_table_of_other_device
- truncated table CSV .................. test_table.py::test_load_reports_corrupt_files_with_file_and_line
- YAML search space with unknown keys .. test_space.py::test_bad_yaml_fails_naming_key_and_allowed_values
- backend whose runtime is missing ..... test_backends.py::test_gpu_backends_unavailable_say_what_to_install
- arbitrary plan / space input ......... test_properties.py (hypothesis)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from _latency_helpers import synthetic_conv1d

import autoprune as ap
from autoprune.errors import (
    AutoPruneError,
    BackendUnavailable,
    CorruptFileError,
    InvalidInputError,
    InvalidPlanError,
    SearchSpaceError,
    StorageError,
    TableMismatchError,
)
from autoprune.zoo import conv1d_net, mlp

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def setup():
    """conv1d_net on the synthetic device: spec, table and a table-sum latency (no fitting)."""
    return synthetic_conv1d()


def _search(s, tmp_path: Path, **kw):  # noqa: ANN001, ANN202
    args = dict(device=s["backend"], latency_budget_ms=0.9 * s["dense_ms"], n_trials=3,
                table=s["table"], predictor=s["predict_ms"], spec=s["spec"],
                run_dir=tmp_path / "run", progress=False, verify_finalists=False)
    args.update(kw)
    return ap.search(s["model"], s["x"], **args)


# --- example inputs that do not fit the model ----------------------------------------------

@pytest.mark.parametrize(
    "model_fn,bad",
    [(lambda: conv1d_net(width=16), torch.randn(1, 3, 40)),  # 3 channels, model takes 1
     (lambda: conv1d_net(width=16), torch.randn(1, 40)),  # missing the channel dimension
     (lambda: mlp(), torch.randn(1, 32))],  # 32 features, model takes 64
)
def test_example_inputs_that_do_not_fit_the_model(model_fn, bad) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError) as e:
        ap.analyze(model_fn(), (bad,))
    msg = str(e.value)
    assert "example_inputs" in msg and str(tuple(bad.shape)) in msg


def test_inputs_that_do_not_fit_reach_no_stage_as_a_torch_error(setup, tmp_path: Path) -> None:
    s = setup
    bad = (torch.randn(1, 3, 40),)
    plan = ap.PruningPlan.uniform(s["spec"], 0.5)
    with pytest.raises(InvalidInputError, match="example_inputs"):
        ap.apply_plan(s["model"], plan, bad)
    with pytest.raises(InvalidInputError, match="example_inputs"):
        ap.profile(s["model"], bad, s["backend"], root=False, progress=False)
    with pytest.raises(InvalidInputError, match="example_inputs"):
        ap.search(s["model"], bad, device=s["backend"], latency_budget_ms=1.0, n_trials=2,
                  run_dir=tmp_path / "run", progress=False)


# --- search arguments ---------------------------------------------------------------------


def test_search_refuses_a_table_from_another_device(setup, tmp_path: Path) -> None:
    s = setup
    other = ap.get_backend("synthetic", alignment=8)  # another device fingerprint
    assert other.device_info().device_id != s["table"].device.device_id
    with pytest.raises(TableMismatchError, match="device"):
        _search(s, tmp_path, device=other)


def test_search_with_missing_runtime_fails_before_any_work(setup, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        _search(setup, tmp_path, device="tensorrt")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("n", [0, -5, 2.5, True])
def test_search_trial_count(setup, tmp_path: Path, n) -> None:  # noqa: ANN001
    with pytest.raises(InvalidInputError, match=f"n_trials must be an integer >= 1, got {n!r}"):
        _search(setup, tmp_path, n_trials=n)


def test_search_with_bad_storage_names_scheme_and_allowed(setup, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"unsupported storage URL scheme 'mysql'.*"
                                                r"postgresql://"):
        _search(setup, tmp_path, storage="mysql://u:pw@db/optuna")
    with pytest.raises(StorageError, match=r"127\.0\.0\.1:1") as e:
        _search(setup, tmp_path, storage="postgresql://u:hunter2@127.0.0.1:1/optuna")
    assert "hunter2" not in str(e.value)


def test_search_with_space_yaml_unknown_key(setup, tmp_path: Path) -> None:
    p = tmp_path / "space.yaml"
    p.write_text("min_keep_ratio: 0.5\nmax_keep: 0.9\n")
    with pytest.raises(SearchSpaceError, match=r"space\.yaml: unknown key\(s\) \['max_keep'\]"):
        _search(setup, tmp_path, space=p)


def test_search_space_from_another_model(setup, tmp_path: Path) -> None:
    from autoprune.space import SearchSpace

    other = ap.analyze(mlp(), (torch.randn(1, 64),))
    with pytest.raises(InvalidInputError, match="another model"):
        _search(setup, tmp_path, space=SearchSpace.from_spec(other))


def test_resumed_study_with_another_budget_is_refused(setup, tmp_path: Path) -> None:
    s = setup
    _search(s, tmp_path, n_trials=2)
    with pytest.raises(InvalidInputError, match="was run for a .* ms budget"):
        _search(s, tmp_path, n_trials=2, latency_budget_ms=0.95 * s["dense_ms"],
                study_name=_search(s, tmp_path, n_trials=2).study_name)


# --- truncated or corrupted files ---------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_table_sidecar_names_the_file(setup, tmp_path: Path) -> None:
    d = setup["table"].save(tmp_path / "t")
    _truncate(d / "table.json")
    with pytest.raises(CorruptFileError, match=r"table\.json: line \d+"):
        ap.LatencyTable.load(d)
    (d / "table.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CorruptFileError, match=r"table\.json"):
        ap.LatencyTable.load(d)


def test_corrupt_search_result_files_name_the_file(setup, tmp_path: Path) -> None:
    from autoprune._search import SearchResult

    result = _search(setup, tmp_path, n_trials=3)
    d = result.run_dir
    ok = SearchResult.load(d)
    assert len(ok.trials) == len(result.trials)
    original = (d / "search_result.json").read_bytes()
    _truncate(d / "search_result.json")
    with pytest.raises(CorruptFileError, match=r"search_result\.json: line \d+"):
        SearchResult.load(d)
    (d / "search_result.json").write_bytes(original)


def test_corrupt_trials_csv_names_the_file(setup, tmp_path: Path) -> None:
    from autoprune._search import SearchResult

    d = _search(setup, tmp_path, n_trials=3).run_dir
    (d / "trials.csv").write_text('trial,proxy\n1,"unterminated\n2,0.5,extra,extra\n')
    with pytest.raises(CorruptFileError, match=r"trials\.csv"):
        SearchResult.load(d)
    (d / "trials.csv").unlink()
    with pytest.raises(CorruptFileError, match=r"trials\.csv"):
        SearchResult.load(d)


def test_corrupt_study_journal_names_the_file(tmp_path: Path) -> None:
    import optuna

    from autoprune.storage import make_storage

    path = tmp_path / "study.journal"
    study = optuna.create_study(study_name="s", storage=make_storage(path, tmp_path))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    lines = path.read_text().splitlines(keepends=True)
    # garbage in the middle (not a torn tail, which is repaired): a disk or copy error
    path.write_text("".join(lines[:2]) + "this line is not JSON\n" + "".join(lines[2:]))
    with pytest.raises(StorageError, match=r"study\.journal is corrupt"):
        make_storage(path, tmp_path)
    # a record of the right shape with missing fields
    path.write_text('{"op_code": 0, "worker_id": "w", "study_name": "s"}\n')
    with pytest.raises(StorageError, match=r"study\.journal is corrupt"):
        make_storage(path, tmp_path)


def test_truncated_finetune_checkpoint_names_the_file(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from autoprune._finetune import finetune

    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 10, (16,))),
                        batch_size=8)
    finetune(mlp(in_features=8, hidden=16), loader, epochs=1, checkpoint_dir=tmp_path,
             progress=False)
    (ckpt,) = tmp_path.glob("*.pt")
    _truncate(ckpt, 0.6)
    with pytest.raises(CorruptFileError, match=ckpt.name):
        finetune(mlp(in_features=8, hidden=16), loader, epochs=2, checkpoint_dir=tmp_path,
                 progress=False)


def test_checkpoint_of_another_model_is_an_autoprune_error(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from autoprune._finetune import finetune

    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.randint(0, 10, (16,))),
                        batch_size=8)
    finetune(mlp(in_features=8, hidden=16), loader, epochs=1, checkpoint_dir=tmp_path,
             progress=False)
    with pytest.raises(AutoPruneError, match="does not fit this model"):
        finetune(mlp(in_features=8, hidden=32), loader, epochs=2, checkpoint_dir=tmp_path,
                 progress=False)


def test_plan_of_a_newer_schema_is_refused() -> None:
    with pytest.raises(InvalidPlanError, match="schema_version 2 is not supported"):
        ap.PruningPlan.from_json(json.dumps({"schema_version": 2, "groups": {}}))


# --- the command line turns mistakes into one-line errors ------------------------------------


@pytest.mark.parametrize(
    "argv,match",
    [(["--model", "autoprune.zoo:nothere"], "has no attribute 'nothere'"),
     (["--device", "tensorrt"], "pip install tensorrt"),
     (["--input-shape", "1,0,40"], "--input-shape must be positive integers"),
     (["--input-shape", "1,3,40"], "example_inputs")],
)
def test_cli_reports_bad_input_without_a_traceback(capsys, tmp_path: Path, argv, match) -> None:  # noqa: ANN001
    from autoprune.cli import main

    base = {"--model": "autoprune.zoo:conv1d_net", "--input-shape": "1,1,40",
            "--device": "onnxruntime-cpu", "--budget-ms": "1.0"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    args = ["search", *[v for kv in base.items() for v in kv], "--trials", "2", "--quiet",
            "--tables-root", str(tmp_path / "tables"), "--run-dir", str(tmp_path / "run")]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("autoprune: error:") and match in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_infeasible_budget_names_the_real_reason():
    """Predicted-unreachable and measured-missed budgets are different failures: the message
    of the second must not call the budget unreachable by prediction (issue 13)."""
    from autoprune.errors import InfeasibleBudgetError

    pred = InfeasibleBudgetError(0.5, 0.8, "dense 2 ms")
    assert "unreachable" in str(pred) and "predicted at 0.8 ms" in str(pred)
    assert not pred.measured
    meas = InfeasibleBudgetError(0.02425, 0.031, "trial 3 missed", measured=True)
    text = str(meas)
    assert meas.measured and "not met when measured" in text and "0.031 ms" in text
    assert "unreachable" not in text and "predicted at" not in text
    assert "raise the budget" in text and "trial 3 missed" in text
