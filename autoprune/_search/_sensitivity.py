"""Per-group sensitivity, measured once: how much the accuracy proxy drops when one group alone
is pruned, at a few widths of the search space's grid.

``SensitivityProxy.fit`` scores the dense model and, for every searchable group, the plans
that prune only that group (channel groups at about 3/4, 1/2, 1/4 of their width and the
space's narrowest width, 2:4 where the space offers it; removable blocks removed), with the
search's own evaluator (e.g. BatchNorm-recalibrated accuracy on a holdout). A plan is then
scored without running the model: dense score minus the sum of its groups' drops, each
interpolated linearly in kept units (a drop never shrinks as a group narrows). The sum ignores
interactions between groups, so it is a guide (the greedy knapsack's loss per saved
millisecond, the search's warm start), not an accuracy. At aggressive budgets it still ranks
where a BatchNorm-recalibrated proxy of the whole plan sits near chance: each measurement
prunes one group only.

The table is plain data (``table_``, a DataFrame) saved as CSV with the model's fingerprint
(``save``/``load``); ``search(importance=path)`` loads it when it is there and measures it
otherwise, so every search on the same model and evaluator reuses one measurement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from autoprune.errors import CorruptFileError, InvalidInputError
from autoprune.io import atomic_write_text
from autoprune.plan import PruningPlan
from autoprune.types import ModelSpec, Structure

#: the shares of a channel group's full width measured (plus the space's narrowest width)
LEVELS = (0.75, 0.5, 0.25)
COLUMNS = ("group", "structure", "units", "full_units", "score", "drop", "model_fingerprint")


class SensitivityProxy:
    """A plan evaluator from per-group sensitivities (see the module docstring).

    ``proxy``: ``plan -> score`` (higher is better), e.g. the search's ``CachedProxy``;
    ``space``: the ``SearchSpace`` whose groups and widths are measured. Fitted attributes:
    ``table_`` (one row per measured plan: group, structure, kept units, score, drop from
    dense), ``dense_score_``, ``n_evaluations_``.
    """

    def __init__(self, space: Any, proxy: Callable[[PruningPlan], float] | None = None,
                 levels: Sequence[float] = LEVELS) -> None:
        self.space = space
        self.proxy = proxy
        self.levels = tuple(levels)

    @property
    def spec(self) -> ModelSpec:
        return self.space.spec  # type: ignore[no-any-return]

    # --- measuring -----------------------------------------------------------------------
    def plans(self) -> list[tuple[str, str, int, PruningPlan]]:
        """(group, structure, kept units, plan) of every single-group plan ``fit`` scores."""
        out: list[tuple[str, str, int, PruningPlan]] = []
        for c in self.space.searchable_groups:
            if c.kind == "block":
                out.append((c.name, Structure.BLOCK.value, 0,
                            self.space.decode({f"block:{c.name}": True})))
                continue
            if c.kind != "channel":
                continue
            if Structure.CHANNEL in c.structures and len(c.widths) > 1:
                widths = np.asarray(c.widths, dtype=float)
                picks = {int(np.argmin(np.abs(widths - lvl * c.units))) for lvl in self.levels}
                picks.add(0)  # the narrowest width the space allows
                picks.discard(len(c.widths) - 1)
                for idx in sorted(picks, reverse=True):
                    params: dict[str, Any] = {f"keep:{c.name}": idx}
                    if len(c.structures) > 1:
                        params[f"structure:{c.name}"] = Structure.CHANNEL.value
                    out.append((c.name, Structure.CHANNEL.value, int(c.widths[idx]),
                                self.space.decode(params)))
            if Structure.NM in c.structures:
                out.append((c.name, Structure.NM.value, int(c.units),
                            self.space.decode({f"structure:{c.name}": Structure.NM.value})))
        return out

    def fit(self, progress: bool = False) -> SensitivityProxy:
        """Score the dense plan and every single-group plan with ``proxy``."""
        if self.proxy is None:
            raise InvalidInputError("SensitivityProxy.fit needs proxy= (plan -> score)")
        todo = self.plans()
        if not todo:
            raise InvalidInputError("the search space has no searchable group to measure")
        from tqdm.auto import tqdm

        dense = float(self.proxy(self.space.dense_plan()))
        rows = []
        for name, structure, units, plan in tqdm(todo, desc="sensitivity", unit="plan",
                                                  disable=not progress, leave=False):
            score = float(self.proxy(plan))
            rows.append({"group": name, "structure": structure, "units": units,
                         "full_units": int(self.space.groups[name].units), "score": score,
                         "drop": dense - score, "model_fingerprint": self.spec.fingerprint})
        self._set(pd.DataFrame(rows, columns=list(COLUMNS)), dense)
        self.n_evaluations_ = len(todo) + 1
        return self

    def _set(self, table: pd.DataFrame, dense: float) -> None:
        self.table_ = table
        self.dense_score_ = dense
        self._curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._fixed: dict[tuple[str, str], float] = {}
        for (name, structure), rows in table.groupby(["group", "structure"], sort=False):
            drops = np.maximum(rows["drop"].to_numpy(float), 0.0)
            if structure == Structure.CHANNEL.value:
                order = np.argsort(rows["units"].to_numpy())[::-1]  # widest first
                units = rows["units"].to_numpy(float)[order]
                # a drop never shrinks as the group narrows (noise would make it)
                d = np.maximum.accumulate(drops[order])
                full = float(rows["full_units"].iloc[0])
                self._curves[str(name)] = (np.r_[units[::-1], full], np.r_[d[::-1], 0.0])
            else:
                self._fixed[(str(name), str(structure))] = float(drops.max())

    # --- scoring -------------------------------------------------------------------------
    def drop(self, plan: PruningPlan) -> float:
        """Sum of the plan's per-group drops from the dense score."""
        if not hasattr(self, "table_"):
            raise InvalidInputError("SensitivityProxy is not fitted; call fit() or load()")
        total = 0.0
        kept = self.spec.kept_units(plan)
        for name, gp in plan.groups.items():
            s = gp.structure
            if s == Structure.NONE:
                continue
            if s == Structure.CHANNEL:
                curve = self._curves.get(name)
                if curve is None:
                    raise InvalidInputError(f"no channel sensitivity was measured for group "
                                            f"{name!r} (not searchable in the space it was fit on)")
                total += float(np.interp(kept.get(name, curve[0][-1]), *curve))
                continue
            key = (name, s.value)
            if key not in self._fixed:
                raise InvalidInputError(f"no sensitivity was measured for {s.value} on group "
                                        f"{name!r}; it scores channel widths, 2:4 and block "
                                        f"removal the space offers")
            total += self._fixed[key]
        return total

    def evaluate_plan(self, plan: PruningPlan) -> float:
        drop = self.drop(plan)  # raises first when unfitted
        return self.dense_score_ - drop

    def __call__(self, model: Any) -> float:
        raise InvalidInputError("SensitivityProxy scores plans, not models: call "
                                "evaluate_plan(plan)")

    # --- files ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """The table as CSV (with a ``dense`` row holding the dense score), written atomically."""
        path = Path(path)
        dense = pd.DataFrame([{"group": "", "structure": "dense", "units": 0, "full_units": 0,
                               "score": self.dense_score_, "drop": 0.0,
                               "model_fingerprint": self.spec.fingerprint}])
        atomic_write_text(path, pd.concat([dense, self.table_]).to_csv(index=False))
        return path

    def load(self, path: str | Path) -> SensitivityProxy:
        """Read a table saved for this space's model; errors name the file."""
        path = Path(path)
        try:
            table = pd.read_csv(path, keep_default_na=False)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise CorruptFileError(f"{path}: not a sensitivity table ({e}); delete it to "
                                   "measure again") from e
        if list(table.columns) != list(COLUMNS) or (table["structure"] == "dense").sum() != 1:
            raise CorruptFileError(f"{path}: not a sensitivity table (columns "
                                   f"{list(table.columns)}); delete it to measure again")
        prints = set(table["model_fingerprint"].astype(str))
        if prints != {self.spec.fingerprint}:
            raise InvalidInputError(f"{path} was measured on another model (fingerprint "
                                    f"{sorted(prints)} vs {self.spec.fingerprint}); pass another "
                                    "path or delete it")
        is_dense = table["structure"] == "dense"
        rows = table[~is_dense].reset_index(drop=True)
        known = {c.name for c in self.space.searchable_groups}
        if not set(rows["group"]) <= known:
            raise InvalidInputError(f"{path} names groups this space does not search: "
                                    f"{sorted(set(rows['group']) - known)}")
        self._set(rows.astype({"units": int, "full_units": int, "score": float,
                               "drop": float}), float(table.loc[is_dense, "score"].iloc[0]))
        self.n_evaluations_ = 0
        return self

    def __repr__(self) -> str:
        if not hasattr(self, "table_"):
            return "SensitivityProxy(unfitted)"
        worst = self.table_.sort_values("drop", ascending=False).head(3)
        top = ", ".join(f"{r.group} {r.structure} {r.units}: -{r.drop:.3f}"
                        for r in worst.itertuples())
        return (f"SensitivityProxy({len(self.table_)} plans, dense {self.dense_score_:.3f}; "
                f"largest drops {top})")


__all__ = ["LEVELS", "SensitivityProxy"]
