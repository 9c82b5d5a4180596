"""Exact multiple-choice knapsack by integer programming (pulp + CBC), as in HAWQ-V3.

  minimise   Σ_g Σ_k cost[g,k] · x[g,k]
  subject to Σ_k x[g,k] = 1                          for every group g
             Σ_g Σ_k bits[g,k] · x[g,k] ≤ budget      (storage)
             x ∈ {0, 1}
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pulp

from .base import Problem, SolverError, register_solver

_MAX_REPAIRS = 5


@register_solver("ilp", "exact integer program (pulp/CBC): optimal one-option-per-group under the budget")
def solve_ilp(problem: Problem, time_limit_s: float = 60.0, gap_rel: float = 1e-6) -> tuple[np.ndarray, str, None]:
    allowed = problem.allowed
    # Dominated options (more bits and no less cost than another in the same group) are never
    # needed at the optimum; dropping them shrinks the program without changing its answer.
    keep = allowed & ~_dominated(problem.cost, problem.storage_bits, allowed)
    cost = _normalized_cost(problem.cost, keep)
    bits, unit = _integer_bits(problem.storage_bits, keep)
    rhs = math.floor(problem.max_storage_bits / unit)
    for _ in range(_MAX_REPAIRS):
        choice, status = _solve_once(cost, bits, keep, rhs, time_limit_s, gap_rel)
        used = int(bits[np.arange(len(choice)), choice].sum())
        if used <= rhs:
            # "optimal" carries its own bound (the objective); CBC's bound at a time limit is not exposed by pulp.
            return choice, status, None
        # CBC's integrality tolerance can leave a rounded choice a few units over: tighten, re-solve.
        rhs -= used - rhs
    raise SolverError(f"CBC kept returning assignments over the budget after {_MAX_REPAIRS} repairs", binding="storage budget")


def _normalized_cost(cost: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Shift each group's costs by their minimum, then scale for CBC's absolute tolerances.

    CBC judges optimality with absolute tolerances (~1e-7 on reduced costs), while predicted
    losses per module span 1e-12..1 nats. Scale so the smallest positive cost difference is
    well above the tolerance, but keep the largest coefficient below 1e9 for a stable LP.
    """
    masked = np.where(keep, cost, np.nan)
    shifted = np.nan_to_num(masked - np.nanmin(masked, axis=1, keepdims=True), nan=0.0)
    positive = shifted[shifted > 0]
    if positive.size == 0:
        return shifted
    scale = min(1e-2 / positive.min(), 1e9 / positive.max())
    return shifted * scale


def _integer_bits(storage_bits: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """Storage as exact integers in units of their gcd (smaller coefficients, exact budget test)."""
    values = np.where(keep, storage_bits, 0).astype(np.int64)
    unit = int(np.gcd.reduce(values[keep])) or 1
    return values // unit, unit


def _solve_once(cost, bits, keep, rhs, time_limit_s, gap_rel) -> tuple[np.ndarray, str]:
    with warnings.catch_warnings():
        # pulp >= 3.3 announces its 4.0 API (and the bundled CBC moving to an extra) on every
        # variable; the project pins pulp < 4.
        warnings.simplefilter("ignore", DeprecationWarning)
        prob = pulp.LpProblem("bitalloc", pulp.LpMinimize)
        x = {(g, k): pulp.LpVariable(f"x_{g}_{k}", cat="Binary") for g, k in zip(*np.nonzero(keep))}
        prob += pulp.lpSum(float(cost[g, k]) * v for (g, k), v in x.items())
        for g in range(cost.shape[0]):
            prob += pulp.lpSum(x[g, k] for k in np.flatnonzero(keep[g])) == 1, f"one_{g}"
        prob += pulp.lpSum(int(bits[g, k]) * v for (g, k), v in x.items()) <= rhs, "storage"
        # One thread and a fixed seed make CBC's search, and so the plan, reproducible.
        cbc = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap_rel, threads=1, options=["randomSeed 1"])
        prob.solve(cbc)
    status = pulp.LpStatus[prob.status]
    if status != "Optimal":
        raise SolverError(f"CBC ended with status {status!r}", binding="storage budget")
    choice = np.zeros(cost.shape[0], dtype=np.int64)
    for (g, k), v in x.items():
        if v.value() is not None and v.value() > 0.5:
            choice[g] = k
    # CBC reports "Optimal" also when stopped by the time limit with a solution; sol_status tells.
    return choice, "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible"


def _dominated(cost: np.ndarray, bits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """dom[g,k]: some other allowed option in group g has ≤ bits and ≤ cost, one of them strictly
    (exact ties keep the lower index, so the pruned program is deterministic)."""
    K = cost.shape[1]
    dom = np.zeros(cost.shape, dtype=bool)
    c = np.where(allowed, cost, np.inf)
    b = np.where(allowed, bits, np.inf)
    for k in range(K):
        le_b = b <= b[:, [k]]
        le_c = c <= c[:, [k]]
        strict = (b < b[:, [k]]) | (c < c[:, [k]])
        tie_first = (b == b[:, [k]]) & (c == c[:, [k]]) & (np.arange(K)[None, :] < k)
        dom[:, k] = ((le_b & le_c & strict) | tie_first).any(axis=1)
    return dom & allowed
