"""``LatencyTable``: measured per-layer latency on one device, per width and structure.

Files (``<root>/<device_id>/``; the default root is ``autoprune.io.cache_dir()/latency_tables``):

* ``table.csv`` — one row per entry: the ``LayerSpec`` fields (tuples written as ``3x3``),
  ``structure``, ``density``, ``latency_ms`` (median), ``iqr_ms``, ``n_runs``, ``min_ms``,
  ``measured_at`` (UTC, ISO 8601);
* ``table.json`` — sidecar: ``schema_version``, ``device`` (``DeviceInfo``), ``device_id``,
  ``alignment`` (the detected channel step), ``alignment_sweep`` (the sweep it came from),
  ``protocol`` (``ProtocolSettings``), ``structures`` (those the device accelerates and the
  table was profiled for), ``n_entries``, ``csv_sha256`` (the CSV it belongs to), ``notes``,
  timestamps;
* ``.lock`` — the directory's inter-process lock (``autoprune.io.file_lock``; empty, or the
  sha256 of a CSV being saved).

Several processes may share a directory. ``save`` holds the exclusive lock while it merges
the table already there into its own (union of entries, the later measurement winning) and
writes the CSV then the sidecar, each atomically (``autoprune.io``); ``load`` reads both under
the shared lock, so it sees one save's pair, never a mix. Before replacing the CSV a saver
records the new CSV's sha256 in the lock file: a saver killed between the two files leaves a
CSV that matches that record, which readers accept (its rows are the merged, newer ones) and
the next save completes. ``load`` refuses a table from another device or schema version
(``TableMismatchError`` naming the differing fields) and a corrupt file (``CorruptFileError``
naming file and line; a CSV with fewer rows than its sidecar records is reported truncated; a
CSV whose sha256 is neither the sidecar's ``csv_sha256`` nor the one being saved is reported
as not matching its sidecar).

Lookups (``lookup``/``lookup_many``) take an explicit miss policy:

* ``"raise"`` — ``TableMissError`` naming the spec;
* ``"measure"`` — measure the entry with the given backend (same device), add it, return it;
* ``"interpolate"`` — follow the device's kernel rules (``table.kernel_rules``, see
  ``autoprune.latency._rules``): each width is rounded *up* to the next fast width (the output
  staircase; input and depthwise steps), the latency is interpolated linearly between the
  measured fast-path widths around it — bilinearly in (in_channels, out_channels) for ordinary
  layers, along the channel count for depthwise convs and attention — and a width off a fast
  path is multiplied by that path's measured penalty. Outside the measured widths (or where no
  measured rectangle surrounds the width) the nearest measured point is scaled by MACs. So a
  lookup never raises for a layer the table has at any width, and is always positive. A table
  without kernel rules (written before them) rounds widths up to its ``alignment`` only.

A structure the table's device does not accelerate (e.g. ``nm`` or ``unstructured`` on a CPU,
which runs masked weights densely) is looked up as ``none``: that is what it costs there.
``channel`` is carried by the widths and is looked up as ``none`` too.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import hashlib
import io
import math
import os
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
from autoprune.io import (
    LOCK_NAME,
    atomic_write_bytes,
    atomic_write_json,
    cache_dir,
    file_lock,
    read_bytes,
    read_json,
    read_text,
)
from autoprune.latency._rules import KernelRules
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
        #: the device's channel-count rules (``KernelRules``); None on tables written before
        #: rules were detected (widths are then only rounded up to ``alignment``)
        self.kernel_rules: KernelRules | None = None
        self.created_at = now_utc()
        self.path: Path | None = None
        self._entries: dict[EntryKey, Entry] = {}
        self._families: dict[tuple[LayerSpec, Structure, float], dict[tuple[int, int], float]] | None = None
        self._penalties: dict[tuple[LayerSpec, Structure, float], list[tuple[int, float]]] | None = None

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
        self._penalties = None
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
        """Price a width the table has not measured (see the module docstring)."""
        spec = key[0]
        pts = self._family_points(key)
        if not pts:
            raise TableMissError(
                f"cannot interpolate {_describe(key)}: the table has no entry of this layer "
                "configuration at any width; profile the model first"
            )
        factor = 1.0
        rules = self.kernel_rules
        if rules is not None:
            ci_eff, co_eff, factor = rules.effective(spec)
            # only measured points on the fast path bracket a fast-path width
            fast = {(ci, co): v for (ci, co), v in pts.items()
                    if not rules.off_fast_path(spec.with_channels(ci, co))}
            if factor > 1.0 and fast:
                factor = self._family_penalty(key, pts, fast, factor)
            pts = fast or pts
            # rounding up never passes the next measured width (e.g. a full width of 10
            # classes is not priced as 16)
            ci_eff = _cap(spec.in_channels, ci_eff, sorted({ci for ci, _ in pts}))
            co_eff = _cap(spec.out_channels, co_eff, sorted({co for _, co in pts}))
        else:
            a = self.alignment or 1
            ci_eff = _round_up(spec.in_channels, a, sorted({ci for ci, _ in pts}))
            co_eff = _round_up(spec.out_channels, a, sorted({co for _, co in pts}))
        if spec.op.is_depthwise:
            ci_eff = co_eff
        hit = pts.get((ci_eff, co_eff))
        if hit is not None:
            return hit * factor
        return factor * _priced_between(spec, ci_eff, co_eff, pts)

    def _family_penalty(self, key: EntryKey, pts: dict[tuple[int, int], float],
                        fast: dict[tuple[int, int], float], default: float) -> float:
        """This layer family's own slow-path factor at the query's width: measured / fast-path
        price (at the rounded-up widths) of the family's measured off-path points (the
        profiler measures one below each grid width), interpolated linearly along the axis
        the rule applies to (input channels; channels for depthwise), constant beyond them;
        the device's rule factor if the family has none."""
        fam = (_family(key[0]), key[1], key[2])
        if self._penalties is None:
            self._penalties = {}
        curve = self._penalties.get(fam)
        rules = self.kernel_rules
        assert rules is not None
        if curve is None:
            by_width: dict[int, list[float]] = {}
            for (ci, co), v in pts.items():
                sp = key[0].with_channels(ci, co)
                if (ci, co) in fast or not rules.off_fast_path(sp):
                    continue
                ci_e, co_e, _ = rules.effective(sp)
                if key[0].op.is_depthwise:
                    ci_e = co_e
                base = fast.get((ci_e, co_e)) or _priced_between(sp, ci_e, co_e, fast)
                by_width.setdefault(co if key[0].op.is_depthwise else ci, []).append(v / base)
            curve = sorted((w, float(np.median(r))) for w, r in by_width.items())
            self._penalties[fam] = curve
        if not curve:
            return default
        w = key[0].out_channels if key[0].op.is_depthwise else key[0].in_channels
        ws = [c[0] for c in curve]
        j = bisect.bisect_left(ws, w)
        if j == 0:
            return curve[0][1]
        if j == len(ws):
            return curve[-1][1]
        (w0, f0), (w1, f1) = curve[j - 1], curve[j]
        return f0 + (f1 - f0) * (w - w0) / (w1 - w0)

    # --- persistence ---------------------------------------------------------------------
    @staticmethod
    def default_dir(device_info: DeviceInfo, root: str | Path | None = None) -> Path:
        """``root/<device_id>``: where the table of this device lives. ``root=None``: the user
        cache, ``autoprune.io.cache_dir()/latency_tables`` (``$AUTOPRUNE_CACHE`` etc., read
        now)."""
        if root is None:
            root = cache_dir() / "latency_tables"
        return Path(root) / device_info.device_id

    def sidecar(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "device": self.device.to_dict(),
            "device_id": self.device_id,
            "alignment": self.alignment,
            "alignment_sweep": self.alignment_sweep,
            "kernel_rules": self.kernel_rules.to_dict() if self.kernel_rules else None,
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
        """Merge with the table on disk and write ``table.csv`` then ``table.json`` atomically
        into ``directory`` (default: the directory it was loaded from or last saved to).
        Returns the directory.

        Safe while other processes save to or load from the same directory: all of it runs
        under the directory's exclusive lock (see the module docstring). A table already there
        (same device and schema, else ``TableMismatchError``) is merged in first: the union of
        the entries; on a key both have, the later ``measured_at`` wins (ties: this table's);
        its ``created_at`` is kept; what this table lacks (alignment with its sweep, kernel
        rules, protocol, notes, sidecar keys it does not write) is taken from it; structures are
        united. Afterwards this table holds the merged entries too.
        """
        d = Path(directory) if directory is not None else self.path
        if d is None:
            raise InvalidInputError(
                "save() needs a directory (e.g. LatencyTable.default_dir(table.device))"
            )
        with file_lock(d / LOCK_NAME) as fd:
            on_disk: dict[str, Any] = {}
            if (d / JSON_NAME).exists():
                meta, csv_bytes = _read_pair(d)
                disk = type(self)._from_files(d, meta, csv_bytes, _read_intent(fd))
                if disk.device_id != self.device_id:
                    fields = self.device.diff(disk.device) or ["device_id"]
                    details = ", ".join(
                        f"{f}: on disk {disk.device.to_dict().get(f)!r} vs this table "
                        f"{self.device.to_dict().get(f)!r}" for f in fields
                    )
                    raise TableMismatchError(
                        f"{d}: holds a table measured on another device or setup ({details}); "
                        "save this table into its own directory (LatencyTable.default_dir("
                        "table.device, root))"
                    )
                self._absorb(disk)
                on_disk = meta
            data = self.to_csv_text().encode("utf-8")
            sha = hashlib.sha256(data).hexdigest()
            ours = self.sidecar()
            sidecar = {**{k: v for k, v in on_disk.items() if k not in ours}, **ours,
                       "csv_sha256": sha}
            assert fd is not None  # an exclusive lock always has its file
            _write_intent(fd, sha)
            atomic_write_bytes(d / CSV_NAME, data)
            atomic_write_json(d / JSON_NAME, sidecar)
            _write_intent(fd, "")
        self.path = d
        return d

    def _absorb(self, disk: LatencyTable) -> None:
        """Merge the on-disk table ``disk`` into this one, as ``save`` describes."""
        for k, e in disk._entries.items():
            mine = self._entries.get(k)
            if mine is None or e.measured_at > mine.measured_at:
                self.add(e.spec, e.structure, e.density, e.sample, e.measured_at)
        if self.alignment is None and disk.alignment is not None:
            self.alignment, self.alignment_sweep = disk.alignment, disk.alignment_sweep
        if self.kernel_rules is None:
            self.kernel_rules = disk.kernel_rules
        if not self.protocol:
            self.protocol = dict(disk.protocol)
        if not self.notes:
            self.notes = disk.notes
        self.structures = tuple(dict.fromkeys([*self.structures, *disk.structures]))
        self.created_at = disk.created_at

    @classmethod
    def load(cls, directory: str | Path, expect_device: DeviceInfo | None = None) -> LatencyTable:
        """Read a table directory. ``expect_device``: refuse a table measured elsewhere.

        Both files are read under the directory's shared lock, so a concurrent ``save`` is seen
        whole or not at all. A CSV that does not match the sidecar's ``csv_sha256`` raises
        ``CorruptFileError`` naming it (tables written before the field existed are not
        checked)."""
        d = Path(directory)
        with file_lock(d / LOCK_NAME, shared=True) as fd:
            meta, csv_bytes = _read_pair(d)
            intent = _read_intent(fd)
        return cls._from_files(d, meta, csv_bytes, intent, expect_device)

    @classmethod
    def _from_files(cls, d: Path, meta: Any, csv_bytes: bytes, intent: str | None,
                    expect_device: DeviceInfo | None = None) -> LatencyTable:
        """The table of directory ``d`` from its sidecar (parsed) and CSV (bytes) read under
        its lock; ``intent``: the sha256 recorded in the lock file by a saver (or None)."""
        jpath, cpath = d / JSON_NAME, d / CSV_NAME
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
            recorded = meta.get("csv_sha256")
            if recorded is not None and not isinstance(recorded, str):
                raise TypeError(f"csv_sha256 must be a string, got {recorded!r}")
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
        if meta.get("kernel_rules"):
            table.kernel_rules = KernelRules.from_dict(meta["kernel_rules"], source=str(jpath))
        table.created_at = str(meta.get("created_at", table.created_at))
        try:
            text = csv_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptFileError(f"{cpath}: not UTF-8 text ({e})") from None
        for entry in _read_csv(cpath, text):
            table._entries[(entry.spec, entry.structure, entry.density)] = entry
        if len(table._entries) < n_entries:
            raise CorruptFileError(
                f"{cpath}: line {len(table._entries) + 2}: truncated: {len(table._entries)} "
                f"rows but {jpath.name} records {n_entries}"
            )
        if recorded is not None:
            actual = hashlib.sha256(csv_bytes).hexdigest()
            # a saver killed between the CSV and the sidecar leaves the CSV it recorded
            if actual != recorded and actual != intent:
                raise CorruptFileError(
                    f"{cpath}: does not match its sidecar {jpath.name}: its sha256 is "
                    f"{actual[:16]}..., the sidecar records {recorded[:16]}... (the CSV was "
                    "replaced or edited outside autoprune); restore the pair, or delete "
                    f"csv_sha256 from {jpath.name} to accept this CSV"
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
        if self.kernel_rules is None:
            self.kernel_rules = other.kernel_rules
        for k, e in other._entries.items():
            mine = self._entries.get(k)
            if mine is None or e.measured_at >= mine.measured_at:
                self._entries[k] = e
        self.structures = tuple(dict.fromkeys([*self.structures, *other.structures]))
        self._families = None
        self._penalties = None
        return self

    def __repr__(self) -> str:
        return (f"LatencyTable({self.device_id}: {len(self)} entries, "
                f"alignment={self.alignment})")


def _round_up(w: int, a: int, grid: list[int]) -> int:
    """``w`` rounded up to the alignment ``a``, never past the next measured width."""
    if w in grid or a <= 1:
        return w
    up = int(math.ceil(w / a) * a)
    pos = bisect.bisect_left(grid, w)
    return min(up, grid[pos]) if pos < len(grid) else up


def _cap(w: int, w_eff: int, grid: list[int]) -> int:
    """``w_eff`` (``w`` rounded up) capped at the smallest measured width >= ``w``."""
    pos = bisect.bisect_left(grid, w)
    return min(w_eff, grid[pos]) if pos < len(grid) else w_eff


def _macs_at(spec: LayerSpec, ci: int, co: int) -> float:
    return float(max(1, spec.with_channels(ci, co).macs))


def _priced_between(spec: LayerSpec, ci: int, co: int,
                    pts: dict[tuple[int, int], float]) -> float:
    """Latency at widths (ci, co) from measured points of the same family: linear between the
    measured widths around it (bilinear in (in, out); along the channel count for depthwise
    and attention); outside the measured range, or where no measured rectangle surrounds it,
    from the nearest measured point scaled by MACs (work grows with MACs there). Never
    raises for a family with at least one point; always positive."""
    tied = spec.op.is_depthwise or spec.op == OpKind.ATTENTION
    if tied:
        line = {c_o: v for (c_i, c_o), v in pts.items()
                if spec.op.is_depthwise or c_i == spec.in_channels}
        if line:
            grid = sorted(line)
            c = min(max(co, grid[0]), grid[-1])
            j = bisect.bisect_left(grid, c)
            if grid[j] == c:
                base = line[c]
            else:
                lo, hi = grid[j - 1], grid[j]
                w = (c - lo) / (hi - lo)
                base = (1 - w) * line[lo] + w * line[hi]
            cin_c = c if spec.op.is_depthwise else spec.in_channels
            return base * _macs_at(spec, ci, co) / _macs_at(spec, cin_c, c)
    rows: dict[int, set[int]] = {}
    for c_i, c_o in pts:
        rows.setdefault(c_i, set()).add(c_o)
    ci_grid = sorted(rows)
    ci_c = min(max(ci, ci_grid[0]), ci_grid[-1])
    all_co = sorted({c_o for _, c_o in pts})
    co_c = min(max(co, all_co[0]), all_co[-1])
    # the tightest measured rectangle around (ci_c, co_c): layers of one family can have
    # different width grids, so the corners must exist together
    best: tuple[float, int, int, int, int] | None = None
    for ci_lo in (c for c in ci_grid if c <= ci_c):
        for ci_hi in (c for c in ci_grid if c >= ci_c):
            common = rows[ci_lo] & rows[ci_hi]
            lows = [c for c in common if c <= co_c]
            highs = [c for c in common if c >= co_c]
            if not lows or not highs:
                continue
            co_lo, co_hi = max(lows), min(highs)
            span = (ci_hi - ci_lo) / max(ci_c, 1) + (co_hi - co_lo) / max(co_c, 1)
            if best is None or span < best[0]:
                best = (span, ci_lo, ci_hi, co_lo, co_hi)
    if best is None:  # no rectangle: the nearest point (relative distance), scaled by MACs
        near = min(pts, key=lambda p: abs(p[0] - ci) / max(ci, 1) + abs(p[1] - co) / max(co, 1))
        return pts[near] * _macs_at(spec, ci, co) / _macs_at(spec, *near)
    _, ci_lo, ci_hi, co_lo, co_hi = best
    wci = (ci_c - ci_lo) / (ci_hi - ci_lo) if ci_hi > ci_lo else 0.0
    wco = (co_c - co_lo) / (co_hi - co_lo) if co_hi > co_lo else 0.0
    v00, v01 = pts[(ci_lo, co_lo)], pts[(ci_lo, co_hi)]
    v10, v11 = pts[(ci_hi, co_lo)], pts[(ci_hi, co_hi)]
    base = ((1 - wci) * ((1 - wco) * v00 + wco * v01)
            + wci * ((1 - wco) * v10 + wco * v11))
    return base * _macs_at(spec, ci, co) / _macs_at(spec, ci_c, co_c)


def _describe(key: EntryKey) -> str:
    spec, s, d = key
    shape = (f"{spec.op.value} in={spec.in_channels} out={spec.out_channels} "
             f"k={'x'.join(map(str, spec.kernel))} s={'x'.join(map(str, spec.stride))} "
             f"g={spec.groups} size={'x'.join(map(str, spec.input_size))} b={spec.batch}"
             f"{' fused=' + spec.fused if spec.fused else ''}")
    return f"[{shape}] structure={s.value}" + (f" density={d}" if s != Structure.NONE else "")


def _read_pair(d: Path) -> tuple[Any, bytes]:
    """(parsed sidecar, CSV bytes) of table directory ``d``; call under its lock."""
    return read_json(d / JSON_NAME), read_bytes(d / CSV_NAME)


def _read_intent(fd: int | None) -> str | None:
    """The CSV sha256 a saver recorded in the lock file ``fd`` before replacing the CSV."""
    if fd is None:
        return None
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 256).decode("ascii", "replace").strip()
    return text or None


def _write_intent(fd: int, sha: str) -> None:
    """Record (``sha``) or clear (``""``) the CSV being saved in the lock file ``fd``."""
    os.ftruncate(fd, 0)
    if sha:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, sha.encode("ascii"))
        os.fsync(fd)


def _read_csv(path: Path, text: str | None = None) -> Iterable[Entry]:
    """Entries of the CSV at ``path`` (``text``: its content, already read)."""
    reader = csv.reader(io.StringIO(read_text(path) if text is None else text))
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
