"""Solvers pick one option per group under a storage budget. Installed as `bitalloc.solvers`.

Adding a solver is one new module that decorates a function with `@register_solver("name")`
and is imported below. Solvers see numpy arrays only: they never import torch or the model.
"""

from .base import Problem, Solution, SolverError, available_solvers, register_solver, solve  # noqa: F401
from . import dp, evolutionary, ilp, lagrangian  # noqa: E402,F401  (each registers itself)
from .pareto import ParetoPoint, frontier_points, pareto_sweep  # noqa: E402,F401
