"""Exact dynamic program over a discretized storage budget (as in HIGGS's dynamic-programming
bit allocation).

Storage is counted above each group's smallest option ("excess"), in units of the gcd of all
excess values, so the program is exact: f_g[c] = min_k f_{g-1}[c - w(g,k)] + cost(g,k) is the
least cost of groups 0..g within c units, one vectorized pass per (group, option). With a
coarser `resolution_bits` each excess is rounded *up* to whole units, so the answer fits the
true budget, and a second pass with excess rounded *down* (a relaxation) bounds the optimum
from below: the result is approximate, with a proven gap. Memory is one back-pointer byte per
(group, budget step); tables past `max_states` or `max_work` are refused, not attempted.
"""

from __future__ import annotations

import math

import numpy as np

from .base import Outcome, Problem, SolverError, dominated, register_solver


@register_solver("dp", "exact dynamic program over the budget in gcd units (HIGGS-style); coarser resolution: approximate + bound")
def solve_dp(problem: Problem, resolution_bits: int | None = None, max_states: float = 2e8,
             max_work: float = 2e9) -> Outcome:
    """resolution_bits: None = exact (gcd of the storage steps); a number = budget steps of that
    many bits (approximate, reports a lower bound). max_states: back-pointers (bytes) allowed;
    max_work: group-option-step updates allowed (about 1 ns each)."""
    if problem.has_latency_limit:
        raise SolverError("solver dp handles the storage budget only; the latency limit needs ilp, lagrangian or "
                          "evolutionary", binding="latency")
    if resolution_bits is not None and (int(resolution_bits) != resolution_bits or resolution_bits < 1):
        raise SolverError(f"dp resolution_bits must be a positive whole number of bits, got {resolution_bits!r}", binding="solver")
    allowed = problem.allowed
    keep = allowed & ~dominated(problem.cost, problem.storage_bits, allowed)
    bits = np.where(keep, problem.storage_bits, 0).astype(np.int64)
    base = np.where(keep, bits, np.iinfo(np.int64).max).min(axis=1)
    excess = np.where(keep, bits - base[:, None], 0)
    room = int(math.floor(problem.max_storage_bits)) - int(base.sum())
    exact_unit = int(np.gcd.reduce(excess[keep])) or 1
    unit = exact_unit if resolution_bits is None else int(resolution_bits)
    exact = resolution_bits is None or exact_unit % unit == 0  # every step a whole number of units
    up = -(-excess // unit)  # ceil: what is chosen always fits
    cap = min(room // unit, int(up.max(axis=1).sum()))  # more room than the largest total is never used
    G = problem.cost.shape[0]
    states = G * (cap + 1)
    work = float(keep.sum()) * (cap + 1)
    if states > max_states or work > max_work:
        raise SolverError(
            f"dp would need {G} groups x {cap + 1} budget steps of {unit} bits ({states:.3g} states, {work:.3g} updates; "
            f"limits {max_states:.3g} and {max_work:.3g}); pass a coarser resolution_bits (approximate, with a bound) "
            "or use ilp or lagrangian", binding="solver")
    cost = problem.cost
    value, back = _program(cost, up, keep, cap, keep_back=True)
    if not np.isfinite(value):
        raise SolverError(f"dp found no assignment within the budget at a resolution of {unit} bits; "
                          "use a finer resolution_bits or ilp", binding="storage budget")
    choice = _trace(back, up, cap)
    objective = float(cost[np.arange(G), choice].sum())
    details = {"unit_bits": unit, "exact": bool(exact), "budget_steps": cap + 1}
    if exact:
        return Outcome(choice, "optimal", None, iterations=G, details=details)
    down = excess // unit  # floor: a relaxation of the true budget, so its optimum bounds ours
    bound, _ = _program(cost, down, keep, min(room // unit, int(down.max(axis=1).sum())), keep_back=False)
    return Outcome(choice, "optimal" if objective <= bound else "feasible", min(bound, objective), iterations=2 * G,
                   details=details)


def _program(cost: np.ndarray, w: np.ndarray, keep: np.ndarray, cap: int, keep_back: bool):
    """f[c]: least cost of the groups so far within c units. Returns (f[cap], back-pointers)."""
    G, K = cost.shape
    f = np.zeros(cap + 1)
    back = np.zeros((G, cap + 1), dtype=np.int8 if K < 128 else np.int16) if keep_back else None
    for g in range(G):
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int64) if keep_back else None
        for k in np.flatnonzero(keep[g]):
            step = int(w[g, k])
            if step > cap:
                continue
            cand = f[: cap + 1 - step] + cost[g, k]
            better = cand < new[step:]  # strict: among equal costs the first option wins
            new[step:][better] = cand[better]
            if keep_back:
                arg[step:][better] = k
        f = new
        if keep_back:
            back[g] = arg
    return float(f[cap]), back


def _trace(back: np.ndarray, w: np.ndarray, cap: int) -> np.ndarray:
    G = back.shape[0]
    choice = np.zeros(G, dtype=np.int64)
    c = cap
    for g in range(G - 1, -1, -1):
        k = int(back[g, c])
        choice[g] = k
        c -= int(w[g, k])
    return choice
