"""bitalloc: mixed-precision bit allocation for LLM weights under a budget.

    import bitalloc
    plan = bitalloc.plan("model.gguf", budget="3.2bits")   # built-in calibration set; or calibration="text.txt" / "self"
    plan.save("plan.json")
    model = bitalloc.apply(model, bitalloc.Plan.load("plan.json"))

Every name below loads on first use (PEP 562), so `import bitalloc` and the command line start
without torch or transformers; only the steps that touch a model import them.
"""

from .lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(("plan", "plan_from_table", "profile", "solve"), ".api"),
    **dict.fromkeys(("pareto_from_profile", "plan_from_profile"), ".replan"),
    **dict.fromkeys(("CalibrationSpec", "ProfileConfig", "SolveConfig"), ".config"),
    "Constraints": ".constraints",
    **dict.fromkeys(("Pareto", "pareto", "pareto_from_table"), ".sweep"),
    "apply": ".apply",
    **dict.fromkeys(("Budget", "parse_budget"), ".budget"),
    **dict.fromkeys(("BadInputError", "BitallocError", "BudgetInfeasibleError", "PlanMismatchError", "PlanVersionError"),
                    ".errors"),
    **dict.fromkeys(("EvalResult", "evaluate", "evaluation_windows", "reference_logprobs"), ".evaluate"),
    **dict.fromkeys(("LoadedModel", "load_model"), ".models"),
    **dict.fromkeys(("StreamedModel", "open_streamed"), ".checkpoint"),
    **dict.fromkeys(("QuantOption", "default_options"), ".options"),
    "Plan": ".plan",
    **dict.fromkeys(("CheckpointReport", "save_checkpoint"), ".pack"),
}

__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
