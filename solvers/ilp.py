"""Exact multiple-choice knapsack by integer programming (pulp + CBC or HiGHS), as in HAWQ-V3.

  minimise   Σ_g Σ_k cost[g,k] · x[g,k]
  subject to Σ_k x[g,k] = 1                              for every group g
             Σ_g Σ_k bits[g,k] · x[g,k] ≤ budget          (storage)
             Σ_g Σ_k latency[g,k] · x[g,k] ≤ max_latency  (only with a latency limit)
             x ∈ {0, 1}
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import pulp

from .base import LATENCY_RTOL, Outcome, Problem, SolverError, dominated, infeasible_error, register_solver

_MAX_REPAIRS = 5
BACKENDS = ("cbc", "highs")


def highs_available() -> bool:
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


@register_solver("ilp", "exact integer program (CBC or HiGHS): optimal under storage and latency limits; the default")
def solve_ilp(problem: Problem, backend: str = "auto", time_limit_s: float = 60.0, gap_rel: float = 1e-9,
              warm_start: bool = True) -> Outcome:
    """backend: "highs" (highspy), "cbc" (bundled with pulp), or "auto": HiGHS when installed
    (10^4 groups: seconds, where CBC needs minutes). gap_rel: the search stops
    once proven within this relative gap ("optimal"; the bound says how close). A run stopped by
    the time limit returns its best assignment as "feasible", with the best proven bound.
    warm_start: hand the solver the Lagrangian assignment as its first incumbent (10^4 groups
    then close their gap in seconds instead of minutes)."""
    if backend == "auto":
        backend = "highs" if highs_available() else "cbc"
    if backend not in BACKENDS:
        raise SolverError(f"ilp backend must be one of auto, {', '.join(BACKENDS)}, got {backend!r}", binding="solver")
    if backend == "highs" and not highs_available():
        raise SolverError("ilp backend 'highs' needs the highspy package: pip install highspy", binding="solver")
    allowed = problem.allowed
    latency = problem.latency if problem.has_latency_limit else None
    # Dominated options (no fewer bits, no less latency and no less cost than another in the
    # same group) are never needed at the optimum; dropping them shrinks the program.
    keep = allowed & ~dominated(problem.cost, problem.storage_bits, allowed, latency)
    start = _warm_start(problem, keep) if warm_start else None
    if start is not None and latency is None:
        keep = _reduced_cost_fixing(problem, keep, start)
    cost, shift, scale = _normalized_cost(problem.cost, keep)
    bits, unit = _integer_bits(problem.storage_bits, keep)
    rhs = math.floor(problem.max_storage_bits / unit)
    # Latency in units of the limit, so the solver's absolute tolerances are relative ones.
    lat_unit = (problem.max_latency or float(np.max(np.where(keep, latency, 0.0))) or 1.0) if latency is not None else 1.0
    lat = None if latency is None else np.where(keep, latency, 0.0) / lat_unit
    lat_rhs = 0.0 if latency is None else problem.max_latency / lat_unit
    rows = np.arange(cost.shape[0])
    solve_once = _solve_cbc if backend == "cbc" else _solve_highs
    for _ in range(_MAX_REPAIRS):
        choice, status, scaled_bound = solve_once(cost, bits, lat, keep, rhs, lat_rhs, start, time_limit_s, gap_rel)
        if choice is None and status == "infeasible":
            raise infeasible_error(problem, f"ilp ({backend})")
        if choice is None:
            raise SolverError(f"{backend} stopped at the time limit ({time_limit_s:g} s) before finding an assignment; "
                              "raise time_limit_s or use the lagrangian solver", binding="solver")
        used = int(bits[rows, choice].sum())
        over_lat = 0.0 if lat is None else (float(latency[rows, choice].sum()) - problem.max_latency) / lat_unit
        if used <= rhs and over_lat <= LATENCY_RTOL * lat_rhs:
            if scaled_bound is None and status == "optimal":
                # CBC stops once within gap_rel of its bound (on the shifted, scaled objective).
                scaled_bound = float(cost[rows, choice].sum()) * (1.0 - gap_rel)
            bound = None if scaled_bound is None else shift + scaled_bound / scale
            if bound is None and latency is None:
                bound = _lp_bound(problem)
            objective = float(problem.cost[rows, choice].sum())
            return Outcome(choice, status, None if bound is None else min(bound, objective), details={"backend": backend})
        # Integrality and feasibility tolerances can leave a rounded choice a little over: tighten, re-solve.
        if used > rhs:
            rhs -= used - rhs
        if over_lat > LATENCY_RTOL * lat_rhs:
            lat_rhs -= over_lat + 1e-9
        start = None
    raise SolverError(f"{backend} kept returning assignments over a limit after {_MAX_REPAIRS} repairs",
                      binding="storage budget and latency" if latency is not None else "storage budget")


def _warm_start(problem: Problem, keep: np.ndarray) -> np.ndarray | None:
    """The Lagrangian assignment, if it is feasible and uses only kept (non-dominated) options."""
    from .lagrangian import solve_lagrangian

    try:
        choice = solve_lagrangian(problem).choice
    except SolverError:
        return None
    rows = np.arange(len(choice))
    if not keep[rows, choice].all() or not problem.feasible(choice):
        return None
    return choice


def _reduced_cost_fixing(problem: Problem, keep: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Drop the options no optimal assignment can use (reduced-cost fixing; exact).

    For the LP price λ of the budget, L = Σ_g min_k (cost + λ·bits) − λ·budget bounds every
    feasible assignment's cost from below by L + Σ_g rc[g, chosen], with rc = cost + λ·bits minus
    its group minimum (≥ 0). An assignment with one option of rc > U − L, U the cost of the
    incumbent `start`, costs more than U, so it is not optimal. With the Lagrangian incumbent
    within ~0.1% of L this keeps one or two options per group (SmolLM2's 210 × 49 table: 6484
    undominated options -> 246..350), and HiGHS's proof of optimality takes about half the time.
    """
    from .hull import frontier, lp_greedy

    cost = np.where(keep, problem.cost, np.inf)
    bits = np.where(keep, problem.storage_bits, np.inf)
    price = lp_greedy(frontier(cost, bits), problem.max_storage_bits).price
    adjusted = np.where(keep, np.where(keep, problem.cost, 0.0) + price * np.where(keep, problem.storage_bits, 0.0), np.inf)
    best = adjusted.min(axis=1, keepdims=True)
    lower = float(best.sum()) - price * problem.max_storage_bits
    incumbent = float(problem.cost[np.arange(len(start)), start].sum())
    # Rounding slack: keeping an option too many is harmless, dropping a needed one is not.
    slack = (incumbent - lower) + 1e-9 * (abs(incumbent) + abs(lower) + price * problem.max_storage_bits) + 1e-300
    return keep & (adjusted - best <= slack)


def _normalized_cost(cost: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Shift each group's costs by their minimum, then scale for the solvers' absolute tolerances.

    CBC and HiGHS judge optimality with absolute tolerances (~1e-7 on reduced costs), while
    predicted losses per module span 1e-12..1 nats. Scale so the smallest positive cost
    difference is well above the tolerance, but keep the largest coefficient below 1e9 for a
    stable LP. Returns (normalized, total shift, scale): original = shift + normalized / scale.
    """
    masked = np.where(keep, cost, np.nan)
    row_min = np.nanmin(masked, axis=1, keepdims=True)
    shifted = np.nan_to_num(masked - row_min, nan=0.0)
    positive = shifted[shifted > 0]
    if positive.size == 0:
        return shifted, float(row_min.sum()), 1.0
    scale = min(1e-2 / positive.min(), 1e9 / positive.max())
    return shifted * scale, float(row_min.sum()), scale


def _integer_bits(storage_bits: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, int]:
    """Storage as exact integers in units of their gcd (smaller coefficients, exact budget test)."""
    values = np.where(keep, storage_bits, 0).astype(np.int64)
    unit = int(np.gcd.reduce(values[keep])) or 1
    return values // unit, unit


def _solve_cbc(cost, bits, lat, keep, rhs, lat_rhs, start, time_limit_s, gap_rel):
    """(choice or None, "optimal" | "feasible" | "infeasible" | "no solution", scaled bound or None)."""
    G = cost.shape[0]
    gs, ks = np.nonzero(keep)
    with warnings.catch_warnings():
        # pulp >= 3.3 announces its 4.0 API (and the bundled CBC moving to an extra) on every
        # variable; the project pins pulp < 4.
        warnings.simplefilter("ignore", DeprecationWarning)
        prob = pulp.LpProblem("bitalloc", pulp.LpMinimize)
        x = [pulp.LpVariable(f"x_{g}_{k}", cat="Binary") for g, k in zip(gs, ks)]
        # Expressions from (variable, coefficient) lists: pulp's arithmetic operators would build
        # one intermediate expression per term.
        prob += pulp.LpAffineExpression(list(zip(x, cost[gs, ks].tolist())))
        members = np.split(np.arange(len(x)), np.cumsum(keep.sum(axis=1))[:-1])
        for g in range(G):
            prob += pulp.LpConstraint(pulp.LpAffineExpression([(x[i], 1) for i in members[g]]), pulp.LpConstraintEQ,
                                      f"one_{g}", 1)
        prob += pulp.LpConstraint(pulp.LpAffineExpression(list(zip(x, bits[gs, ks].astype(int).tolist()))),
                                  pulp.LpConstraintLE, "storage", rhs)
        if lat is not None:
            prob += pulp.LpConstraint(pulp.LpAffineExpression(list(zip(x, lat[gs, ks].tolist()))),
                                      pulp.LpConstraintLE, "latency", lat_rhs)
        if start is not None:
            for v, on in zip(x, start[gs] == ks):
                v.setInitialValue(1 if on else 0)
        # One thread and a fixed seed make CBC's search, and so the plan, reproducible.
        cbc = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, gapRel=gap_rel, threads=1,
                                options=["randomSeed 1"], warmStart=start is not None)
        prob.solve(cbc)
    status = pulp.LpStatus[prob.status]
    if status == "Infeasible":
        return None, "infeasible", None
    if status != "Optimal":
        return None, "no solution", None
    values = np.array([v.value() if v.value() is not None else 0.0 for v in x])
    choice = _choice_from(values, gs, ks, G)
    # CBC reports "Optimal" also when stopped by the time limit with a solution; sol_status tells.
    return choice, "optimal" if prob.sol_status == pulp.LpSolutionOptimal else "feasible", None


def _solve_highs(cost, bits, lat, keep, rhs, lat_rhs, start, time_limit_s, gap_rel):
    """HiGHS through highspy directly: the model goes in as numpy arrays (pulp's HiGHS adapter
    adds columns one by one from Python, slower than solving for 10^4 groups), and the MIP's
    proven dual bound comes back when the time limit stops the search."""
    import highspy

    G = cost.shape[0]
    gs, ks = np.nonzero(keep)
    n = gs.size
    rows_per_col = 2 if lat is None else 3
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, G + rows_per_col - 1
    lp.col_cost_ = cost[gs, ks].astype(np.float64)
    lp.col_lower_, lp.col_upper_ = np.zeros(n), np.ones(n)
    lp.row_lower_ = np.concatenate([np.ones(G), np.full(rows_per_col - 1, -highspy.kHighsInf)])
    lp.row_upper_ = np.concatenate([np.ones(G), [float(rhs)], [] if lat is None else [lat_rhs]])
    index = np.stack([gs, np.full(n, G)] + ([] if lat is None else [np.full(n, G + 1)]), axis=1).ravel()
    value = np.stack([np.ones(n), bits[gs, ks].astype(np.float64)] + ([] if lat is None else [lat[gs, ks]]), axis=1).ravel()
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, rows_per_col * n + 1, rows_per_col, dtype=np.int32)
    lp.a_matrix_.index_ = index.astype(np.int32)
    lp.a_matrix_.value_ = value
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    h = _silent_highs(highspy)
    for option, val in (("output_flag", False), ("threads", 1), ("random_seed", 1), ("time_limit", float(time_limit_s)),
                        ("mip_rel_gap", float(gap_rel))):
        h.setOptionValue(option, val)
    h.passModel(lp)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = (start[gs] == ks).astype(np.float64).tolist()
        sol.value_valid = True
        h.setSolution(sol)
    h.run()
    status = h.getModelStatus()
    info = h.getInfo()
    if status == highspy.HighsModelStatus.kInfeasible:
        return None, "infeasible", None
    if info.primal_solution_status != 2:  # 2 = feasible
        return None, "no solution", None
    choice = _choice_from(np.asarray(h.getSolution().col_value), gs, ks, G)
    optimal = status == highspy.HighsModelStatus.kOptimal
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    return choice, "optimal" if optimal else "feasible", bound


def _choice_from(values: np.ndarray, gs: np.ndarray, ks: np.ndarray, G: int) -> np.ndarray | None:
    choice = np.full(G, -1, dtype=np.int64)
    on = values > 0.5
    choice[gs[on]] = ks[on]
    return None if (choice < 0).any() else choice


def _lp_bound(problem: Problem) -> float:
    """The linear relaxation's value (storage only): a proven lower bound when CBC, which does
    not report its own through pulp, stops at the time limit."""
    from .hull import frontier, lp_greedy

    cost = np.where(problem.allowed, problem.cost, np.inf)
    bits = np.where(problem.allowed, problem.storage_bits, np.inf)
    return lp_greedy(frontier(cost, bits), problem.max_storage_bits).lp_value


def _silent_highs(highspy):
    """A Highs instance, its licence banner kept off stdout: the constructor prints it to file
    descriptor 1 before any option can silence it, which would break `--json` output and the summary."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
