"""``run_pipeline``: analyze → profile → fit predictor → search → apply → fine-tune → verify →
export, in one run directory, resumable.

Every step writes its artefact into ``run_dir`` and is recorded in ``run_dir/state.json`` when
it completes; a rerun with the same model and budget skips completed steps and reloads their
artefacts. A step is also skipped when its output is passed in (``table=``, ``predictor=``,
``plan=``). Artefacts::

    run_dir/
      state.json              completed steps, dense accuracy, predicted latency, settings
      spec.json               ModelSpec from analyze
      table_ref.json          which latency table was used (tables live in tables_root)
      predictor.csv (+ .json) the predictor's measured plans (LatencyPredictor.load rebuilds it)
      study.journal           the Optuna study (JournalStorage), trials.csv, front.png
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
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from autoprune.budget import Budget
from autoprune.errors import InvalidInputError
from autoprune.export import _as_tuple

if TYPE_CHECKING:
    from autoprune.export import VerifyReport
    from autoprune.plan import PruningPlan
    from autoprune.types import ModelSpec

STATE_VERSION = 1

__all__ = ["PipelineReport", "Step", "load_pruned", "run_pipeline"]


class Step(str, Enum):
    """Pipeline steps, in order."""

    ANALYZE = "analyze"
    PROFILE = "profile"
    PREDICTOR = "predictor"
    SEARCH = "search"
    APPLY = "apply"
    FINETUNE = "finetune"
    VERIFY = "verify"
    EXPORT = "export"

    def __str__(self) -> str:
        return self.value


@dataclass
class PipelineReport:
    """What ``run_pipeline`` found; ``str(report)`` is the text written to ``report.txt``."""

    run_dir: Path
    budget_ms: float
    budget_fraction: float | None
    plan: PruningPlan
    model: nn.Module = field(repr=False)
    verify: VerifyReport | None
    predicted_ms: float | None
    accuracy_dense: float | None
    accuracy_pruned: float | None
    accuracy_before_finetune: float | None
    macs_dense: int
    macs_pruned: int
    params_dense: int
    params_pruned: int
    steps: dict[str, str]
    seconds: dict[str, float]
    onnx_path: Path | None = None
    #: the latency model's band for the chosen plan (``predict_interval``)
    predicted_band_ms: tuple[float, float] | None = None

    @property
    def budget_met(self) -> bool | None:
        return None if self.verify is None else self.verify.budget_met

    @property
    def mac_reduction(self) -> float:
        return self.macs_dense / max(1, self.macs_pruned)

    @property
    def param_reduction(self) -> float:
        return self.params_dense / max(1, self.params_pruned)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "budget_ms": self.budget_ms,
            "budget_fraction": self.budget_fraction,
            "budget_met": self.budget_met,
            "predicted_ms": self.predicted_ms,
            "predicted_band_ms": None if self.predicted_band_ms is None
            else list(self.predicted_band_ms),
            "verify": None if self.verify is None else self.verify.to_dict(),
            "accuracy_dense": self.accuracy_dense,
            "accuracy_pruned": self.accuracy_pruned,
            "accuracy_before_finetune": self.accuracy_before_finetune,
            "macs_dense": self.macs_dense,
            "macs_pruned": self.macs_pruned,
            "mac_reduction": self.mac_reduction,
            "params_dense": self.params_dense,
            "params_pruned": self.params_pruned,
            "param_reduction": self.param_reduction,
            "steps": dict(self.steps),
            "seconds": dict(self.seconds),
            "onnx_path": None if self.onnx_path is None else str(self.onnx_path),
            "plan": self.plan.to_dict(),
        }

    def __str__(self) -> str:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.2f}%"

        v = self.verify
        lines = ["autoprune report", "================",
                 f"run directory     {self.run_dir}",
                 f"latency budget    {self.budget_ms:.4g} ms"
                 + (f" ({self.budget_fraction:.0%} of dense, checked as a paired ratio)"
                    if self.budget_fraction is not None else "")]
        if v is not None:
            if v.reference is not None:
                lines.append(f"dense   measured  {v.reference}")
            lines.append(f"pruned  measured  {v.measured}")
            if v.ratio is not None:
                rel = (v.ratio_iqr or 0.0) / v.ratio
                lines.append(
                    f"paired ratio      {v.ratio:.3f} ± {100 * rel:.1f}% (IQR; pruned/dense, timed "
                    f"alternately) -> {v.paired_ms:.4g} ms, speed-up {v.speedup:.2f}x"
                )
            if self.predicted_ms is not None:
                band = "" if self.predicted_band_ms is None else (
                    f", band {self.predicted_band_ms[0]:.4g}-{self.predicted_band_ms[1]:.4g}")
                lines.append(f"predicted         {self.predicted_ms:.4g} ms{band} "
                             f"({100 * (v.prediction_error or 0):+.1f}% vs measured now)")
            if v.ratio_prediction_error is not None:
                lines.append(f"  as dense share  predicted {v.predicted_ratio:.3f} vs measured "
                             f"{v.ratio:.3f} ({100 * v.ratio_prediction_error:+.1f}%; "
                             "drift-free)")
            verdict = {True: "MET", False: "NOT MET", None: "n/a"}[v.budget_met]
            lines.append(f"budget            {verdict} ({v.latency_ms:.4g} ms vs "
                         f"{self.budget_ms:.4g} ms)")
        lines += [
            f"accuracy dense    {pct(self.accuracy_dense)}",
            f"accuracy pruned   {pct(self.accuracy_pruned)} after fine-tuning "
            f"({pct(self.accuracy_before_finetune)} before)",
            f"MACs              {self.macs_dense / 1e6:.2f} M -> {self.macs_pruned / 1e6:.2f} M "
            f"({self.mac_reduction:.2f}x fewer)",
            f"parameters        {self.params_dense / 1e6:.3f} M -> {self.params_pruned / 1e6:.3f} M "
            f"({self.param_reduction:.2f}x fewer)",
        ]
        structures: dict[str, int] = {}
        for gp in self.plan.groups.values():
            structures[gp.structure.value] = structures.get(gp.structure.value, 0) + 1
        lines.append("plan              " + (", ".join(f"{n} {s}" for s, n in
                                                      sorted(structures.items())) or "dense"))
        lines.append("steps             " + ", ".join(f"{k}: {v}" for k, v in self.steps.items()))
        if self.onnx_path is not None:
            lines.append(f"ONNX              {self.onnx_path}")
        if v is not None:
            lines.append("(latency on a shared machine is noisy; the paired ratio is the steadier "
                         "number)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
class _State:
    """``state.json``: which steps completed, plus small results they produced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"version": STATE_VERSION, "completed": [], "values": {}}

    def load(self) -> _State:
        if self.path.exists():
            from autoprune.io import read_json

            self.data = read_json(self.path)
            if self.data.get("version") != STATE_VERSION:
                from autoprune.errors import CorruptFileError

                raise CorruptFileError(
                    f"{self.path}: state version {self.data.get('version')!r} is not "
                    f"{STATE_VERSION}; use a new run_dir"
                )
        return self

    def done(self, step: Step) -> bool:
        return step.value in self.data["completed"]

    def complete(self, step: Step, **values: Any) -> None:
        if step.value not in self.data["completed"]:
            self.data["completed"].append(step.value)
        self.data["values"].update(values)
        self.save()

    def get(self, key: str, default: Any = None) -> Any:
        return self.data["values"].get(key, default)

    def set(self, **values: Any) -> None:
        self.data["values"].update(values)
        self.save()

    def save(self) -> None:
        from autoprune.io import atomic_write_json

        atomic_write_json(self.path, self.data)


def load_pruned(model: nn.Module, run_dir: str | Path, example_inputs: Any) -> nn.Module:
    """Rebuild the pruned, fine-tuned model of a finished run from a fresh dense ``model``."""
    from autoprune.executor import apply_plan
    from autoprune.io import safe_torch_load
    from autoprune.plan import PruningPlan

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
    n_trials: int = 60,
    table: Any = None,
    tables_root: str | Path | None = None,
    predictor: Any = None,
    predictor_samples: int = 60,
    plan: PruningPlan | None = None,
    search_options: dict[str, Any] | None = None,
    finetune_epochs: int = 3,
    finetune_options: dict[str, Any] | None = None,
    distill: bool = True,
    export: bool = True,
    train_device: str = "cpu",
    budget_headroom: float = 0.05,
    seed: int = 0,
    progress: bool = True,
) -> PipelineReport:
    """Prune ``model`` to ``latency_budget_ms`` measured on ``device`` and prove it there.

    ``evaluator(model) -> float`` (higher is better) reports accuracy; by default top-1 on
    ``val_loader``. The search scores candidates with ``search_evaluator``, by default labelled
    accuracy after BatchNorm re-calibration on ``val_loader`` (pass a held-out split of the
    training data to keep the test set out of the search). ``table``/``predictor``/``plan``
    skip the steps that would make them. ``tables_root``: where latency tables live (default
    the user cache, ``autoprune.io.cache_dir()/latency_tables``; shared by runs on the same
    device: a table that already covers the model is reused, a partial one is extended).
    ``finetune_options`` go to ``autoprune.finetune`` (``lr``, ``optimizer``, ``gradual``, ...);
    with ``distill`` the dense model is the teacher.

    The budget is ``latency_budget_ms`` (absolute, on the device) or ``budget_fraction`` (a share
    of the dense model's latency on the device). With ``budget_fraction`` every check is a paired
    ratio (candidate timed alternately with the dense model), which holds on a machine whose
    speed drifts (shared CPUs). The search budget is anchored by measurement
    (:func:`anchor_budget_ms`): the widest uniform plan of the space whose measured ratio fits is
    found by bisection (about five paired measurements) and its *predicted* latency becomes the
    search budget, so a predictor that is biased for small plans neither wastes the budget nor
    overshoots it (without such a plan: ``fraction x predicted dense latency``). Then the
    feasible trials are re-measured in :func:`candidate_order` (proxy ties within 0.01 of the
    best: largest predicted latency first; then by proxy) and the first whose measured ratio is
    within ``fraction x (1 - budget_headroom)`` is taken (``finalists.csv``); the headroom keeps
    the final verification, a fresh noisy measurement, on the right side of the budget.
    """
    Budget.of(latency_budget_ms, budget_fraction, budget_headroom)  # the one validation
    if finetune_epochs > 0 and train_loader is None:
        raise InvalidInputError("fine-tuning needs train_loader (or pass finetune_epochs=0)")
    from autoprune._analyze import analyze
    from autoprune.backends import get_backend
    from autoprune.executor import apply_plan
    from autoprune.io import atomic_torch_save, atomic_write_json, atomic_write_text
    from autoprune.plan import PruningPlan

    args = _as_tuple(example_inputs)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    steps: dict[str, str] = {}
    seconds: dict[str, float] = {}
    state = _State(run_dir / "state.json").load()

    def timed(step: Step) -> Callable[[float], None]:
        t0 = time.perf_counter()
        return lambda _=0.0: seconds.__setitem__(step.value, round(time.perf_counter() - t0, 2))

    def say(msg: str) -> None:
        if progress:
            print(f"[autoprune] {msg}", flush=True)

    # 1. analyze (cheap: always run; checks the run directory belongs to this model) --------
    stop = timed(Step.ANALYZE)
    spec: ModelSpec = analyze(model, args)
    settings = {"fingerprint": spec.fingerprint, "device": device,
                "budget_ms": None if latency_budget_ms is None else float(latency_budget_ms),
                "budget_fraction": budget_fraction}
    old = state.get("settings")
    if old is not None and old != settings:
        raise InvalidInputError(
            f"{run_dir} holds a run with other settings ({old}); this call has {settings}: "
            "use a new run_dir or delete the old one"
        )
    atomic_write_json(run_dir / "spec.json", spec.to_dict())
    state.complete(Step.ANALYZE, settings=settings)
    steps[Step.ANALYZE.value] = "ran"
    stop()
    say(f"analyzed: {spec!r}")

    backend = get_backend(device, **(backend_options or {}))  # backend defaults (ORT: 1 thread)
    plan_path = run_dir / "plan.json"
    predicted_ms = state.get("predicted_ms")

    # 2-4. profile, predictor, search (skipped entirely once the plan exists) ---------------
    if plan is not None:
        for s in (Step.PROFILE, Step.PREDICTOR, Step.SEARCH):
            steps[s.value] = "skipped (plan given)"
        plan.validate(spec)
        atomic_write_text(plan_path, plan.to_json())
    elif state.done(Step.SEARCH) and plan_path.exists():
        for s in (Step.PROFILE, Step.PREDICTOR, Step.SEARCH):
            steps[s.value] = "skipped (done: plan.json)"
        plan = PruningPlan.from_json(plan_path.read_text())
        plan.validate(spec)
    else:
        # profile
        stop = timed(Step.PROFILE)
        if table is not None:
            steps[Step.PROFILE.value] = "skipped (table given)"
        else:
            from autoprune.latency._profile import profile
            from autoprune.latency._table import LatencyTable

            root = Path(tables_root) if tables_root is not None else None  # None: the cache
            where = LatencyTable.default_dir(backend.device_info(), root)
            say(f"profiling layers on {device} (table in {where}/; resumable, reused by "
                "later runs on this device)")
            table = profile(model, args, backend, spec=spec, root=root, progress=progress)
            steps[Step.PROFILE.value] = "ran"
        _record_table(run_dir, table)
        state.complete(Step.PROFILE)
        stop()
        # predictor
        stop = timed(Step.PREDICTOR)
        pred_path = run_dir / "predictor.csv"
        if predictor is not None:
            steps[Step.PREDICTOR.value] = "skipped (predictor given)"
        else:
            from autoprune.latency._predictor import LatencyPredictor

            if state.done(Step.PREDICTOR) and pred_path.exists():
                predictor = LatencyPredictor.load(pred_path, table=table)
                steps[Step.PREDICTOR.value] = "skipped (done: predictor.csv)"
            else:
                say(f"fitting the latency predictor ({predictor_samples} measured plans)")
                predictor = LatencyPredictor(n_samples=predictor_samples, random_state=seed).fit(
                    table=table, model=model, example_inputs=args, backend=backend, spec=spec,
                    data_path=pred_path, progress=progress,
                )
                predictor.save(pred_path)
                steps[Step.PREDICTOR.value] = "ran"
        state.complete(Step.PREDICTOR)
        stop()
        # search
        stop = timed(Step.SEARCH)
        from autoprune._search import search

        if search_evaluator is None and val_loader is not None:
            from autoprune.evaluators import accuracy_evaluator

            search_evaluator = accuracy_evaluator(val_loader, calib_loader=train_loader)
        search_budget_ms = latency_budget_ms
        opts = dict(search_options or {})
        if budget_fraction is not None and state.get("search_budget_ms") is not None:
            search_budget_ms = float(state.get("search_budget_ms"))  # an interrupted search
        elif budget_fraction is not None:
            say("anchoring the search budget: bisecting a uniform plan on measured ratios")
            anchor = anchor_budget_ms(model, args, spec, table, backend, predictor,
                                      budget_fraction * (1.0 - budget_headroom),
                                      opts.get("space_options"))
            search_budget_ms = (anchor.budget_ms if anchor is not None else
                                budget_fraction * float(predictor.predict(PruningPlan.dense(spec))))
            # kept so that a resumed search asks for the same budget its study was made for
            state.set(search_budget_ms=search_budget_ms)
        say(f"searching ({n_trials} trials, budget {search_budget_ms:.4g} ms"
            + (f" = {budget_fraction:.0%} of dense)" if budget_fraction is not None else ")"))
        if budget_fraction is not None:
            opts["verify_finalists"] = False
        result = search(
            model, args, device=backend, latency_budget_ms=search_budget_ms,
            evaluator=search_evaluator, n_trials=n_trials, table=table, predictor=predictor,
            run_dir=run_dir / "search", seed=seed, progress=progress, spec=spec, **opts,
        )
        from autoprune.io import atomic_write_bytes

        atomic_write_bytes(run_dir / "trials.csv", result.trials.to_csv(index=False).encode())
        if budget_fraction is not None:
            say("re-measuring the best candidates against the dense model (paired ratios)")
            result.best_plan = _select_by_ratio(
                result, model, args, spec, backend, budget_fraction * (1.0 - budget_headroom),
                run_dir, search_budget_ms)
            # the user's budget and the measured finalists on the predictor's scale (paired
            # ratio x predicted dense), so the plot compares like with like
            dense_pred = float(predictor.predict(PruningPlan.dense(spec)))
            result.user_budget_ms = budget_fraction * dense_pred
            if not result.finalists.empty:
                result.finalists["measured_latency_ms"] = (
                    result.finalists["measured_ratio"] * dense_pred)
        else:
            result.user_budget_ms = float(latency_budget_ms)  # type: ignore[arg-type]
        try:
            result.plot(run_dir / "front.png")
        except Exception as e:  # noqa: BLE001 - a missing plot must not lose the search
            say(f"could not draw front.png ({type(e).__name__}: {e})")
        if result.best_plan is None:
            from autoprune.errors import InfeasibleBudgetError

            measured = result.finalists.get("measured_latency_ms")
            fastest = float(measured.min()) if measured is not None and len(measured) else float(
                result.trials["predicted_latency_ms"].min())
            raise InfeasibleBudgetError(search_budget_ms, fastest, "; ".join(result.notes))
        plan = result.best_plan
        atomic_write_text(plan_path, plan.to_json())
        predicted_ms = float(predictor.predict(plan))
        state.complete(Step.SEARCH, predicted_ms=predicted_ms)
        steps[Step.SEARCH.value] = "ran"
        stop()
    if predicted_ms is None and predictor is not None:
        predicted_ms = float(predictor.predict(plan))
        state.set(predicted_ms=predicted_ms)

    # 5. apply ------------------------------------------------------------------------------
    stop = timed(Step.APPLY)
    pruned = apply_plan(model, plan, args)
    macs_dense, params_dense = spec.count()
    macs_pruned, params_pruned = spec.count(plan)
    state.complete(Step.APPLY)
    steps[Step.APPLY.value] = "ran"
    stop()

    # accuracies: dense once, pruned before fine-tune once (both cheap, stored in state)
    acc_dense = state.get("accuracy_dense")
    if acc_dense is None:
        acc_dense = _accuracy(model, val_loader, evaluator, train_device)
        state.set(accuracy_dense=acc_dense)
    acc_before = state.get("accuracy_before_finetune")
    if acc_before is None and not state.done(Step.FINETUNE):
        acc_before = _accuracy(pruned, val_loader, evaluator, train_device)
        state.set(accuracy_before_finetune=acc_before)

    # 6. fine-tune --------------------------------------------------------------------------
    stop = timed(Step.FINETUNE)
    weights_path = run_dir / "pruned.pt"
    if state.done(Step.FINETUNE) and weights_path.exists():
        from autoprune.io import safe_torch_load

        pruned.load_state_dict(safe_torch_load(weights_path))
        steps[Step.FINETUNE.value] = "skipped (done: pruned.pt)"
    elif finetune_epochs <= 0:
        steps[Step.FINETUNE.value] = "skipped (finetune_epochs=0)"
        atomic_torch_save(pruned.state_dict(), weights_path)
        state.complete(Step.FINETUNE)
    else:
        from autoprune._finetune import finetune

        say(f"fine-tuning {finetune_epochs} epoch(s)"
            + (" with the dense model as teacher" if distill else ""))
        opts = dict(finetune_options or {})
        teacher = copy.deepcopy(model).eval() if distill else None
        # the validation data only steers fine-tuning (best epoch, early stopping) when asked:
        # val_loader is also what the report's accuracy is measured on
        steer = "early_stopping_patience" in opts and "val_metric" not in opts
        finetune(pruned, train_loader, epochs=finetune_epochs, teacher=teacher,
                 val_loader=val_loader if steer else None,
                 checkpoint_dir=run_dir / "finetune", device=train_device, seed=seed,
                 progress=progress, **opts)
        pruned = pruned.to("cpu").eval()
        atomic_torch_save(pruned.state_dict(), weights_path)
        state.complete(Step.FINETUNE)
        steps[Step.FINETUNE.value] = "ran"
    pruned = pruned.to("cpu").eval()
    acc_pruned = state.get("accuracy_pruned")
    if acc_pruned is None:
        acc_pruned = _accuracy(pruned, val_loader, evaluator, train_device)
        state.set(accuracy_pruned=acc_pruned)
    stop()

    # 7. verify -----------------------------------------------------------------------------
    stop = timed(Step.VERIFY)
    from autoprune.export import verify

    verify_path = run_dir / "verify.json"
    vrep: VerifyReport | None
    if state.done(Step.VERIFY) and verify_path.exists():
        vrep = _verify_from_json(verify_path)
        steps[Step.VERIFY.value] = "skipped (done: verify.json)"
    else:
        say("verifying on the device (pruned and dense timed alternately)")
        dense_predicted = (float(predictor.predict(PruningPlan.dense(spec)))
                           if predictor is not None else None)
        vrep = verify(pruned, args, backend, budget_ms=latency_budget_ms, reference=model,
                      predicted_ms=predicted_ms, budget_fraction=budget_fraction,
                      predicted_reference_ms=dense_predicted)
        atomic_write_json(verify_path, vrep.to_dict())
        state.complete(Step.VERIFY)
        steps[Step.VERIFY.value] = "ran"
    stop()

    # 8. export -----------------------------------------------------------------------------
    stop = timed(Step.EXPORT)
    onnx_path: Path | None = None
    if not export:
        steps[Step.EXPORT.value] = "skipped (export=False)"
    elif state.done(Step.EXPORT) and (run_dir / "model.onnx").exists():
        onnx_path = run_dir / "model.onnx"
        steps[Step.EXPORT.value] = "skipped (done: model.onnx)"
    else:
        from autoprune.export import export_onnx

        onnx_path = export_onnx(pruned, args, run_dir / "model.onnx")
        state.complete(Step.EXPORT)
        steps[Step.EXPORT.value] = "ran"
    stop()

    report = PipelineReport(
        run_dir=run_dir,
        budget_ms=float(vrep.budget_ms if vrep is not None and vrep.budget_ms is not None
                        else latency_budget_ms or float("nan")),
        budget_fraction=budget_fraction, plan=plan, model=pruned,
        verify=vrep, predicted_ms=predicted_ms, accuracy_dense=acc_dense,
        accuracy_pruned=acc_pruned, accuracy_before_finetune=acc_before,
        macs_dense=macs_dense, macs_pruned=macs_pruned, params_dense=params_dense,
        params_pruned=params_pruned, steps=steps, seconds=seconds, onnx_path=onnx_path,
        predicted_band_ms=_band(predictor, plan),
    )
    atomic_write_text(run_dir / "report.txt", str(report) + "\n")
    atomic_write_json(run_dir / "report.json", report.to_dict())
    return report


@dataclass(frozen=True)
class BudgetAnchor:
    """The widest uniform plan measured within a budget fraction, and its predicted latency."""

    budget_ms: float
    keep_ratio: float
    measured_ratio: float
    ratio_iqr: float
    plan: PruningPlan


def anchor_budget_ms(model: nn.Module, args: tuple[Any, ...], spec: ModelSpec, table: Any,
                     backend: Any, predictor: Any, fraction: float,
                     space_options: dict[str, Any] | None = None, iters: int = 5,
                     ) -> BudgetAnchor | None:
    """Translate a budget given as a share of dense latency into predicted milliseconds by
    measurement: bisect the keep ratio of a uniform plan on the space's width grid until its
    paired ratio vs dense is at most ``fraction``; the widest such plan's predicted latency is
    the search budget. The search then looks for plans predicted no slower than a plan known
    to fit, whatever the predictor's bias at that size; the uniform plan itself is in the
    search (a warm start), so the search has to beat it on the proxy. None if even the
    narrowest uniform plan measured does not fit."""
    from autoprune.executor import apply_plan
    from autoprune.space import SearchSpace

    space = SearchSpace.from_spec(spec, table, backend, **(space_options or {}))
    dense = copy.deepcopy(model).eval()
    best: BudgetAnchor | None = None
    lo, hi = 0.0, 1.0
    for _ in range(max(1, iters)):
        r = 0.5 * (lo + hi)
        plan = space.uniform_plan(max(r, 1e-3))
        pruned = apply_plan(model, plan, args, spec=spec).eval()
        ratio, iqr = backend.measure_ratio(pruned, dense, args)
        if float(ratio) <= fraction:
            if best is None or r > best.keep_ratio:
                best = BudgetAnchor(float(predictor.predict(plan)), r, float(ratio), float(iqr),
                                    plan)
            lo = r
        else:
            hi = r
    return best


def candidate_order(trials: Any, proxy_tolerance: float = 0.01) -> Any:
    """Feasible trials in the order they are re-measured: first those whose proxy is within
    ``proxy_tolerance`` of the best, largest predicted latency first (a proxy difference that
    small is noise on a few hundred held-out samples, and the larger plan keeps more of the
    network for fine-tuning); then the rest by proxy, faster first on ties."""
    import pandas as pd

    cands = trials[trials["feasible"].astype(bool) & trials["proxy"].notna()]
    if cands.empty:
        return cands
    top = cands["proxy"] >= cands["proxy"].max() - proxy_tolerance
    head = cands[top].sort_values(["predicted_latency_ms", "proxy"], ascending=[False, False])
    tail = cands[~top].sort_values(["proxy", "predicted_latency_ms"], ascending=[False, True])
    return pd.concat([head, tail])


def _band(predictor: Any, plan: PruningPlan) -> tuple[float, float] | None:
    """The latency model's band for ``plan`` (None without a latency model)."""
    if predictor is None:
        return None
    from autoprune.latency._model import as_latency_model

    lo, hi = as_latency_model(predictor).predict_interval([plan])
    return float(lo[0]), float(hi[0])


def _select_by_ratio(result: Any, model: nn.Module, args: tuple[Any, ...], spec: ModelSpec,
                     backend: Any, fraction: float, run_dir: Path, search_budget_ms: float,
                     max_candidates: int = 8, proxy_tolerance: float = 0.01,
                     ) -> PruningPlan | None:
    """The first trial in :func:`candidate_order` whose measured paired ratio vs dense is <=
    ``fraction``."""
    import optuna
    import pandas as pd

    from autoprune.executor import apply_plan
    from autoprune.io import atomic_write_bytes
    from autoprune.plan import PruningPlan
    from autoprune.storage import make_storage

    study = optuna.load_study(study_name=result.study_name,
                              storage=make_storage(None, result.run_dir))
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    tr = result.trials
    cands = candidate_order(tr, proxy_tolerance)
    dense = copy.deepcopy(model).eval()
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    chosen: PruningPlan | None = None
    for n in cands["trial"].astype(int):
        d = by_number[n].user_attrs.get("plan")
        if d is None:
            continue
        plan = PruningPlan.from_dict(d)
        key = plan.to_json(indent=None)
        if key in seen:
            continue
        seen.add(key)
        pruned = apply_plan(model, plan, args, spec=spec).eval()
        ratio, iqr = backend.measure_ratio(pruned, dense, args)
        ok = float(ratio) <= fraction
        pred = float(tr.loc[tr["trial"] == n, "predicted_latency_ms"].iloc[0])
        rows.append({"trial": n, "proxy": float(tr.loc[tr["trial"] == n, "proxy"].iloc[0]),
                     "predicted_latency_ms": pred, "measured_ratio": float(ratio),
                     "ratio_iqr": float(iqr), "meets_budget": ok, "chosen": ok, "plan": key})
        if ok:
            chosen = plan
            break
        result.notes.append(
            f"trial {n}: measured ratio {ratio:.3f} vs dense misses the {fraction:.3f} budget "
            f"(predicted {pred / search_budget_ms * fraction:.3f})")
        if len(rows) >= max_candidates:
            break
    result.finalists = pd.DataFrame(rows)
    atomic_write_bytes(run_dir / "finalists.csv", result.finalists.to_csv(index=False).encode())
    return chosen


def _record_table(run_dir: Path, table: Any) -> None:
    """Note which table the run used (path and device) in ``table_ref.json``."""
    from autoprune.io import atomic_write_json

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
    from autoprune.io import read_json
    from autoprune.types import LatencySample

    d = read_json(path)

    def sample(x: dict[str, Any] | None) -> LatencySample | None:
        return None if x is None else LatencySample(**x)

    measured = sample(d.get("measured"))
    if measured is None:
        from autoprune.errors import CorruptFileError

        raise CorruptFileError(f"{path}: no 'measured' entry; delete it to verify again")
    return VerifyReport(
        backend=d["backend"], measured=measured, budget_ms=d.get("budget_ms"),
        predicted_ms=d.get("predicted_ms"), reference=sample(d.get("reference")),
        ratio=d.get("ratio"), ratio_iqr=d.get("ratio_iqr"), device=d.get("device", {}),
        predicted_reference_ms=d.get("predicted_reference_ms"),
    )

