"""``search``: find the per-group pruning plan that keeps the most accuracy within a latency
budget on a device. A short facade over the stages:

analyze the model (unless ``spec=``) -> profile it on the device (unless ``table=``; an
existing table for the same device and model is reused) -> fit the latency model (unless
``predictor=``) -> build the search space -> check the budget (zero, negative or NaN ->
``InvalidInputError``; below the fastest plan of the space -> ``InfeasibleBudgetError``
stating the fastest predicted latency) -> :func:`optimize` (the study stored in ``run_dir``
or ``storage=``, so a second call with the same arguments resumes) -> :func:`select_finalists`
(re-measure the best candidates on the device; see ``autoprune._search._finalists`` for the
order and the rule) -> ``SearchResult``. Without ``run_dir`` and ``storage`` the study lives
in memory and nothing is written (the latency table, if profiled, goes to the user cache).

``best_plan`` is the finalist chosen after measuring; if none met the budget it is ``None``
and ``result.notes`` says why (the trials are kept: a tighter budget or more trials is the
fix). With ``verify_finalists=False`` nothing is measured and ``best_plan`` is the first
candidate by prediction.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import autoprune._search._finalists as _fin
from autoprune._search._optimize import CachedProxy, latency_fn, optimize
from autoprune._search._refine import refine_proxies
from autoprune._search._result import SearchResult
from autoprune.budget import Budget
from autoprune.errors import InfeasibleBudgetError, InvalidInputError, TableMismatchError
from autoprune.latency._model import TableLatencyModel, as_latency_model
from autoprune.strategies.base import SearchProblem
from autoprune.types import ModelSpec

if TYPE_CHECKING:
    from torch import nn

    from autoprune.backends.base import Backend
    from autoprune.space import SearchSpace


# --- the call ------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]


def check_budget(budget: Any) -> Budget:
    """The search budget in milliseconds as a validated ``Budget`` (``Budget.of``)."""
    if budget is None:
        raise InvalidInputError("latency_budget_ms is required: the latency budget in "
                                "milliseconds on the target device, e.g. latency_budget_ms=8.0")
    return Budget.of(latency_budget_ms=budget)


def _storage(storage: Any, run_dir: Path | None) -> Any:
    """The Optuna storage: ``make_storage``'s, or in memory without ``storage`` and
    ``run_dir`` (nothing to resume, nothing written)."""
    if isinstance(storage, str) and storage.startswith("journal:"):
        storage = storage[len("journal:"):]
    if storage is None and run_dir is None:
        import optuna

        return optuna.storages.InMemoryStorage()
    from autoprune.storage import make_storage

    # a given storage does not use run_dir (only the default journal lives there)
    return make_storage(storage, run_dir if run_dir is not None else Path("."))


def run_stem(spec: ModelSpec, device_name: str, budget_ms: float, strategy_name: str) -> str:
    """The default study name (and the CLI's default run directory under ``runs/``)."""
    return _slug(f"search_{spec.model_name}_{spec.fingerprint[:8]}_{device_name}_"
                 f"{budget_ms:.4g}ms_{strategy_name}")



def search(
    model: nn.Module,
    example_inputs: Any,
    device: str | Any = "onnxruntime-cpu",
    latency_budget_ms: float | None = None,
    evaluator: Callable[[nn.Module], float] | Any | None = None,
    n_trials: int = 200,
    strategy: str | Any = "tpe",
    table: Any | None = None,
    predictor: Any | str | None = None,
    space: SearchSpace | str | Path | None = None,
    storage: str | Path | Any | None = None,
    study_name: str | None = None,
    run_dir: str | Path | None = None,
    n_finalists: int = 3,
    seed: int = 0,
    progress: bool = True,
    timeout_s: float | None = None,
    *,
    spec: ModelSpec | None = None,
    verify_finalists: bool = True,
    max_remeasure: int = 8,
    strategy_options: dict[str, Any] | None = None,
    space_options: dict[str, Any] | None = None,
    finalist_budget: Budget | None = None,
    proxy_tolerance: float = 0.0,
    refine_evaluator: Callable[[nn.Module], float] | None = None,
    refine_top_k: int = 8,
    importance: str | Path | Any = "magnitude",
) -> SearchResult:
    """Search per-group pruning plans for ``model`` under ``latency_budget_ms`` on ``device``.

    ``evaluator``: any ``model -> float`` (higher is better; see ``autoprune.evaluators``), a
    plan evaluator (``evaluate_plan(plan)``), or None for the data-free weight-magnitude proxy.
    ``strategy``: ``tpe`` (default), ``nsga2``, ``motpe``, ``random``, ``rl``, ``greedy``, a
    ``Strategy`` or an Optuna sampler. ``space``: a ``SearchSpace``, a preset name or a YAML
    path (default: built from the model, table and backend; ``space_options`` go to it).
    ``predictor``: a fitted ``LatencyPredictor``, any callable plan -> ms, ``"table"`` (the
    table sums mapped onto two measured plans: ``TableLatencyModel``), or None (fit a
    ``LatencyPredictor``). ``n_trials`` is the study's total: a resumed study runs only the missing trials.
    ``run_dir`` holds the study journal (unless ``storage=`` is given) and the saved result
    (``SearchResult.save``); resuming needs it (or a persistent ``storage`` and the same
    ``study_name``, by default ``search-<model>-<fingerprint>-<device>-<budget>ms-<strategy>``).
    Without ``run_dir`` nothing is written: the study is kept in memory (unless ``storage=``),
    the result is returned unsaved (``result.run_dir`` is None; ``result.save(path)`` writes
    it), and a latency table profiled here goes to the user cache
    (``autoprune.io.cache_dir()``).

    Finalists (``select_finalists``): ``n_finalists`` candidates are re-measured (more, up to
    ``max_remeasure``, while none meets the budget); ``proxy_tolerance`` treats proxies that
    close to the best as ties (the larger plan first). ``finalist_budget``: the ``Budget`` the
    measured finalists must meet, by default ``latency_budget_ms``; ``run_pipeline`` passes a
    fraction of dense (checked on paired ratios; ``measured_latency_ms`` is then the ratio x
    the predicted dense latency, the predictor's scale).

    ``refine_evaluator``: a costlier proxy (e.g. ``accuracy_evaluator(val, calib_loader=train,
    finetune_steps=50)``) for the ``refine_top_k`` best distinct feasible plans of the study
    (``refine_proxies``; column ``proxy_refined``); finalists are then taken from those first.

    ``importance``: what the greedy knapsack (strategy ``greedy`` and the Optuna strategies'
    warm start) trades latency against: ``"magnitude"`` (data-free weight magnitude kept),
    ``"sensitivity"`` (``SensitivityProxy``: ``evaluator``'s drop with one group pruned at a
    few widths, measured once into ``run_dir/sensitivity.csv`` and reused on resume), a path
    (that table: loaded if it exists, else measured and saved there, so searches at other
    budgets reuse it), or any plan evaluator (``evaluate_plan(plan) -> float``).
    """
    search_budget = check_budget(latency_budget_ms)
    budget = float(search_budget.ms)  # type: ignore[arg-type]
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise InvalidInputError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    if isinstance(n_finalists, bool) or not isinstance(n_finalists, int) or n_finalists < 1:
        raise InvalidInputError(f"n_finalists must be an integer >= 1, got {n_finalists!r}")
    if finalist_budget is None:
        finalist_budget = search_budget
    elif not isinstance(finalist_budget, Budget):
        raise InvalidInputError(f"finalist_budget must be an autoprune.budget.Budget "
                                f"(Budget.of(...)), got {type(finalist_budget).__name__}")
    from autoprune.strategies import get_strategy

    strat = get_strategy(strategy, **(strategy_options or {}))

    # backend, spec, table, predictor ------------------------------------------------------
    backend: Backend
    if isinstance(device, str):
        from autoprune.backends import get_backend

        backend = get_backend(device)  # each backend has sane defaults (ORT: 1 thread)
    else:
        backend = device
    device_name = getattr(backend, "name", "") or type(backend).__name__
    _check_table_device(table, backend)
    if spec is None:
        from autoprune._analyze import analyze

        spec = analyze(model, example_inputs)
    if table is None and (predictor is None or isinstance(predictor, str) or space is None):
        from autoprune.latency._profile import profile

        table = profile(model, example_inputs, backend, spec=spec, progress=progress)
    # space ------------------------------------------------------------------------------------
    from autoprune.space import SearchSpace

    if space is None:
        space = SearchSpace.from_spec(spec, table, backend, **(space_options or {}))
    elif isinstance(space, (str, Path)):
        space = SearchSpace.from_yaml(space, spec, table, backend, **(space_options or {}))
    elif not isinstance(space, SearchSpace):
        raise InvalidInputError(f"space must be a SearchSpace, a preset name or a YAML path, got "
                                f"{type(space).__name__}")
    if space.spec.fingerprint != spec.fingerprint:
        raise InvalidInputError("space was built for another model (fingerprints differ); "
                                "build it from this model's spec")

    # latency model ------------------------------------------------------------------------------
    if predictor is None:
        from autoprune.latency._predictor import LatencyPredictor

        predictor = LatencyPredictor(random_state=seed).fit(
            table=table, model=model, example_inputs=example_inputs, backend=backend,
            spec=spec, progress=progress)
    elif isinstance(predictor, str):
        if predictor != "table":
            raise InvalidInputError(f"predictor must be a LatencyPredictor, a callable plan -> "
                                    f"ms, or 'table'; got {predictor!r}")
        if table is None:
            raise InvalidInputError("predictor='table' needs a latency table (table=...)")
        predictor = TableLatencyModel(table, spec).fit(
            model, example_inputs, backend, [space.dense_plan(), space.fastest_plan()])
    latency_ms = latency_fn(predictor)

    # budget against what the space can reach -------------------------------------------------
    dense_pred = float(latency_ms([space.dense_plan()])[0])
    fastest = float(latency_ms([space.fastest_plan()])[0])
    if budget < fastest:
        raise InfeasibleBudgetError(
            budget, fastest,
            f"dense model predicted at {dense_pred:.4g} ms; raise the budget or widen the "
            f"space (lower min_keep_ratio, allow_block=True)")
    notes: list[str] = []
    if fastest <= 0 or dense_pred <= 0:
        msg = (f"the latency predictor gives {fastest:.4g} ms for the fastest plan and "
               f"{dense_pred:.4g} ms for the dense one: predictions <= 0 mean it extrapolates "
               "badly; fit it on more plans (n_samples) or use predictor='table'. Finalists are "
               "still re-measured, so the budget holds for the returned plan")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    if budget >= dense_pred:
        msg = (f"budget {budget:.4g} ms is above the dense model's predicted {dense_pred:.4g} ms: "
               "every plan is feasible")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)

    # run dir, storage, evaluator ----------------------------------------------------------------
    stem = run_stem(spec, device_name, budget, strat.name)
    rd = Path(run_dir) if run_dir is not None else None
    if rd is not None:
        rd.mkdir(parents=True, exist_ok=True)
    study_name = study_name or stem
    from autoprune.evaluators import ImportanceProxy

    magnitude = ImportanceProxy(model, spec).fit()
    proxy = CachedProxy(evaluator if evaluator is not None else magnitude, model,
                        example_inputs, spec)
    guide = _importance(importance, magnitude, proxy, space, rd, evaluator is not None, progress)
    problem = SearchProblem(space=space, latency_ms=latency_ms, proxy=proxy, budget_ms=budget,
                            storage=_storage(storage, rd), study_name=study_name, seed=seed,
                            importance=guide)

    # search, finalists -------------------------------------------------------------------------
    trials = optimize(problem, strat, n_trials, latency_model=as_latency_model(predictor),
                      timeout_s=timeout_s, progress=progress,
                      assume_single_worker=storage is None)
    if refine_evaluator is not None:
        trials = refine_proxies(trials, model, example_inputs, spec, refine_evaluator,
                                top_k=refine_top_k, progress=progress)
    result = SearchResult(trials=trials, best_plan=None, dense_latency_ms=float("nan"),
                          budget_ms=budget, dense_predicted_ms=dense_pred,
                          dense_proxy=proxy.dense(), strategy=strat.name, study_name=study_name,
                          run_dir=rd, device=device_name, notes=notes, space=space.to_dict(),
                          user_budget_ms=finalist_budget.limit_ms(dense_pred))
    finalists = _fin.select_finalists(
        trials, model, example_inputs, spec, backend, finalist_budget,
        n_finalists=n_finalists, max_remeasure=max_remeasure, proxy_tolerance=proxy_tolerance,
        dense_ms=dense_pred if finalist_budget.is_fraction else None, verify=verify_finalists)
    result = result.with_finalists(finalists)
    if rd is not None:
        result.save(rd)
    return result


def _importance(importance: str | Path | Any, magnitude: Any, proxy: CachedProxy,
                space: SearchSpace, run_dir: Path | None, has_evaluator: bool,
                progress: bool) -> Any:
    """The plan evaluator the greedy knapsack uses (see ``search(importance=...)``)."""
    from autoprune.evaluators import PlanEvaluator

    if isinstance(importance, PlanEvaluator):
        return importance
    if not isinstance(importance, (str, Path)):
        raise InvalidInputError(f"importance must be 'magnitude', 'sensitivity', a path to a "
                                f"sensitivity table or a plan evaluator, got "
                                f"{type(importance).__name__}")
    if importance == "magnitude":
        return magnitude
    from autoprune._search._sensitivity import SensitivityProxy

    if importance == "sensitivity":
        path = run_dir / "sensitivity.csv" if run_dir is not None else None
    else:
        path = Path(importance)
    sens = SensitivityProxy(space, proxy)
    if path is not None and path.exists():
        return sens.load(path)
    if not has_evaluator:
        raise InvalidInputError("importance='sensitivity' measures the evaluator's drop per "
                                "group: pass evaluator= (e.g. autoprune.evaluators."
                                "accuracy_evaluator(val_loader))")
    sens.fit(progress=progress)
    if path is not None:
        sens.save(path)
    return sens


def _check_table_device(table: Any, backend: Any) -> None:
    """A table measured on another device (or runtime, threads, precision) is refused."""
    tdev = getattr(table, "device", None) if table is not None else None
    info = getattr(backend, "device_info", None)
    if tdev is None or info is None or not hasattr(tdev, "device_id"):
        return
    bdev = info()
    if bdev.device_id != tdev.device_id:
        fields = bdev.diff(tdev) or ["device_id"]
        details = ", ".join(f"{f}: table {tdev.to_dict().get(f)!r} vs backend "
                            f"{bdev.to_dict().get(f)!r}" for f in fields)
        where = getattr(table, "path", None)
        name = f"{tdev.device_id}" + (f" at {where}" if where is not None else "")
        why = (f"it was measured on {tdev.arch}, this search runs on {bdev.arch}; "
               if tdev.arch != bdev.arch else "")
        raise TableMismatchError(
            f"refused latency table {name}: {why}it was measured on another device or setup "
            f"({details}); profile this device (autoprune.profile) or pass the matching backend"
        )

