"""Budget sweeps: one solution per storage budget, and which of them form the Pareto frontier
(no other point has no more storage and less predicted loss)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Problem, Solution, solve


@dataclass(frozen=True)
class ParetoPoint:
    max_storage_bits: float
    solution: Solution
    on_frontier: bool


def pareto_sweep(problem: Problem, budgets_bits: Sequence[float], solver: str = "ilp", **settings) -> list[ParetoPoint]:
    """Solve `problem` at every budget (total storage bits), in the order given."""
    solutions = [solve(dataclasses.replace(problem, max_storage_bits=float(b)), solver, **settings) for b in budgets_bits]
    front = frontier_points([s.storage_bits for s in solutions], [s.objective for s in solutions])
    return [ParetoPoint(float(b), s, bool(f)) for b, s, f in zip(budgets_bits, solutions, front)]


def frontier_points(storage: Sequence[float], loss: Sequence[float]) -> np.ndarray:
    """on[i]: no other point has storage <= storage[i] and loss <= loss[i] with one strictly less
    (of identical points only the first counts)."""
    s, l = np.asarray(storage, dtype=float), np.asarray(loss, dtype=float)
    n = s.size
    on = np.ones(n, dtype=bool)
    for i in range(n):
        le = (s <= s[i]) & (l <= l[i])
        strict = (s < s[i]) | (l < l[i])
        same_before = (s == s[i]) & (l == l[i]) & (np.arange(n) < i)
        on[i] = not ((le & strict) | same_before).any()
    return on
