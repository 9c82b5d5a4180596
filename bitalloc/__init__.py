"""bitalloc: mixed-precision bit allocation for LLM weights under a budget.

    import bitalloc
    plan = bitalloc.plan("model.gguf", budget="3.2bits")   # built-in calibration set; or calibration="text.txt" / "self"
    plan.save("plan.json")
    model = bitalloc.apply(model, bitalloc.Plan.load("plan.json"))
"""

from .api import plan, plan_from_table, profile
from .replan import pareto_from_profile, plan_from_profile
from .constraints import Constraints
from .sweep import Pareto, pareto, pareto_from_table
from .apply import apply
from .budget import Budget, parse_budget
from .errors import BadInputError, BitallocError, BudgetInfeasibleError, PlanMismatchError, PlanVersionError
from .evaluate import EvalResult, evaluate, evaluation_windows, reference_logprobs
from .models import LoadedModel, load_model
from .checkpoint import StreamedModel, open_streamed
from .options import QuantOption, default_options
from .plan import Plan
from .pack import CheckpointReport, save_checkpoint

__all__ = [
    "plan", "plan_from_table", "profile", "pareto", "pareto_from_table", "Pareto", "Constraints", "apply", "evaluate", "evaluation_windows", "reference_logprobs",
    "Plan", "Budget", "parse_budget", "QuantOption", "default_options", "LoadedModel", "load_model", "StreamedModel", "open_streamed",
    "EvalResult", "BitallocError", "BadInputError", "BudgetInfeasibleError", "PlanMismatchError",
    "PlanVersionError", "save_checkpoint", "CheckpointReport", "plan_from_profile", "pareto_from_profile",
]
