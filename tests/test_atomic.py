"""Atomic writes under SIGKILL: a writer process rewrites a large file over and over through
autoprune.io and is killed at random moments; a reader polling the file must only ever see a
whole old version or a whole new one. A control run with a plain ``open(..., "wb")`` writer
shows the harness does catch torn files.

This file is also the writer program: ``python tests/test_atomic.py MODE PATH``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    seen, torn = _run_and_kill(mode, path, kills=3, rng=random.Random(MODES.index(mode)))
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in MODES:
        _write_forever(sys.argv[1], Path(sys.argv[2]))
    else:
        sys.exit(f"usage: test_atomic.py {{{'|'.join(MODES)}}} PATH")
