"""Lagrangian relaxation of the budget (BAQ-style), with a greedy repair; reports its duality gap.

For a multiplier λ ≥ 0 every group independently takes argmin_k cost[g,k] + λ·bits[g,k]: a point
of the lower convex hull of its (bits, cost) points. Instead of bisecting on λ (a full [G, K]
argmin per step), each group's hull is computed once and the hull segments are taken in order
of cost decrease per extra bit (hull.py): the last segment that fits fixes λ, and the value of
that linear relaxation, max_λ L(λ) with L(λ) = Σ_g min_k (cost + λ·bits) − λ·budget, is the
lower bound the reported gap is measured against. The budget left over is then spent greedily,
first on further hull segments, then on any option of any group.

With a latency limit a second multiplier μ prices latency into the cost (cost + μ·latency);
bisection on μ finds the smallest price whose storage-relaxed choice meets the limit, and
L(λ, μ) − μ·max_latency bounds the optimum from below for every μ ≥ 0.
"""

from __future__ import annotations

import numpy as np

from .base import Outcome, Problem, SolverError, register_solver
from .hull import frontier, hull_fill, improvable, lp_greedy


@register_solver("lagrangian", "Lagrangian relaxation on convex hulls + greedy repair: linear time, reports its gap")
def solve_lagrangian(problem: Problem, iterations: int = 40, max_rounds: int = 64) -> Outcome:
    """iterations: bisection steps on the latency multiplier (only with a latency limit);
    max_rounds: rounds of the final repair over all options."""
    every = bool(problem.allowed.all())
    cost = problem.cost if every else np.where(problem.allowed, problem.cost, np.inf)
    bits = problem.storage_bits if every else np.where(problem.allowed, problem.storage_bits, np.inf)
    if problem.has_latency_limit:
        return _with_latency(problem, cost, bits, iterations, max_rounds)
    budget = problem.max_storage_bits
    front = frontier(cost, bits)
    greedy = lp_greedy(front, budget)
    pos = hull_fill(front, greedy.pos, greedy.left)
    choice = front.columns(pos)
    rows = np.arange(len(choice))
    left = budget - float(bits[rows, choice].sum())
    # Only groups with a cheaper option within what is left can improve: repair just those rows.
    sub = improvable(front, pos, left)
    if sub.size:
        choice[sub] = fill(cost[sub], bits[sub], choice[sub], left + float(bits[sub, choice[sub]].sum()),
                           max_rounds=max_rounds)
    objective = float(cost[rows, choice].sum())
    # An integral relaxation optimum is the integer optimum; otherwise the LP value bounds it.
    status = "optimal" if not greedy.fractional or objective <= greedy.lp_value else "feasible"
    return Outcome(choice, status, greedy.lp_value, iterations=1)


def relax(cost: np.ndarray, bits: np.ndarray, budget: float) -> tuple[np.ndarray, float]:
    """(choice after hull greedy + hull fill, linear-relaxation value)."""
    front = frontier(cost, bits)
    greedy = lp_greedy(front, budget)
    return front.columns(hull_fill(front, greedy.pos, greedy.left)), greedy.lp_value


def fill(cost: np.ndarray, bits: np.ndarray, choice: np.ndarray, budget: float, latency: np.ndarray | None = None,
         max_latency: float | None = None, max_rounds: int = 64) -> np.ndarray:
    """Spend the unused budget: each round, every group proposes its cheapest option that fits
    what is left, and proposals are taken by cost decrease per extra bit while they still fit."""
    choice = choice.copy()
    rows = np.arange(cost.shape[0])
    for _ in range(max_rounds):
        cur_cost, cur_bits = cost[rows, choice], bits[rows, choice]
        left = budget - cur_bits.sum()
        ok = (cost < cur_cost[:, None]) & (bits - cur_bits[:, None] <= left)
        if latency is not None:
            cur_lat = latency[rows, choice]
            left_lat = max_latency - cur_lat.sum()
            ok &= latency - cur_lat[:, None] <= left_lat
        groups = np.flatnonzero(ok.any(axis=1))
        if groups.size == 0:
            break
        best = np.where(ok[groups], cost[groups], np.inf).argmin(axis=1)
        d_cost = cur_cost[groups] - cost[groups, best]
        d_bits = np.maximum(bits[groups, best] - cur_bits[groups], 0.0)
        order = np.argsort(-d_cost / np.maximum(d_bits, 1e-9), kind="stable")
        fits = np.cumsum(d_bits[order]) <= left
        if latency is not None:
            d_lat = np.maximum(latency[groups, best] - cur_lat[groups], 0.0)
            fits &= np.cumsum(d_lat[order]) <= left_lat
        n = int(np.argmin(fits)) if not fits.all() else fits.size  # prefix that fits (the first always does)
        take = order[:max(n, 1)]
        choice[groups[take]] = best[take]
    return choice


def _with_latency(problem: Problem, cost: np.ndarray, bits: np.ndarray, iterations: int, max_rounds: int) -> Outcome:
    lat = np.where(problem.allowed, problem.latency, np.inf)
    budget, limit = problem.max_storage_bits, problem.max_latency
    rows = np.arange(cost.shape[0])
    bound = -np.inf
    best: tuple[float, np.ndarray] | None = None
    relaxations = 0

    def attempt(mu: float) -> bool:
        nonlocal bound, best, relaxations
        relaxations += 1
        choice, lp_value = relax(cost + mu * np.where(problem.allowed, problem.latency, 0.0), bits, budget)
        bound = max(bound, lp_value - mu * limit)
        if lat[rows, choice].sum() > limit:
            return False
        choice = fill(cost, bits, choice, budget, lat, limit, max_rounds)
        objective = float(cost[rows, choice].sum())
        if best is None or objective < best[0]:
            best = (objective, choice)
        return True

    if not attempt(0.0):
        # The price of a second of latency, in cost units, at which trading starts to matter.
        span_cost = np.ptp(np.where(problem.allowed, problem.cost, np.nan), axis=1)
        span_lat = np.ptp(np.where(problem.allowed, problem.latency, np.nan), axis=1)
        with np.errstate(all="ignore"):
            ratios = span_cost / span_lat
        ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
        lo, hi = 0.0, float(np.median(ratios)) if ratios.size else 1.0
        for _ in range(200):
            if attempt(hi):
                break
            lo, hi = hi, hi * 4
        else:
            raise SolverError("lagrangian found no assignment meeting both the storage budget and the latency limit; "
                              "the ilp solver proves whether one exists", binding="storage budget and latency")
        for _ in range(iterations):
            mid = 0.5 * (lo + hi) if lo == 0 else float(np.sqrt(lo * hi))
            if attempt(mid):
                hi = mid
            else:
                lo = mid
    objective, choice = best
    return Outcome(choice, "optimal" if objective <= bound else "feasible", float(bound), iterations=relaxations)
