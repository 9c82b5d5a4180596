"""The candidate table as data: storage bits and predicted errors per (group, option). numpy only,
so re-planning from a saved profile (and every solver) runs without torch; candidates.py fills it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import BadInputError, setting
from .options import QuantOption

# Error models the table carries (profile/statistics.py). "fisher" is the planner's default,
# ½ Σ_o F_o (ΔW H ΔWᵀ)_oo. "fisher-tw" weights each calibration token by its output gradient,
# ½ Σ_o (F_o/ΣF) (ΔW H_a ΔWᵀ)_oo: better ranked on SmolLM2's ablations and its llama.cpp-type plans, not yet
# the default because its RTN INT plans there lost at 4-5 bits (README, "How the loss is predicted").
# "local" is the unweighted layer output error tr(ΔW H ΔWᵀ), kept to compare against.
ERROR_MODELS = ("fisher", "local", "fisher-tw")


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

    def errors_of(self, error_model: str) -> np.ndarray:
        """errors[error_model], or a BadInputError when the table was made without it (an older bitalloc)."""
        if error_model not in self.errors:
            raise BadInputError(f"this candidate table has no {error_model!r} errors (it has "
                                f"{', '.join(sorted(self.errors))}: made by an older bitalloc); re-profile, or plan "
                                f"with {setting('error_model')} {sorted(self.errors)[0]}")
        return self.errors[error_model]


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
