"""``run_pipeline``: analyze → profile → fit predictor → search → apply → fine-tune → verify →
export, in one run directory, resumable.

Every step runs inside ``RunState.step`` (``_state.py``): it is timed, its status recorded, and
it is marked complete in ``run_dir/state.json``; a rerun with the same model and budget skips
completed steps and reloads their artefacts. A step is also skipped when its output is passed
in (``table=``, ``predictor=``, ``plan=``). Artefacts::

    run_dir/
      state.json              completed steps, dense accuracy, predicted latency, settings
      spec.json               ModelSpec from analyze
      table_ref.json          which latency table was used (tables live in tables_root)
      predictor.csv (+ .json) the predictor's measured plans (LatencyPredictor.load rebuilds it)
      search/                 the Optuna study (study.journal unless SearchConfig.storage) and
                              the saved SearchResult; trials.csv, finalists.csv, front.png
      plan.json               the chosen PruningPlan
      pruned.pt               pruned + fine-tuned state_dict (rebuild: apply_plan(fresh model,
                              plan, example_inputs).load_state_dict(torch.load(..., weights_only=True)))
      finetune/               fine-tuning checkpoint (resumes an interrupted fine-tune)
      verify.json             measured latency (dense, pruned, paired ratio), budget verdict
      model.onnx              the exported pruned model (masks baked)
      report.txt, report.json the summary
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

import autoprune.pipeline._anchor as _anchor
from autoprune.budget import Budget
from autoprune.errors import CorruptFileError, InfeasibleBudgetError, InvalidInputError
from autoprune.export import _as_tuple
from autoprune.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    read_json,
    safe_torch_load,
)
from autoprune.latency._model import as_latency_model, fitted_dense_ms
from autoprune.pipeline._config import FinetuneOptions, SearchConfig
from autoprune.pipeline._report import PipelineReport
from autoprune.pipeline._state import RunState, Step
from autoprune.plan import PruningPlan

if TYPE_CHECKING:
    from autoprune.export import VerifyReport
    from autoprune.types import ModelSpec


def load_pruned(model: nn.Module, run_dir: str | Path, example_inputs: Any) -> nn.Module:
    """Rebuild the pruned, fine-tuned model of a finished run from a fresh dense ``model``."""
    from autoprune.executor import apply_plan

    run_dir = Path(run_dir)
    plan = PruningPlan.from_json((run_dir / "plan.json").read_text())
    pruned = apply_plan(model, plan, _as_tuple(example_inputs))
    pruned.load_state_dict(safe_torch_load(run_dir / "pruned.pt"))
    return pruned.eval()


def _accuracy(model: nn.Module, loader: Iterable[Any] | None,
              evaluator: Callable[[nn.Module], float] | None, device: str) -> float | None:
    if evaluator is not None:
        return float(evaluator(copy.deepcopy(model)))
    if loader is None:
        return None
    from autoprune._finetune import evaluate_accuracy

    return evaluate_accuracy(model, loader, device)


def _configs(search_config: SearchConfig | None, finetune_config: FinetuneOptions | None,
             n_trials: int | None, search_options: Mapping[str, Any] | None,
             finetune_epochs: int | None, finetune_options: Mapping[str, Any] | None,
             distill: bool | None, train_device: str | None,
             ) -> tuple[SearchConfig, FinetuneOptions]:
    """The typed configs from either the new arguments or the old keyword arguments (not
    both: an old argument beside its config is an error saying which field takes it)."""
    old_search = {"n_trials": n_trials, "search_options": search_options}
    if search_config is not None:
        if not isinstance(search_config, SearchConfig):
            raise InvalidInputError(f"search_config must be an autoprune.SearchConfig, got "
                                    f"{type(search_config).__name__}")
        given = [k for k, v in old_search.items() if v is not None]
        if given:
            raise InvalidInputError(f"{', '.join(given)} given beside search_config: put them "
                                    "in SearchConfig(...) instead")
        sc = search_config
    else:
        sc = SearchConfig.from_options(
            search_options, **({} if n_trials is None else {"n_trials": n_trials}))
    old_ft = {"finetune_epochs": ("epochs", finetune_epochs), "distill": ("distill", distill),
              "train_device": ("train_device", train_device),
              "finetune_options": (None, finetune_options)}
    if finetune_config is not None:
        if not isinstance(finetune_config, FinetuneOptions):
            raise InvalidInputError(f"finetune_config must be an autoprune.FinetuneOptions, got "
                                    f"{type(finetune_config).__name__}")
        given = [k for k, (_, v) in old_ft.items() if v is not None]
        if given:
            raise InvalidInputError(f"{', '.join(given)} given beside finetune_config: put them "
                                    "in FinetuneOptions(...) instead")
        fc = finetune_config
    else:
        base = {f: v for f, v in old_ft.values() if f is not None and v is not None}
        fc = FinetuneOptions.from_options(finetune_options, **base)
    return sc, fc


def run_pipeline(
    model: nn.Module,
    example_inputs: Any,
    *,
    latency_budget_ms: float | None = None,
    budget_fraction: float | None = None,
    run_dir: str | Path,
    train_loader: Iterable[Any] | None = None,
    val_loader: Iterable[Any] | None = None,
    device: str = "onnxruntime-cpu",
    backend_options: dict[str, Any] | None = None,
    evaluator: Callable[[nn.Module], float] | None = None,
    search_evaluator: Callable[[nn.Module], float] | None = None,
    n_trials: int | None = None,
    table: Any = None,
    tables_root: str | Path | None = None,
    predictor: Any = None,
    predictor_samples: int = 60,
    plan: PruningPlan | None = None,
    search_options: dict[str, Any] | None = None,
    finetune_epochs: int | None = None,
    finetune_options: dict[str, Any] | None = None,
    distill: bool | None = None,
    export: bool = True,
    train_device: str | None = None,
    budget_headroom: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    search_config: SearchConfig | None = None,
    finetune_config: FinetuneOptions | None = None,
) -> PipelineReport:
    """Prune ``model`` to ``latency_budget_ms`` measured on ``device`` and prove it there.

    ``evaluator(model) -> float`` (higher is better) reports accuracy; by default top-1 on
    ``val_loader``. The search scores candidates with ``search_evaluator``, by default labelled
    accuracy after BatchNorm re-calibration on ``val_loader`` (pass a held-out split of the
    training data to keep the test set out of the search). ``table``/``predictor``/``plan``
    skip the steps that would make them. ``tables_root``: where latency tables live (default
    the user cache, ``autoprune.io.cache_dir()/latency_tables``; shared by runs on the same
    device: a table that already covers the model is reused, a partial one is extended).

    ``search_config`` (``SearchConfig``: trials, strategy, space, storage, finalists) and
    ``finetune_config`` (``FinetuneOptions``: epochs, distillation from the dense model,
    train device, ``autoprune.finetune`` settings) configure those steps; the older
    ``n_trials``/``search_options`` and ``finetune_epochs``/``finetune_options``/``distill``/
    ``train_device`` arguments still work (converted by ``from_options``; not beside a config).

    The budget is ``latency_budget_ms`` (absolute, on the device) or ``budget_fraction`` (a share
    of the dense model's latency on the device), validated once by ``Budget.of``. With
    ``budget_fraction`` every check is a paired ratio (candidate timed alternately with the
    dense model), which holds on a machine whose speed drifts (shared CPUs). The search budget
    is anchored by measurement (:func:`anchor_budget_ms`): the widest uniform plan of the space
    whose measured ratio fits is found by bisection (about five paired measurements) and its
    *predicted* latency becomes the search budget, so a predictor that is biased for small plans
    neither wastes the budget nor overshoots it (without such a plan: ``fraction x predicted
    dense latency``). Finalists are chosen by ``autoprune.select_finalists`` (the search's own
    rule; ``candidate_order``) against the budget less ``budget_headroom`` (for a fraction; an
    absolute budget is checked as given), so the final verification, a fresh noisy
    measurement, stays on the right side of the budget.
    """
    budget = Budget.of(latency_budget_ms, budget_fraction, budget_headroom)  # the one validation
    sc, fc = _configs(search_config, finetune_config, n_trials, search_options,
                      finetune_epochs, finetune_options, distill, train_device)
    if fc.epochs > 0 and train_loader is None:
        raise InvalidInputError("fine-tuning needs train_loader (or pass finetune_epochs=0)")
    if sc.refine_top_k > 0 and (val_loader is None or train_loader is None):
        raise InvalidInputError("SearchConfig.refine_top_k needs train_loader and val_loader "
                                "(the refined proxy fine-tunes on the first and scores on the "
                                "second)")
    if sc.importance == "sensitivity" and val_loader is None and search_evaluator is None:
        raise InvalidInputError("SearchConfig(importance='sensitivity') measures the search "
                                "proxy's drop per group: pass val_loader (or search_evaluator)")
    from autoprune._analyze import analyze
    from autoprune.backends import get_backend
    from autoprune.executor import apply_plan

    args = _as_tuple(example_inputs)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    state = RunState.load(run_dir)

    def say(msg: str) -> None:
        if progress:
            print(f"[autoprune] {msg}", flush=True)

    # 1. analyze (cheap: always run; checks the run directory belongs to this model) --------
    with state.step(Step.ANALYZE, resumable=False) as st:
        spec: ModelSpec = analyze(model, args)
        settings = {"fingerprint": spec.fingerprint, "device": device,
                    "budget_ms": budget.ms, "budget_fraction": budget.fraction}
        old = state.get("settings")
        if old is not None and old != settings:
            raise InvalidInputError(
                f"{run_dir} holds a run with other settings ({old}); this call has {settings}: "
                "use a new run_dir or delete the old one"
            )
        atomic_write_json(run_dir / "spec.json", spec.to_dict())
        st.record(settings=settings)
    say(f"analyzed: {spec!r}")

    backend = get_backend(device, **(backend_options or {}))  # backend defaults (ORT: 1 thread)
    plan_path = run_dir / "plan.json"
    predicted_ms = state.get("predicted_ms")

    # 2-4. profile, predictor, search (skipped entirely once the plan exists) ---------------
    if plan is not None:
        for s in (Step.PROFILE, Step.PREDICTOR, Step.SEARCH):
            with state.step(s, resumable=False) as st:
                st.skip("plan given", complete=False)
        plan.validate(spec)
        atomic_write_text(plan_path, plan.to_json())
    elif state.done(Step.SEARCH) and plan_path.exists():
        for s in (Step.PROFILE, Step.PREDICTOR, Step.SEARCH):
            with state.step(s, resumable=False) as st:
                st.skip("done: plan.json")
        plan = PruningPlan.from_json(plan_path.read_text())
        plan.validate(spec)
    else:
        with state.step(Step.PROFILE, resumable=False) as st:
            if table is not None:
                st.skip("table given")
            else:
                from autoprune.latency._profile import profile
                from autoprune.latency._table import LatencyTable

                root = Path(tables_root) if tables_root is not None else None  # None: cache
                where = LatencyTable.default_dir(backend.device_info(), root)
                say(f"profiling layers on {device} (table in {where}/; resumable, reused by "
                    "later runs on this device)")
                table = profile(model, args, backend, spec=spec, root=root, progress=progress)
            _record_table(run_dir, table)
        pred_path = run_dir / "predictor.csv"
        with state.step(Step.PREDICTOR, artefact=pred_path) as st:
            if predictor is not None:
                st.skip("predictor given")
            else:
                from autoprune.latency._predictor import LatencyPredictor

                if st.resumed:
                    predictor = LatencyPredictor.load(pred_path, table=table)
                else:
                    say(f"fitting the latency predictor ({predictor_samples} measured plans)")
                    predictor = LatencyPredictor(n_samples=predictor_samples,
                                                 random_state=seed).fit(
                        table=table, model=model, example_inputs=args, backend=backend,
                        spec=spec, data_path=pred_path, progress=progress,
                    )
                    predictor.save(pred_path)
        with state.step(Step.SEARCH, resumable=False) as st:
            plan, predicted_ms = _search_step(
                model, args, spec, table, backend, predictor, budget, sc, state, run_dir,
                search_evaluator, val_loader, train_loader, seed, progress, say)
            atomic_write_text(plan_path, plan.to_json())
            # a new search may choose another plan: the old plan's accuracies are not its own
            st.record(predicted_ms=predicted_ms, accuracy_before_finetune=None,
                      accuracy_pruned=None)
    if predicted_ms is None and predictor is not None:
        predicted_ms = _predict(predictor, plan)
        state.set(predicted_ms=predicted_ms)

    # 5. apply ------------------------------------------------------------------------------
    with state.step(Step.APPLY, resumable=False):
        pruned = apply_plan(model, plan, args)
        macs_dense, params_dense = spec.count()
        macs_pruned, params_pruned = spec.count(plan)

    # accuracies: dense once, pruned before fine-tune once (both cheap, stored in state)
    acc_dense = state.get("accuracy_dense")
    if acc_dense is None:
        acc_dense = _accuracy(model, val_loader, evaluator, fc.train_device)
        state.set(accuracy_dense=acc_dense)
    acc_before = state.get("accuracy_before_finetune")
    if acc_before is None and not state.done(Step.FINETUNE):
        acc_before = _accuracy(pruned, val_loader, evaluator, fc.train_device)
        state.set(accuracy_before_finetune=acc_before)

    # 6. fine-tune --------------------------------------------------------------------------
    weights_path = run_dir / "pruned.pt"
    with state.step(Step.FINETUNE, artefact=weights_path) as st:
        if st.resumed:
            pruned.load_state_dict(safe_torch_load(weights_path))
        elif fc.epochs <= 0:
            st.skip("finetune_epochs=0")
            atomic_torch_save(pruned.state_dict(), weights_path)
        else:
            from autoprune._finetune import finetune

            say(f"fine-tuning {fc.epochs} epoch(s)"
                + (" with the dense model as teacher" if fc.distill else ""))
            teacher = copy.deepcopy(model).eval() if fc.distill else None
            # the validation data only steers fine-tuning (best epoch, early stopping) when
            # asked: val_loader is also what the report's accuracy is measured on
            steer = fc.early_stopping_patience is not None and fc.val_metric is None
            assert train_loader is not None  # checked on entry: fc.epochs > 0 needs one
            # checkpoints per plan: a search that reruns on resume (and re-measures its
            # finalists) may choose another plan, whose fine-tune must not load this one's
            plan_id = hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()[:12]
            finetune(pruned, train_loader, epochs=fc.epochs, teacher=teacher,
                     val_loader=val_loader if steer else None,
                     checkpoint_dir=run_dir / "finetune" / plan_id, device=fc.train_device,
                     seed=seed,
                     progress=progress, **fc.finetune_kwargs())
            pruned = pruned.to("cpu").eval()
            atomic_torch_save(pruned.state_dict(), weights_path)
        pruned = pruned.to("cpu").eval()
        acc_pruned = state.get("accuracy_pruned")
        if acc_pruned is None:
            acc_pruned = _accuracy(pruned, val_loader, evaluator, fc.train_device)
            state.set(accuracy_pruned=acc_pruned)

    # 7. verify -----------------------------------------------------------------------------
    verify_path = run_dir / "verify.json"
    vrep: VerifyReport | None
    with state.step(Step.VERIFY, artefact=verify_path) as st:
        if st.resumed:
            vrep = _verify_from_json(verify_path)
        else:
            from autoprune.export import verify

            say("verifying on the device (pruned and dense timed alternately)")
            dense_predicted = (_predict(predictor, PruningPlan.dense(spec))
                               if predictor is not None else None)
            vrep = verify(pruned, args, backend, budget_ms=budget.ms, reference=model,
                          predicted_ms=predicted_ms, budget_fraction=budget.fraction,
                          predicted_reference_ms=dense_predicted,
                          fitted_reference_ms=fitted_dense_ms(predictor))
            atomic_write_json(verify_path, vrep.to_dict())

    # 8. export -----------------------------------------------------------------------------
    onnx_path: Path | None = None
    with state.step(Step.EXPORT, artefact=run_dir / "model.onnx") as st:
        if not export:
            st.skip("export=False", complete=False)
        elif st.resumed:
            onnx_path = run_dir / "model.onnx"
        else:
            from autoprune.export import export_onnx

            onnx_path = export_onnx(pruned, args, run_dir / "model.onnx")

    report = PipelineReport(
        run_dir=run_dir,
        budget_ms=float(vrep.budget_ms if vrep is not None and vrep.budget_ms is not None
                        else budget.ms or float("nan")),
        budget_fraction=budget.fraction, plan=plan, model=pruned,
        verify=vrep, predicted_ms=predicted_ms, accuracy_dense=acc_dense,
        accuracy_pruned=acc_pruned, accuracy_before_finetune=acc_before,
        macs_dense=macs_dense, macs_pruned=macs_pruned, params_dense=params_dense,
        params_pruned=params_pruned, steps=dict(state.steps), seconds=dict(state.seconds),
        onnx_path=onnx_path, predicted_band_ms=_band(predictor, plan),
    )
    atomic_write_text(run_dir / "report.txt", str(report) + "\n")
    atomic_write_json(run_dir / "report.json", report.to_dict())
    return report


def _search_step(model: nn.Module, args: tuple[Any, ...], spec: ModelSpec, table: Any,
                 backend: Any, predictor: Any, budget: Budget, sc: SearchConfig,
                 state: RunState, run_dir: Path, search_evaluator: Any, val_loader: Any,
                 train_loader: Any, seed: int, progress: bool,
                 say: Callable[[str], None]) -> tuple[PruningPlan, float]:
    """The search at a budget in predicted ms (a fraction anchored by measurement first), its
    finalists chosen by ``select_finalists`` against ``budget`` (less its headroom for a
    fraction); returns the plan and its predicted latency."""
    from autoprune._search import search
    from autoprune.evaluators import accuracy_evaluator

    if search_evaluator is None and val_loader is not None:
        search_evaluator = accuracy_evaluator(val_loader, calib_loader=train_loader)
    refine = None
    if sc.refine_top_k > 0:  # run_pipeline checked that both loaders are given
        refine = accuracy_evaluator(val_loader, calib_loader=train_loader,
                                    finetune_steps=sc.refine_finetune_steps)
    finalist_budget = budget
    if budget.fraction is None:
        search_budget_ms = float(budget.ms)  # type: ignore[arg-type]
        finalist_budget = replace(budget, headroom=0.0)  # absolute: checked as given
    elif state.get("search_budget_ms") is not None:
        search_budget_ms = float(state.get("search_budget_ms"))  # an interrupted search
    else:
        say("anchoring the search budget: bisecting a uniform plan on measured ratios")
        anchor = _anchor.anchor_budget_ms(model, args, spec, table, backend,
                                          as_latency_model(predictor),
                                          budget.target_ratio(),
                                          None if sc.space_options is None
                                          else dict(sc.space_options))
        search_budget_ms = (anchor.budget_ms if anchor is not None else
                            budget.fraction * _predict(predictor, PruningPlan.dense(spec)))
        # kept so that a resumed search asks for the same budget its study was made for
        state.set(search_budget_ms=search_budget_ms)
    say(f"searching ({sc.n_trials} trials, budget {search_budget_ms:.4g} ms"
        + (f" = {budget.fraction:.0%} of dense)" if budget.fraction is not None else ")"))

    def run_search(budget_ms: float, subdir: str, n_trials: int) -> Any:
        kwargs = {**sc.search_kwargs(), "n_trials": n_trials}
        if sc.importance == "sensitivity":  # one measurement for both search rounds
            kwargs["importance"] = run_dir / "sensitivity.csv"
        if kwargs["study_name"] is not None and subdir != "search":
            kwargs["study_name"] = f"{kwargs['study_name']}-{subdir}"
        return search(model, args, device=backend, latency_budget_ms=budget_ms,
                      evaluator=search_evaluator, table=table, predictor=predictor,
                      run_dir=run_dir / subdir, seed=seed, progress=progress, spec=spec,
                      finalist_budget=finalist_budget, refine_evaluator=refine,
                      refine_top_k=sc.refine_top_k, **kwargs)

    result = run_search(search_budget_ms, "search", sc.n_trials)
    if sc.budget_rounds > 1 and result.best_plan is not None:
        # closed loop: the chosen plan measured well under the budget (the latency model
        # prices the search's plans differently from the anchor) -> search once more at a
        # budget scaled by measurement; keep that choice if it met the budget with a proxy as
        # good (issue 13: "use the budget")
        use = _anchor.budget_use(result.finalists, finalist_budget)
        second_ms = state.get("search_budget_ms_2", "undecided")  # decided once per run_dir
        if second_ms == "undecided":
            second_ms = _anchor.second_round_budget_ms(search_budget_ms, use)
            state.set(search_budget_ms_2=second_ms)  # None: the first search used enough
        if second_ms is not None:
            say(f"the chosen plan used {use:.0%} of the budget when measured: searching again "
                f"at {second_ms:.4g} ms ({max(1, sc.n_trials // 2)} trials)")
            second = run_search(float(second_ms), "search_2", max(1, sc.n_trials // 2))
            kept = state.get("search_round_kept")  # a resumed run keeps its first decision
            if kept is None:
                kept = 2 if _anchor.keep_second(result.finalists, second.finalists) else 1
                state.set(search_round_kept=kept)
            say(f"second search {'kept' if kept == 2 else 'not kept (the first choice stays)'}")
            if kept == 2:
                result = second
    atomic_write_text(run_dir / "trials.csv", result.trials.to_csv(index=False))
    atomic_write_text(run_dir / "finalists.csv", result.finalists.to_csv(index=False))
    try:
        result.plot(run_dir / "front.png")
    except Exception as e:  # noqa: BLE001 - a missing plot must not lose the search
        say(f"could not draw front.png ({type(e).__name__}: {e})")
    if result.best_plan is None:
        measured = result.finalists.get("measured_latency_ms")
        was_measured = measured is not None and bool(measured.notna().any())
        fastest = float(measured.min()) if was_measured \
            else float(result.trials["predicted_latency_ms"].min())
        raise InfeasibleBudgetError(search_budget_ms, fastest, "; ".join(result.notes),
                                    measured=was_measured)
    return result.best_plan, _predict(predictor, result.best_plan)


def _predict(predictor: Any, plan: PruningPlan) -> float:
    """Predicted ms of ``plan`` by any latency model (a ``LatencyModel`` or a callable)."""
    return float(as_latency_model(predictor).predict(plan))


def _band(predictor: Any, plan: PruningPlan) -> tuple[float, float] | None:
    """The latency model's band for ``plan`` (None without a latency model)."""
    if predictor is None:
        return None
    lo, hi = as_latency_model(predictor).predict_interval([plan])
    return float(lo[0]), float(hi[0])



def _record_table(run_dir: Path, table: Any) -> None:
    """Note which table the run used (path and device) in ``table_ref.json``."""
    ref: dict[str, Any] = {"type": type(table).__name__}
    for attr in ("path", "directory", "root"):
        v = getattr(table, attr, None)
        if v is not None:
            ref[attr] = str(v)
    info = getattr(table, "device_info", None) or getattr(table, "device", None)
    if info is not None and hasattr(info, "to_dict"):
        ref["device"] = info.to_dict()
    atomic_write_json(run_dir / "table_ref.json", ref)


def _verify_from_json(path: Path) -> VerifyReport:
    from autoprune.export import VerifyReport
    from autoprune.types import LatencySample

    d = read_json(path)

    def sample(x: dict[str, Any] | None) -> LatencySample | None:
        return None if x is None else LatencySample(**x)

    measured = sample(d.get("measured"))
    if measured is None:
        raise CorruptFileError(f"{path}: no 'measured' entry; delete it to verify again")
    return VerifyReport(
        backend=d["backend"], measured=measured, budget_ms=d.get("budget_ms"),
        predicted_ms=d.get("predicted_ms"), reference=sample(d.get("reference")),
        ratio=d.get("ratio"), ratio_iqr=d.get("ratio_iqr"), device=d.get("device", {}),
        predicted_reference_ms=d.get("predicted_reference_ms"),
        fitted_reference_ms=d.get("fitted_reference_ms"),
    )


