"""The one interface every solver implements: Problem in, Solution out, registered by name."""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class SolverError(Exception):
    """A solver could not produce an assignment; `binding` names the constraint when known
    ("storage budget", "latency", "storage budget and latency", "ties", "allowed options", "solver")."""

    def __init__(self, message: str, binding: str | None = None):
        super().__init__(message)
        self.binding = binding


@dataclass(frozen=True)
class Problem:
    """Multiple-choice knapsack: choose one column per row of `cost`, minimising total cost,
    with the total of `storage_bits` over the chosen cells at most `max_storage_bits`.

    cost, storage_bits: [groups, options]; storage is in whole bits, and a NaN in storage_bits
    marks a disallowed cell.
    latency: [groups, options] predicted seconds per cell; with max_latency, the chosen cells'
    total latency must not exceed it (a second knapsack row).
    ties: sets of group indices that must all choose the same option column (fused q/k/v,
    gate/up, the experts' same projection); overlapping sets join.
    """

    cost: np.ndarray
    storage_bits: np.ndarray
    max_storage_bits: float
    group_names: tuple[str, ...] = ()
    latency: np.ndarray | None = None
    max_latency: float | None = None
    ties: tuple[tuple[int, ...], ...] = ()

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
        if self.latency is not None:
            if self.latency.shape != self.cost.shape:
                raise ValueError(f"latency {self.latency.shape} must have the shape of cost {self.cost.shape}")
            lat = self.latency[self.allowed]
            if not np.isfinite(lat).all() or (lat < 0).any():
                raise ValueError("latency must be finite and non-negative wherever the option is allowed")
        if self.max_latency is not None and self.latency is None:
            raise ValueError("max_latency needs a latency matrix [groups, options]")
        G = self.cost.shape[0]
        for tie in self.ties:
            if any(not 0 <= g < G for g in tie):
                raise ValueError(f"tie {tie} names a group outside 0..{G - 1}")

    @functools.cached_property
    def allowed(self) -> np.ndarray:
        return np.isfinite(self.storage_bits)

    @property
    def has_latency_limit(self) -> bool:
        return self.max_latency is not None

    def name(self, g: int) -> str:
        return self.group_names[g] if self.group_names else f"#{g}"

    def bits_range(self) -> tuple[float, float]:
        """Smallest and largest total storage any assignment can have."""
        allowed = self.allowed
        low = np.where(allowed, self.storage_bits, np.inf).min(axis=1)
        high = np.where(allowed, self.storage_bits, -np.inf).max(axis=1)
        return float(low.sum()), float(high.sum())

    def min_bits(self) -> float:
        """Smallest total storage any assignment can have."""
        held = self.storage_bits if self.allowed.all() else np.where(self.allowed, self.storage_bits, np.inf)
        return float(held.min(axis=1).sum())

    def min_latency(self) -> float:
        """Smallest total latency any assignment can have (0 without a latency matrix)."""
        if self.latency is None:
            return 0.0
        return float(np.where(self.allowed, self.latency, np.inf).min(axis=1).sum())

    def evaluate(self, choice: np.ndarray) -> tuple[float, float]:
        """(total cost, total storage bits) of an assignment; raises if a chosen cell is disallowed."""
        rows = np.arange(len(choice))
        if not np.isfinite(self.storage_bits[rows, choice]).all():
            raise ValueError("assignment uses a disallowed option")
        return float(self.cost[rows, choice].sum()), float(self.storage_bits[rows, choice].sum())

    def total_latency(self, choice: np.ndarray) -> float | None:
        if self.latency is None:
            return None
        return float(self.latency[np.arange(len(choice)), choice].sum())

    def feasible(self, choice: np.ndarray) -> bool:
        """Within the storage budget and (if set) the latency limit."""
        _, bits = self.evaluate(choice)
        if bits > self.max_storage_bits:
            return False
        return not self.has_latency_limit or self.total_latency(choice) <= self.max_latency * (1 + LATENCY_RTOL)


# Latency is a float sum, and the order of summation (per tied set, then over sets) may move it
# by an ulp; storage is integral and gets no tolerance at all.
LATENCY_RTOL = 1e-9


@dataclass(frozen=True)
class Outcome:
    """What a registered solver function returns."""

    choice: np.ndarray  # [groups] index of the chosen option
    status: str  # "optimal" (proven) or "feasible"
    bound: float | None = None  # proven lower bound on the optimal objective, where known
    iterations: int | None = None  # solver-specific: relaxations, trials, DP stages, ...
    details: dict = field(default_factory=dict)  # deterministic facts worth recording in the plan


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
    iterations: int | None = None
    latency: float | None = None  # total predicted seconds of the choice, with a latency matrix
    details: dict = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        return relative_gap(self.objective, self.bound)


def relative_gap(objective: float, bound: float | None) -> float | None:
    """Relative distance to a lower bound: the most a solution can be worse than optimal."""
    if bound is None:
        return None
    return max(0.0, objective - bound) / max(abs(objective), 1e-300)


# fn(problem, **settings) -> Outcome
SolverFn = Callable[..., Outcome]
_SOLVERS: dict[str, tuple[SolverFn, str]] = {}


def register_solver(name: str, summary: str) -> Callable[[SolverFn], SolverFn]:
    """Register `fn(problem, **settings) -> Outcome` under `name`."""

    def deco(fn: SolverFn) -> SolverFn:
        _SOLVERS[name] = (fn, summary)
        return fn

    return deco


def available_solvers() -> dict[str, str]:
    return {name: summary for name, (_, summary) in sorted(_SOLVERS.items())}


def solver_settings(name: str) -> dict[str, object]:
    """The settings a solver takes, with their defaults."""
    fn, _ = _lookup(name)
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[1:]}


def _lookup(name: str) -> tuple[SolverFn, str]:
    if name not in _SOLVERS:
        raise SolverError(f"unknown solver {name!r}; available: {', '.join(sorted(_SOLVERS))}", binding="solver")
    return _SOLVERS[name]


def solve(problem: Problem, solver: str = "ilp", **settings) -> Solution:
    """Run a registered solver and check its answer against every constraint.

    Ties are handled here, once for every solver: tied groups become one group whose cost,
    storage and latency are the members' sums. A `score` setting (a true-objective callback,
    see the evolutionary solver) is called with assignments of the original groups.
    """
    fn, _ = _lookup(solver)
    accepted = set(inspect.signature(fn).parameters) - {"problem"}
    if unknown := sorted(set(settings) - accepted):
        raise SolverError(f"solver {solver} has no setting {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}", binding="solver")
    check_feasible_bounds(problem)
    reduced, expand = merge_ties(problem)
    if reduced is not problem:
        check_feasible_bounds(reduced)  # ties can raise the smallest storage or latency
    run_settings = dict(settings)
    if callable(run_settings.get("score")):
        run_settings["score"] = _ExpandedScore(run_settings["score"], expand)
    start = time.perf_counter()
    outcome = fn(reduced, **run_settings)
    seconds = time.perf_counter() - start
    choice = expand(np.asarray(outcome.choice, dtype=np.int64))
    objective, bits = problem.evaluate(choice)
    # No tolerance: storage is counted in whole bits and the budget is a hard limit.
    if bits > problem.max_storage_bits:
        raise SolverError(f"solver {solver} returned {bits:.6g} bits over the budget {problem.max_storage_bits:.6g}",
                          binding="storage budget")
    latency = problem.total_latency(choice)
    if problem.has_latency_limit and latency > problem.max_latency * (1 + LATENCY_RTOL):
        raise SolverError(f"solver {solver} returned {latency:.6g} s over the latency limit {problem.max_latency:.6g} s",
                          binding="latency")
    for tie in problem.ties:
        if len(set(choice[list(tie)])) > 1:
            raise SolverError(f"solver {solver} broke the tie of {', '.join(problem.name(g) for g in tie)}", binding="ties")
    # "optimal" without a bound means proven exactly optimal; solvers that stop within a gap say so.
    bound = objective if outcome.status == "optimal" and outcome.bound is None else outcome.bound
    recorded = {k: _describe_setting(v) for k, v in sorted(settings.items())}
    return Solution(choice, objective, bits, outcome.status, solver, recorded, seconds, bound,
                    outcome.iterations, latency, dict(sorted(outcome.details.items())))


def _describe_setting(value):
    # Callbacks cannot go into a JSON plan; their `description` (if any) says what they measure.
    if callable(value):
        return getattr(value, "description", "callback")
    return value


class _ExpandedScore:
    """A score callback over the original groups, called with assignments of the merged ones."""

    def __init__(self, score, expand):
        self.score, self.expand = score, expand
        self.description = getattr(score, "description", "callback")

    def __call__(self, choice: np.ndarray) -> float:
        return float(self.score(self.expand(np.asarray(choice, dtype=np.int64))))


def check_feasible_bounds(problem: Problem) -> None:
    """Raise, naming the constraint, when storage or latency alone cannot be met."""
    lo = problem.min_bits()
    if problem.max_storage_bits < lo:
        raise SolverError(
            f"budget of {problem.max_storage_bits:.6g} bits is below the smallest feasible {lo:.6g} bits",
            binding="storage budget",
        )
    if problem.has_latency_limit:
        fastest = problem.min_latency()
        if problem.max_latency * (1 + LATENCY_RTOL) < fastest:
            raise SolverError(
                f"latency limit of {problem.max_latency:.6g} s is below the smallest feasible {fastest:.6g} s",
                binding="latency",
            )


def infeasible_error(problem: Problem, solver: str) -> SolverError:
    """The error for 'no assignment meets every constraint', naming which ones bind."""
    if problem.has_latency_limit:
        return SolverError(f"{solver}: no assignment meets both the storage budget ({problem.max_storage_bits:.6g} bits) "
                           f"and the latency limit ({problem.max_latency:.6g} s); relax one of them",
                           binding="storage budget and latency")
    return SolverError(f"{solver}: no assignment fits the storage budget of {problem.max_storage_bits:.6g} bits",
                       binding="storage budget")


# ---- ties ------------------------------------------------------------------------------------


def tie_classes(n_groups: int, ties: tuple[tuple[int, ...], ...]) -> list[list[int]]:
    """Partition of 0..n_groups-1 into tied classes (union of overlapping ties), each sorted,
    ordered by their first member, so the merged problem is deterministic."""
    parent = list(range(n_groups))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for tie in ties:
        for g in tie[1:]:
            ra, rb = find(tie[0]), find(g)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    classes: dict[int, list[int]] = {}
    for g in range(n_groups):
        classes.setdefault(find(g), []).append(g)
    return sorted(classes.values(), key=lambda c: c[0])


def merge_ties(problem: Problem) -> tuple[Problem, Callable[[np.ndarray], np.ndarray]]:
    """One super-group per tied class: cost, storage and latency are the members' sums, and an
    option is allowed only where every member allows it. Returns the reduced problem and the
    map from its assignments back to the original groups."""
    if not any(len(t) > 1 for t in problem.ties):
        return problem, lambda choice: choice
    G = problem.cost.shape[0]
    classes = tie_classes(G, problem.ties)
    owner = np.empty(G, dtype=np.int64)
    for i, members in enumerate(classes):
        owner[members] = i

    def summed(a: np.ndarray) -> np.ndarray:
        out = np.zeros((len(classes), a.shape[1]))
        np.add.at(out, owner, a)  # NaN (disallowed) in any member stays NaN
        return out

    allowed = problem.allowed
    storage = summed(np.where(allowed, problem.storage_bits, np.nan))
    for members in classes:
        if len(members) > 1 and not np.isfinite(storage[owner[members[0]]]).any():
            names = ", ".join(problem.name(g) for g in members)
            raise SolverError(f"tied groups {names} share no allowed option", binding="ties")
    reduced = Problem(
        cost=summed(np.where(allowed, problem.cost, 0.0)),
        storage_bits=storage,
        max_storage_bits=problem.max_storage_bits,
        group_names=tuple("+".join(problem.name(g) for g in members) for members in classes),
        latency=None if problem.latency is None else summed(np.where(allowed, problem.latency, 0.0)),
        max_latency=problem.max_latency,
    )
    return reduced, lambda choice: np.asarray(choice, dtype=np.int64)[owner]


def dominated(cost: np.ndarray, bits: np.ndarray, allowed: np.ndarray, latency: np.ndarray | None = None) -> np.ndarray:
    """dom[g,k]: some other allowed option in group g has ≤ bits, ≤ cost (and ≤ latency), one of
    them strictly (exact ties keep the lower index, so the pruned program is deterministic)."""
    K = cost.shape[1]
    dom = np.zeros(cost.shape, dtype=bool)
    attrs = [np.where(allowed, a, np.inf) for a in (bits, cost) + (() if latency is None else (latency,))]
    for k in range(K):
        le = np.ones(cost.shape, dtype=bool)
        strict = np.zeros(cost.shape, dtype=bool)
        equal = np.ones(cost.shape, dtype=bool)
        for a in attrs:
            le &= a <= a[:, [k]]
            strict |= a < a[:, [k]]
            equal &= a == a[:, [k]]
        tie_first = equal & (np.arange(K)[None, :] < k)
        dom[:, k] = ((le & strict) | tie_first).any(axis=1)
    return dom & allowed
