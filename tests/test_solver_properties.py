"""Every solver against brute force, with and without ties and a latency limit.

Exact solvers (ilp on both backends, dp) must equal the brute-force optimum; approximate ones
(lagrangian, evolutionary on the table objective) must fit every limit and bracket the optimum
with their bound. Infeasible instances must name the binding constraint.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from bitalloc.solvers import Problem, SolverError, frontier_points, pareto_sweep, solve
from bitalloc.solvers.base import merge_ties, tie_classes
from bitalloc.solvers.evolutionary import repair
from bitalloc.solvers.hull import frontier, lp_greedy

reproducible = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                        suppress_health_check=[HealthCheck.too_slow])


def brute_force(p: Problem) -> tuple[float, tuple[int, ...]] | None:
    """Optimum by enumeration, honouring storage, latency and ties."""
    allowed = [np.flatnonzero(p.allowed[g]) for g in range(p.cost.shape[0])]
    rows = np.arange(p.cost.shape[0])
    best = None
    for choice in itertools.product(*allowed):
        c = np.array(choice)
        if any(len(set(c[list(t)])) > 1 for t in p.ties):
            continue
        if p.storage_bits[rows, c].sum() > p.max_storage_bits:
            continue
        if p.max_latency is not None and p.latency[rows, c].sum() > p.max_latency:
            continue
        cost = float(p.cost[rows, c].sum())
        if best is None or cost < best[0]:
            best = (cost, choice)
    return best


@st.composite
def problems(draw, with_ties=None, with_latency=None):
    G = draw(st.integers(2, 5))
    K = draw(st.integers(2, 4))
    bits = np.array([[draw(st.integers(1, 64)) * 16 for _ in range(K)] for _ in range(G)], dtype=np.float64)
    cost = np.array([[draw(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False)) for _ in range(K)] for _ in range(G)])
    for g in range(G):  # disallow some cells, keeping at least one per group
        keep = draw(st.integers(0, K - 1))
        for k in range(K):
            if k != keep and draw(st.integers(0, 4)) == 0:
                bits[g, k] = np.nan
    ties = ()
    if with_ties if with_ties is not None else draw(st.booleans()):
        a, b = draw(st.integers(0, G - 1)), draw(st.integers(0, G - 1))
        if a != b:
            ties = ((a, b),)
            bits[[a, b], 0] = np.where(np.isfinite(bits[[a, b], 0]), bits[[a, b], 0], 16.0)  # share column 0
    latency = max_latency = None
    if with_latency if with_latency is not None else draw(st.booleans()):
        # microseconds to a millisecond per module, as a hardware profile predicts them
        latency = np.array([[draw(st.integers(0, 1000)) * 1e-6 for _ in range(K)] for _ in range(G)])
        masked = np.where(np.isfinite(bits), latency, np.nan)
        lo, hi = np.nansum(np.nanmin(masked, 1)), np.nansum(np.nanmax(masked, 1))
        max_latency = float(lo + draw(st.floats(0.0, 1.0)) * (hi - lo))
    masked = np.where(np.isfinite(bits), bits, np.nan)
    lo, hi = float(np.nansum(np.nanmin(masked, 1))), float(np.nansum(np.nanmax(masked, 1)))
    budget = lo + draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))) * (hi - lo)
    return Problem(np.where(np.isfinite(bits), cost, 0.0), bits, budget, latency=latency, max_latency=max_latency, ties=ties)


def assert_feasible(p: Problem, sol) -> None:
    rows = np.arange(len(sol.choice))
    assert p.allowed[rows, sol.choice].all()
    assert sol.storage_bits <= p.max_storage_bits  # never over, not even by a tolerance
    if p.max_latency is not None:
        assert sol.latency <= p.max_latency * (1 + 1e-9)
    for t in p.ties:
        assert len(set(sol.choice[list(t)])) == 1
    assert sol.objective == pytest.approx(float(p.cost[rows, sol.choice].sum()), abs=1e-12)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def solve_or_infeasible(p: Problem, solver: str, **kw):
    """The solution, or None when the solver proves (or, for heuristics, reports) no assignment."""
    try:
        return solve(p, solver, **kw)
    except SolverError as e:
        assert e.binding in ("storage budget", "latency", "storage budget and latency", "ties"), e
        return None


# ---- exact solvers equal brute force -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cbc", "highs"])
@reproducible
@given(problems())
def test_ilp_matches_brute_force_with_ties_and_latency(backend, p):
    best = brute_force(p)
    sol = solve_or_infeasible(p, "ilp", backend=backend)
    if best is None:
        assert sol is None
        return
    assert sol is not None, "ilp missed a feasible instance"
    assert_feasible(p, sol)
    assert close(sol.objective, best[0]), (sol.objective, best[0])
    assert sol.status == "optimal"


@reproducible
@given(problems(with_latency=False))
def test_dp_matches_brute_force_with_ties(p):
    best = brute_force(p)
    sol = solve_or_infeasible(p, "dp")
    if best is None:
        assert sol is None
        return
    assert_feasible(p, sol)
    assert close(sol.objective, best[0])
    assert sol.status == "optimal" and sol.details["exact"]


@reproducible
@given(problems(with_latency=False))
def test_dp_coarse_resolution_brackets_the_optimum(p):
    best = brute_force(p)
    if best is None:
        return
    sol = solve_or_infeasible(p, "dp", resolution_bits=48)
    if sol is None:  # rounding every step up can leave nothing that fits near the smallest budget
        return
    assert_feasible(p, sol)
    assert sol.bound <= best[0] + 1e-9 <= sol.objective + 2e-9


# ---- approximate solvers: within their reported gap, never over a limit ------------------------


@reproducible
@given(problems())
def test_lagrangian_brackets_the_optimum(p):
    best = brute_force(p)
    sol = solve_or_infeasible(p, "lagrangian")
    if best is None:
        assert sol is None
        return
    if sol is None:  # a heuristic may miss a jointly feasible corner, but must say which limits bind
        assert p.max_latency is not None
        return
    assert_feasible(p, sol)
    assert sol.bound <= best[0] + 1e-9 * max(1.0, abs(best[0]))
    assert sol.objective >= best[0] - 1e-9 * max(1.0, abs(best[0]))
    if sol.status == "optimal":
        assert close(sol.objective, best[0])


@settings(max_examples=20, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_evolutionary_on_the_table_objective_is_feasible_and_no_worse_than_its_warm_start(p):
    best = brute_force(p)
    sol = solve_or_infeasible(p, "evolutionary", trials=12, population=4, warm_start="ilp")
    if best is None:
        assert sol is None
        return
    assert_feasible(p, sol)
    # warm-started from the exact ilp: it can only match it on the table objective
    assert close(sol.objective, best[0])
    assert sol.details["improvement"] >= 0 and sol.iterations == 12


def test_lagrangian_bound_is_the_linear_relaxation():
    # The hull greedy must reproduce the LP optimum exactly (that is what makes the bound tight).
    rng = np.random.default_rng(3)
    for _ in range(60):
        G, K = rng.integers(1, 7), rng.integers(1, 7)
        bits = rng.integers(1, 40, (G, K)).astype(float) * 8
        cost = rng.random((G, K)) * rng.choice([1e-6, 1.0, 1e3])
        bits[rng.random((G, K)) < 0.2] = np.inf
        bits[np.isinf(bits).all(1), 0] = 8.0
        budget = float(np.where(np.isfinite(bits), bits, np.inf).min(1).sum() + rng.random() * 200)
        lp = lp_greedy(frontier(np.where(np.isfinite(bits), cost, np.inf), bits), budget).lp_value
        idx = [(g, k) for g in range(G) for k in range(K) if np.isfinite(bits[g, k])]
        a_eq = np.zeros((G, len(idx)))
        for j, (g, _) in enumerate(idx):
            a_eq[g, j] = 1
        ref = linprog([cost[g, k] for g, k in idx], A_ub=[[bits[g, k] for g, k in idx]], b_ub=[budget],
                      A_eq=a_eq, b_eq=np.ones(G), bounds=(0, 1), method="highs")
        assert lp == pytest.approx(ref.fun, rel=1e-7, abs=1e-9)


def convex_instance(G: int, K: int, seed: int = 0, noise: float = 0.1):
    """Error curves convex in bits with noise, groups of many sizes (like real candidate tables)."""
    rng = np.random.default_rng(seed)
    widths = np.linspace(2, 8, K)
    sizes = rng.integers(50, 5000, (G, 1)).astype(float)
    bits = np.round(sizes * widths[None, :]) * 8
    cost = rng.lognormal(0, 1, (G, 1)) * np.exp(-1.3 * widths)[None, :] * rng.lognormal(0, noise, (G, K))
    return cost, bits, sizes


def test_lagrangian_near_exact_on_a_realistic_instance():
    cost, bits, sizes = convex_instance(3000, 16)
    p = Problem(cost, bits, 4.1 * 8 * float(sizes.sum()))
    lag, ilp = solve(p, "lagrangian"), solve(p, "ilp", backend="highs")
    assert lag.bound <= ilp.objective * (1 + 1e-12) <= lag.objective * (1 + 1e-12)
    assert lag.gap < 1e-4 and lag.objective <= ilp.objective * (1 + 1e-4)


def test_lagrangian_with_per_row_option_order():
    # Columns ordered differently per row (no single order sorts them): the per-row path.
    cost, bits, sizes = convex_instance(400, 8, seed=5)
    rng = np.random.default_rng(1)
    for g in range(0, 400, 2):
        perm = rng.permutation(8)
        cost[g], bits[g] = cost[g, perm], bits[g, perm]
    p = Problem(cost, bits, 4.5 * 8 * float(sizes.sum()))
    lag, ilp = solve(p, "lagrangian"), solve(p, "ilp")
    assert lag.bound <= ilp.objective * (1 + 1e-12) <= lag.objective * (1 + 1e-12)
    assert lag.gap < 1e-3


# ---- infeasibility names the binding constraint --------------------------------------------------


def small(latency_limit=None, budget=40.0):
    cost = np.array([[1.0, 0.0], [1.0, 0.0]])
    bits = np.array([[10.0, 30.0], [10.0, 30.0]])
    lat = np.array([[3.0, 1.0], [3.0, 1.0]])  # more bits, less latency
    return Problem(cost, bits, budget, latency=lat, max_latency=latency_limit)


@pytest.mark.parametrize("solver", ["ilp", "lagrangian", "evolutionary", "dp"])
def test_storage_infeasible_names_the_budget(solver):
    with pytest.raises(SolverError, match="smallest feasible 20") as info:
        solve(small(budget=19.0), solver)
    assert info.value.binding == "storage budget"


@pytest.mark.parametrize("solver", ["ilp", "lagrangian", "evolutionary"])
def test_latency_infeasible_names_latency(solver):
    with pytest.raises(SolverError, match="latency limit") as info:
        solve(small(latency_limit=1.5), solver)
    assert info.value.binding == "latency"


@pytest.mark.parametrize("solver", ["ilp", "lagrangian"])
def test_jointly_infeasible_names_both(solver):
    # storage alone (<= 40 bits: at most one group at 30) and latency alone (<= 4 s: both at 1 s)
    # are each feasible, but not together: 30 + 10 bits gives 1 + 3 = 4 s... allow 3.5 s.
    with pytest.raises(SolverError) as info:
        solve(small(latency_limit=3.5, budget=40.0), solver)
    assert info.value.binding == "storage budget and latency"


def test_dp_refuses_a_latency_limit_by_name():
    with pytest.raises(SolverError, match="latency") as info:
        solve(small(latency_limit=6.0), "dp")
    assert info.value.binding == "latency"


def test_dp_refuses_a_table_too_large():
    cost, bits, sizes = convex_instance(300, 16)
    p = Problem(cost, bits + np.arange(16), 4 * 8 * float(sizes.sum()))  # gcd 1: a huge exact program
    with pytest.raises(SolverError, match="resolution_bits") as info:
        solve(p, "dp", max_states=1e6)
    assert info.value.binding == "solver"
    approx = solve(p, "dp", resolution_bits=4096)
    exact = solve(p, "ilp", backend="highs")
    assert approx.bound <= exact.objective * (1 + 1e-12) <= approx.objective * (1 + 1e-12)
    assert approx.details == {"budget_steps": approx.details["budget_steps"], "exact": False, "unit_bits": 4096}


def test_ties_without_a_common_option_name_the_groups():
    bits = np.array([[8.0, np.nan], [np.nan, 16.0]])
    p = Problem(np.zeros((2, 2)), bits, 100.0, group_names=("q", "k"), ties=((0, 1),))
    with pytest.raises(SolverError, match="tied groups q, k share no allowed option") as info:
        solve(p, "ilp")
    assert info.value.binding == "ties"


# ---- ties, repair, pareto, determinism ---------------------------------------------------------


def test_tie_classes_join_overlapping_ties():
    assert tie_classes(6, ((4, 1), (1, 2), (5, 3))) == [[0], [1, 2, 4], [3, 5]]


def test_merged_problem_sums_members():
    cost = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    bits = np.array([[8.0, 16.0], [8.0, np.nan], [8.0, 16.0]])
    p = Problem(cost, bits, 100.0, group_names=("a", "b", "c"), ties=((0, 2),))
    reduced, expand = merge_ties(p)
    assert reduced.group_names == ("a+c", "b")
    np.testing.assert_array_equal(reduced.cost[0], [6.0, 8.0])
    assert reduced.cost[1, 0] == 3.0  # (the disallowed cell's cost does not matter)
    np.testing.assert_array_equal(reduced.storage_bits, [[16.0, 32.0], [8.0, np.nan]])
    assert list(expand(np.array([1, 0]))) == [1, 0, 1]


def test_repair_reaches_the_budget_by_the_cheapest_cuts():
    cost = np.array([[5.0, 1.0], [5.0, 0.0], [5.0, 4.9]])
    bits = np.array([[10.0, 20.0], [10.0, 20.0], [10.0, 20.0]])
    p = Problem(cost, bits, 50.0)
    fixed = repair(p, np.array([1, 1, 1]), fallback=np.array([0, 0, 0]))
    assert list(fixed) == [1, 1, 0]  # group 2 loses least (0.1) per bit saved


def test_pareto_sweep_is_monotone_and_marks_the_frontier():
    cost, bits, sizes = convex_instance(50, 8, seed=2)
    p = Problem(cost, bits, 0.0 + 8 * 8 * float(sizes.sum()))
    n = 8 * float(sizes.sum())
    points = pareto_sweep(p, [3.0 * n, 4.0 * n, 4.0 * n, 6.0 * n], solver="lagrangian")
    objs = [pt.solution.objective for pt in points]
    assert objs[0] > objs[1] == objs[2] > objs[3]
    assert [pt.on_frontier for pt in points] == [True, True, False, True]  # a repeat is not a new point
    assert list(frontier_points([1, 2, 3], [3.0, 3.0, 1.0])) == [True, False, True]


@pytest.mark.parametrize("solver, kw", [("ilp", {"backend": "cbc"}), ("ilp", {"backend": "highs"}), ("dp", {}),
                                        ("lagrangian", {}), ("evolutionary", {"trials": 15, "seed": 3})])
def test_same_inputs_same_choice(solver, kw):
    cost, bits, sizes = convex_instance(40, 6, seed=4)
    p = Problem(cost, bits, 4.2 * 8 * float(sizes.sum()), ties=((0, 1, 2), (5, 9)))
    a, b = solve(p, solver, **kw), solve(p, solver, **kw)
    assert a.choice.tobytes() == b.choice.tobytes() and a.objective == b.objective
    assert a.choice[0] == a.choice[1] == a.choice[2] and a.choice[5] == a.choice[9]


def test_evolutionary_improves_a_true_objective_the_table_gets_wrong():
    # The true loss has an interaction the additive table cannot see: groups 0 and 1 at their
    # cheapest options together cost an extra 1.0. The search must find a better assignment.
    cost, bits, sizes = convex_instance(12, 6, seed=8)
    p = Problem(cost, bits, 4.0 * 8 * float(sizes.sum()))
    warm = solve(p, "ilp").choice

    def score(choice):
        extra = 1.0 if (choice[0] == warm[0] and choice[1] == warm[1]) else 0.0
        return float(cost[np.arange(len(choice)), choice].sum()) + extra

    score.description = "table + interaction"
    sol = solve(p, "evolutionary", score=score, trials=60, population=8, seed=0)
    assert sol.details["improvement"] > 0.5
    assert sol.details["best_score"] == pytest.approx(score(sol.choice))
    assert sol.settings["score"] == "table + interaction"  # a callback is recorded by its description
    assert sol.bound is None  # no bound on a true objective
    assert_feasible(p, sol)


def test_the_highs_backend_prints_nothing():
    # HiGHS prints a licence banner from its first constructor in a process; on stdout it would break
    # `plan --json`. A fresh interpreter, so that this is that first constructor.
    import subprocess
    import sys

    code = ("import numpy as np; from bitalloc.solvers import Problem, solve; "
            "p = Problem(np.array([[0.0, 1.0], [0.0, 2.0]]), np.array([[64.0, 32.0], [64.0, 32.0]]), 96.0); "
            "sol = solve(p, 'ilp', backend='highs'); assert sol.status == 'optimal' and list(sol.choice) == [1, 0]")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
