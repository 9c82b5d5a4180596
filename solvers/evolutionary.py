"""Evolutionary search over assignments, scored by a true objective (optuna's NSGA-II sampler).

The table's predicted losses add up module by module; the loss of the quantized model does not
(errors interact). This solver starts from the exact (or Lagrangian) assignment of the table
and lets a genetic algorithm try nearby assignments, each scored by a callback `score(choice)`
(the API passes one that applies the assignment to the model and measures the NLL on a
calibration slice). Without a callback it optimizes the table objective, which only the tests
and benchmarks want.

- Genes: one per group (tied groups are one group), the index of its option on the group's
  Pareto ladder (options sorted by bits, dominated ones dropped), within `radius` steps of
  the warm start: big jumps are almost never better and waste trials.
- Generation 0 is the warm start plus sparse mutations of it (seeded), so the search begins
  where the table says the optimum is, not at random.
- Every candidate is repaired toward the limits deterministically (cheapest predicted cost
  per bit or second saved first), so every scored assignment is feasible.
- Trials and timeout bound the search; with a fixed seed and no timeout hit, the same inputs
  give the same assignment. Identical assignments are scored once.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .base import Outcome, Problem, SolverError, _lookup, dominated, register_solver

WARM_STARTS = ("ilp", "lagrangian", "dp")


@register_solver("evolutionary", "genetic search (optuna NSGA-II) around the ilp plan, scored by the true loss on calibration text")
def solve_evolutionary(problem: Problem, score: Callable[[np.ndarray], float] | None = None, trials: int = 60,
                       timeout_s: float | None = None, seed: int = 0, warm_start: str = "ilp", radius: int = 2,
                       population: int = 16) -> Outcome:
    """score: true objective of an assignment (lower is better); None = the table's cost.
    trials / timeout_s: search budget. warm_start: solver whose assignment seeds the search.
    radius: how many ladder steps a gene may move from the warm start. population: NSGA-II
    generation size."""
    import optuna

    if warm_start not in WARM_STARTS:
        raise SolverError(f"evolutionary warm_start must be one of {', '.join(WARM_STARTS)}, got {warm_start!r}", binding="solver")
    if trials < 1 or population < 2 or radius < 1:
        raise SolverError("evolutionary needs trials >= 1, population >= 2 and radius >= 1", binding="solver")
    start = _lookup(warm_start)[0](problem)
    warm = np.asarray(start.choice, dtype=np.int64)
    table_score = score is None
    evaluate = (lambda c: float(problem.cost[np.arange(len(c)), c].sum())) if table_score else score

    ladders = _ladders(problem, warm)
    genes = {f"g{g:06d}": g for g, lad in enumerate(ladders) if len(lad) > 1}
    warm_pos = {name: ladders[g].index(int(warm[g])) for name, g in genes.items()}
    bounds = {name: (max(0, warm_pos[name] - radius), min(len(ladders[g]) - 1, warm_pos[name] + radius))
              for name, g in genes.items()}

    cache: dict[bytes, float] = {}

    def scored(choice: np.ndarray) -> float:
        key = choice.tobytes()
        if key not in cache:
            cache[key] = float(evaluate(choice))
        return cache[key]

    def objective(trial) -> float:
        choice = warm.copy()
        for name, g in genes.items():
            lo, hi = bounds[name]
            choice[g] = ladders[g][trial.suggest_int(name, lo, hi)]
        choice = repair(problem, choice, fallback=warm)
        trial.set_user_attr("choice", choice.tolist())
        return scored(choice)

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.enqueue_trial(warm_pos)
        rng = np.random.default_rng(seed)
        for params in _mutations(warm_pos, bounds, population - 1, rng):
            study.enqueue_trial(params)
        study.optimize(objective, n_trials=trials, timeout=timeout_s, n_jobs=1, gc_after_trial=False)
    finally:
        optuna.logging.set_verbosity(previous)
    done = [t for t in study.trials if t.value is not None]
    best = min(done, key=lambda t: (t.value, t.number))  # earliest among equals: deterministic
    warm_value = scored(warm)
    details = {
        "warm_start": warm_start,
        "objective": "table" if table_score else getattr(score, "description", "callback"),
        "warm_start_score": warm_value,
        "best_score": best.value,
        "improvement": warm_value - best.value,
        "distinct_assignments_scored": len(cache),
    }
    # On the table objective the warm start's bound still bounds the optimum; a true objective has none.
    bound = start.bound if table_score and start.status != "optimal" else None
    if table_score and start.status == "optimal":
        bound = float(problem.cost[np.arange(len(warm)), warm].sum())
    return Outcome(np.asarray(best.user_attrs["choice"], dtype=np.int64), "feasible", bound,
                   iterations=len(done), details=details)


def _ladders(problem: Problem, warm: np.ndarray) -> list[list[int]]:
    """Per group, its non-dominated options by increasing bits (the warm start's always included)."""
    latency = problem.latency if problem.has_latency_limit else None
    keep = problem.allowed & ~dominated(problem.cost, problem.storage_bits, problem.allowed, latency)
    keep[np.arange(len(warm)), warm] = True
    ladders = []
    for g in range(keep.shape[0]):
        ks = np.flatnonzero(keep[g])
        ladders.append([int(k) for k in ks[np.argsort(problem.storage_bits[g, ks], kind="stable")]])
    return ladders


def _mutations(warm_pos: dict[str, int], bounds: dict[str, tuple[int, int]], n: int, rng: np.random.Generator):
    """n sparse mutations of the warm start: a few genes moved one step each."""
    names = sorted(warm_pos)
    if not names:
        return
    per = max(1, math.ceil(len(names) / 20))
    for _ in range(n):
        params = dict(warm_pos)
        for i in rng.choice(len(names), size=min(per, len(names)), replace=False):
            name = names[int(i)]
            lo, hi = bounds[name]
            params[name] = int(np.clip(params[name] + rng.choice([-1, 1]), lo, hi))
        yield params


def repair(problem: Problem, choice: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Move groups to options with less storage (and less latency) until every limit holds:
    each step takes the move with the least predicted cost increase per unit of excess removed
    (ties: the lowest group and option). Never breaks a limit that holds. Falls back to
    `fallback` (a feasible assignment) if no move helps."""
    choice = choice.copy()
    rows = np.arange(len(choice))
    allowed = problem.allowed
    bits = np.where(allowed, problem.storage_bits, np.inf)
    lat = None if not problem.has_latency_limit else np.where(allowed, problem.latency, np.inf)
    cost = np.where(allowed, problem.cost, np.inf)
    for _ in range(int(allowed.sum()) + 1):
        if problem.feasible(choice):
            return choice
        over_b = bits[rows, choice].sum() - problem.max_storage_bits
        d_bits = bits - bits[rows, choice][:, None]
        ok = d_bits <= 0 if over_b > 0 else d_bits <= -over_b  # never worsen, never break
        progress = np.maximum(-d_bits, 0) / over_b if over_b > 0 else np.zeros_like(d_bits)
        if lat is not None:
            over_l = lat[rows, choice].sum() - problem.max_latency
            d_lat = lat - lat[rows, choice][:, None]
            ok &= d_lat <= 0 if over_l > 0 else d_lat <= -over_l
            if over_l > 0:
                progress = progress + np.maximum(-d_lat, 0) / over_l
        ok &= progress > 0
        if not ok.any():
            return fallback.copy()
        with np.errstate(all="ignore"):
            price = np.where(ok, (cost - cost[rows, choice][:, None]) / progress, np.inf)
        g, k = np.unravel_index(int(np.argmin(price)), price.shape)
        choice[g] = k
    return fallback.copy()
