"""Plan from a saved profile folder (`bitalloc profile --out DIR`): no model, no recomputation.

A profile holds the candidate table, the model record a plan needs (source, architecture, content
hash, embedding names, tied or not), the calibration settings and ids, and the options. Planning
from it solves the stored table directly, so re-planning at another budget, solver, error model or
with other constraints costs the solve alone.

Checks (every failure is a BadInputError naming the fix, never a silently used profile):
  - the folder's checksum (Profile.load): a damaged profile is refused: re-run `bitalloc profile`;
  - a profile without a candidate table (profiled without the `table` signal) is refused;
  - with a model given as well: its weight hash and planned modules must match the profile's,
    otherwise ProfileMismatchError. We refuse rather than recompute: the user named this profile,
    and silently profiling anew would take minutes and replace what they asked to use;
  - with calibration text given as well: its sha256 must be the profile's calibration text's.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from .budget import Budget
from .config import check_table_quantizer
from .constraints import Constraints
from .errors import BadInputError, ProfileMismatchError, setting, step
from .profile.artifact import Profile
from .sweep import Pareto, parse_budget_range

# What --protect-spikes keeps a flagged projection at, as a test on an offered option.
SPIKE_PRECISIONS = {
    "fp16": lambda o: o.fmt == "keep",
    "fp8": lambda o: o.fmt == "keep" or (o.fmt == "fp" and o.bits >= 8),  # float: the range spikes need
    "8bits": lambda o: o.bits >= 8,  # any format with at least 8 bits (int8 too)
}


def load_profile(profile_or_dir: Profile | str | Path) -> Profile:
    """A profile with a candidate table, read (and checksum-verified) from its folder if given as a path."""
    if isinstance(profile_or_dir, Profile):
        profile, where = profile_or_dir, "the profile"
    else:
        folder = Path(profile_or_dir)
        if folder.name == "profile.json":
            folder = folder.parent
        profile, where = Profile.load(folder), str(folder)
    if profile.table is None:
        raise BadInputError(f"{where} has no candidate table; profile again with 'table' in {setting('signals')} "
                            "(e.g. fisher,spikes,table)")
    if "model" not in profile.settings or "tied_embeddings" not in profile.settings["model"]:
        raise BadInputError(f"{where} was written by an older bitalloc that did not record the model's embedding "
                            f"layout; re-run {step('profile')} to plan from it")
    return profile


def check_profile_matches(profile: Profile, loaded, where: str = "the profile") -> None:
    """Raise ProfileMismatchError unless `loaded` has the profile's weights and planned modules."""
    from .models import select_modules

    record = profile.settings["model"]
    if loaded.content_hash != record["content_hash"]:
        raise ProfileMismatchError(
            f"{where} was computed for other weights ({record['source']}, {record['content_hash'][:19]}…), not "
            f"{loaded.source} ({loaded.content_hash[:19]}…); re-run {step('profile')} on this model, or plan "
            "from the profile alone (drop MODEL)")
    names = select_modules(loaded.model, bool(profile.settings.get("include_lm_head")),
                           bool(profile.settings.get("include_embeddings")))
    if names != profile.table.groups:
        raise ProfileMismatchError(f"{where} plans {len(profile.table.groups)} modules, the model has "
                                   f"{len(names)} to plan; re-run {step('profile')} on this model")


def check_calibration_matches(profile: Profile, text_path: str | Path, where: str = "the profile") -> None:
    """Raise ProfileMismatchError unless the text file is the one the profile was calibrated on."""
    from .calibration import read_text, text_sha256

    recorded = profile.settings.get("calibration", {})
    if text_sha256(read_text(text_path)) != recorded.get("text_sha256"):
        raise ProfileMismatchError(
            f"{where} was calibrated on {recorded.get('source')!r}, not on {Path(text_path).name!r} (the text "
            f"differs); drop {setting('calibration')} to use the profile's calibration, or re-run {step('profile')} with this text")


def flagged_modules(profile: Profile) -> list[str]:
    """Planned modules whose input or output activations the profile flagged as spiking."""
    if not any(m.spikes is not None for m in profile.modules):
        raise BadInputError(f"the profile has no activation spikes to protect; re-run {step('profile')} with "
                            f"'spikes' in {setting('signals')}")
    planned = set(profile.table.groups)
    return [m.name for m in profile.modules
            if m.spikes is not None and m.name in planned and (m.spikes.input.flagged or m.spikes.output.flagged)]


def spike_constraints(profile: Profile, precision: str, constraints: Constraints | None = None) -> Constraints:
    """`constraints` plus an allow rule keeping every flagged projection at >= `precision` (fp16, fp8, 8bits).

    The rule is an option filter per module (an exact-name regex), so it shows in the plan's
    constraints and combines with the user's own bounds, pins and filters like any --allow.
    """
    constraints = constraints or Constraints()
    test = SPIKE_PRECISIONS.get(precision)
    if test is None:
        raise BadInputError(f"unknown spike protection {precision!r}; choose one of {', '.join(SPIKE_PRECISIONS)}")
    flagged = flagged_modules(profile)
    if not flagged:
        return constraints
    labels = [o.label for o in profile.table.options if test(o)]
    if not labels:
        raise BadInputError(f"the profile's table offers no option at {precision} or above (offered: "
                            f"{', '.join(o.label for o in profile.table.options)}); profile with keep (fp16) offered, "
                            f"or choose another {setting('protect_spikes')} precision")
    modules = "^(" + "|".join(re.escape(n) for n in flagged) + ")$"
    options = "(" + "|".join(re.escape(lbl) for lbl in labels) + ")"
    return replace(constraints, allow=(*constraints.allow, (modules, options)))


def plan_from_profile(
    profile_or_dir: Profile | str | Path,
    budget: str | Budget,
    *,
    model: Any = None,
    tokenizer: Any = None,
    calibration: str | Path | None = None,
    solver: str = "ilp",
    solver_settings: dict | None = None,
    error_model: str | None = None,
    seed: int | None = None,
    constraints: Constraints | None = None,
    protect_spikes: str | None = None,
    latency_target=None,
    score_windows: int = 4,
    trust_remote_code: bool = False,
    quantizer: str | None = None,
):
    """Plan from a profile folder's candidate table, without the model (see the module docstring).

    model: optional; checked against the profile (weights, modules), and needed only by solvers that
    score plans on the model (evolutionary). calibration: optional text file, checked against the
    profile's. protect_spikes: 'fp16' | 'fp8' | '8bits' keeps the profile's flagged projections at
    that precision or above. seed: default the profile's. error_model: None = the table's default
    (config.default_error_model). quantizer: the one the plan will be applied with; None = the profile's.
    Another one is refused: the table holds the profile's quantizer's errors.
    """
    from .api import PlanContext, solve_table

    where = "the profile" if isinstance(profile_or_dir, Profile) else str(profile_or_dir)
    profile = load_profile(profile_or_dir)
    check_table_quantizer(profile.table.quantizer, quantizer, where,
                          f"drop {setting('quantizer')} to plan for {profile.table.quantizer}, or re-run {step('profile')} with "
                          f"{setting('quantizer')} {quantizer}")
    if calibration is not None:
        check_calibration_matches(profile, calibration, where)
    score_model = score_tokens = None
    if model is not None:
        from .models import as_loaded

        loaded = as_loaded(model, tokenizer, trust_remote_code=trust_remote_code)
        check_profile_matches(profile, loaded, where)
        score_model = loaded.model
        if profile.calibration_tokens is not None:
            import torch

            score_tokens = torch.as_tensor(profile.calibration_tokens)
    if protect_spikes is not None:
        constraints = spike_constraints(profile, protect_spikes, constraints)
    context = PlanContext(model=profile.settings["model"], calibration=profile.settings["calibration"],
                          score_model=score_model, score_tokens=score_tokens)
    return solve_table(profile.table, budget, context, solver=solver, solver_settings=solver_settings,
                       error_model=error_model, seed=profile.settings.get("seed", 0) if seed is None else seed,
                       constraints=constraints, latency_target=latency_target, score_windows=score_windows)


def pareto_from_profile(profile_or_dir: Profile | str | Path, budgets: list[Budget] | str, **plan_kwargs) -> Pareto:
    """One plan per budget from one profile (read once); plan_from_profile's keyword arguments apply to each."""
    from .solvers import frontier_points

    budgets = parse_budget_range(budgets) if isinstance(budgets, str) else budgets
    profile = load_profile(profile_or_dir)
    if plan_kwargs.get("model") is not None:  # load (and hash) a model source once, not per budget
        from .models import as_loaded

        plan_kwargs["model"] = as_loaded(plan_kwargs["model"], plan_kwargs.pop("tokenizer", None),
                                         trust_remote_code=plan_kwargs.get("trust_remote_code", False))
    plans = [plan_from_profile(profile, b, **plan_kwargs) for b in budgets]
    on = frontier_points([p.summary.storage_bits_per_weight for p in plans], [p.summary.predicted_delta_loss for p in plans])
    return Pareto(plans, [bool(v) for v in on])
