"""LatencyTable storage shared by processes: saves merge under an inter-process lock, a reader
never sees a CSV and sidecar from different saves, a SIGKILLed writer loses only what it had
not saved and never leaves the lock stuck or the pair unreadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autoprune.errors import CorruptFileError, StorageError, TableMismatchError
from autoprune.io import LOCK_NAME, file_lock
from autoprune.latency._table import LatencyTable
from autoprune.types import DeviceInfo, LatencySample, LayerSpec, OpKind, Structure

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

# Worker w adds entry j: a 3x3 conv (w+1) -> (j+1) channels at (1000 w + j + 1) ms, and saves
# after every `save_every` entries; after each save returns it appends the number of its
# entries saved so far to its log. argv: dir, w, n, save_every, log, pause_s.
_COMMON = """
from autoprune.latency._table import LatencyTable
from autoprune.types import DeviceInfo, LatencySample, LayerSpec, OpKind
DEV = DeviceInfo("synthetic", "concurrency test", "x86_64", "none")
def spec(w, j):
    return LayerSpec(OpKind.CONV2D, w + 1, j + 1, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))
def sample(w, j):
    return LatencySample(1000.0 * w + j + 1, 0.5, 20, 1000.0 * w + j + 0.5)
"""
_WRITER = _COMMON + textwrap.dedent("""
    import os, sys, time
    d, log, pause = sys.argv[1], sys.argv[5], float(sys.argv[6])
    w, n, every = map(int, sys.argv[2:5])
    t = LatencyTable(DEV)
    with open(log, "a") as f:
        for j in range(n):
            t.add(spec(w, j), "none", 1.0, sample(w, j))
            if (j + 1) % every == 0 or j + 1 == n:
                t.save(d)
                f.write(f"{j + 1}\\n")
                f.flush()
            time.sleep(pause)
""")

DEV = DeviceInfo("synthetic", "concurrency test", "x86_64", "none")


def spec(w: int, j: int) -> LayerSpec:
    return LayerSpec(OpKind.CONV2D, w + 1, j + 1, (3, 3), (1, 1), (1, 1), (1, 1), 1, (8, 8))


def sample(w: int, j: int) -> LatencySample:
    return LatencySample(1000.0 * w + j + 1, 0.5, 20, 1000.0 * w + j + 0.5)


def _writer(d: Path, w: int, n: int, every: int, log: Path, pause_s: float = 0.0
            ) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(d), str(w), str(n), str(every), str(log),
         str(pause_s)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _saved(log: Path) -> int:
    """How many entries the worker had saved when it last reported (whole lines only)."""
    if not log.exists():
        return 0
    lines = [ln for ln in log.read_text().split("\n")[:-1] if ln]
    return int(lines[-1]) if lines else 0


def _wait(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    out, _ = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, out.decode()[-3000:]


def _csv_rows(d: Path) -> list[str]:
    return (d / "table.csv").read_text().splitlines()[1:]


@pytest.mark.timeout(90)
def test_three_writers_one_killed_keep_every_saved_entry(tmp_path: Path) -> None:
    d = tmp_path / "table"
    n, every = 45, 3
    logs = [tmp_path / f"w{w}.log" for w in range(3)]
    procs = [_writer(d, w, n, every, logs[w], pause_s=0.004) for w in range(3)]
    victim = procs[2]
    deadline = time.monotonic() + 60
    while _saved(logs[2]) < 4 * every:  # several saves in, well before its last
        assert victim.poll() is None, victim.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline, "worker 2 never got far enough to be killed"
        time.sleep(0.002)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, "worker 2 finished before the kill"
    killed_saved = _saved(logs[2])
    assert killed_saved < n
    for p in procs[:2]:
        _wait(p)

    table = LatencyTable.load(d, expect_device=DEV)  # loads without error
    by_key = {(e.spec.in_channels - 1, e.spec.out_channels - 1): e for e in table}
    rows = _csv_rows(d)
    assert len(rows) == len(set(rows)) == len(table) == len(by_key)  # each entry once
    for w in (0, 1):  # survivors: everything
        for j in range(n):
            assert by_key[(w, j)].sample == sample(w, j), (w, j)
    for j in range(killed_saved):  # the killed one: everything its finished saves held
        assert by_key[(2, j)].sample == sample(2, j), j
    # nothing else: at most the save it may have been inside when killed
    extra = sorted(j for (w, j) in by_key if w == 2 and j >= killed_saved)
    assert extra in ([], list(range(killed_saved, killed_saved + every)))
    assert set(by_key) <= {(w, j) for w in range(3) for j in range(n)}

    # the lock is free again and a new save goes through
    with file_lock(d / LOCK_NAME, timeout_s=5):
        pass
    late = LatencyTable(DEV)
    late.add(spec(9, 0), Structure.NONE, 1.0, sample(9, 0))
    late.save(d)
    assert len(late) == len(table) + 1  # it merged the table on disk
    assert len(LatencyTable.load(d)) == len(table) + 1


@pytest.mark.timeout(90)
def test_reader_never_sees_a_mismatched_pair_while_writers_save(tmp_path: Path) -> None:
    d = tmp_path / "table"
    first = LatencyTable(DEV)
    first.add(spec(5, 0), Structure.NONE, 1.0, sample(5, 0))
    first.save(d)
    n = 60
    procs = [_writer(d, w, n, 1, tmp_path / f"w{w}.log") for w in range(2)]
    loads, sizes = 0, []
    while any(p.poll() is None for p in procs):
        t = LatencyTable.load(d)  # a CSV from one save with the sidecar of another raises
        sizes.append(len(t))
        loads += 1
    for p in procs:
        _wait(p)
    final = LatencyTable.load(d)
    assert len(final) == 2 * n + 1
    assert loads >= 20, f"only {loads} loads overlapped the writers"
    assert sizes == sorted(sizes)  # saves only ever add entries
    assert len(set(sizes)) > 3  # the reader saw the table grow, not only its ends


_DIE_BETWEEN_FILES = _COMMON + textwrap.dedent("""
    import os, signal, sys
    import autoprune.latency._table as table_module
    d = sys.argv[1]
    t = LatencyTable(DEV)
    for j in range(3):
        t.add(spec(0, j), "none", 1.0, sample(0, j))
    t.save(d)
    t.add(spec(0, 3), "none", 1.0, sample(0, 3))
    def die(*a, **k):  # the CSV is in place, its sidecar not yet
        os.kill(os.getpid(), signal.SIGKILL)
    table_module.atomic_write_json = die  # where the table module looks it up
    t.save(d)
""")


def test_writer_killed_between_csv_and_sidecar_leaves_a_loadable_table(tmp_path: Path) -> None:
    d = tmp_path / "table"
    proc = subprocess.run([sys.executable, "-c", _DIE_BETWEEN_FILES, str(d)], env=ENV,
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    side = json.loads((d / "table.json").read_text())
    assert side["n_entries"] == 3  # the old sidecar, the new CSV
    assert len(_csv_rows(d)) == 4
    t = LatencyTable.load(d)  # the CSV the dead saver recorded is accepted
    assert len(t) == 4 and t.lookup(spec(0, 3)) == sample(0, 3).median_ms
    t.add(spec(1, 0), Structure.NONE, 1.0, sample(1, 0))
    t.save()
    side = json.loads((d / "table.json").read_text())
    assert side["n_entries"] == 5 and len(LatencyTable.load(d)) == 5
    assert (d / LOCK_NAME).read_bytes() == b""  # no save in flight
    # a CSV changed outside autoprune is still refused, naming the file
    rows = (d / "table.csv").read_text().splitlines(keepends=True)
    (d / "table.csv").write_text(rows[0] + "".join(reversed(rows[1:])))
    with pytest.raises(CorruptFileError, match=r"table\.csv: does not match its sidecar"):
        LatencyTable.load(d)
    # ... unless the sidecar has no checksum (a table written before csv_sha256 existed)
    del side["csv_sha256"]
    (d / "table.json").write_text(json.dumps(side))
    assert len(LatencyTable.load(d)) == 5


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from autoprune.io import file_lock
    with file_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_lock_of_a_killed_holder_is_released(tmp_path: Path) -> None:
    lock = tmp_path / "table" / LOCK_NAME
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)], env=ENV,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(StorageError, match=r"\.lock: another process has held"):
            with file_lock(lock, timeout_s=0.2):
                pass
        with pytest.raises(StorageError):  # readers wait for writers too
            with file_lock(lock, shared=True, timeout_s=0.1):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    t0 = time.monotonic()
    with file_lock(lock, timeout_s=5):
        pass
    assert time.monotonic() - t0 < 5
    t = LatencyTable(DEV)
    t.add(spec(0, 0), Structure.NONE, 1.0, sample(0, 0))
    t.save(lock.parent)
    assert len(LatencyTable.load(lock.parent)) == 1


def test_shared_locks_do_not_block_each_other(tmp_path: Path) -> None:
    lock = tmp_path / LOCK_NAME
    with file_lock(lock, shared=True), file_lock(lock, shared=True, timeout_s=0.5):
        with pytest.raises(StorageError):
            with file_lock(lock, timeout_s=0.1):
                pass


def test_save_merges_with_the_table_on_disk(tmp_path: Path) -> None:
    d = tmp_path / "table"
    disk = LatencyTable(DEV, alignment=8, protocol={"min_runs": 20}, notes="first",
                        structures=[Structure.NONE])
    disk.created_at = "2020-01-01T00:00:00Z"
    disk.add(spec(0, 0), Structure.NONE, 1.0, sample(0, 0), measured_at="2020-01-01T00:00:00Z")
    disk.add(spec(0, 1), Structure.NONE, 1.0, sample(0, 1), measured_at="2030-01-01T00:00:00Z")
    disk.add(spec(0, 2), Structure.NONE, 1.0, sample(0, 2), measured_at="2025-01-01T00:00:00Z")
    disk.save(d)
    side = json.loads((d / "table.json").read_text())
    side["from_a_newer_version"] = {"kept": True}
    (d / "table.json").write_text(json.dumps(side))

    ours = LatencyTable(DEV, structures=[Structure.NONE, Structure.NM])
    newer, older, tie = sample(7, 0), sample(7, 1), sample(7, 2)
    ours.add(spec(0, 0), Structure.NONE, 1.0, newer, measured_at="2021-01-01T00:00:00Z")
    ours.add(spec(0, 1), Structure.NONE, 1.0, older, measured_at="2029-01-01T00:00:00Z")
    ours.add(spec(0, 2), Structure.NONE, 1.0, tie, measured_at="2025-01-01T00:00:00Z")
    ours.add(spec(1, 0), Structure.NONE, 1.0, sample(1, 0))
    ours.save(d)
    for t in (ours, LatencyTable.load(d)):  # in memory and on disk alike
        assert len(t) == 4
        assert t.lookup(spec(0, 0)) == newer.median_ms  # ours is later
        assert t.lookup(spec(0, 1)) == sample(0, 1).median_ms  # the disk's is later
        assert t.lookup(spec(0, 2)) == tie.median_ms  # a tie keeps ours
        assert t.lookup(spec(1, 0)) == sample(1, 0).median_ms
        assert t.alignment == 8 and t.protocol == {"min_runs": 20} and t.notes == "first"
        assert t.created_at == "2020-01-01T00:00:00Z"
        assert t.structures == (Structure.NONE, Structure.NM)
    side = json.loads((d / "table.json").read_text())
    assert side["from_a_newer_version"] == {"kept": True}
    assert side["n_entries"] == 4 and len(side["csv_sha256"]) == 64


def test_save_refuses_a_directory_holding_another_devices_table(tmp_path: Path) -> None:
    d = tmp_path / "table"
    t = LatencyTable(DEV)
    t.add(spec(0, 0), Structure.NONE, 1.0, sample(0, 0))
    t.save(d)
    other = LatencyTable(DeviceInfo("synthetic", "another device", "x86_64", "none"))
    other.add(spec(1, 0), Structure.NONE, 1.0, sample(1, 0))
    with pytest.raises(TableMismatchError, match="device_name: on disk 'concurrency test'"):
        other.save(d)
    assert len(LatencyTable.load(d)) == 1  # untouched
