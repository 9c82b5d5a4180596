"""The pipeline as one call: model + calibration + budget -> Plan. The CLI calls only this module."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import solvers
from .budget import Budget, Outside, gguf_typed, parse_budget
from .config import (KEYLESS_QUANTIZER, CalibrationSpec, ProfileConfig, RaySpec, SolveConfig, check_solver_names,
                     default_error_model, default_quantizer, supplied_calibration)
from .constraints import Constraints, constraint_masks
from .errors import BadInputError, BudgetInfeasibleError, NonFiniteError, setting, step
from .io import check_output_dir
from .options import QuantOption
from .plan import Assignment, BudgetSpec, LatencySpec, ModelSpec, Plan, SolverSpec, summarize
from .plan import sig6 as _sig
from .profile.store import default_cache_dir  # noqa: F401  (numpy-only; bench and the notebook use api.default_cache_dir)
from .table import CandidateTable
from .uniform import uniform_floor

if TYPE_CHECKING:  # torch (or, for latency, pydantic models); imported where they are called
    import torch

    from .calibration import Calibration
    from .checkpoint import StreamedModel
    from .latency.planning import LatencyInputs, LatencyTarget
    from .models import LoadedModel
    from .profile.artifact import Profile


def bitalloc_version() -> str:
    try:
        return version("bitalloc")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def resolve_calibration(calibration: Any, loaded: LoadedModel, seq_len: int, tokens: int, seed: int) -> Calibration:
    """None: the built-in set; "self": text sampled from the model; a path: that text file; ids: as given."""
    from .models import check_token_ids

    calib = _calibration(calibration, loaded, seq_len, tokens, seed)
    check_token_ids(loaded.model, calib.tokens, "calibration token ids")
    return calib


def _calibration(calibration: Any, loaded: LoadedModel, seq_len: int, tokens: int, seed: int) -> Calibration:
    import torch

    from .calibration import (BUILTIN_CALIBRATION, BUILTIN_PREFIX, SELF_CALIBRATION, Calibration, builtin_text,
                              calibration_from_tokens, make_calibration, read_text)

    if isinstance(calibration, Calibration):
        return calibration
    if isinstance(calibration, torch.Tensor):
        return calibration_from_tokens(calibration, seed=seed)
    if calibration is None:
        return make_calibration(loaded.tokenizer, builtin_text(), seq_len=seq_len, tokens=tokens, seed=seed,
                                source=f"{BUILTIN_PREFIX}{BUILTIN_CALIBRATION}")
    if isinstance(calibration, str) and calibration == SELF_CALIBRATION:
        from .calibration_self import self_calibration

        return self_calibration(loaded.model, loaded.tokenizer, seq_len=seq_len, tokens=tokens, seed=seed)
    if isinstance(calibration, (str, Path)):
        text = read_text(calibration)
        return make_calibration(loaded.tokenizer, text, seq_len=seq_len, tokens=tokens, seed=seed, source=Path(calibration).name)
    raise BadInputError("calibration must be a text file path, 'self', token ids [windows, seq_len], or None (the built-in set)")


def profile(
    loaded: LoadedModel,
    calibration: Calibration,
    module_names: list[str],
    options: list[QuantOption],
    cache_dir: Path | None = None,
    progress: bool = False,
    quantizer: str | None = ProfileConfig.quantizer,
    ray: RaySpec | None = None,
    trust_remote_code: bool = False,
) -> CandidateTable:
    """Candidate table for these modules and options, from the cache when an identical one exists.

    quantizer: whose ΔW the errors measure (gptq uses each layer's H from the unquantized model's
    calibration inputs); None: config.default_quantizer(options), awq-gptq for a model equalized first
    (api.equalized) and rtn-w for one as it is.
    ray: compute it on a Ray cluster (profile/distributed.py); trust_remote_code: for the workers' loads.
    """
    from .candidates import build_candidate_table
    from .checkpoint import StreamedModel
    from .profile.statistics import collect_statistics
    from .profile.store import content_key, load_table, numerics_fingerprint, save_table
    from .profile.streamed import streamed_candidate_table
    from .equalize import weights_before
    from .quantizers import equalizes

    supplied = supplied_calibration(calibration)
    quantizer = quantizer or default_quantizer(options, foldable=weights_before(getattr(loaded, "model", None)) is not None)
    if equalizes(quantizer) and weights_before(getattr(loaded, "model", None)) is None:
        raise BadInputError(f"{setting('quantizer')} {quantizer} measures the equalized model: profile through "
                            "prepare_profile or profile_model (they fold the scales in), or fold them first with "
                            "api.equalized")
    key = content_key(
        {
            "model": loaded.content_hash,
            "calibration": calibration.settings(),
            "modules": module_names,
            "options": [o.to_dict() for o in options],
            "quantizer": quantizer,
            "bitalloc": bitalloc_version(),
            "code": numerics_fingerprint(),
            **_shards(ray),
        }
    )
    if cache_dir is not None and (table := load_table(cache_dir, key)) is not None:
        return table
    loaded.model.eval()
    if ray is not None:
        from .profile.distributed import RayPool, ray_candidate_table

        pool = RayPool(ray, loaded, trust_remote_code)
        try:
            table = ray_candidate_table(pool, module_names, calibration, options, quantizer=quantizer, progress=progress)
        finally:
            pool.close()
    elif isinstance(loaded, StreamedModel):  # weights stay on disk; one block is loaded at a time
        table = streamed_candidate_table(loaded, module_names, calibration, options, progress=progress, quantizer=quantizer)
    else:
        stats = collect_statistics(loaded.model, module_names, calibration, progress=progress)
        table = build_candidate_table(loaded.model, module_names, stats, options, progress=progress, quantizer=quantizer,
                                      supplied=supplied)
    if cache_dir is not None:
        save_table(cache_dir, key, table)
    return table


def _shards(ray: RaySpec | None) -> dict:
    """The cache-key entry of a sharded profile: k > 1 shards sum in another float32 order (distributed.py),
    so such a table is cached apart from the single-process one, which one worker reproduces exactly."""
    return {"shards": ray.workers} if ray is not None and ray.workers > 1 else {}


def profile_model(
    model_or_source: Any,
    calibration: Any = None,
    out: str | Path = "profile",
    *,
    config: ProfileConfig | None = None,
    signals: tuple[str, ...] | list[str] | None = None,
    options: list[QuantOption] | None = None,
    tokenizer: Any = None,
    seq_len: int = CalibrationSpec.seq_len,
    calib_tokens: int = CalibrationSpec.tokens,
    seed: int = CalibrationSpec.seed,
    include_lm_head: bool = ProfileConfig.include_lm_head,
    include_embeddings: bool = ProfileConfig.include_embeddings,
    progress: bool = False,
    trust_remote_code: bool = False,
    stream: bool = ProfileConfig.stream,
    quantizer: str | None = ProfileConfig.quantizer,
    ray: RaySpec | None = None,
    **settings: Any,
) -> Profile:
    """All requested sensitivity signals of the planned modules, saved as a profile folder `out`.

    A complete profile in `out` for the same weights, calibration, modules and settings is read
    instead of recomputed; an interrupted one resumes from its finished blocks. `settings` are the
    fields of ProfileSettings (trace_tol, trace_max_probes, spike_threshold, interaction_option, ...).
    config: the ProfileConfig (calibration, options, planned modules, quantizer, stream); without it
    one is built from calibration/options/seq_len/.../quantizer. The table's errors are `quantizer`'s.
    stream: one decoder block in memory at a time (a local checkpoint path; every signal; the trace is then
    the empirical-Fisher trace, settings trace_estimator="empirical-fisher").
    ray: fisher, salience, spikes and the table computed on a Ray cluster (profile/distributed.py).
    """
    from .profile.pipeline import DEFAULT_SIGNALS, ProfileSettings, code_fingerprint, compute_profile
    from .profile.store import content_key

    if config is None:
        config = _profile_config(calibration, options, seq_len, calib_tokens, seed, include_lm_head,
                                 include_embeddings, quantizer, stream, ray)
    if config.stream and "trace" in (signals or DEFAULT_SIGNALS):
        settings.setdefault("trace_estimator", "empirical-fisher")  # Hutchinson needs the whole model
    try:
        prof_settings = ProfileSettings(signals=tuple(signals or DEFAULT_SIGNALS), seed=config.calibration.seed,
                                        **settings)
    except TypeError as e:
        raise BadInputError(f"{e}; see ProfileSettings for the profile settings") from None
    check_output_dir(out)
    if "interactions" in prof_settings.signals:
        from .quantizers import check_without_hessian, measuring_quantizer

        check_without_hessian(measuring_quantizer(config.quantizer), "the interactions signal",
                                 f"profile interactions with {setting('quantizer')} rtn, rtn-mse or rtn-w, or drop 'interactions'")
    loaded, calib, module_names = _load_for_profile(model_or_source, config, tokenizer, trust_remote_code, "ilp",
                                                    progress)
    options = list(config.options)
    parts = {
        "model": loaded.content_hash,
        "calibration": calib.settings(),
        "modules": module_names,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(prof_settings).items()},
        "options": [o.to_dict() for o in options] if "table" in prof_settings.signals else [],
        "bitalloc": bitalloc_version(),
        "code": code_fingerprint(),
    }
    if config.quantizer != KEYLESS_QUANTIZER:  # rtn stays out, so existing keys do not move
        parts["quantizer"] = config.quantizer
    parts.update(_shards(config.ray))
    meta = {"model": model_record(loaded), "calibration": calib.settings(), "bitalloc_version": bitalloc_version(),
            "include_lm_head": config.include_lm_head, "include_embeddings": config.include_embeddings}
    from .checkpoint import StreamedModel

    pool = None
    if config.ray is not None:
        from .profile.distributed import RayPool

        pool = RayPool(config.ray, loaded, trust_remote_code)  # its actors start only if there is work for them
    try:
        return compute_profile(loaded.model, module_names, calib, content_key(parts), prof_settings, Path(out),
                               options=options, meta=meta, progress=progress, quantizer=config.quantizer,
                               streamed_from=loaded if isinstance(loaded, StreamedModel) else None, ray_pool=pool)
    finally:
        if pool is not None:
            pool.close()


def model_record(loaded: LoadedModel) -> dict:
    """What a plan needs to know about the model, so that planning from a profile needs no model."""
    from .models import input_embedding_name, output_embedding_name, tied_embeddings

    model = loaded.model
    return {"source": loaded.source, "architecture": type(model).__name__, "content_hash": loaded.content_hash,
            "output_embedding": output_embedding_name(model), "input_embedding": input_embedding_name(model),
            "tied_embeddings": tied_embeddings(model), "total_weights": total_weights(model)}


def total_weights(model: torch.nn.Module) -> int:
    """Elements of every parameter, a tied tensor counted once (named_parameters dedups shared ones)."""
    return int(sum(p.numel() for _, p in model.named_parameters()))


def plan(
    model_or_source: Any,
    budget: str | Budget,
    calibration: Any = None,
    *,
    tokenizer: Any = None,
    solver: str = SolveConfig.solver,
    solver_settings: dict | None = None,
    options: list[QuantOption] | None = None,
    error_model: str | None = SolveConfig.error_model,
    seq_len: int = CalibrationSpec.seq_len,
    calib_tokens: int = CalibrationSpec.tokens,
    seed: int = SolveConfig.seed,
    include_lm_head: bool = ProfileConfig.include_lm_head,
    include_embeddings: bool = ProfileConfig.include_embeddings,
    cache_dir: str | Path | None | bool = None,
    progress: bool = False,
    trust_remote_code: bool = False,
    constraints: Constraints | None = None,
    latency_target: LatencyTarget | None = None,
    stream: bool = ProfileConfig.stream,
    quantizer: str | None = ProfileConfig.quantizer,
    verify: Any = False,
    ray: RaySpec | None = None,
) -> Plan:
    """Choose one option per planned module so that storage fits `budget` and predicted loss is least.

    model_or_source: an nn.Module (pass `tokenizer` if calibration is text), a LoadedModel, or a
    source string (hub id, directory, .gguf). calibration: None (the built-in set,
    bitalloc/data/calibration/), "self" (sampled from the model with `seed`), a text file path, token ids
    [windows, seq_len], or a Calibration. cache_dir: a folder for the profile cache, True = the
    default cache (~/.cache/bitalloc or $BITALLOC_CACHE_DIR), None/False (default) = no cache.
    constraints: bit bounds, pins, option filters, ties (see bitalloc.constraints).
    latency_target: hardware profile (+ tokens, optional whole-forward limit) to predict and cap latency.
    stream: profile with one decoder block in memory at a time (a local checkpoint path only; same table).
    quantizer: the quantizer the plan will be applied with (rtn or gptq); the candidate errors are
    that quantizer's, and the plan records it so `apply` uses it.
    The keyword arguments build a ProfileConfig and a SolveConfig: see solve(prepare_profile(...)).
    verify: True or a verify.VerifySettings: measure the plan on held-back calibration windows, repair
    it, and never return one that measures worse than the best fitting uniform option (bitalloc/verify.py).
    ray: a config.RaySpec: profile on a Ray cluster (profile/distributed.py).
    """
    solve_config = SolveConfig(budget=budget, solver=solver, solver_settings=solver_settings or (),
                               error_model=error_model, constraints=constraints or Constraints(),
                               latency_target=latency_target, seed=seed)
    config = _profile_config(calibration, options, seq_len, calib_tokens, seed, include_lm_head, include_embeddings,
                             quantizer, stream, ray)
    table, loaded, calib = prepare_profile(model_or_source, config, tokenizer=tokenizer, cache_dir=cache_dir,
                                           progress=progress, trust_remote_code=trust_remote_code, solver=solver)
    context = context_of(loaded, calib)
    plan = solve(table, context, solve_config)
    if not verify:
        return plan
    return _verified(plan, table, solve_config.budget, loaded, calib, verify, context, solve_config.solve_kwargs())


def _profile_config(calibration, options, seq_len, calib_tokens, seed, include_lm_head, include_embeddings,
                    quantizer, stream, ray=None) -> ProfileConfig:
    """The ProfileConfig of the keyword-argument entry points (options None or empty: the default grid)."""
    grid = {"options": tuple(options)} if options else {}
    return ProfileConfig(calibration=CalibrationSpec(source=calibration, seq_len=seq_len, tokens=calib_tokens, seed=seed),
                         include_lm_head=include_lm_head, include_embeddings=include_embeddings, quantizer=quantizer,
                         stream=stream, ray=ray, **grid)


def prepare(model_or_source: Any, calibration: Any, *, tokenizer: Any = None, solver: str = SolveConfig.solver,
            options: list[QuantOption] | None = None, error_model: str | None = SolveConfig.error_model,
            seq_len: int = CalibrationSpec.seq_len, calib_tokens: int = CalibrationSpec.tokens,
            seed: int = CalibrationSpec.seed, include_lm_head: bool = ProfileConfig.include_lm_head,
            include_embeddings: bool = ProfileConfig.include_embeddings,
            cache_dir: str | Path | None | bool = None, progress: bool = False,
            trust_remote_code: bool = False, stream: bool = ProfileConfig.stream,
            quantizer: str | None = ProfileConfig.quantizer,
            ray: RaySpec | None = None) -> tuple[CandidateTable, LoadedModel, Calibration]:
    """Check the arguments, load the model, build the calibration and the candidate table.

    The keyword form of prepare_profile (they build its ProfileConfig); solver and error_model are
    checked here so that a typo fails before the model loads.
    stream: keep the weights in the checkpoint and profile one decoder block at a time
    (profile/streamed.py); the table, and its cache entry, are those of the whole-model path.
    ray: a config.RaySpec: statistics and rows on a Ray cluster (profile/distributed.py).
    """
    check_solver_names(solver, error_model)
    config = _profile_config(calibration, options, seq_len, calib_tokens, seed, include_lm_head, include_embeddings,
                             quantizer, stream, ray)
    return prepare_profile(model_or_source, config, tokenizer=tokenizer, cache_dir=cache_dir, progress=progress,
                           trust_remote_code=trust_remote_code, solver=solver)


def prepare_profile(model_or_source: Any, config: ProfileConfig, *, tokenizer: Any = None,
                    cache_dir: str | Path | None | bool = None, progress: bool = False, trust_remote_code: bool = False,
                    solver: str = SolveConfig.solver) -> tuple[CandidateTable, LoadedModel, Calibration]:
    """Load the model, build the calibration windows and the candidate table that `config` describes.

    cache_dir: a profile-cache folder, True = the default one, None/False = none (profile.store.cache_folder).
    solver: only to refuse streaming with a solver that scores plans on the loaded model.
    """
    from .profile.store import cache_folder

    cache = cache_folder(cache_dir)
    loaded, calib, module_names = _load_for_profile(model_or_source, config, tokenizer, trust_remote_code, solver,
                                                    progress, cache)
    table = profile(loaded, calib, module_names, list(config.options), cache_dir=cache, progress=progress,
                    quantizer=config.quantizer, ray=config.ray, trust_remote_code=trust_remote_code)
    return table, loaded, calib


def _load_for_profile(model_or_source: Any, config: ProfileConfig, tokenizer: Any, trust_remote_code: bool,
                      solver: str, progress: bool = False,
                      cache_dir: Path | None = None) -> tuple[LoadedModel, Calibration, list[str]]:
    from .models import as_loaded, check_weights, select_modules
    from .quantizers import equalizes

    loaded = _open_streamed(model_or_source, solver, trust_remote_code) if config.stream else \
        as_loaded(model_or_source, tokenizer, trust_remote_code=trust_remote_code)
    if not config.stream:  # a streamed model's weights are read block by block; its statistics are checked instead
        check_weights(loaded.model)
    c = config.calibration
    calib = resolve_calibration(c.source, loaded, c.seq_len, c.tokens, c.seed)
    names = select_modules(loaded.model, config.include_lm_head, config.include_embeddings)
    if equalizes(config.quantizer):
        if config.stream or config.ray is not None:
            raise BadInputError(f"{setting('quantizer')} {config.quantizer} folds scales into the whole model, which "
                                f"{setting('stream' if config.stream else 'ray')} never holds in one place: drop one of them")
        loaded = equalized(loaded, calib, copy_model=not isinstance(model_or_source, (str, Path)), progress=progress,
                           cache_dir=cache_dir)
    return loaded, calib, names


def equalized(loaded: LoadedModel, calib: Calibration, copy_model: bool, progress: bool = False,
              cache_dir: Path | None = None) -> LoadedModel:
    """The model with equalization folded in (equalize.py) on the calibration windows, as `apply` folds it
    before quantizing: what an equalizing quantizer (awq) is profiled on. copy_model: fold a copy (a model
    the caller passed is left as it was); the content hash stays the given weights', which apply checks.
    cache_dir: keep the scales there (a few KB; equalize_cache.py), so a profile read from the cache, and apply,
    fold them without searching again."""
    import copy

    from .equalize import weights_before
    from .equalize_cache import equalize_cached
    from .models import LoadedModel

    model = copy.deepcopy(loaded.model) if copy_model else loaded.model
    equalize_cached(model, calib.tokens, cache_dir, loaded.content_hash, progress=progress)
    return LoadedModel(model, loaded.tokenizer, loaded.source, weights_before(model))


def _open_streamed(source: Any, solver: str, trust_remote_code: bool) -> StreamedModel:
    from .checkpoint import StreamedModel, open_streamed

    if isinstance(source, StreamedModel):
        return source
    if not isinstance(source, (str, Path)):
        raise BadInputError("streaming reads the weights from a checkpoint: pass the model as a local path "
                            "(directory with config.json + safetensors, or a .gguf file), or drop stream")
    if "score" in solvers.base.solver_settings(solver):
        raise BadInputError(f"solver {solver!r} scores candidate plans on the loaded model, which streaming never "
                            f"holds; drop {setting('stream')} or choose another solver")
    return open_streamed(str(source), trust_remote_code=trust_remote_code)


def context_of(loaded: LoadedModel, calibration: Calibration) -> PlanContext:
    """The PlanContext of a loaded model and its calibration (a scoring solver measures on both)."""
    return PlanContext(model=model_record(loaded), calibration=calibration.settings(), score_model=loaded.model,
                       score_tokens=calibration.tokens, windows=calibration)


def solve(table: CandidateTable, context: PlanContext, config: SolveConfig) -> Plan:
    """The plan `config` chooses from `table` (SolveConfig's step); the plan records the table's quantizer."""
    return solve_table(table, config.budget, context, **config.solve_kwargs())


def plan_from_table(
    table: CandidateTable,
    budget: str | Budget,
    loaded: LoadedModel,
    calibration: Calibration,
    *,
    solver: str = SolveConfig.solver,
    solver_settings: dict | None = None,
    error_model: str | None = SolveConfig.error_model,
    seed: int = SolveConfig.seed,
    constraints: Constraints | None = None,
    latency: np.ndarray | None = None,
    max_latency: float | None = None,
    latency_target: LatencyTarget | None = None,
    score_windows: int = SolveConfig.score_windows,
    verify: Any = False,
) -> Plan:
    """Solve an existing candidate table at a budget (re-planning without re-profiling).

    latency_target: a measured hardware profile (+ tokens per forward and an optional limit on the
    whole forward pass); the plan then reports its predicted latency and, with a limit, meets it.
    latency / max_latency: the raw form — [modules, options] seconds and a cap on their sum.
    score_windows: calibration windows the evolutionary solver's true objective is measured on
    (unless solver_settings has a score).
    verify: True or a verify.VerifySettings: check the plan against measured loss on the calibration's
    held-back windows and repair it (see plan()).
    """
    context = context_of(loaded, calibration)
    settings = dict(solver=solver, solver_settings=solver_settings, error_model=error_model, seed=seed,
                    constraints=constraints, latency=latency, max_latency=max_latency, latency_target=latency_target,
                    score_windows=score_windows)
    plan = solve_table(table, budget, context, **settings)
    if not verify:
        return plan
    return _verified(plan, table, parse_budget(budget), loaded, calibration, verify, context, settings)


def _verified(plan: Plan, table: CandidateTable, budget: Budget, loaded: LoadedModel, calibration: Calibration,
              verify: Any, context: PlanContext, settings: dict) -> Plan:
    from .checkpoint import StreamedModel
    from .verify import VerifySettings, verify_plan

    constraints = settings["constraints"] or Constraints()
    if settings.get("latency") is not None or settings.get("latency_target") is not None or constraints.max_latency:
        raise BadInputError(f"{setting('verify')} does not handle latency profiles or limits yet: drop one of them")
    if isinstance(loaded, StreamedModel):
        raise BadInputError(f"{setting('verify')} runs the whole model on held-back calibration windows; drop {setting('stream')}")
    outside = outside_plan(table, context.model) if budget.scope == "model" else None
    # the error model the plan was solved under, which the repairs re-solve under too
    error_model = settings["error_model"] or default_error_model(table.options)
    settings = {**settings, "error_model": error_model}
    max_bits = budget.max_storage_bits(table.num_weights, outside)

    def uniform(choice: np.ndarray) -> Plan:
        rows = np.arange(len(table.groups))
        solution = solvers.Solution(choice=choice, objective=float(table.errors_of(error_model)[rows, choice].sum()),
                                    storage_bits=float(table.storage_bits[rows, choice].sum()), status="feasible",
                                    solver="uniform", details={"chosen_by": "verify: measured better than the solved plan"})
        return _make_plan(table, solution, budget, max_bits, context, error_model, settings["seed"],
                          constraints if constraints.active else None, outside=outside)

    return verify_plan(plan, table, loaded.model, calibration, verify if isinstance(verify, VerifySettings) else VerifySettings(),
                       error_model=error_model,
                       allowed=constraint_masks(table, with_uniform_floor(table, constraints, error_model, max_bits)[0]).allowed,
                       max_storage_bits=max_bits, resolve=lambda t: solve_table(t, budget, context, **settings),
                       uniform_plan=uniform)


@dataclass(frozen=True)
class PlanContext:
    """What a plan records about its model and calibration, and what a search solver scores plans on.

    model: model_record() (source, architecture, content hash, embedding names, tied or not).
    score_model / score_tokens: the model and calibration ids [windows, seq_len] for solvers that
    measure the true loss (evolutionary); None when planning from a profile without the model.
    windows: the Calibration a plan made in this process remembers (Plan.made_on), default score_tokens;
    apply draws more of its text from it for GPTQ's Hessians (quantize_model's hessian_tokens).
    """

    model: dict
    calibration: dict
    score_model: Any = None
    score_tokens: Any = None
    windows: Any = None


def solve_table(
    table: CandidateTable,
    budget: str | Budget,
    context: PlanContext,
    *,
    solver: str = SolveConfig.solver,
    solver_settings: dict | None = None,
    error_model: str | None = SolveConfig.error_model,
    seed: int = SolveConfig.seed,
    constraints: Constraints | None = None,
    latency: np.ndarray | None = None,
    max_latency: float | None = None,
    latency_target: LatencyTarget | None = None,
    score_windows: int = SolveConfig.score_windows,
) -> Plan:
    """plan_from_table's work, given what the plan records instead of a loaded model (see PlanContext)."""
    budget = parse_budget(budget)
    check_solver_names(solver, error_model)
    error_model = error_model or default_error_model(table.options)
    table.errors_of(error_model)  # refuse a table made without it now, before any solving
    constraints = constraints or Constraints()
    timing = None
    if latency_target is not None:
        if latency is not None or max_latency is not None or constraints.max_latency is not None:
            raise BadInputError("give the latency either as a hardware profile (latency_target) or as a matrix with a cap, not both")
        from .latency.planning import latency_inputs

        timing = latency_inputs(latency_target, context.model["architecture"], table.shapes, table.options, table.allowed)
        latency, max_latency = timing.matrix, timing.max_layers_s
    if max_latency is None:
        max_latency = constraints.max_latency
    if max_latency is not None and latency is None:
        raise BadInputError("a latency limit needs a latency matrix: pass latency=[modules, options] "
                            "predicted seconds (from a hardware profile)")
    if latency is not None and np.shape(latency) != table.storage_bits.shape:
        raise BadInputError(f"latency has shape {list(np.shape(latency))}, the table is {list(table.storage_bits.shape)} "
                            "(modules x options)")
    n = table.num_weights
    total = context.model.get("total_weights")  # absent in profiles made before whole-model sizes
    unplanned = None if total is None else total - n
    outside = outside_plan(table, context.model) if budget.scope == "model" else None
    max_bits = budget.max_storage_bits(n, outside)
    resolved, floor = with_uniform_floor(table, constraints, error_model, max_bits)
    masks = constraint_masks(table, resolved)
    cost = _finite_costs(table, error_model)
    problem = solvers.Problem(
        cost=cost,
        storage_bits=np.where(masks.allowed, table.storage_bits, np.nan),
        max_storage_bits=max_bits,
        group_names=tuple(table.groups),
        latency=None if latency is None else np.asarray(latency, dtype=np.float64),
        max_latency=None if max_latency is None else float(max_latency),
        ties=masks.ties,
    )
    lo, hi = problem.bits_range()
    if max_bits < lo:
        under = " under these constraints" if constraints.active else ""
        raise BudgetInfeasibleError(
            f"budget {budget.text}{_scope_text(outside)} is below the smallest feasible {budget.describe(lo, n, outside)}{under} "
            f"(feasible: {budget.describe(lo, n, outside)} to {budget.describe(hi, n, outside)}); "
            f"raise the budget or offer fewer bits ({setting('bits')})"
        )
    settings = dict(solver_settings or {})
    accepted = solvers.base.solver_settings(solver)
    if "seed" in accepted and "seed" not in settings:
        settings["seed"] = seed  # a searching solver follows the plan's seed
    score = None
    if "score" in accepted and "score" not in settings:
        if context.score_model is None or context.score_tokens is None:
            raise BadInputError(f"solver {solver!r} scores candidate plans on the model itself: pass the model "
                                f"beside the profile to {step('plan')} or choose another {setting('solver')} (ilp, lagrangian, dp)")
        from .objective import CalibrationScore

        score = CalibrationScore(context.score_model, table, context.score_tokens[:score_windows],
                                 importance_tokens=context.score_tokens)
        settings["score"] = score
    try:
        solution = solvers.solve(problem, solver, **settings)
    except solvers.SolverError as e:
        error = BudgetInfeasibleError if e.binding in ("storage budget", "latency", "storage budget and latency") else BadInputError
        raise error(f"{e} (binding: {e.binding or 'unknown'})") from None
    finally:
        if score is not None:
            score.restore()
    if constraints.min_bits == "uniform":
        solution.details["min_bits_uniform"] = "none: no uniform plan fits" if floor is None else f"{floor[0]} ({floor[1]})"
    return _make_plan(table, solution, budget, max_bits, context, error_model, seed,
                      constraints if constraints.active else None, timing, masks.tie_kinds, unplanned, outside)


def with_uniform_floor(table: CandidateTable, constraints: Constraints, error_model: str,
                       max_bits: float) -> tuple[Constraints, tuple[int, str] | None]:
    """constraints with min_bits "uniform" resolved to the bits of the best-predicted uniform plan that fits
    max_bits (no floor where none fits), and that (bits, label); other constraints as they are, and None."""
    if constraints.min_bits != "uniform":
        return constraints, None
    unfloored = replace(constraints, min_bits=None)
    floor = uniform_floor(table, table.errors_of(error_model), constraint_masks(table, unfloored).allowed, max_bits)
    return (unfloored if floor is None else replace(constraints, min_bits=floor[0])), floor


def _scope_text(outside: Outside | None) -> str:
    return "" if outside is None else f" (whole model: {outside.what} included)"


def outside_plan(table: CandidateTable, model: dict) -> Outside | None:
    """What a whole-model budget holds besides the planned weights, as the plan's target stores the model.

    A plan in GGUF types (every option gguf or kept) of a .gguf model or a checkpoint folder bitalloc
    converts is a llama.cpp file: the file's own header, metadata and unplanned tensors as written
    (gguf_file.file_outside). Any other plan: the
    unplanned tensors at 16 bits. None: a profile made before the model's total size was recorded."""
    source = str(model.get("source", ""))
    if gguf_typed(table.options, source):
        from .gguf_file import file_outside

        if not Path(source).expanduser().exists():
            raise BadInputError(f"a whole-file budget for a GGUF plan reads the source file {source!r}, which is not "
                                f"there; pass the model again, or use {setting('budget_scope')} planned")
        try:
            return file_outside(source, list(table.groups), model["architecture"])
        except BadInputError as e:  # a folder bitalloc cannot convert (tokenizer, RoPE): no file to budget
            raise BadInputError(f"a size budget of a llama.cpp plan is of the whole GGUF file, which bitalloc cannot "
                                f"write from this model: {e.args[0]}. Plan with {setting('budget_scope')} planned") from None
    total = model.get("total_weights")
    return None if total is None else Outside.at_16_bits(total - table.num_weights)


def _finite_costs(table: CandidateTable, error_model: str) -> np.ndarray:
    """The table's predicted errors, 0 where an option does not fit (no storage, never chosen).

    A NaN or Inf error of an option that fits is a broken profile, not a free option: solving it
    would pick that option "optimally" (issue 15), so it is refused, naming module and option.
    """
    errors = np.asarray(table.errors_of(error_model), dtype=np.float64)
    bad = table.allowed & ~np.isfinite(errors)
    if bad.any():
        i, j = (int(x[0]) for x in np.nonzero(bad))
        raise NonFiniteError(f"candidate table: predicted {error_model} error of {table.groups[i]} as "
                             f"{table.options[j].label} is not finite ({errors[i, j]}; {int(bad.sum())} such cell(s)); "
                             f"the profile is damaged: re-run {step('profile')} (check the weights for NaN/Inf)")
    return np.where(table.allowed, errors, 0.0)


def _latency_spec(timing: LatencyInputs, choice: np.ndarray) -> LatencySpec:
    rows = np.arange(len(choice))
    layers = float(timing.matrix[rows, choice].sum())
    host = float(timing.host[rows, choice].sum())
    predicted = timing.predicted(layers, host)
    p = timing.profile
    return LatencySpec(profile=p.name, device=p.device_name, activation_dtype=p.activation_dtype, tokens=timing.tokens,
                       context=timing.context, layers_s=_sig(layers), other_s=None if timing.other_s is None else _sig(timing.other_s),
                       predicted_s=None if predicted is None else _sig(predicted),
                       max_s=None if timing.max_latency_s is None else _sig(timing.max_latency_s))


def _make_plan(table, solution, budget, max_bits, context: PlanContext, error_model, seed, constraints=None,
               timing: LatencyInputs | None = None, tie_kinds: tuple[str, ...] = (), unplanned: int | None = None,
               outside: Outside | None = None) -> Plan:
    record = context.model
    tied = record["tied_embeddings"]
    head, emb = record["output_embedding"], record["input_embedding"]
    assignments = []
    errors = table.errors_of(error_model)
    for g, k in enumerate(solution.choice):
        name, (out_f, in_f), opt = table.groups[g], table.shapes[g], table.options[k]
        tied_to = [emb] if tied and name == head else ([head] if tied and name == emb else [])
        assignments.append(
            Assignment(
                module=name,
                shape=(out_f, in_f),
                option=opt,
                label=opt.label,
                storage_bits=int(table.storage_bits[g, k]),
                predicted_delta_loss=_sig(errors[g, k]),
                predicted_latency_s=None if timing is None else _sig(timing.matrix[g, k]),
                tied_to=tied_to,
            )
        )
    plan = Plan(
        bitalloc_version=bitalloc_version(),
        model=ModelSpec(source=record["source"], architecture=record["architecture"], content_hash=record["content_hash"]),
        calibration=context.calibration,
        error_model=error_model,
        quantizer=table.quantizer,
        options=[o.label for o in table.options],
        solver=SolverSpec(name=solution.solver, settings=solution.settings, status=solution.status,
                          objective=_sig(solution.objective),
                          bound=None if solution.bound is None else _sig(solution.bound),
                          details={k: _sig(v) if isinstance(v, float) else v for k, v in solution.details.items()}),
        seed=seed,
        budget=BudgetSpec(kind=budget.kind, value=budget.value, text=budget.text, max_storage_bits=float(max_bits),
                          scope=budget.scope, fixed_bits=None if outside is None else float(outside.bits)),
        summary=summarize(assignments, ties=dict(sorted(Counter(tie_kinds).items())), unplanned_weights=unplanned),
        latency=None if timing is None else _latency_spec(timing, solution.choice),
        assignments=assignments,
        constraints=None if constraints is None else constraints.to_dict(),
    )
    return plan.made_on(context.score_tokens if context.windows is None else context.windows)


