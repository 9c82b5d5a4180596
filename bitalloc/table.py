"""The candidate table as data: storage bits and predicted errors per (group, option). numpy only,
so re-planning from a saved profile (and every solver) runs without torch; candidates.py fills it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .options import QuantOption

# Error models the table carries. "fisher" is the planner's default: see profile/statistics.py.
# "local" is the unweighted layer output error tr(ΔW H ΔWᵀ), kept to compare against.
ERROR_MODELS = ("fisher", "local")


@dataclass
class CandidateTable:
    """Row g = one group (today: one whole module), column k = one option.

    storage_bits[g, k] is NaN where option k cannot tile group g (group size not dividing the row).
    errors[model][g, k] is the predicted increase of mean next-token NLL (nats) under that model.
    """

    groups: list[str]
    shapes: list[tuple[int, int]]
    options: list[QuantOption]
    storage_bits: np.ndarray
    errors: dict[str, np.ndarray] = field(default_factory=dict)
    quantizer: str = "rtn"  # whose ΔW the errors are: the quantizer the plan will be applied with

    @property
    def num_weights(self) -> int:
        return int(sum(o * i for o, i in self.shapes))

    @property
    def allowed(self) -> np.ndarray:
        return np.isfinite(self.storage_bits)

    def option_index(self, option: QuantOption) -> int:
        return self.options.index(option)


def table_inconsistency(table: CandidateTable) -> str | None:
    """What in a read-back table disagrees with itself (array shapes, duplicate groups, storage bits not
    those of the option and shape), or None; the first problem found, naming the group and option."""
    n, k = len(table.groups), len(table.options)
    if len(table.shapes) != n:
        return f"{n} groups but {len(table.shapes)} shapes"
    if len(set(table.groups)) != n:
        return f"group {next(g for g in table.groups if table.groups.count(g) > 1)} is listed twice"
    for name, a in [("storage_bits", table.storage_bits), *((f"errors[{m}]", e) for m, e in table.errors.items())]:
        if np.shape(a) != (n, k):
            return f"{name} has shape {list(np.shape(a))}, not [{n} groups, {k} options]"
    for g, (name, (out_f, in_f)) in enumerate(zip(table.groups, table.shapes)):
        for j, o in enumerate(table.options):
            want = float(o.storage_bits(out_f, in_f)) if o.fits(in_f) else np.nan
            got = float(table.storage_bits[g, j])
            if not (got == want or (np.isnan(got) and np.isnan(want))):
                return f"{name}: storage bits of {o.label} are {got:g}, its shape {out_f}x{in_f} needs {want:g}"
    return None
