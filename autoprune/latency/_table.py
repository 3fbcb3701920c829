"""``LatencyTable``: measured per-layer latency on one device, per width and structure.

Files (``latency_tables/<device_id>/``):

* ``table.csv`` — one row per entry: the ``LayerSpec`` fields (tuples written as ``3x3``),
  ``structure``, ``density``, ``latency_ms`` (median), ``iqr_ms``, ``n_runs``, ``min_ms``,
  ``measured_at`` (UTC, ISO 8601);
* ``table.json`` — sidecar: ``schema_version``, ``device`` (``DeviceInfo``), ``device_id``,
  ``alignment`` (the detected channel step), ``alignment_sweep`` (the sweep it came from),
  ``protocol`` (``ProtocolSettings``), ``structures`` (those the device accelerates and the
  table was profiled for), ``n_entries``, ``notes``, timestamps.

Both are written atomically (``autoprune.io``), CSV first, so an interrupted save leaves a
consistent pair. ``load`` refuses a table from another device or schema version
(``TableMismatchError`` naming the differing fields) and a corrupt file (``CorruptFileError``
naming file and line; a CSV with fewer rows than its sidecar records is reported truncated).

Lookups (``lookup``/``lookup_many``) take an explicit miss policy:

* ``"raise"`` — ``TableMissError`` naming the spec;
* ``"measure"`` — measure the entry with the given backend (same device), add it, return it;
* ``"interpolate"`` — respect the staircase: each width is first rounded *up* to the table's
  alignment (never past the next measured width, e.g. the full width), then the latency is
  interpolated linearly between the measured widths around it — bilinearly in
  (in_channels, out_channels) for ordinary layers, along the channel count for depthwise
  convs and attention. A width below the smallest or above the largest measured width, or a
  missing grid corner, raises ``TableMissError``: nothing is extrapolated.

A structure the table's device does not accelerate (e.g. ``nm`` or ``unstructured`` on a CPU,
which runs masked weights densely) is looked up as ``none``: that is what it costs there.
``channel`` is carried by the widths and is looked up as ``none`` too.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import io
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoprune.errors import (
    CorruptFileError,
    InvalidInputError,
    TableMismatchError,
    TableMissError,
)
from autoprune.io import read_text
from autoprune.types import DeviceInfo, LatencySample, LayerSpec, OpKind, Structure

if TYPE_CHECKING:
    import pandas as pd

    from autoprune.backends.base import Backend

SCHEMA_VERSION = 1
CSV_NAME = "table.csv"
JSON_NAME = "table.json"
MissPolicy = Literal["raise", "measure", "interpolate"]
_POLICIES = ("raise", "measure", "interpolate")

SPEC_COLUMNS = (
    "op", "in_channels", "out_channels", "kernel", "stride", "padding", "dilation", "groups",
    "input_size", "batch", "dtype", "bias", "fused",
)
_TUPLE_COLUMNS = ("kernel", "stride", "padding", "dilation", "input_size")
_INT_COLUMNS = ("in_channels", "out_channels", "groups", "batch")
COLUMNS = (
    *SPEC_COLUMNS, "structure", "density", "latency_ms", "iqr_ms", "n_runs", "min_ms",
    "measured_at",
)

EntryKey = tuple[LayerSpec, Structure, float]


@dataclass(frozen=True)
class Entry:
    """One measured table row."""

    spec: LayerSpec
    structure: Structure
    density: float
    sample: LatencySample
    measured_at: str

    def to_row(self) -> list[str]:
        d = self.spec.to_dict()
        row: list[str] = []
        for col in SPEC_COLUMNS:
            v = d[col]
            if col in _TUPLE_COLUMNS:
                row.append("x".join(str(int(x)) for x in v))
            elif col == "bias":
                row.append("1" if v else "0")
            else:
                row.append(str(v))
        s = self.sample
        row += [
            self.structure.value, _fmt(self.density), _fmt(s.median_ms), _fmt(s.iqr_ms),
            str(int(s.n_runs)), _fmt(s.min_ms), self.measured_at,
        ]
        return row


def _fmt(x: float) -> str:
    return repr(float(x))


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def normalize_structure(structure: Structure | str) -> Structure:
    """The structure a table entry is keyed by: ``channel`` is carried by the widths (→ none);
    ``block`` has no per-layer cost and is refused."""
    try:
        s = Structure(structure)
    except ValueError:
        raise InvalidInputError(
            f"unknown structure {structure!r}; use one of {[x.value for x in Structure]}"
        ) from None
    if s == Structure.CHANNEL:
        return Structure.NONE
    if s == Structure.BLOCK:
        raise InvalidInputError(
            "structure 'block' removes layers instead of shaping one; measure the remaining "
            "layers with structure='none'"
        )
    return s



def entry_key(spec: LayerSpec, structure: Structure | str = Structure.NONE,
              density: float = 1.0) -> EntryKey:
    """The normalised key of a table entry: ``channel`` → ``none``; dense → density 1.0."""
    s = normalize_structure(structure)
    d = 1.0 if s == Structure.NONE else round(float(density), 4)
    return spec, s, d


def _family(spec: LayerSpec) -> LayerSpec:
    """The spec with its widths blanked: entries of one family differ only in widths."""
    tied = spec.op.is_depthwise or spec.op == OpKind.ATTENTION
    return dataclasses.replace(
        spec, in_channels=0 if not tied or spec.op.is_depthwise else spec.in_channels,
        out_channels=0, groups=0 if tied else spec.groups,
    )


class LatencyTable:
    """Per-layer latencies of one device. See the module docstring for files and policies.

    Construct empty with a ``DeviceInfo`` (the profiler does), or ``LatencyTable.load(dir)``.
    """

    def __init__(
        self,
        device: DeviceInfo,
        alignment: int | None = None,
        protocol: dict[str, Any] | Any | None = None,
        structures: Sequence[Structure | str] | None = None,
        notes: str = "",
    ) -> None:
        self.device = device
        self.alignment = alignment
        if protocol is not None and hasattr(protocol, "to_dict"):
            protocol = protocol.to_dict()
        self.protocol: dict[str, Any] = dict(protocol or {})
        self.structures: tuple[Structure, ...] = tuple(
            Structure(s) for s in (structures or (Structure.NONE,))
        )
        self.notes = notes
        self.alignment_sweep: dict[str, Any] | None = None
        self.created_at = now_utc()
        self.path: Path | None = None
        self._entries: dict[EntryKey, Entry] = {}
        self._families: dict[tuple[LayerSpec, Structure, float], dict[tuple[int, int], float]] | None = None

    # --- container -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, LayerSpec):
            key = entry_key(key)
        elif isinstance(key, tuple):
            key = entry_key(*key)
        return key in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def has(self, spec: LayerSpec, structure: Structure | str = Structure.NONE,
            density: float = 1.0) -> bool:
        return entry_key(spec, structure, density) in self._entries

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def add(self, spec: LayerSpec, structure: Structure | str, density: float,
            sample: LatencySample, measured_at: str | None = None) -> Entry:
        """Add (or replace) one entry."""
        k = entry_key(spec, structure, density)
        if not (sample.median_ms > 0 and math.isfinite(sample.median_ms)):
            raise InvalidInputError(f"latency median must be a positive number, got {sample}")
        e = Entry(k[0], k[1], k[2], sample, measured_at or now_utc())
        self._entries[k] = e
        self._families = None
        return e

    def accelerated(self, structure: Structure) -> bool:
        return structure in self.structures

    @property
    def device_id(self) -> str:
        return self.device.device_id

    # --- lookups -------------------------------------------------------------------------
    def lookup(
        self,
        spec: LayerSpec,
        structure: Structure | str = Structure.NONE,
        density: float = 1.0,
        policy: MissPolicy = "raise",
        backend: Backend | None = None,
    ) -> float:
        """Latency (ms, the median) of ``spec`` under ``structure``/``density``.

        ``policy`` decides what a miss does: "raise" (``TableMissError``), "measure" (needs
        ``backend`` on the table's device; the entry is added to the table — ``save`` keeps
        it) or "interpolate" (see the module docstring; never extrapolates).
        """
        if policy not in _POLICIES:
            raise InvalidInputError(f"policy={policy!r}; use one of {_POLICIES}")
        key = entry_key(spec, structure, density)
        if key[1] != Structure.NONE and not self.accelerated(key[1]):
            key = (key[0], Structure.NONE, 1.0)
        hit = self._entries.get(key)
        if hit is not None:
            return hit.sample.median_ms
        if policy == "raise":
            raise TableMissError(
                f"no latency-table entry for {_describe(key)} on {self.device_id}; profile the "
                "model (autoprune.profile) or look it up with policy='interpolate'/'measure'"
            )
        if policy == "measure":
            return self._measure_missing(key, backend)
        return self._interpolate(key)

    def lookup_many(
        self,
        specs: Sequence[LayerSpec],
        structures: Sequence[Structure | str] | None = None,
        densities: Sequence[float] | None = None,
        policy: MissPolicy = "raise",
        backend: Backend | None = None,
    ) -> np.ndarray:
        """``lookup`` for many entries at once (repeated keys are looked up once)."""
        n = len(specs)
        structures = structures if structures is not None else [Structure.NONE] * n
        densities = densities if densities is not None else [1.0] * n
        if len(structures) != n or len(densities) != n:
            raise InvalidInputError(
                f"lookup_many got {n} specs, {len(structures)} structures, "
                f"{len(densities)} densities; give one of each per spec"
            )
        cache: dict[EntryKey, float] = {}
        out = np.empty(n, dtype=float)
        for i, (sp, st, d) in enumerate(zip(specs, structures, densities)):
            k = entry_key(sp, st, d)
            v = cache.get(k)
            if v is None:
                v = cache[k] = self.lookup(sp, k[1], k[2], policy=policy, backend=backend)
            out[i] = v
        return out

    def _measure_missing(self, key: EntryKey, backend: Backend | None) -> float:
        if backend is None:
            raise InvalidInputError(
                "policy='measure' needs backend= (the backend this table was measured with)"
            )
        dev = backend.device_info()
        if dev.device_id != self.device_id:
            raise TableMismatchError(
                f"cannot measure into this table: backend device differs in "
                f"{', '.join(dev.diff(self.device)) or 'device_id'} "
                f"({dev.device_id} vs {self.device_id})"
            )
        sample = backend.measure_layer(*key)
        self.add(*key, sample)
        return sample.median_ms

    def _family_points(self, key: EntryKey) -> dict[tuple[int, int], float]:
        if self._families is None:
            fams: dict[tuple[LayerSpec, Structure, float], dict[tuple[int, int], float]] = {}
            for (sp, st, d), e in self._entries.items():
                fams.setdefault((_family(sp), st, d), {})[
                    (sp.in_channels, sp.out_channels)
                ] = e.sample.median_ms
            self._families = fams
        return self._families.get((_family(key[0]), key[1], key[2]), {})

    def _interpolate(self, key: EntryKey) -> float:
        spec = key[0]
        pts = self._family_points(key)
        if not pts:
            raise TableMissError(
                f"cannot interpolate {_describe(key)}: the table has no entry of this layer "
                "configuration at any width; profile the model first"
            )
        a = self.alignment or 1
        if spec.op.is_depthwise or spec.op == OpKind.ATTENTION:  # one width axis
            line = {co: v for (ci, co), v in pts.items()
                    if spec.op.is_depthwise or ci == spec.in_channels}
            grid = sorted(line)
            if not grid:
                raise TableMissError(f"cannot interpolate {_describe(key)}: no entry with "
                                     f"in_channels={spec.in_channels}")
            lo, hi, w = _bracket(spec.out_channels, grid, a, key, "out_channels")
            return (1 - w) * line[lo] + w * line[hi]
        ci_eff = _effective(spec.in_channels, sorted({ci for ci, _ in pts}), a, key,
                            "in_channels")
        co_eff = _effective(spec.out_channels, sorted({co for _, co in pts}), a, key,
                            "out_channels")
        rows: dict[int, set[int]] = {}
        for ci, co in pts:
            rows.setdefault(ci, set()).add(co)
        # the tightest measured rectangle around (ci_eff, co_eff): layers of one family can
        # have different width grids, so the corners must exist together
        best: tuple[float, int, int, int, int] | None = None
        for ci_lo in (c for c in rows if c <= ci_eff):
            for ci_hi in (c for c in rows if c >= ci_eff):
                common = rows[ci_lo] & rows[ci_hi]
                lows = [c for c in common if c <= co_eff]
                highs = [c for c in common if c >= co_eff]
                if not lows or not highs:
                    continue
                co_lo, co_hi = max(lows), min(highs)
                span = (ci_hi - ci_lo) / max(ci_eff, 1) + (co_hi - co_lo) / max(co_eff, 1)
                if best is None or span < best[0]:
                    best = (span, ci_lo, ci_hi, co_lo, co_hi)
        if best is None:
            raise TableMissError(
                f"cannot interpolate {_describe(key)}: no measured (in, out) rectangle around "
                f"({ci_eff}, {co_eff}); re-profile the model with its width grid"
            )
        _, ci_lo, ci_hi, co_lo, co_hi = best
        wci = (ci_eff - ci_lo) / (ci_hi - ci_lo) if ci_hi > ci_lo else 0.0
        wco = (co_eff - co_lo) / (co_hi - co_lo) if co_hi > co_lo else 0.0
        v00, v01 = pts[(ci_lo, co_lo)], pts[(ci_lo, co_hi)]
        v10, v11 = pts[(ci_hi, co_lo)], pts[(ci_hi, co_hi)]
        return ((1 - wci) * ((1 - wco) * v00 + wco * v01)
                + wci * ((1 - wco) * v10 + wco * v11))

    # --- persistence ---------------------------------------------------------------------
    @staticmethod
    def default_dir(device_info: DeviceInfo, root: str | Path = "latency_tables") -> Path:
        """``root/<device_id>``: where the table of this device lives."""
        return Path(root) / device_info.device_id

    def sidecar(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "device": self.device.to_dict(),
            "device_id": self.device_id,
            "alignment": self.alignment,
            "alignment_sweep": self.alignment_sweep,
            "protocol": self.protocol,
            "structures": [s.value for s in self.structures],
            "n_entries": len(self._entries),
            "notes": self.notes,
            "created_at": self.created_at,
            "updated_at": now_utc(),
            "columns": list(COLUMNS),
        }

    def to_csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for e in self._entries.values():
            w.writerow(e.to_row())
        return buf.getvalue()

    def save(self, directory: str | Path | None = None) -> Path:
        """Write ``table.csv`` then ``table.json`` atomically into ``directory`` (default: the
        directory it was loaded from or last saved to). Returns the directory."""
        from autoprune.io import atomic_write_json, atomic_write_text

        d = Path(directory) if directory is not None else self.path
        if d is None:
            raise InvalidInputError(
                "save() needs a directory (e.g. LatencyTable.default_dir(table.device))"
            )
        atomic_write_text(d / CSV_NAME, self.to_csv_text())
        atomic_write_json(d / JSON_NAME, self.sidecar())
        self.path = d
        return d

    @classmethod
    def load(cls, directory: str | Path, expect_device: DeviceInfo | None = None) -> LatencyTable:
        """Read a table directory. ``expect_device``: refuse a table measured elsewhere."""
        from autoprune.io import read_json

        d = Path(directory)
        jpath, cpath = d / JSON_NAME, d / CSV_NAME
        meta = read_json(jpath)
        if not isinstance(meta, dict):
            raise CorruptFileError(f"{jpath}: line 1: expected a JSON object")
        version = meta.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TableMismatchError(
                f"{jpath}: schema_version is {version!r}, this autoprune reads "
                f"{SCHEMA_VERSION}; re-profile the device (autoprune profile) to rebuild it"
            )
        try:
            device = DeviceInfo.from_dict(meta["device"])
            structures = [Structure(s) for s in meta.get("structures", ["none"])]
            alignment = meta.get("alignment")
            alignment = int(alignment) if alignment is not None else None
            n_entries = int(meta.get("n_entries", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{jpath}: malformed sidecar field ({type(e).__name__}: {e})"
                                   ) from None
        if expect_device is not None and expect_device.device_id != device.device_id:
            fields = expect_device.diff(device) or ["device_id"]
            details = ", ".join(
                f"{f}: table {device.to_dict().get(f)!r} vs expected "
                f"{expect_device.to_dict().get(f)!r}" for f in fields
            )
            raise TableMismatchError(
                f"{d}: table measured on another device or setup ({details}); profile this "
                "device instead"
            )
        table = cls(device, alignment=alignment, protocol=meta.get("protocol") or {},
                    structures=structures, notes=str(meta.get("notes", "")))
        table.alignment_sweep = meta.get("alignment_sweep")
        table.created_at = str(meta.get("created_at", table.created_at))
        for e in _read_csv(cpath):
            table._entries[(e.spec, e.structure, e.density)] = e
        if len(table._entries) < n_entries:
            raise CorruptFileError(
                f"{cpath}: line {len(table._entries) + 2}: truncated: {len(table._entries)} "
                f"rows but {jpath.name} records {n_entries}"
            )
        table.path = d
        return table

    # --- views ---------------------------------------------------------------------------
    @property
    def df(self) -> pd.DataFrame:
        """All entries as a pandas DataFrame (one row per entry, the CSV's columns)."""
        import pandas as pd

        rows = []
        for e in self._entries.values():
            d = e.spec.to_dict()
            for c in _TUPLE_COLUMNS:
                d[c] = tuple(d[c])
            d.update(structure=e.structure.value, density=e.density,
                     latency_ms=e.sample.median_ms, iqr_ms=e.sample.iqr_ms,
                     n_runs=e.sample.n_runs, min_ms=e.sample.min_ms, measured_at=e.measured_at)
            rows.append(d)
        return pd.DataFrame(rows, columns=list(COLUMNS))

    def merge(self, other: LatencyTable) -> LatencyTable:
        """Add ``other``'s entries (same device only); on a duplicate the newer measurement
        wins. Returns ``self``."""
        if other.device_id != self.device_id:
            raise TableMismatchError(
                f"cannot merge tables of different devices (differ in "
                f"{', '.join(self.device.diff(other.device)) or 'device_id'})"
            )
        if self.alignment is None:
            self.alignment = other.alignment
            self.alignment_sweep = other.alignment_sweep
        for k, e in other._entries.items():
            mine = self._entries.get(k)
            if mine is None or e.measured_at >= mine.measured_at:
                self._entries[k] = e
        self.structures = tuple(dict.fromkeys([*self.structures, *other.structures]))
        self._families = None
        return self

    def __repr__(self) -> str:
        return (f"LatencyTable({self.device_id}: {len(self)} entries, "
                f"alignment={self.alignment})")


def _effective(w: int, grid: list[int], a: int, key: EntryKey, what: str) -> int:
    """``w`` rounded up to the alignment, capped at the next measured width; raises when it
    lies outside the measured widths (no extrapolation)."""
    if w in grid:
        return w
    pos = bisect.bisect_left(grid, w)
    if pos == len(grid):
        raise TableMissError(
            f"cannot interpolate {_describe(key)}: {what}={w} is above the largest measured "
            f"width {grid[-1]}; no extrapolation"
        )
    w_eff = min(int(math.ceil(w / a) * a), grid[pos])
    if w_eff < grid[0]:
        raise TableMissError(
            f"cannot interpolate {_describe(key)}: {what}={w} (rounded to {w_eff}) is below the "
            f"smallest measured width {grid[0]}; no extrapolation"
        )
    return w_eff


def _bracket(w: int, grid: list[int], a: int, key: EntryKey, what: str) -> tuple[int, int, float]:
    """(lower grid width, upper grid width, weight of the upper) for width ``w``."""
    w_eff = _effective(w, grid, a, key, what)
    if w_eff in grid:
        return w_eff, w_eff, 0.0
    j = bisect.bisect_left(grid, w_eff)
    lo, hi = grid[j - 1], grid[j]
    return lo, hi, (w_eff - lo) / (hi - lo)


def _describe(key: EntryKey) -> str:
    spec, s, d = key
    shape = (f"{spec.op.value} in={spec.in_channels} out={spec.out_channels} "
             f"k={'x'.join(map(str, spec.kernel))} s={'x'.join(map(str, spec.stride))} "
             f"g={spec.groups} size={'x'.join(map(str, spec.input_size))} b={spec.batch}"
             f"{' fused=' + spec.fused if spec.fused else ''}")
    return f"[{shape}] structure={s.value}" + (f" density={d}" if s != Structure.NONE else "")


def _read_csv(path: Path) -> Iterable[Entry]:
    reader = csv.reader(io.StringIO(read_text(path)))
    try:
        header = next(reader)
    except StopIteration:
        raise CorruptFileError(f"{path}: line 1: empty file, expected a header") from None
    except csv.Error as e:
        raise CorruptFileError(f"{path}: line 1: {e}") from None
    if tuple(header) != COLUMNS:
        raise CorruptFileError(
            f"{path}: line 1: header {header} does not match the expected columns {list(COLUMNS)}"
        )
    out = []
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise CorruptFileError(f"{path}: line {reader.line_num}: {e}") from None
        line = reader.line_num
        if not row:
            continue
        if len(row) != len(COLUMNS):
            raise CorruptFileError(
                f"{path}: line {line}: expected {len(COLUMNS)} fields, got {len(row)} "
                "(truncated or hand-edited file)"
            )
        try:
            out.append(_parse_row(row))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{path}: line {line}: {type(e).__name__}: {e}") from None
    return out


def _parse_row(row: list[str]) -> Entry:
    d: dict[str, Any] = dict(zip(COLUMNS, row))
    spec_d: dict[str, Any] = {}
    for c in SPEC_COLUMNS:
        v = d[c]
        if c in _TUPLE_COLUMNS:
            spec_d[c] = tuple(int(x) for x in v.split("x")) if v else ()
        elif c in _INT_COLUMNS:
            spec_d[c] = int(v)
        elif c == "bias":
            if v not in ("0", "1"):
                raise ValueError(f"bias must be 0 or 1, got {v!r}")
            spec_d[c] = v == "1"
        else:
            spec_d[c] = v
    spec = LayerSpec.from_dict(spec_d)
    sample = LatencySample(
        median_ms=float(d["latency_ms"]), iqr_ms=float(d["iqr_ms"]), n_runs=int(d["n_runs"]),
        min_ms=float(d["min_ms"]),
    )
    if not (sample.median_ms > 0 and math.isfinite(sample.median_ms)):
        raise ValueError(f"latency_ms must be a positive number, got {d['latency_ms']!r}")
    structure = Structure(d["structure"])
    return Entry(spec, structure, float(d["density"]), sample, d["measured_at"])
