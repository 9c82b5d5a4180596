"""Budget sweeps (`bitalloc.pareto`): plan one model at many budgets from one profile, and keep the frontier of
predicted loss against storage. `bitalloc plan --pareto 3.0:5.0:0.25bits --out DIR` writes one
plan per budget (plan-3.00bits.json, ...), pareto.png and pareto.json, and prints the table."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .budget import Budget, parse_budget
from .config import SolveConfig
from .errors import BadInputError
from .io import atomic_write_bytes, atomic_write_text, canonical_json, check_output_dir
from .plan import Plan
from .solvers import frontier_points

if TYPE_CHECKING:
    from .calibration import Calibration
    from .models import LoadedModel
    from .table import CandidateTable

_RANGE = re.compile(r"^\s*([0-9]*\.?[0-9]+):([0-9]*\.?[0-9]+):([0-9]*\.?[0-9]+)\s*([a-zA-Z%]+)\s*$")
_MAX_POINTS = 200


def parse_budget_range(text: str) -> list[Budget]:
    """'3.0:5.0:0.25bits' -> 3.00, 3.25, ..., 5.00 bits (the stop is included when it lands on a step)."""
    m = _RANGE.match(text)
    if not m:
        raise BadInputError(f"cannot read budget range {text!r}; write START:STOP:STEP with a unit, e.g. 3.0:5.0:0.25bits")
    start, stop, step, unit = float(m.group(1)), float(m.group(2)), float(m.group(3)), m.group(4)
    if step <= 0 or stop < start:
        raise BadInputError(f"budget range {text!r} needs STEP > 0 and STOP >= START")
    n = math.floor((stop - start) / step + 1e-9) + 1
    if n > _MAX_POINTS:
        raise BadInputError(f"budget range {text!r} has {n} points; at most {_MAX_POINTS}, take a larger step")
    budgets = []
    for i in range(n):
        value = round(start + i * step, 12)
        parsed = parse_budget(f"{value!r}{unit}")
        budgets.append(Budget(parsed.kind, parsed.value, f"{value:.2f}{unit}"))
    return budgets


@dataclass(frozen=True)
class Pareto:
    plans: list[Plan]
    on_frontier: list[bool]

    @property
    def has_latency(self) -> bool:
        return all(p.latency is not None and p.latency.predicted_s is not None for p in self.plans)

    def table(self) -> str:
        lat = self.has_latency
        head = ("| budget | storage bits/weight | predicted ΔNLL | MB | whole model MB |" + (" predicted ms/forward |" if lat else "")
                + " solver status | frontier |")
        lines = [head, "|---" * (head.count("|") - 1) + "|"]
        for p, on in zip(self.plans, self.on_frontier):
            s = p.summary
            ms = f" {p.latency.predicted_s * 1e3:.4g} |" if lat else ""
            whole = "?" if s.model_bytes is None else f"{s.model_bytes / 1e6:.2f}"  # ? = profile predates it
            lines.append(f"| {p.budget.text} | {s.storage_bits_per_weight:.4f} | {s.predicted_delta_loss:.4g} | "
                         f"{s.storage_bytes / 1e6:.2f} | {whole} |{ms} {p.solver.status} | {'yes' if on else 'no'} |")
        return "\n".join(lines)

    def save(self, out_dir: str | Path) -> list[Path]:
        """plan-<budget>.json per point, pareto.json (the table as data) and pareto.png."""
        out = check_output_dir(out_dir)
        written = [p.save(out / f"plan-{p.budget.text}.json") for p in self.plans]
        rows = [{"budget": p.budget.text, "storage_bits_per_weight": p.summary.storage_bits_per_weight,
                 "predicted_delta_loss": p.summary.predicted_delta_loss, "storage_bytes": p.summary.storage_bytes,
                 "model_bytes": p.summary.model_bytes,
                 "status": p.solver.status, "on_frontier": on,
                 "predicted_latency_s": p.latency.predicted_s if p.latency else None}
                for p, on in zip(self.plans, self.on_frontier)]
        written.append(atomic_write_text(out / "pareto.json", canonical_json({"points": rows})))
        written.append(atomic_write_bytes(out / "pareto.png", self._plot()))
        return written

    def _frontier_axis(self, ax, x, y, xlabel: str, title: str) -> None:
        front = sorted((a, b) for a, b, on in zip(x, y, self.on_frontier) if on)
        ax.plot([a for a, _ in front], [b for _, b in front], "o-", label="frontier (storage)")
        off = [(a, b) for a, b, on in zip(x, y, self.on_frontier) if not on]
        if off:
            ax.plot([a for a, _ in off], [b for _, b in off], "x", color="gray", label="dominated")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("predicted ΔNLL (nats)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)

    def _plot(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = [p.summary.storage_bits_per_weight for p in self.plans]
        y = [p.summary.predicted_delta_loss for p in self.plans]
        lat = self.has_latency
        fig, axes = plt.subplots(1, 2 if lat else 1, figsize=(12 if lat else 6.5, 4), squeeze=False)
        self._frontier_axis(axes[0][0], x, y, "storage bits per planned weight", "predicted loss vs storage")
        if lat:  # with a hardware profile: the same plans against their predicted forward time
            ms = [p.latency.predicted_s * 1e3 for p in self.plans]
            self._frontier_axis(axes[0][1], ms, y, f"predicted ms per forward ({self.plans[0].latency.profile}, "
                                f"{self.plans[0].latency.tokens} token(s))", "predicted loss vs latency")
        fig.suptitle(str(self.plans[0].model.source), fontsize=9)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()


def pareto_from_table(table: CandidateTable, budgets: list[Budget] | str, loaded: LoadedModel,
                      calibration: Calibration, **plan_kwargs) -> Pareto:
    """One plan per budget (plan_from_table's keyword arguments apply to each)."""
    from .api import plan_from_table

    budgets = parse_budget_range(budgets) if isinstance(budgets, str) else budgets
    plans = [plan_from_table(table, b, loaded, calibration, **plan_kwargs) for b in budgets]
    on = frontier_points([p.summary.storage_bits_per_weight for p in plans], [p.summary.predicted_delta_loss for p in plans])
    return Pareto(plans, [bool(v) for v in on])


def pareto(model_or_source: Any, budgets: list[Budget] | str, calibration: Any = None, *, solver: str = SolveConfig.solver,
           solver_settings: dict | None = None, constraints=None, error_model: str = SolveConfig.error_model,
           seed: int = SolveConfig.seed,
           **prepare_kwargs) -> Pareto:
    """Profile once, plan at every budget ('3.0:5.0:0.25bits' or a list of Budgets)."""
    from .api import prepare

    budgets = parse_budget_range(budgets) if isinstance(budgets, str) else budgets
    table, loaded, calib = prepare(model_or_source, calibration, solver=solver, error_model=error_model, seed=seed,
                                   **prepare_kwargs)
    return pareto_from_table(table, budgets, loaded, calib, solver=solver, solver_settings=solver_settings,
                             constraints=constraints, error_model=error_model, seed=seed)
