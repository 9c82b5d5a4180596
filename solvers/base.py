"""The one interface every solver implements: Problem in, Solution out, registered by name."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class SolverError(Exception):
    """A solver could not produce an assignment; `binding` names the constraint when known."""

    def __init__(self, message: str, binding: str | None = None):
        super().__init__(message)
        self.binding = binding


@dataclass(frozen=True)
class Problem:
    """Multiple-choice knapsack: choose one column per row of `cost`, minimising total cost,
    with the total of `storage_bits` over the chosen cells at most `max_storage_bits`.

    cost, storage_bits: [groups, options]; storage is in whole bits, and a NaN in storage_bits
    marks a disallowed cell.
    """

    cost: np.ndarray
    storage_bits: np.ndarray
    max_storage_bits: float
    group_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.cost.shape != self.storage_bits.shape or self.cost.ndim != 2:
            raise ValueError(f"cost {self.cost.shape} and storage_bits {self.storage_bits.shape} must be equal 2-D shapes")
        if not self.allowed.any(axis=1).all():
            bad = int(np.flatnonzero(~self.allowed.any(axis=1))[0])
            raise SolverError(f"group {self.name(bad)} has no allowed option", binding="allowed options")
        if not np.isfinite(self.cost[self.allowed]).all():
            raise ValueError("cost must be finite wherever the option is allowed")
        held = self.storage_bits[self.allowed]
        if (held < 0).any() or (held != np.round(held)).any():
            raise ValueError("storage_bits must be whole, non-negative numbers of bits")

    @property
    def allowed(self) -> np.ndarray:
        return np.isfinite(self.storage_bits)

    def name(self, g: int) -> str:
        return self.group_names[g] if self.group_names else f"#{g}"

    def bits_range(self) -> tuple[float, float]:
        """Smallest and largest total storage any assignment can have."""
        masked = np.where(self.allowed, self.storage_bits, np.nan)
        return float(np.nansum(np.nanmin(masked, axis=1))), float(np.nansum(np.nanmax(masked, axis=1)))

    def evaluate(self, choice: np.ndarray) -> tuple[float, float]:
        """(total cost, total storage bits) of an assignment; raises if a chosen cell is disallowed."""
        rows = np.arange(len(choice))
        if not self.allowed[rows, choice].all():
            raise ValueError("assignment uses a disallowed option")
        return float(self.cost[rows, choice].sum()), float(self.storage_bits[rows, choice].sum())


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray  # [groups] index of the chosen option
    objective: float
    storage_bits: float
    status: str  # "optimal" (proven) or "feasible"
    solver: str
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    bound: float | None = None  # proven lower bound on the optimal objective, where the solver has one

    @property
    def gap(self) -> float | None:
        return relative_gap(self.objective, self.bound)


def relative_gap(objective: float, bound: float | None) -> float | None:
    """Relative distance to a lower bound: the most a solution can be worse than optimal."""
    if bound is None:
        return None
    return max(0.0, objective - bound) / max(abs(objective), 1e-300)


# fn(problem, **settings) -> (choice, status, bound or None)
SolverFn = Callable[..., tuple[np.ndarray, str, "float | None"]]
_SOLVERS: dict[str, tuple[SolverFn, str]] = {}


def register_solver(name: str, summary: str) -> Callable[[SolverFn], SolverFn]:
    """Register `fn(problem, **settings) -> (choice, status, bound)` under `name`."""

    def deco(fn: SolverFn) -> SolverFn:
        _SOLVERS[name] = (fn, summary)
        return fn

    return deco


def available_solvers() -> dict[str, str]:
    return {name: summary for name, (_, summary) in sorted(_SOLVERS.items())}


def solve(problem: Problem, solver: str = "ilp", **settings) -> Solution:
    if solver not in _SOLVERS:
        raise SolverError(f"unknown solver {solver!r}; available: {', '.join(sorted(_SOLVERS))}", binding="solver")
    fn, _ = _SOLVERS[solver]
    accepted = set(inspect.signature(fn).parameters) - {"problem"}
    if unknown := sorted(set(settings) - accepted):
        raise SolverError(f"solver {solver} has no setting {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}", binding="solver")
    lo, _ = problem.bits_range()
    if problem.max_storage_bits < lo:
        raise SolverError(
            f"budget of {problem.max_storage_bits:.6g} bits is below the smallest feasible {lo:.6g} bits",
            binding="storage budget",
        )
    start = time.perf_counter()
    choice, status, bound = fn(problem, **settings)
    seconds = time.perf_counter() - start
    choice = np.asarray(choice, dtype=np.int64)
    objective, bits = problem.evaluate(choice)
    # No tolerance: storage is counted in whole bits and the budget is a hard limit.
    if bits > problem.max_storage_bits:
        raise SolverError(f"solver {solver} returned {bits:.6g} bits over the budget {problem.max_storage_bits:.6g}")
    if status == "optimal":
        bound = objective
    return Solution(choice, objective, bits, status, solver, dict(sorted(settings.items())), seconds, bound)
