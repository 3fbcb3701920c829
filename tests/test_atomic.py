"""Atomic writes under SIGKILL: a writer process rewrites a large file over and over through
autoprune.io and is killed at random moments; a reader polling the file must only ever see a
whole old version or a whole new one. A control run with a plain ``open(..., "wb")`` writer
shows the harness does catch torn files.

This file is also the writer program: ``python tests/test_atomic.py MODE PATH``.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

PAYLOAD_BYTES = 2 * 1024 * 1024
MODES = ("bytes", "json", "torch", "plain")


def _body(version: int) -> bytes:
    # cheap, version-dependent, incompressible-looking bytes
    seed = hashlib.sha256(str(version).encode()).digest()
    return (seed * (PAYLOAD_BYTES // len(seed)))[:PAYLOAD_BYTES]


def _write_forever(mode: str, path: Path) -> None:
    from autoprune import io

    version = 0
    while True:
        version += 1
        body = _body(version)
        digest = hashlib.sha256(body).hexdigest()
        if mode == "bytes":
            io.atomic_write_bytes(path, f"{version} {digest}\n".encode() + body)
        elif mode == "json":
            io.atomic_write_json(path, {"version": version, "digest": digest,
                                        "rows": [body[i:i + 64].hex() for i in range(0, 1 << 20, 64)]})
        elif mode == "torch":
            import torch

            t = torch.frombuffer(bytearray(body), dtype=torch.uint8)
            io.atomic_torch_save({"version": torch.tensor(version), "weight": t}, path)
        elif mode == "plain":  # the non-atomic control
            with open(path, "wb") as f:
                data = f"{version} {digest}\n".encode() + body
                for i in range(0, len(data), 1 << 16):
                    f.write(data[i:i + (1 << 16)])
                    f.flush()
        else:
            raise SystemExit(f"unknown mode {mode}")
        if version == 1:
            (path.parent / "started").write_text("1")


def _check(mode: str, path: Path) -> int:
    """Read ``path`` once; return the version it holds, raise AssertionError if torn."""
    from autoprune import io

    if mode in ("bytes", "plain"):
        data = path.read_bytes()
        head, _, body = data.partition(b"\n")
        version, digest = head.decode().split()
        assert len(body) == PAYLOAD_BYTES, f"torn: {len(body)} of {PAYLOAD_BYTES} bytes"
        assert hashlib.sha256(body).hexdigest() == digest, "torn: checksum mismatch"
        return int(version)
    if mode == "json":
        d = io.read_json(path)  # CorruptFileError on a torn file
        body = b"".join(bytes.fromhex(r) for r in d["rows"])
        assert len(body) == 1 << 20
        assert hashlib.sha256(_body(d["version"])).hexdigest() == d["digest"]
        assert body == _body(d["version"])[: 1 << 20]
        return int(d["version"])
    sd = io.safe_torch_load(path)
    version = int(sd["version"])
    assert bytes(sd["weight"].numpy().tobytes()) == _body(version), "torn tensor"
    return version


def _run_and_kill(mode: str, path: Path, kills: int, rng: random.Random) -> tuple[set[int], int]:
    """Start the writer ``kills`` times, SIGKILL it at a random moment each time while reading.
    Returns (versions seen, torn reads)."""
    seen: set[int] = set()
    torn = 0
    for _ in range(kills):
        started = path.parent / "started"
        started.unlink(missing_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode, str(path)],
                                env=env, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not started.exists():
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "writer never wrote"
                time.sleep(0.01)
            kill_at = time.monotonic() + rng.uniform(0.05, 0.8)
            while time.monotonic() < kill_at:
                try:
                    seen.add(_check(mode, path))
                except Exception:  # noqa: BLE001 - any failure to read whole counts as torn
                    torn += 1
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # after the kill the file is still one whole version
        try:
            seen.add(_check(mode, path))
        except Exception:  # noqa: BLE001
            torn += 1
    return seen, torn


@pytest.mark.parametrize("mode", ["bytes", "json", "torch"])
@pytest.mark.timeout(180)
def test_readers_see_old_or_new_file_whole_under_sigkill(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"artifact.{mode}"
    kills = 2 if mode == "torch" else 3  # each torch writer start imports torch (slow)
    seen, torn = _run_and_kill(mode, path, kills=kills, rng=random.Random(MODES.index(mode)))
    assert torn == 0
    # the writer really did replace the file while we read it
    assert len(seen) >= 2
    # temp files never took the target's name; the directory holds the target plus at most the
    # temp file of each killed write
    others = [p.name for p in tmp_path.iterdir() if p.name not in (path.name, "started")]
    assert all(n.startswith(f".{path.name}.") and n.endswith(".tmp") for n in others), others
    assert len(others) <= 3


@pytest.mark.timeout(120)
def test_harness_catches_a_non_atomic_writer(tmp_path: Path) -> None:
    path = tmp_path / "artifact.plain"
    _, torn = _run_and_kill("plain", path, kills=2, rng=random.Random(1))
    assert torn > 0


# --- whole stages killed with SIGKILL, then resumed ------------------------------------------
# (the profiler's own test covers a profile killed mid-table:
#  test_profiler.py::test_sigkill_midway_then_resume_loses_nothing_and_duplicates_nothing)

N_SEARCH = 30
FT_EPOCHS, FT_BATCHES = 3, 6


class _SlowScore:
    """Plan evaluator: a deterministic score after a short sleep, leaving start/done markers."""

    def __init__(self, spec, markers: Path) -> None:  # noqa: ANN001
        self.spec, self.markers, self.calls = spec, markers, 0
        self.dense_params = spec.count()[1]

    def evaluate_plan(self, plan) -> float:  # noqa: ANN001
        self.calls += 1
        (self.markers / f"start-{os.getpid()}-{self.calls}").write_text(plan.to_json())
        time.sleep(0.15)
        (self.markers / f"done-{os.getpid()}-{self.calls}").write_text("")
        return (self.spec.count(plan)[1] / self.dense_params) ** 0.5


def _search_args(markers: Path, run_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    from _latency_helpers import synthetic_conv1d

    s = synthetic_conv1d()
    kw = dict(device=s["backend"], latency_budget_ms=0.9 * s["dense_ms"],
              evaluator=_SlowScore(s["spec"], markers), n_trials=N_SEARCH, table=s["table"],
              predictor=s["predict_ms"], spec=s["spec"], run_dir=run_dir, progress=False,
              verify_finalists=False, strategy="tpe", seed=0)
    return s["model"], s["x"], kw


def _run_search(markers: Path, run_dir: Path) -> None:
    import autoprune as ap

    model, x, kw = _search_args(markers, run_dir)
    ap.search(model, x, **kw)


def _spawn_and_kill(argv: list[str], ready: Any, what: str, timeout_s: float = 120) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"{what} never got far enough to be killed"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"{what} ended before the kill"


@pytest.mark.timeout(240)
def test_search_killed_by_sigkill_resumes_the_study(tmp_path: Path) -> None:
    import optuna

    import autoprune as ap
    from autoprune.storage import make_storage

    markers, run_dir = tmp_path / "markers", tmp_path / "run"
    markers.mkdir()

    def inside_ninth_evaluation() -> bool:  # 8 finished, the 9th started and not finished
        started = list(markers.glob("start-*"))
        return len(started) >= 9 and len(list(markers.glob("done-*"))) < len(started)

    _spawn_and_kill(["search", str(markers), str(run_dir)], inside_ninth_evaluation, "search")
    TS = optuna.trial.TrialState
    before = optuna.load_study(study_name=optuna.get_all_study_names(
        make_storage(None, run_dir))[0], storage=make_storage(None, run_dir))
    done_before = {t.number: t.params for t in before.get_trials(states=(TS.COMPLETE,))}
    running = before.get_trials(states=(TS.RUNNING,))
    assert len(done_before) >= 7 and len(running) == 1  # killed inside a trial

    model, x, kw = _search_args(markers, run_dir)
    result = ap.search(model, x, **kw)
    study = optuna.load_study(study_name=result.study_name, storage=make_storage(None, run_dir))
    trials = study.get_trials()
    # nothing of the first run was lost or redone: its trials keep their numbers and plans
    for n, params in done_before.items():
        assert trials[n].state == TS.COMPLETE and trials[n].params == params
    # the trial the kill interrupted is failed and its plan run again
    killed = trials[running[0].number]
    assert killed.state == TS.FAIL
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state == TS.COMPLETE
    assert retried[0].params == killed.params
    # and the study holds exactly the trials asked for
    assert sum(t.state == TS.COMPLETE for t in trials) == N_SEARCH
    assert len(result.trials) == len(trials) == N_SEARCH + 1
    assert len({t.number for t in trials}) == len(trials)


class _SlowLoader:
    """A fixed, unshuffled loader that sleeps per batch and records how far it got."""

    def __init__(self, marker: Path | None, sleep_s: float) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.batches = [(torch.randn(8, 8, generator=g), torch.randint(0, 10, (8,), generator=g))
                        for _ in range(FT_BATCHES)]
        self.marker, self.sleep_s, self.seen = marker, sleep_s, 0

    def __len__(self) -> int:
        return FT_BATCHES

    def __iter__(self):  # noqa: ANN204
        for b in self.batches:
            time.sleep(self.sleep_s)
            self.seen += 1
            if self.marker is not None:
                self.marker.write_text(str(self.seen))
            yield b


def _ft_model():  # noqa: ANN202
    import torch

    from autoprune.zoo import mlp

    torch.manual_seed(0)
    return mlp(in_features=8, hidden=16)


def _run_finetune(ckpt_dir: Path, marker: Path | None, sleep_s: float):  # noqa: ANN202
    from autoprune._finetune import finetune

    return finetune(_ft_model(), _SlowLoader(marker, sleep_s), epochs=FT_EPOCHS, lr=0.05,
                    checkpoint_dir=ckpt_dir, progress=False)


@pytest.mark.timeout(240)
def test_finetune_killed_by_sigkill_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """run_pipeline fine-tunes with checkpoint_dir=<run_dir>/finetune, so this is what a
    pipeline killed during fine-tuning resumes from."""
    import torch

    reference = _run_finetune(tmp_path / "reference", None, 0.0)
    ckpt_dir, marker = tmp_path / "ckpt", tmp_path / "seen"

    def inside_second_epoch() -> bool:  # epoch 1 checkpointed, a few batches of epoch 2 done
        seen = int(marker.read_text() or 0) if marker.exists() else 0
        return (ckpt_dir / "finetune_last.pt").exists() and seen >= FT_BATCHES + 3

    _spawn_and_kill(["finetune", str(ckpt_dir), str(marker)], inside_second_epoch, "finetune")
    resumed = _run_finetune(ckpt_dir, None, 0.0)
    assert resumed.resumed_from_step == FT_BATCHES  # the end of epoch 1, not step 0
    assert resumed.steps_run == FT_EPOCHS * FT_BATCHES
    for k, v in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, msg=k)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in MODES:
        _write_forever(sys.argv[1], Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "search":
        import warnings

        warnings.filterwarnings("ignore")
        _run_search(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "finetune":
        _run_finetune(Path(sys.argv[2]), Path(sys.argv[3]), 0.15)
    else:
        sys.exit(f"usage: test_atomic.py {{{'|'.join(MODES)}}} PATH | search MARKERS RUN_DIR | "
                 "finetune CKPT_DIR MARKER")
