"""``SearchSpace``: what the search may choose for each prunable group of one model.

Per channel group the space holds the structures worth trying on the device and a grid of
kept widths snapped to the device's channel alignment; per block group whether removing it is
allowed. Built from a ``ModelSpec`` (plus, when given, the ``LatencyTable`` and ``Backend`` that
say what the device accelerates) or from a YAML preset shipped in ``autoprune/presets/``.

Rules (see ``from_spec``):

- ``channel`` is offered wherever the group allows it; kept widths form a grid of multiples of
  the alignment (``keep_units`` in ``autoprune.types`` is the one rounding rule) between
  ``min_keep_ratio`` / ``min_units`` and the full width (which means "dense").
- ``nm`` (2:4) is offered only where the table shows the group's producing layers faster with
  a 2:4 mask than dense (``nm="auto"``); ``nm=True`` offers it wherever the group allows it,
  ``nm=False`` never.
- ``unstructured`` is offered only if the backend accelerates it or ``allow_unstructured=True``.
- ``block`` removal only with ``allow_block=True`` and where the group allows it.
- Frozen groups (glob patterns) stay dense.

Optuna parameters: ``keep:<group>`` (an index into the group's width grid, ordered narrow to
wide, so TPE sees an ordered choice), ``structure:<group>`` when more than one structure is
offered, ``block:<group>`` for removable blocks.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from autoprune.errors import SearchSpaceError
from autoprune.plan import GroupPlan, PruningPlan
from autoprune.types import ModelSpec, PrunableGroup, Structure, keep_units

if TYPE_CHECKING:
    import optuna

NMChoice = Literal["auto", True, False]

#: keys accepted at the top of a YAML preset and as keyword options of ``from_spec``
SPACE_OPTIONS: dict[str, str] = {
    "alignment": "int >= 1, or 'auto' (the table's alignment, else 1)",
    "min_keep_ratio": "float in (0, 1]",
    "min_units": "int >= 1",
    "structures": "list from: channel, nm, unstructured",
    "nm": "'auto' (only where the table shows 2:4 faster than dense), true or false",
    "nm_n": "int, kept weights per block (2 for 2:4)",
    "nm_m": "int, block size (4 for 2:4)",
    "allow_unstructured": "true, false, or 'auto' (only if the backend accelerates it)",
    "allow_block": "true or false",
    "frozen": "list of group-name glob patterns kept dense",
    "importance": "l1, l2, taylor, bn_gamma or random",
    "max_grid": "int >= 2, most widths offered per group (evenly thinned)",
    "groups": "mapping of group-name glob pattern -> per-group overrides",
}
#: keys accepted per pattern under ``groups:``
GROUP_OPTIONS: dict[str, str] = {
    "min_keep_ratio": "float in (0, 1]",
    "max_keep_ratio": "float in (0, 1]",
    "min_units": "int >= 1",
    "structures": "list from: channel, nm, unstructured",
    "frozen": "true or false",
    "allow_block": "true or false",
    "alignment": "int >= 1",
}
#: keys that only describe a preset
META_KEYS = ("name", "description")

_SEARCHABLE = (Structure.CHANNEL, Structure.NM, Structure.UNSTRUCTURED)


@dataclass(frozen=True)
class GroupChoices:
    """What the search may pick for one group.

    ``widths`` are kept unit counts (ascending, the last is the full width) for ``channel`` and
    ``unstructured`` (as a density ``width / units``); ``structures`` never lists ``none``
    (full width means dense). A block group has ``removable`` and no widths.
    """

    name: str
    kind: str
    units: int
    structures: tuple[Structure, ...] = ()
    widths: tuple[int, ...] = ()
    alignment: int = 1
    removable: bool = False
    frozen: bool = False

    @property
    def searchable(self) -> bool:
        if self.frozen:
            return False
        if self.kind == "block":
            return self.removable
        return len(self.widths) > 1 or any(s != Structure.CHANNEL for s in self.structures)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "units": self.units,
            "structures": [s.value for s in self.structures],
            "widths": list(self.widths),
            "alignment": self.alignment,
            "removable": self.removable,
            "frozen": self.frozen,
        }


@dataclass
class SearchSpace:
    """Per-group choices for one model (see the module docstring for the rules)."""

    spec: ModelSpec
    groups: dict[str, GroupChoices]
    alignment: int = 1
    nm: tuple[int, int] = (2, 4)
    importance: str = "l2"
    options: dict[str, Any] = field(default_factory=dict)

    # --- construction --------------------------------------------------------------------
    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        table: Any | None = None,
        backend: Any | None = None,
        *,
        alignment: int | Literal["auto"] = "auto",
        min_keep_ratio: float = 0.25,
        min_units: int = 1,
        structures: tuple[str | Structure, ...] | list[str] = ("channel", "nm", "unstructured"),
        nm: NMChoice = "auto",
        nm_n: int = 2,
        nm_m: int = 4,
        allow_unstructured: bool | Literal["auto"] = "auto",
        allow_block: bool = False,
        frozen: tuple[str, ...] | list[str] | str | None = (),
        importance: str = "l2",
        max_grid: int = 64,
        groups: dict[str, dict[str, Any]] | None = None,
    ) -> SearchSpace:
        """Build the space for ``spec``; ``table``/``backend`` decide what the device accelerates.

        ``groups`` maps group-name glob patterns to overrides (see ``GROUP_OPTIONS``); a
        pattern that matches no group is a ``SearchSpaceError``.
        """
        if frozen is None:
            frozen = ()
        if isinstance(frozen, str):
            frozen = (frozen,)
        if not isinstance(frozen, (list, tuple)):
            raise SearchSpaceError(f"frozen must be a list of group-name patterns, got {frozen!r}")
        if groups is not None and not isinstance(groups, dict):
            raise SearchSpaceError(f"groups must be a mapping of group-name pattern -> overrides "
                                   f"(allowed keys: {', '.join(GROUP_OPTIONS)}), got {groups!r}")
        group_options = dict(groups or {})
        options = {
            "alignment": alignment, "min_keep_ratio": min_keep_ratio, "min_units": min_units,
            "structures": [str(Structure(s)) if not isinstance(s, Structure) else s.value
                           for s in _structures(structures, "structures")],
            "nm": nm, "nm_n": nm_n, "nm_m": nm_m, "allow_unstructured": allow_unstructured,
            "allow_block": allow_block, "frozen": list(frozen), "importance": importance,
            "max_grid": max_grid, "groups": group_options,
        }
        _validate_options(options, spec)
        align = _resolve_alignment(alignment, table)
        rules = getattr(table, "kernel_rules", None) if table is not None else None
        group_step = int(getattr(rules, "group_step", 1) or 1) if alignment == "auto" else 1
        wanted = set(_structures(structures, "structures"))
        if allow_unstructured == "auto":
            allow_unstr = bool(backend is not None and _accelerates(backend, Structure.UNSTRUCTURED))
        else:
            allow_unstr = bool(allow_unstructured)
        if not allow_unstr:
            wanted.discard(Structure.UNSTRUCTURED)
        if nm is False:
            wanted.discard(Structure.NM)

        choices: dict[str, GroupChoices] = {}
        for g in spec.groups.values():
            over = _overrides_for(g.name, group_options)
            is_frozen = any(fnmatch.fnmatchcase(g.name, p) for p in frozen)
            is_frozen = bool(over.get("frozen", is_frozen))
            if g.kind == "block":
                removable = bool(over.get("allow_block", allow_block)) and Structure.BLOCK in g.allowed
                choices[g.name] = GroupChoices(g.name, "block", g.units, (), (), 1,
                                               removable=removable, frozen=is_frozen)
                continue
            g_wanted = wanted
            if "structures" in over:
                g_wanted = set(_structures(over["structures"], f"groups.{g.name}.structures"))
                if not allow_unstr:
                    g_wanted.discard(Structure.UNSTRUCTURED)
                if nm is False:
                    g_wanted.discard(Structure.NM)
            offered = [s for s in _SEARCHABLE if s in g_wanted and s in g.allowed]
            if Structure.NM in offered and nm == "auto" and not _nm_helps(spec, g, table, nm_n, nm_m):
                offered.remove(Structure.NM)
            g_align = int(over.get("alignment", 1 if g.unit_size > 1 else align))
            lo_ratio = float(over.get("min_keep_ratio", min_keep_ratio))
            hi_ratio = float(over.get("max_keep_ratio", 1.0))
            lo_units = max(int(over.get("min_units", min_units)), g.min_units)
            widths = _width_grid(g.units, g_align, lo_ratio, hi_ratio, lo_units, max_grid)
            step = group_step if "alignment" not in over and spec.feeds_grouped_conv(g.name) else 1
            if step > 1:  # per-group widths off the device's grouped-conv step run slower
                widths = tuple(w for w in widths if w % step == 0 or w == g.units) or (g.units,)
                g_align = step
            if not any(s in offered for s in (Structure.CHANNEL, Structure.UNSTRUCTURED)):
                widths = (g.units,)  # no width to choose; nm alone gets "none" as its other choice
                if offered:
                    offered.append(Structure.NONE)
            choices[g.name] = GroupChoices(g.name, "channel", g.units, tuple(offered), widths,
                                           g_align, frozen=is_frozen)
        return cls(spec=spec, groups=choices, alignment=align, nm=(nm_n, nm_m),
                   importance=importance, options=options)

    @classmethod
    def from_yaml(
        cls,
        path_or_name: str | Path,
        spec: ModelSpec,
        table: Any | None = None,
        backend: Any | None = None,
        **overrides: Any,
    ) -> SearchSpace:
        """Load a preset: a file path, or a preset name (``autoprune/presets/``: ``default``,
        ``resnet``, ``mobilenet``, ``vit``). Keyword ``overrides`` replace top-level keys of the file."""
        import yaml

        path = resolve_preset(path_or_name)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, ValueError, RecursionError, UnicodeDecodeError) as e:
            raise SearchSpaceError(f"{path}: invalid YAML ({type(e).__name__}: "
                                   f"{str(e)[:300]})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SearchSpaceError(f"{path}: a search space must be a mapping of keys, "
                                   f"got {type(data).__name__}")
        bad = sorted(repr(k) for k in data if not isinstance(k, str))
        if bad:
            raise SearchSpaceError(f"{path}: unknown key(s) [{', '.join(bad)}]; allowed: "
                                   f"{', '.join(SPACE_OPTIONS)}")
        data = {k: v for k, v in data.items() if k not in META_KEYS}
        data.update(overrides)
        unknown = sorted(set(data) - set(SPACE_OPTIONS))
        if unknown:
            raise SearchSpaceError(
                f"{path}: unknown key(s) {unknown}; allowed: {', '.join(SPACE_OPTIONS)}"
            )
        try:
            return cls.from_spec(spec, table, backend, **data)
        except SearchSpaceError as e:
            raise SearchSpaceError(f"{path}: {e}") from None

    # --- queries -------------------------------------------------------------------------
    @property
    def searchable_groups(self) -> list[GroupChoices]:
        return [c for c in self.groups.values() if c.searchable]

    def _base_plan(self) -> PruningPlan:
        return PruningPlan(
            alignment=self.alignment,
            alignments={c.name: c.alignment for c in self.groups.values()
                        if c.kind == "channel" and c.alignment != self.alignment},
            importance=self.importance,
            model_fingerprint=self.spec.fingerprint,
            model_name=self.spec.model_name,
        )

    def group_plan(self, name: str, structure: Structure, width: int) -> GroupPlan | None:
        """The ``GroupPlan`` for a choice, or None when it means dense."""
        c = self.groups[name]
        if structure == Structure.BLOCK:
            return GroupPlan(Structure.BLOCK)
        if structure == Structure.NM:
            return GroupPlan(Structure.NM, n=self.nm[0], m=self.nm[1])
        if structure == Structure.NONE or width >= c.units:
            return None
        return GroupPlan(structure, width / c.units)

    def decode(self, params: dict[str, Any]) -> PruningPlan:
        """A plan from parameter values (``keep:``/``structure:``/``block:``); missing means dense."""
        plan = self._base_plan()
        for c in self.searchable_groups:
            if c.kind == "block":
                if bool(params.get(f"block:{c.name}", False)):
                    plan.groups[c.name] = GroupPlan(Structure.BLOCK)
                continue
            s = Structure(params.get(f"structure:{c.name}", c.structures[0] if c.structures
                                     else Structure.CHANNEL))
            idx = int(params.get(f"keep:{c.name}", len(c.widths) - 1))
            idx = min(max(idx, 0), len(c.widths) - 1)
            gp = self.group_plan(c.name, s, c.widths[idx])
            if gp is not None:
                plan.groups[c.name] = gp
        return plan

    def encode(self, plan: PruningPlan) -> dict[str, Any]:
        """Parameter values that decode to (the grid point nearest to) ``plan``; used to
        enqueue warm starts into an Optuna study."""
        params: dict[str, Any] = {}
        for c in self.searchable_groups:
            gp = plan.groups.get(c.name)
            if c.kind == "block":
                params[f"block:{c.name}"] = bool(gp is not None and gp.structure == Structure.BLOCK)
                continue
            if gp is not None:
                s = gp.structure
            elif Structure.NONE in c.structures:
                s = Structure.NONE
            else:
                s = Structure.CHANNEL
            if s not in c.structures:
                s = c.structures[0] if c.structures else Structure.CHANNEL
            if len(c.structures) > 1:
                params[f"structure:{c.name}"] = s.value
            if len(c.widths) > 1:
                if gp is None or gp.structure in (Structure.NONE, Structure.NM):
                    params[f"keep:{c.name}"] = len(c.widths) - 1
                else:
                    target = gp.keep_ratio * c.units
                    params[f"keep:{c.name}"] = min(range(len(c.widths)),
                                                   key=lambda i: abs(c.widths[i] - target))
        return params

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of every parameter (fixed, so ask/tell and enqueue agree)."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        out: dict[str, Any] = {}
        for c in self.searchable_groups:
            if c.kind == "block":
                out[f"block:{c.name}"] = CategoricalDistribution([False, True])
                continue
            if len(c.structures) > 1:
                out[f"structure:{c.name}"] = CategoricalDistribution([s.value for s in c.structures])
            if len(c.widths) > 1:
                out[f"keep:{c.name}"] = IntDistribution(0, len(c.widths) - 1)
        return out

    def sample(self, trial: optuna.trial.BaseTrial) -> PruningPlan:
        """Draw a plan through an Optuna trial (every parameter is always drawn, so the
        space is the same for every trial and multivariate samplers can model it)."""
        params = {name: _suggest(trial, name, dist) for name, dist in self.distributions().items()}
        return self.decode(params)

    def fastest_plan(self) -> PruningPlan:
        """Every searchable channel group at its narrowest width (``channel``) and every
        removable block removed: the cheapest plan this space can express."""
        params: dict[str, Any] = {}
        for c in self.searchable_groups:
            if c.kind == "block":
                params[f"block:{c.name}"] = True
                continue
            if Structure.CHANNEL in c.structures:
                if len(c.structures) > 1:
                    params[f"structure:{c.name}"] = Structure.CHANNEL.value
                params[f"keep:{c.name}"] = 0
            elif c.structures:
                params[f"structure:{c.name}"] = c.structures[0].value
                params[f"keep:{c.name}"] = 0
        return self.decode(params)

    def dense_plan(self) -> PruningPlan:
        return self._base_plan()

    def uniform_plan(self, keep_ratio: float) -> PruningPlan:
        """Every channel group at the same keep ratio, snapped to this space's width grid (the
        plan a user would try by hand, expressed in this space)."""
        from autoprune.plan import PruningPlan

        return self.decode(self.encode(PruningPlan.uniform(
            self.spec, keep_ratio, structure="channel", alignment=self.alignment)))

    def size(self) -> float:
        """Number of distinct plans (may be astronomically large; returned as a float)."""
        total = 1.0
        for c in self.searchable_groups:
            if c.kind == "block":
                total *= 2
            else:
                n = 0
                for s in c.structures:
                    n += 1 if s == Structure.NM else len(c.widths)
                total *= max(n, 1)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.spec.model_name,
            "model_fingerprint": self.spec.fingerprint,
            "alignment": self.alignment,
            "nm": list(self.nm),
            "importance": self.importance,
            "options": _jsonable(self.options),
            "groups": {k: v.to_dict() for k, v in self.groups.items()},
        }

    def __repr__(self) -> str:
        n = len(self.searchable_groups)
        return (f"SearchSpace({self.spec.model_name}: {n} searchable of {len(self.groups)} groups, "
                f"alignment {self.alignment}, ~{self.size():.3g} plans)")


# --- helpers -----------------------------------------------------------------------------
def _suggest(trial: Any, name: str, dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    raise TypeError(f"unexpected distribution {dist!r}")  # pragma: no cover


def resolve_preset(path_or_name: str | Path) -> Path:
    """A YAML path, or the name of a preset shipped in the package (``autoprune/presets/``)."""
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise SearchSpaceError(f"search-space file {str(p)!r} not found")
        return p
    names = list_presets()
    d = _preset_dir()
    if str(path_or_name) not in names:
        raise SearchSpaceError(
            f"unknown search-space preset {str(path_or_name)!r}; presets: {', '.join(names)} "
            f"(in {d}), or pass a .yaml path"
        )
    return d / f"{path_or_name}.yaml"


def _preset_dir() -> Path:
    return Path(__file__).resolve().parent / "presets"  # package data: found by any install


def list_presets() -> list[str]:
    d = _preset_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _structures(values: Any, key: str) -> list[Structure]:
    if isinstance(values, (str, Structure)):
        values = [values]
    if not isinstance(values, (list, tuple)):
        raise SearchSpaceError(f"{key} must be a list from: channel, nm, unstructured; "
                               f"got {values!r}")
    out = []
    for v in values:
        try:
            s = Structure(v)
        except ValueError:
            s = None
        if s not in _SEARCHABLE:
            raise SearchSpaceError(f"{key}: unknown structure {v!r}; allowed: channel, nm, "
                                   "unstructured (block removal is 'allow_block')")
        out.append(s)
    return out


def _check_ratio(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 0 < v <= 1:
        raise SearchSpaceError(f"{key} must be a number in (0, 1], got {v!r}")


def _check_int(key: str, v: Any, low: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise SearchSpaceError(f"{key} must be an integer >= {low}, got {v!r}")


def _check_bool(key: str, v: Any, extra: tuple[str, ...] = ()) -> None:
    if not isinstance(v, bool) and v not in extra:
        allowed = ", ".join(["true", "false", *[repr(x) for x in extra]])
        raise SearchSpaceError(f"{key} must be one of {allowed}; got {v!r}")


def _validate_options(o: dict[str, Any], spec: ModelSpec) -> None:
    a = o["alignment"]
    if a != "auto":
        _check_int("alignment", a)
    _check_ratio("min_keep_ratio", o["min_keep_ratio"])
    _check_int("min_units", o["min_units"])
    _check_bool("nm", o["nm"], ("auto",))
    _check_int("nm_n", o["nm_n"])
    _check_int("nm_m", o["nm_m"], 2)
    if o["nm_n"] >= o["nm_m"]:
        raise SearchSpaceError(f"nm_n must be below nm_m, got {o['nm_n']}:{o['nm_m']}")
    _check_bool("allow_unstructured", o["allow_unstructured"], ("auto",))
    _check_bool("allow_block", o["allow_block"])
    _check_int("max_grid", o["max_grid"], 2)
    from autoprune.plan import IMPORTANCE_NAMES

    if o["importance"] not in IMPORTANCE_NAMES:
        raise SearchSpaceError(f"importance must be one of {', '.join(IMPORTANCE_NAMES)}; "
                               f"got {o['importance']!r}")
    frozen = o["frozen"]
    if not isinstance(frozen, list) or not all(isinstance(p, str) for p in frozen):
        raise SearchSpaceError(f"frozen must be a list of group-name patterns, got {frozen!r}")
    names = list(spec.groups)
    for p in frozen:
        _check_pattern("frozen", p, names)
    groups = o["groups"]
    if not isinstance(groups, dict):
        raise SearchSpaceError(f"groups must be a mapping of pattern -> overrides, got {groups!r}")
    for pattern, over in groups.items():
        key = f"groups.{pattern}"
        if not isinstance(pattern, str):
            raise SearchSpaceError(f"{key}: group patterns must be strings")
        _check_pattern("groups", pattern, names)
        if not isinstance(over, dict):
            raise SearchSpaceError(f"{key} must be a mapping of overrides; allowed keys: "
                                   f"{', '.join(GROUP_OPTIONS)}")
        unknown = sorted(set(over) - set(GROUP_OPTIONS))
        if unknown:
            raise SearchSpaceError(f"{key}: unknown key(s) {unknown}; allowed: "
                                   f"{', '.join(GROUP_OPTIONS)}")
        for k in ("min_keep_ratio", "max_keep_ratio"):
            if k in over:
                _check_ratio(f"{key}.{k}", over[k])
        if over.get("min_keep_ratio", 0) > over.get("max_keep_ratio", 1):
            raise SearchSpaceError(f"{key}: min_keep_ratio {over['min_keep_ratio']} is above "
                                   f"max_keep_ratio {over['max_keep_ratio']}")
        for k in ("min_units", "alignment"):
            if k in over:
                _check_int(f"{key}.{k}", over[k])
        for k in ("frozen", "allow_block"):
            if k in over:
                _check_bool(f"{key}.{k}", over[k])
        if "structures" in over:
            _structures(over["structures"], f"{key}.structures")


def _check_pattern(key: str, pattern: str, names: list[str]) -> None:
    if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise SearchSpaceError(f"{key}: pattern {pattern!r} matches no group of this model; "
                               f"groups: {shown}")


def _overrides_for(name: str, groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Overrides of every matching pattern, later patterns winning."""
    out: dict[str, Any] = {}
    for pattern, over in groups.items():
        if fnmatch.fnmatchcase(name, pattern):
            out.update(over)
    return out


def _resolve_alignment(alignment: int | str, table: Any | None) -> int:
    if alignment != "auto":
        return int(alignment)
    a = getattr(table, "alignment", None) if table is not None else None
    return int(a) if isinstance(a, int) and a >= 1 else 1


def _accelerates(backend: Any, structure: Structure) -> bool:
    fn = getattr(backend, "accelerates", None)
    try:
        return bool(fn(structure)) if fn is not None else False
    except Exception:  # noqa: BLE001 - a backend that cannot tell does not accelerate it
        return False


def _nm_helps(spec: ModelSpec, g: PrunableGroup, table: Any | None, n: int, m: int) -> bool:
    """True if the table shows the group's producers faster with an n:m mask than dense."""
    if table is None or not g.producers:
        return False
    dense = sparse = 0.0
    for name in g.producers:
        lay = spec.layers.get(name)
        if lay is None:
            return False
        try:
            dense += float(table.lookup(lay.spec, Structure.NONE, policy="raise"))
            sparse += float(_lookup_nm(table, lay.spec, n / m))
        except Exception:  # noqa: BLE001 - no 2:4 entry: not offered
            return False
    return sparse < dense


def _lookup_nm(table: Any, spec: Any, density: float) -> float:
    try:
        return float(table.lookup(spec, Structure.NM, policy="raise", density=density))
    except TypeError:
        return float(table.lookup(spec, Structure.NM, policy="raise"))


def _width_grid(units: int, alignment: int, lo_ratio: float, hi_ratio: float,
                lo_units: int, max_grid: int) -> tuple[int, ...]:
    """Distinct kept widths reachable through ``keep_units``, ascending, within the bounds;
    always ends with the full width (dense)."""
    lo = max(lo_units, math.ceil(lo_ratio * units - 1e-9))
    hi = units if hi_ratio >= 1.0 else max(lo, int(math.floor(hi_ratio * units + 1e-9)))
    if alignment > 1 and units > alignment:
        cands = set(range(alignment, units, alignment)) | {units}
    else:
        cands = set(range(1, units + 1))
    widths = sorted(w for w in cands if lo <= w <= hi and keep_units(units, w / units, alignment) == w)
    if hi < units and not widths:
        widths = [min(cands, key=lambda w: abs(w - hi))]
    if units not in widths and hi_ratio >= 1.0:
        widths.append(units)
    if not widths:
        widths = [units]
    if len(widths) > max_grid:  # thin evenly, keeping both ends
        step = (len(widths) - 1) / (max_grid - 1)
        widths = sorted({widths[round(i * step)] for i in range(max_grid)})
    return tuple(widths)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Structure):
        return x.value
    return x
