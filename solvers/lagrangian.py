"""Lagrangian relaxation of the budget (BAQ-style), with a greedy repair; reports its duality gap.

For a multiplier λ ≥ 0 every group independently takes argmin_k cost[g,k] + λ·bits[g,k]: that
lands on the lower convex hull of the group's (bits, cost) points, and total bits fall as λ
grows. Bisection finds the smallest λ whose choice fits the budget; the budget left over is then
spent greedily on the upgrades with the best cost decrease per extra bit. Every λ also gives a
lower bound on the optimum, L(λ) = Σ_g min_k (cost + λ·bits) − λ·budget (weak duality), so the
reported gap is an upper bound on how far from optimal the answer is.
"""

from __future__ import annotations

import numpy as np

from .base import Problem, register_solver


@register_solver("lagrangian", "Lagrangian relaxation + greedy repair: fast, near-optimal, reports its duality gap")
def solve_lagrangian(problem: Problem, iterations: int = 100) -> tuple[np.ndarray, str, float]:
    cost = np.where(problem.allowed, problem.cost, np.inf)
    bits = np.where(problem.allowed, problem.storage_bits, np.inf)
    budget = problem.max_storage_bits
    rows = np.arange(cost.shape[0])

    finite_bits = np.where(problem.allowed, problem.storage_bits, 0.0)

    def relaxed(lam: float) -> tuple[np.ndarray, float]:
        value = np.where(problem.allowed, cost + lam * finite_bits, np.inf)  # 0·inf would be NaN
        best = value.min(axis=1, keepdims=True)
        # Among (near-)ties take the fewest bits, so the choice is deterministic and as small as it can be.
        ties = value <= best + 1e-12 * np.maximum(np.abs(best), 1.0)
        choice = np.where(ties, bits, np.inf).argmin(axis=1)
        return choice, float(best.sum() - lam * budget)

    choice, bound = relaxed(0.0)
    if bits[rows, choice].sum() <= budget:  # the cheapest-cost choice fits: optimal outright
        return choice, "optimal", bound
    lo, hi = 0.0, 1.0
    while True:  # grow λ until the relaxed choice fits
        best_choice, b = relaxed(hi)
        bound = max(bound, b)
        if bits[rows, best_choice].sum() <= budget:
            break
        lo, hi = hi, hi * 2
        if hi > 1e300:
            raise ValueError("no multiplier makes the choice fit; the budget is below the smallest total")
    for _ in range(iterations):  # bisect: smallest λ that fits
        mid = 0.5 * (lo + hi)
        c, b = relaxed(mid)
        bound = max(bound, b)
        if bits[rows, c].sum() <= budget:
            hi, best_choice = mid, c
        else:
            lo = mid
    choice = _repair(cost, bits, best_choice, budget)
    objective = float(cost[rows, choice].sum())
    return choice, "optimal" if objective <= bound else "feasible", bound


def _repair(cost: np.ndarray, bits: np.ndarray, choice: np.ndarray, budget: float) -> np.ndarray:
    """Spend the unused budget: repeatedly take the single-group switch with the largest cost
    decrease per extra bit that still fits, until none helps."""
    choice = choice.copy()
    rows = np.arange(cost.shape[0])
    while True:
        left = budget - bits[rows, choice].sum()
        d_cost = cost[rows, choice][:, None] - cost  # > 0: improvement
        d_bits = bits - bits[rows, choice][:, None]
        ok = (d_cost > 0) & (d_bits <= left)
        if not ok.any():
            return choice
        with np.errstate(invalid="ignore", divide="ignore"):  # inf/inf in disallowed cells, masked next
            gain = np.where(ok, d_cost / np.maximum(d_bits, 1e-12), -np.inf)
        g, k = np.unravel_index(int(np.argmax(gain)), gain.shape)
        choice[g] = k
