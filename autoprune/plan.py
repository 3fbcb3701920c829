"""``PruningPlan``: per group a structure and a keep amount; JSON round trip; validation."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoprune.errors import CorruptFileError, InvalidPlanError
from autoprune.io import atomic_write_text, read_text
from autoprune.types import Structure

if TYPE_CHECKING:
    from autoprune.types import ModelSpec, PrunableGroup

PLAN_SCHEMA_VERSION = 1
IMPORTANCE_NAMES = ("l1", "l2", "taylor", "bn_gamma", "random")


@dataclass
class GroupPlan:
    """What happens to one group.

    ``keep_ratio`` is the share kept: of channels for ``channel``, of weights for
    ``unstructured``; for ``nm`` it is n/m; for ``none`` 1.0; for ``block`` 0.0.
    """

    structure: Structure = Structure.NONE
    keep_ratio: float = 1.0
    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        try:
            self.structure = Structure(self.structure)
        except ValueError:
            allowed = ", ".join(s.value for s in Structure)
            raise InvalidPlanError(
                f"unknown structure {self.structure!r}; allowed: {allowed}"
            ) from None
        if self.structure == Structure.NM:
            try:
                self.keep_ratio = self.n / self.m
            except (ZeroDivisionError, OverflowError, TypeError):
                self.keep_ratio = float("nan")  # validate() names the bad n:m
        elif self.structure == Structure.NONE:
            self.keep_ratio = 1.0
        elif self.structure == Structure.BLOCK:
            self.keep_ratio = 0.0

    @property
    def density(self) -> float:
        return float(self.keep_ratio)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"structure": self.structure.value}
        if self.structure in (Structure.CHANNEL, Structure.UNSTRUCTURED):
            d["keep_ratio"] = self.keep_ratio
        if self.structure == Structure.NM:
            d["n"], d["m"] = self.n, self.m
        return d


@dataclass
class PruningPlan:
    """Per-group pruning decisions. Groups not listed stay dense.

    ``alignment`` rounds kept channel counts to a multiple (16 for ONNX Runtime on AVX-512);
    ``alignments`` overrides it per group. ``importance`` names the criterion that picks which
    channels/weights survive (l1, l2, taylor, bn_gamma, random).
    """

    groups: dict[str, GroupPlan] = field(default_factory=dict)
    alignment: int = 1
    alignments: dict[str, int] = field(default_factory=dict)
    importance: str = "l2"
    model_fingerprint: str | None = None
    model_name: str | None = None

    # --- construction --------------------------------------------------------------------
    @classmethod
    def dense(cls, spec: ModelSpec) -> PruningPlan:
        return cls(model_fingerprint=spec.fingerprint, model_name=spec.model_name)

    @classmethod
    def uniform(
        cls,
        spec: ModelSpec,
        keep_ratio: float,
        structure: Structure | str = "channel",
        alignment: int = 1,
        importance: str = "l2",
        n: int = 2,
        m: int = 4,
    ) -> PruningPlan:
        """The same structure and keep ratio on every group that allows it."""
        structure = _structure(structure)
        if structure == Structure.BLOCK:
            raise InvalidPlanError("a uniform plan cannot remove every block; pick groups")
        plan = cls(
            alignment=alignment,
            importance=importance,
            model_fingerprint=spec.fingerprint,
            model_name=spec.model_name,
        )
        for g in spec.groups.values():
            if g.kind == "channel" and structure in g.allowed:
                plan.groups[g.name] = GroupPlan(structure, keep_ratio, n=n, m=m)
        plan.validate(spec)
        return plan

    # --- queries -------------------------------------------------------------------------
    def alignment_for(self, group: PrunableGroup) -> int:
        return self.alignments.get(group.name, self.alignment)

    def structure_of(self, group: str) -> Structure:
        gp = self.groups.get(group)
        return gp.structure if gp else Structure.NONE

    # --- validation ----------------------------------------------------------------------
    def validate(self, spec: ModelSpec) -> PruningPlan:
        """Raise ``InvalidPlanError`` naming the group and the allowed values if anything is off."""
        if self.model_fingerprint is not None and self.model_fingerprint != spec.fingerprint:
            raise InvalidPlanError(
                f"plan was made for another model ({self.model_name or '?'}, fingerprint "
                f"{self.model_fingerprint}); this model is {spec.model_name} with fingerprint "
                f"{spec.fingerprint}"
            )
        if self.importance not in IMPORTANCE_NAMES:
            raise InvalidPlanError(
                f"unknown importance {self.importance!r}; allowed: {', '.join(IMPORTANCE_NAMES)}"
            )
        if not isinstance(self.alignment, int) or self.alignment < 1:
            raise InvalidPlanError(f"alignment must be an integer >= 1, got {self.alignment!r}")
        for name, a in self.alignments.items():
            if not isinstance(a, int) or a < 1:
                raise InvalidPlanError(f"alignment of group {name!r} must be >= 1, got {a!r}")
        for name, gp in self.groups.items():
            if name not in spec.groups:
                close = [g for g in spec.groups if name.split(".")[0] in g][:5]
                hint = f"; similar: {', '.join(close)}" if close else ""
                raise InvalidPlanError(
                    f"unknown group {name!r} for model {spec.model_name} "
                    f"({len(spec.groups)} groups){hint}"
                )
            g = spec.groups[name]
            if gp.structure not in g.allowed:
                raise InvalidPlanError(
                    f"structure {gp.structure.value!r} not allowed for group {name!r}; "
                    f"allowed: {', '.join(s.value for s in g.allowed)}"
                )
            r = gp.keep_ratio
            if gp.structure in (Structure.CHANNEL, Structure.UNSTRUCTURED):
                if not isinstance(r, (int, float)) or math.isnan(r) or not 0.0 < r <= 1.0:
                    raise InvalidPlanError(
                        f"keep_ratio of group {name!r} must be in (0, 1], got {r!r}"
                    )
            if gp.structure == Structure.NM:
                if not (isinstance(gp.n, int) and isinstance(gp.m, int) and 0 < gp.n < gp.m):
                    raise InvalidPlanError(
                        f"n:m of group {name!r} must satisfy 0 < n < m, got {gp.n}:{gp.m}"
                    )
        return self

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "model_name": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "alignment": self.alignment,
            "alignments": dict(self.alignments),
            "importance": self.importance,
            "groups": {k: v.to_dict() for k, v in self.groups.items()},
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Any) -> PruningPlan:
        if not isinstance(d, dict):
            raise InvalidPlanError(f"a plan must be a JSON object, got {type(d).__name__}")
        known = {"schema_version", "model_name", "model_fingerprint", "alignment", "alignments",
                 "importance", "groups"}
        unknown = set(d) - known
        if unknown:
            raise InvalidPlanError(
                f"unknown plan keys {sorted(unknown)}; allowed: {sorted(known)}"
            )
        version = d.get("schema_version", PLAN_SCHEMA_VERSION)
        if version != PLAN_SCHEMA_VERSION:
            raise InvalidPlanError(
                f"plan schema_version {version!r} is not supported (expected {PLAN_SCHEMA_VERSION})"
            )
        groups_in = d.get("groups", {})
        if not isinstance(groups_in, dict):
            raise InvalidPlanError("plan 'groups' must be an object of group name -> settings")
        groups: dict[str, GroupPlan] = {}
        for name, g in groups_in.items():
            if not isinstance(g, dict):
                raise InvalidPlanError(f"group {name!r}: settings must be an object, got {g!r}")
            extra = set(g) - {"structure", "keep_ratio", "n", "m"}
            if extra:
                raise InvalidPlanError(
                    f"group {name!r}: unknown keys {sorted(extra)}; "
                    "allowed: structure, keep_ratio, n, m"
                )
            ratio = g.get("keep_ratio", 1.0)
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise InvalidPlanError(f"group {name!r}: keep_ratio must be a number, got {ratio!r}")
            n, m = g.get("n", 2), g.get("m", 4)
            if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool):
                raise InvalidPlanError(f"group {name!r}: n and m must be integers, got {n!r}:{m!r}")
            try:
                ratio = float(ratio)
            except OverflowError:
                raise InvalidPlanError(
                    f"group {name!r}: keep_ratio must be in (0, 1], got {ratio!r}"
                ) from None
            groups[str(name)] = GroupPlan(g.get("structure", "none"), ratio, n, m)
        alignment = d.get("alignment", 1)
        alignments = d.get("alignments", {}) or {}
        if not isinstance(alignments, dict):
            raise InvalidPlanError("plan 'alignments' must be an object of group name -> int")
        return cls(
            groups=groups,
            alignment=alignment,
            alignments={str(k): v for k, v in alignments.items()},
            importance=d.get("importance", "l2"),
            model_fingerprint=d.get("model_fingerprint"),
            model_name=d.get("model_name"),
        )

    @classmethod
    def from_json(cls, text: str) -> PruningPlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidPlanError(f"plan is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidPlanError("plan JSON is nested too deeply to be a plan") from None
        return cls.from_dict(d)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        text = read_text(path)
        try:
            return cls.from_json(text)
        except InvalidPlanError as e:
            raise CorruptFileError(f"{path}: {e}") from None

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for gp in self.groups.values():
            counts[gp.structure.value] = counts.get(gp.structure.value, 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "dense"
        return f"PruningPlan({self.model_name or '?'}: {parts}; alignment {self.alignment})"


def _structure(s: Structure | str) -> Structure:
    try:
        return Structure(s)
    except ValueError:
        raise InvalidPlanError(
            f"unknown structure {s!r}; allowed: {', '.join(x.value for x in Structure)}"
        ) from None


def random_plan(
    spec: ModelSpec,
    rng: Any,
    structures: tuple[Structure | str, ...] | None = None,
    alignment: int = 1,
    min_keep_ratio: float = 0.1,
    block_probability: float = 0.2,
    importance: str = "l2",
) -> PruningPlan:
    """A random valid plan: per channel group a structure drawn from those it allows (and
    ``structures``, if given) and a keep ratio uniform in [``min_keep_ratio``, 1]; each block
    group removed with ``block_probability``. ``rng`` is a ``numpy.random.Generator``.

    Used to spread predictor training data over the whole space and by tests.
    """
    wanted = None if structures is None else {_structure(s) for s in structures}
    plan = PruningPlan(alignment=alignment, importance=importance,
                       model_fingerprint=spec.fingerprint, model_name=spec.model_name)
    for g in spec.groups.values():
        if g.kind == "block":
            if Structure.BLOCK in g.allowed and (wanted is None or Structure.BLOCK in wanted):
                if rng.random() < block_probability:
                    plan.groups[g.name] = GroupPlan(Structure.BLOCK)
            continue
        choices = [s for s in g.allowed if s != Structure.BLOCK and (wanted is None or s in wanted)]
        if not choices:
            continue
        s = choices[int(rng.integers(len(choices)))]
        if s == Structure.NONE:
            continue
        ratio = float(rng.uniform(min_keep_ratio, 1.0))
        plan.groups[g.name] = GroupPlan(s, ratio)
    return plan
