"""Exact multiple-choice knapsack by integer programming (pulp + CBC), as in HAWQ-V3.

  minimise   Σ_g Σ_k cost[g,k] · x[g,k]
  subject to Σ_k x[g,k] = 1                          for every group g
             Σ_g Σ_k bits[g,k] · x[g,k] ≤ budget      (storage)
             x ∈ {0, 1}
"""

from __future__ import annotations

import numpy as np
import pulp

from .base import Problem, SolverError, register_solver


@register_solver("ilp", "exact integer program (pulp/CBC): optimal one-option-per-group under the budget")
def solve_ilp(problem: Problem, time_limit_s: float = 60.0, gap_rel: float = 1e-6) -> tuple[np.ndarray, str]:
    allowed = problem.allowed
    # Dominated options (more bits and no less cost than another in the same group) are never
    # needed at the optimum; dropping them shrinks the program without changing its answer.
    keep = allowed & ~_dominated(problem.cost, problem.storage_bits, allowed)
    # Scale storage to "bits per planned weight" units so coefficients are O(1) for CBC.
    total = float(np.nansum(np.nanmax(np.where(allowed, problem.storage_bits, np.nan), axis=1)))
    scale = 1.0 / total
    # Shift each group's costs by its minimum: constant offset, better-conditioned objective.
    cost = problem.cost - np.nanmin(np.where(keep, problem.cost, np.nan), axis=1, keepdims=True)

    prob = pulp.LpProblem("bitalloc", pulp.LpMinimize)
    x = {}
    for g, k in zip(*np.nonzero(keep)):
        x[g, k] = pulp.LpVariable(f"x_{g}_{k}", cat="Binary")
    prob += pulp.lpSum(float(cost[g, k]) * v for (g, k), v in x.items())
    for g in range(cost.shape[0]):
        prob += pulp.lpSum(x[g, k] for k in np.flatnonzero(keep[g])) == 1, f"one_{g}"
    prob += (
        pulp.lpSum(float(problem.storage_bits[g, k] * scale) * v for (g, k), v in x.items())
        <= problem.max_storage_bits * scale,
        "storage",
    )
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
    G, K = cost.shape
    dom = np.zeros((G, K), dtype=bool)
    c = np.where(allowed, cost, np.inf)
    b = np.where(allowed, bits, np.inf)
    for k in range(K):
        le_b = b <= b[:, [k]]
        le_c = c <= c[:, [k]]
        strict = (b < b[:, [k]]) | (c < c[:, [k]])
        tie_first = (b == b[:, [k]]) & (c == c[:, [k]]) & (np.arange(K)[None, :] < k)
        dom[:, k] = ((le_b & le_c & strict) | tie_first).any(axis=1)
    return dom & allowed
