"""`bitalloc` command line: parses arguments, calls the Python API, prints results."""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import (DEFAULT_SIGNALS, HESSIAN_TEXT_MULTIPLE, SIGNALS, CalibrationSpec, ProfileSettings, SolveConfig,
                     VerifySettings)
from .errors import BadInputError, BitallocError, cli_step
from .options import DEFAULT_BITS, DEFAULT_GROUP_SIZES
from .table import ERROR_MODELS
from .service.limits import DEFAULT_JOB_TIMEOUT_S


CALIB_HELP = ("calibration text file (e.g. wiki.valid.tokens); 'self' = text sampled from the model (data-free, --seed); "
              "default: the built-in set (public-domain English prose, bitalloc/data/calibration/)")

PLAN_CALIB_HELP = ("the plan's calibration text, for quantizers with layer Hessians (gptq, rtn-w, awq, imatrix): needed only when "
                   "the plan was calibrated on a file (built-in and self plans rebuild their windows); its sha256 must be the plan's")
SKIP_CALIB_HASH_HELP = ("calibrate on a --calib text whose sha256 differs from the plan's (or on self-calibration windows that "
                        "sampled differently); the windows keep the plan's seq_len, tokens and seed")

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Mixed-precision bit allocation for LLM weights.")
out = Console()


BITS_TEXT = ",".join(map(str, DEFAULT_BITS))  # --bits as the default grid has it
# The registered quantizers (bitalloc.quantizers.available_quantizers(); written out so --help does not import torch,
# and kept equal to the registry by tests/test_cli.py).
QUANTIZER_NAMES = ("rtn", "rtn-mse", "rtn-w", "rtn-w-signed", "awq", "gptq", "gptq-signed", "gptq-minmax", "awq-gptq",
                   "imatrix")
QUANTIZERS_TEXT = (", ".join(QUANTIZER_NAMES[:-1]) + " or " + QUANTIZER_NAMES[-1] + " (rtn-mse: clip search; rtn-w: "
                   "importance-weighted scales; -signed: signed symmetric INT scales; awq: rtn-w after AWQ's "
                   "activation-aware scales are folded into norms and weights; gptq-minmax: GPTQ with min/max "
                   "scales; awq-gptq: GPTQ after the same fold, planned from awq's errors; imatrix: llama.cpp's, GGUF types only)")
CACHE_DIR_HELP = "profile cache (default ~/.cache/bitalloc or $BITALLOC_CACHE_DIR)"
APPLY_CACHE_HELP = ("search awq's equalization scales again instead of reading those the plan's profile left in the "
                    "cache (and do not write them there)")
GROUP_SIZES_TEXT = ",".join("ch" if g is None else str(g) for g in DEFAULT_GROUP_SIZES)


def _group_sizes(text: str) -> list[int | None]:
    try:
        return [None if t.strip() in ("ch", "channel") else int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BadInputError(f"cannot read --group-sizes {text!r}; write e.g. '32,64,128,ch' (ch = per channel)") from None


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise BadInputError(f"cannot read {flag} {text!r}; write comma-separated integers, e.g. '2,3,4,8'") from None


def _option_grid(bits: str, group_sizes: str, keep: bool, formats: str | None, target: str | None) -> list:
    from .options import default_options
    from .targets import resolve_formats

    try:
        options = default_options(bits=_ints(bits, "--bits"), group_sizes=_group_sizes(group_sizes), include_keep=keep,
                                  formats=resolve_formats(formats, target))
    except ValueError as e:  # an option the formats cannot represent, e.g. --bits 9
        raise BadInputError(f"{e}; e.g. --bits 2,3,4,8 --group-sizes 32,64,ch") from None
    if not options:
        raise BadInputError("no options left to offer (--no-keep with --formats keep); add a family to --formats")
    return options


def _setting_value(text: str):
    """A solver setting's value as written: int, float, true/false, none, or the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _solver_settings(items: list[str], flag: str = "--solver-setting", example: str = "backend=highs") -> dict:
    """KEY=VALUE items of a repeatable settings flag as a dict (values as _setting_value reads them)."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"cannot read {flag} {item!r}; write KEY=VALUE, e.g. {flag} {example}")
        settings[key.strip()] = _setting_value(value)
    return settings


QUANTIZER_SETTING_HELP = ("KEY=VALUE for the quantizer, over the plan's defaults (repeatable): e.g. hessian_tokens=32768 "
                          f"(GPTQ's Hessians from that many tokens of the calibration text; {HESSIAN_TEXT_MULTIPLE} times "
                          "the plan's by default), float_target=0.25, damp=0.05, act_order=true, token_weighted=false")


def _quantizer_settings(items: list[str]) -> dict:
    return _solver_settings(items, "--quantizer-setting", "hessian_tokens=32768")


RAY_HELP = ("profile on a Ray cluster: 'auto' (the one $RAY_ADDRESS names or runs here, else a local one) or "
            "its address; statistics and table rows are spread over --ray-workers; needs pip install 'bitalloc[ray]'")
RAY_WORKERS_HELP = "Ray workers (default 2): each holds the model and takes a contiguous share of the calibration windows"


def _ray_spec(address: Optional[str], workers: Optional[int]):
    """The config.RaySpec of --ray/--ray-workers (None without --ray); refuses them before any model loads."""
    if address is None:
        if workers is not None:
            raise BadInputError("--ray-workers needs --ray auto|ADDRESS")
        return None
    from .config import RaySpec
    from .profile.distributed import require_ray

    spec = RaySpec(address=address) if workers is None else RaySpec(address=address, workers=workers)
    require_ray()
    return spec


@app.command("plan")
def plan_cmd(
    model: Optional[str] = typer.Argument(None, help="hub id, local directory (config.json + safetensors) or .gguf file (optional with --profile)"),
    budget: Optional[str] = typer.Option(None, "--budget", help="'3.2bits' (avg storage bits/weight), '1.5GB', '800MB', '2GiB' or '30%' of fp16; with --target llama.cpp and a .gguf MODEL (or a llama/qwen2 checkpoint folder), a size is the whole GGUF file's"),
    budget_scope: Optional[str] = typer.Option(None, "--budget-scope", help="what --budget/--pareto limit: 'planned' (the planned weights) or 'model' (the whole model as its target stores it: unplanned embedding, head, norms at 16 bits; with --target llama.cpp and a .gguf MODEL or a llama/qwen2 checkpoint folder, the whole GGUF file bitalloc writes). Default: 'model' for a size budget of a llama.cpp file, else 'planned'"),
    calib: Optional[str] = typer.Option(None, "--calib", help=CALIB_HELP),
    calib_tokens: int = typer.Option(CalibrationSpec.tokens, "--calib-tokens", help="calibration tokens (random windows of --seq-len)"),
    seq_len: int = typer.Option(CalibrationSpec.seq_len, "--seq-len"),
    solver: str = typer.Option(SolveConfig.solver, "--solver", help="solver name; `bitalloc solvers` lists them"),
    error_model: Optional[str] = typer.Option(SolveConfig.error_model, "--error-model", help=" or ".join(ERROR_MODELS) + "; default fisher-tw"),
    quantizer: Optional[str] = typer.Option(None, "--quantizer", help="quantizer the plan will be applied with: " + QUANTIZERS_TEXT + "; default imatrix for GGUF types only (--target llama.cpp), else awq-gptq (rtn-w with --stream or --ray); its errors fill the candidate table (with --profile: the profile's, another is refused)"),
    bits: str = typer.Option(BITS_TEXT, "--bits", help="integer bit widths offered"),
    group_sizes: str = typer.Option(GROUP_SIZES_TEXT, "--group-sizes", help="group sizes offered; ch = per channel"),
    no_keep: bool = typer.Option(False, "--no-keep", help="do not offer keeping a module in fp16"),
    formats: Optional[str] = typer.Option(None, "--formats", help="format families offered: int,fp8,fp6,fp4,mxfp4,mxfp6,mxfp8,nvfp4,gguf,gguf-iq,keep (default int,keep, or the target's; gguf-iq: llama.cpp's IQ3_S/IQ3_XXS/IQ2_* i-quants, only when named)"),
    target: Optional[str] = typer.Option(None, "--target", help="hardware target restricting the formats: cpu, a100, h100, h200, b200, llama.cpp (GGUF types), any"),
    seed: int = typer.Option(CalibrationSpec.seed, "--seed"),
    out_path: Optional[Path] = typer.Option(None, "--out", help="where to write the JSON plan (default plan.json); with --pareto a folder (default pareto/)"),
    min_bits: Optional[str] = typer.Option(None, "--min-bits", help="every planned module gets at least this many bits (fp16 = 16); "
                                           "'uniform': at least the bits of the best uniform option that fits the budget"),
    max_bits: Optional[int] = typer.Option(None, "--max-bits", help="every planned module gets at most this many bits"),
    pin: List[str] = typer.Option([], "--pin", help="REGEX=OPTION: modules matching REGEX take OPTION, e.g. 'lm_head=fp16' (repeatable)"),
    allow: List[str] = typer.Option([], "--allow", help="REGEX=LABEL_REGEX: modules matching REGEX choose only options whose label matches, e.g. 'down_proj=int[4-8].*' (repeatable)"),
    tie: List[str] = typer.Option([], "--tie", help="default 'fused': q/k/v, gate/up and each projection across a block's experts share an option (what serving stacks fuse); 'none' lifts it; or a module REGEX whose matches share one (repeatable)"),
    pareto: Optional[str] = typer.Option(None, "--pareto", help="sweep budgets START:STOP:STEP, e.g. 3.0:5.0:0.25bits: one plan per point in --out, plus pareto.png"),
    latency_profile: Optional[Path] = typer.Option(None, "--latency-profile", help="hardware profile (profiles/*.json, `bitalloc latency`): the plan reports its predicted latency"),
    latency_tokens: int = typer.Option(1, "--latency-tokens", help="tokens per forward the latency is for: 1 = a decode step, e.g. 512 = a prefill"),
    max_latency: Optional[str] = typer.Option(None, "--max-latency", help="limit on the predicted whole-forward latency, e.g. 40ms (needs --latency-profile)"),
    solver_setting: List[str] = typer.Option([], "--solver-setting", help="KEY=VALUE passed to the solver, e.g. backend=highs, time_limit_s=30, trials=60 (repeatable)"),
    include_lm_head: bool = typer.Option(False, "--include-lm-head", help="also plan the output head (tied: the shared embedding)"),
    include_embeddings: bool = typer.Option(False, "--include-embeddings", help="also plan the input embedding"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute the profile, do not read or write the cache"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow a model's own Python code to run"),
    profile_dir: Optional[Path] = typer.Option(None, "--profile", help="plan from this profile folder (`bitalloc profile --out`): its candidate table, no model needed; with MODEL, checks they match"),
    protect_spikes: Optional[str] = typer.Option(None, "--protect-spikes", help="keep the profile's spike-flagged projections at fp16, fp8 (float >= 8 bits or fp16) or 8bits (any >= 8 bits); needs --profile"),
    stream: bool = typer.Option(False, "--stream", help="profile one decoder block at a time, weights read from the checkpoint (local directory or .gguf): memory ~ one block + activations, same table"),
    verify: bool = typer.Option(False, "--verify", help="measure the plan on held-back calibration windows, repair it, and never return one worse there than the best fitting uniform option"),
    verify_windows: int = typer.Option(VerifySettings.windows, "--verify-windows", help="held-back calibration windows --verify measures on (the last ones profiling did not use)"),
    verify_rounds: int = typer.Option(VerifySettings.max_rounds, "--verify-rounds", help="repair rounds of --verify"),
    verify_applied: bool = typer.Option(VerifySettings.applied, "--verify-applied/--no-verify-applied", help="where the table holds a stand-in's errors (awq-gptq: awq's), --verify also applies the kept plan and the best uniform option with the plan's quantizer and keeps the better (two applies)"),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help=RAY_WORKERS_HELP),
) -> None:
    """Profile MODEL on calibration text (or read --profile DIR) and write a plan that fits BUDGET."""
    ray_spec = _ray_spec(ray, ray_workers)
    if ray_spec is not None and profile_dir is not None:
        raise BadInputError("--ray profiles the model, --profile DIR plans from a finished profile: drop one of them")
    if verify and (profile_dir is not None or pareto is not None):
        raise BadInputError("--verify checks one plan on the loaded model: drop --profile/--pareto, or drop --verify")
    if profile_dir is not None:
        grid_flags = (bits, group_sizes, no_keep, formats, target, include_lm_head, include_embeddings)
        if grid_flags != (BITS_TEXT, GROUP_SIZES_TEXT, False, None, None, False, False):
            raise BadInputError("--profile fixes the options and planned modules (its candidate table); drop --bits/"
                                "--group-sizes/--no-keep/--formats/--target/--include-*, narrow with --allow or --min-bits instead")
        return _plan_from_profile_cmd(profile_dir, model, calib, budget, pareto, budget_scope, out_path, protect_spikes, dict(
            solver=solver, solver_settings=_solver_settings(solver_setting), error_model=error_model, seed=seed,
            constraints=_constraints(min_bits, max_bits, pin, allow, tie),
            latency_target=_latency_target(latency_profile, latency_tokens, max_latency),
            trust_remote_code=trust_remote_code, quantizer=quantizer))
    if protect_spikes is not None:
        raise BadInputError("--protect-spikes reads the flagged projections from a profile: add --profile DIR "
                            "(bitalloc profile MODEL --signals fisher,spikes,table --out DIR)")
    if model is None:
        raise BadInputError("pass MODEL (hub id, directory or .gguf) or --profile DIR (a folder from `bitalloc profile`)")
    from . import api

    from .budget import gguf_typed
    from .config import ProfileConfig
    from .sweep import parse_budget_range, pareto_from_table

    if (budget is None) == (pareto is None):
        raise BadInputError("pass exactly one of --budget (one plan) and --pareto START:STOP:STEP (a sweep), e.g. --budget 3.2bits")
    options = _option_grid(bits, group_sizes, keep=not no_keep, formats=formats, target=target)
    constraints = _constraints(min_bits, max_bits, pin, allow, tie)
    settings = _solver_settings(solver_setting)
    latency_target = _latency_target(latency_profile, latency_tokens, max_latency)
    # fail on a bad budget, range or output path before loading anything
    gguf_file = gguf_typed(options, model)
    budgets = _scoped(parse_budget_range(pareto), budget_scope, gguf_file) if pareto is not None else None
    one_budget = _scoped([budget], budget_scope, gguf_file)[0] if budget is not None else None
    _check_plan_out(out_path, pareto)
    start = time.perf_counter()
    table, loaded, calibration = api.prepare(
        model, calib, solver=solver, error_model=error_model, options=options, seq_len=seq_len,
        calib_tokens=calib_tokens, seed=seed, include_lm_head=include_lm_head, include_embeddings=include_embeddings,
        cache_dir=_cache_arg(cache_dir, no_cache), progress=True, trust_remote_code=trust_remote_code,
        stream=stream,
        quantizer=quantizer or ProfileConfig.quantizer,
        ray=ray_spec,
    )
    common = dict(solver=solver, solver_settings=settings, error_model=error_model, seed=seed, constraints=constraints,
                  latency_target=latency_target)
    if budgets is not None:
        sweep = pareto_from_table(table, budgets, loaded, calibration, **common)
        folder = out_path or Path("pareto")
        sweep.save(folder)
        out.print(sweep.table(), markup=False, soft_wrap=True)
        out.print(f"wrote {len(sweep.plans)} plans, pareto.json and pareto.png to {folder}")
        return
    if verify:
        from .verify import VerifySettings

        common["verify"] = VerifySettings(windows=verify_windows, max_rounds=verify_rounds, applied=verify_applied,
                                          progress=True)
    plan = api.plan_from_table(table, one_budget, loaded, calibration, **common)
    target = out_path or Path("plan.json")
    plan.save(target)
    _print_summary(plan, time.perf_counter() - start)
    out.print(f"wrote {target}")


def _check_plan_out(out_path: Path | None, pareto: str | None) -> None:
    """--out of `plan`: a file (default plan.json), or with --pareto a folder (default pareto/)."""
    from .io import check_output_dir, check_output_file

    if pareto is not None:
        check_output_dir(out_path or Path("pareto"))
    else:
        check_output_file(out_path or Path("plan.json"))


def _min_bits(text: str | None) -> int | str | None:
    """--min-bits: a number of bits, or 'uniform'."""
    if text is None or text == "uniform":
        return text
    try:
        return int(text)
    except ValueError:
        raise BadInputError(f"--min-bits {text!r}: give a number of bits (e.g. 3) or 'uniform'") from None


def _constraints(min_bits, max_bits, pin, allow, tie):
    from .constraints import Constraints, parse_rule, parse_ties

    return Constraints(min_bits=_min_bits(min_bits), max_bits=max_bits, pins=tuple(parse_rule(p, "--pin") for p in pin),
                       allow=tuple(parse_rule(a, "--allow") for a in allow), ties=parse_ties(tie))


def _scoped(budgets: list, scope: str | None, gguf_file: bool) -> list:
    """Each budget in `scope`; without --budget-scope, budget.default_scope's (a size of a llama.cpp file: the file)."""
    from .budget import default_scope, parse_budget

    return [parse_budget(b, scope or default_scope(parse_budget(b).kind, gguf_file)) for b in budgets]


def _plan_from_profile_cmd(profile_dir: Path, model, calib, budget, pareto, budget_scope, out_path, protect_spikes,
                           common: dict) -> None:
    """`bitalloc plan --profile DIR`: solve the profile's table; MODEL and --calib, if given, are checked against it."""
    from .budget import gguf_typed, parse_budget
    from .replan import load_profile, plan_from_profile, pareto_from_profile
    from .sweep import parse_budget_range

    if (budget is None) == (pareto is None):
        raise BadInputError("pass exactly one of --budget (one plan) and --pareto START:STOP:STEP (a sweep), e.g. --budget 3.2bits")
    texts = parse_budget_range(pareto) if pareto is not None else [budget]
    gguf_file = False
    if budget_scope is None and any(parse_budget(b).kind == "bytes" for b in texts):
        # a size budget's default scope depends on whether the profile's plans are llama.cpp files
        profile = load_profile(profile_dir)
        gguf_file = gguf_typed(profile.table.options, profile.settings["model"]["source"])
    budgets = _scoped(parse_budget_range(pareto), budget_scope, gguf_file) if pareto is not None else None
    one_budget = _scoped([budget], budget_scope, gguf_file)[0] if budget is not None else None
    _check_plan_out(out_path, pareto)
    start = time.perf_counter()
    kwargs = dict(model=model, calibration=calib, protect_spikes=protect_spikes, **common)
    if budgets is not None:
        sweep = pareto_from_profile(profile_dir, budgets, **kwargs)
        folder = out_path or Path("pareto")
        sweep.save(folder)
        out.print(sweep.table(), markup=False, soft_wrap=True)
        out.print(f"wrote {len(sweep.plans)} plans, pareto.json and pareto.png to {folder}")
        return
    plan = plan_from_profile(profile_dir, one_budget, **kwargs)
    target = out_path or Path("plan.json")
    plan.save(target)
    _print_summary(plan, time.perf_counter() - start)
    out.print(f"wrote {target}")


def _latency_target(profile_path: Path | None, tokens: int, max_latency: str | None):
    """The hardware-profile side of a plan, checked before any model is loaded."""
    from .latency.planning import LatencyTarget
    from .latency.predict import parse_latency
    from .latency.profile import HardwareProfile

    if profile_path is None:
        if max_latency is not None:
            raise BadInputError("--max-latency needs --latency-profile: the measured kernel latencies of the target machine "
                                "(profiles/*.json, or measure with `bitalloc latency`)")
        return None
    if tokens < 1:
        raise BadInputError(f"--latency-tokens must be at least 1, got {tokens}")
    if max_latency is not None:
        parse_latency(max_latency)
    return LatencyTarget(HardwareProfile.load(profile_path), tokens, max_latency)


def _print_summary(plan, seconds: float) -> None:
    s = plan.summary
    scope = " (whole model)" if plan.budget.scope == "model" else ""
    table = Table(title=f"plan for {plan.model.source} at {plan.budget.text}{scope}")
    table.add_column("option")
    table.add_column("modules", justify="right")
    table.add_column("weights", justify="right")
    table.add_column("predicted ΔNLL", justify="right")
    weights, loss = Counter(), Counter()
    count = Counter(a.label for a in plan.assignments)
    for a in plan.assignments:
        weights[a.label] += a.shape[0] * a.shape[1]
        loss[a.label] += a.predicted_delta_loss
    for label in sorted(count, key=lambda lbl: -weights[lbl]):
        table.add_row(label, str(count[label]), f"{weights[label] / s.planned_weights:.1%}", f"{loss[label]:.4g}")
    out.print(table)
    out.print(
        f"{s.planned_modules} modules, {s.planned_weights:,} weights: storage {s.storage_bits_per_weight:.4f} bits/weight "
        f"(nominal {s.nominal_bits_per_weight:.4f}), {s.storage_bytes / 1e6:.2f} MB vs {s.fp16_bytes / 1e6:.2f} MB fp16; "
        f"predicted ΔNLL {s.predicted_delta_loss:.4g} nats; solver {plan.solver.name} ({_solver_status(plan.solver)}); {seconds:.1f}s"
    )
    out.print(_model_size_line(s), soft_wrap=True)
    out.print(_ties_line(plan), soft_wrap=True)
    if (lat := plan.latency) is not None:
        whole = f"{lat.predicted_s * 1e3:.4g} ms per forward" if lat.predicted_s is not None else "whole forward unknown (model not timed in the profile)"
        limit = f" (limit {lat.max_s * 1e3:.4g} ms)" if lat.max_s is not None else ""
        out.print(f"predicted latency on {lat.profile} ({lat.device}), {lat.tokens} token(s): planned layers "
                  f"{lat.layers_s * 1e3:.4g} ms; {whole}{limit}")
    if (v := plan.verification) is not None:
        sl = v.slice
        best = min(v.uniform, key=lambda u: getattr(u.loss, v.metric), default=None)
        out.print(f"verified on {sl['windows']}×{sl['seq_len']} held-back calibration tokens ({v.metric}): solved plan "
                  f"ΔNLL {v.solved.delta_nll:.4g} measured / {v.solved.predicted_delta_nll:.4g} predicted, KL {v.solved.kl:.4g}; "
                  f"returned the {v.outcome} plan: ΔNLL {v.final.delta_nll:.4g}, KL {v.final.kl:.4g}"
                  + (f"; best uniform {best.label}: ΔNLL {best.loss.delta_nll:.4g}, KL {best.loss.kl:.4g}" if best else ""))


def _model_size_line(s) -> str:
    if s.model_bytes is None:
        return "whole model: unknown (the plan's profile predates whole-model sizes)"
    return (f"whole model {s.model_bytes / 1e6:.2f} MB = planned weights {s.storage_bytes / 1e6:.2f} MB + unplanned tensors "
            f"(embedding, head, norms; {s.unplanned_weights:,} at 16 bits) {s.unplanned_bytes / 1e6:.2f} MB")


_TIE_KINDS = {"qkv": "q/k/v", "gate_up": "gate/up", "w1_w3": "w1/w3", "experts_gate_up": "experts' gate/up",
              "experts_down": "experts' down"}


def _ties_line(plan) -> str:
    ties = plan.summary.ties
    if ties is None:
        return "ties: not recorded (plan predates them)"
    specs = (plan.constraints or {}).get("ties", [])
    if not ties:
        why = "lifted (--tie none)" if not specs else "none matched"
        return f"ties: none ({why}); `bitalloc apply` refuses q/k/v or gate/up with different options"
    parts = ", ".join(f"{n} {_TIE_KINDS.get(kind, repr(kind))}" for kind, n in ties.items())
    default = " (default --tie fused: what serving stacks fuse; --tie none lifts it)" if "fused" in specs else ""
    return f"ties: {parts} groups share one option{default}"


def _solver_status(spec) -> str:
    from .solvers.base import relative_gap

    gap = relative_gap(spec.objective, spec.bound)
    if spec.status == "optimal" or gap is None:
        return spec.status
    return f"{spec.status}, within {gap:.3%} of optimal"


@app.command("profile")
def profile_cmd(
    model: str = typer.Argument(..., help="hub id, local directory or .gguf file"),
    calib: Optional[str] = typer.Option(None, "--calib", help=CALIB_HELP),
    signals: str = typer.Option(",".join(DEFAULT_SIGNALS), "--signals", help="comma-separated: " + ",".join(SIGNALS)),
    out_dir: Path = typer.Option(Path("profile"), "--out", help="profile folder to write (profile.json + tensors.npz); an unfinished one is resumed"),
    calib_tokens: int = typer.Option(CalibrationSpec.tokens, "--calib-tokens"),
    seq_len: int = typer.Option(CalibrationSpec.seq_len, "--seq-len"),
    seed: int = typer.Option(CalibrationSpec.seed, "--seed"),
    bits: str = typer.Option(BITS_TEXT, "--bits", help="integer bit widths of the candidate table"),
    group_sizes: str = typer.Option(GROUP_SIZES_TEXT, "--group-sizes", help="group sizes of the table; ch = per channel"),
    formats: Optional[str] = typer.Option(None, "--formats", help="format families of the table (default int,keep)"),
    trace_tol: float = typer.Option(ProfileSettings.trace_tol, "--trace-tol", help="a layer stops probing when its trace has this relative standard error..."),
    trace_abs_tol: float = typer.Option(ProfileSettings.trace_abs_tol, "--trace-abs-tol", help="...or when its standard error is below this fraction of the largest layer's |trace| (layers with trace ~0)"),
    trace_max_probes: int = typer.Option(ProfileSettings.trace_max_probes, "--trace-max-probes"),
    spike_threshold: float = typer.Option(ProfileSettings.spike_threshold, "--spike-threshold", help="flag a projection whose max|x| / median channel RMS exceeds this"),
    interaction_option: str = typer.Option(ProfileSettings.interaction_option, "--interaction-option", help="option the pair ablations quantize with"),
    include_lm_head: bool = typer.Option(False, "--include-lm-head"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    stream: bool = typer.Option(False, "--stream", help="one decoder block in memory at a time (local checkpoint; trace = empirical-Fisher trace)"),
    quantizer: Optional[str] = typer.Option(None, "--quantizer", help="quantizer the plans will be applied with: " + QUANTIZERS_TEXT + " (default imatrix for GGUF types only, else awq-gptq; rtn-w with --stream or --ray); the table holds its errors"),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help=RAY_WORKERS_HELP),
) -> None:
    """Compute sensitivity signals of MODEL's planned layers on calibration text and save them as a profile."""
    from . import api
    from .io import check_output_dir
    from .config import ProfileConfig

    ray_spec = _ray_spec(ray, ray_workers)
    check_output_dir(out_dir)
    chosen = tuple(s.strip() for s in signals.split(",") if s.strip())
    options = _option_grid(bits, group_sizes, keep=True, formats=formats, target=None)
    start = time.perf_counter()
    prof = api.profile_model(model, calib, out_dir, signals=chosen, options=options, seq_len=seq_len,
                             calib_tokens=calib_tokens, seed=seed, include_lm_head=include_lm_head, progress=True,
                             trust_remote_code=trust_remote_code, trace_tol=trace_tol, trace_abs_tol=trace_abs_tol,
                             trace_max_probes=trace_max_probes,
                             spike_threshold=spike_threshold, interaction_option=interaction_option, stream=stream,
                             quantizer=quantizer or ProfileConfig.quantizer, ray=ray_spec)
    _print_profile(prof)
    out.print(f"wrote {out_dir} ({time.perf_counter() - start:.0f}s)")


def _print_profile(prof) -> None:
    table = Table(title=f"profile of {prof.settings['model']['source']}: {len(prof.modules)} modules")
    table.add_column("module")
    table.add_column("trace/param", justify="right")
    table.add_column("Σ Fisher", justify="right")
    table.add_column("salience top-1%", justify="right")
    table.add_column("input spike ratio", justify="right")
    ranked = sorted(prof.modules, key=lambda m: -(m.trace.per_param if m.trace else float(m.fisher.sum()) if m.fisher is not None else 0))
    for m in ranked[:12]:
        table.add_row(m.name, f"{m.trace.per_param:.3g}" if m.trace else "-",
                      f"{float(m.fisher.sum()):.3g}" if m.fisher is not None else "-",
                      f"{m.salience.top1pct_share['hessian']:.1%}" if m.salience else "-",
                      (f"{m.spikes.input.ratio:.3g}" + (" (flagged)" if m.spikes.input.flagged else "")) if m.spikes else "-")
    out.print(table)
    if any(m.trace for m in prof.modules):
        t = [m.trace for m in prof.modules if m.trace]
        rules = Counter(x.stopped_by or "?" for x in t)
        if prof.settings.get("trace_estimator") == "empirical-fisher":
            out.print(f"trace: empirical-Fisher trace (streamed) over {t[0].probes} windows")
        else:
            out.print(f"Hessian trace: {min(x.probes for x in t)}-{max(x.probes for x in t)} probes per layer, largest relative "
                      f"standard error {max(x.rel_stderr for x in t):.3f}; stopped by " + ", ".join(f"{r}: {c}" for r, c in sorted(rules.items())))
    flagged = [m.name for m in prof.modules if m.spikes and (m.spikes.input.flagged or m.spikes.output.flagged)]
    if any(m.spikes for m in prof.modules):
        out.print(f"activation spikes flagged in {len(flagged)} projection(s){': ' + ', '.join(flagged) if flagged else ''}")
    if prof.interactions:
        worst = max(prof.interactions, key=lambda i: abs(i.correction))
        out.print(f"{len(prof.interactions)} measured pairs; largest correction {worst.correction:+.4g} ({worst.a} + {worst.b})")


@app.command("report")
def report_cmd(
    source: Path = typer.Argument(..., help="a profile folder (bitalloc profile --out) or a plan .json"),
    out_path: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write"),
    measured: Optional[Path] = typer.Option(None, "--measured", help="measured single-module ΔNLL JSON (bench/sensitivity.py's bench/out/sensitivity.json): adds predicted vs measured"),
    error_model: Optional[str] = typer.Option(SolveConfig.error_model, "--error-model", help="with a profile: which table prediction to set against --measured (default: the one its plans are solved under)"),
) -> None:
    """Figures of a profile (sensitivity bars, spike heatmap, predicted vs measured) or a plan (bit-allocation heatmap)."""
    from .io import check_output_file
    from .report import write_report

    check_output_file(out_path)
    write_report(source, out_path, measured=measured, error_model=error_model)
    out.print(f"wrote {out_path}")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="hub id, local directory or .gguf file"),
    text: Path = typer.Option(..., "--text", help="evaluation text file (e.g. wiki.test.raw)"),
    plan_path: Optional[Path] = typer.Option(None, "--plan", help="apply this plan (with its quantizer) before scoring"),
    quantizer: Optional[str] = typer.Option(None, "--quantizer", help="apply the plan with this quantizer instead of the plan's own (" + QUANTIZERS_TEXT + ")"),
    quantizer_setting: List[str] = typer.Option([], "--quantizer-setting", help=QUANTIZER_SETTING_HELP),
    calib: Optional[Path] = typer.Option(None, "--calib", help=PLAN_CALIB_HELP),
    seq_len: int = typer.Option(512, "--seq-len", help="tokens per evaluation window"),
    windows: int = typer.Option(16, "--windows", help="number of non-overlapping windows from the start"),
    bos: bool = typer.Option(False, "--bos", help="write the tokenizer's BOS over each window's first token when it starts sequences with one (Gemma, Llama 3), as llama-perplexity does; default: the text's tokens only (the GPTQ-line convention)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    skip_hash_check: bool = typer.Option(False, "--skip-hash-check", "--force", help="apply a plan made for different weights (their hash differs); --force is the old name"),
    skip_calib_hash_check: bool = typer.Option(False, "--skip-calib-hash-check", help=SKIP_CALIB_HASH_HELP),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help=APPLY_CACHE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Perplexity; with --plan also KL divergence and top-1 agreement against the unquantized model."""
    import copy

    from .apply import apply
    from .calibration import leading_bos, read_text
    from .evaluate import evaluate, evaluation_windows
    from .models import check_token_ids, load_model
    from .plan import Plan

    if windows < 1:
        raise BadInputError(f"--windows must be at least 1, got {windows}")
    if seq_len < 2:
        raise BadInputError(f"--seq-len must be at least 2, got {seq_len} (a window scores every token after its first)")
    settings = _quantizer_settings(quantizer_setting)
    if settings and plan_path is None:
        raise BadInputError("--quantizer-setting applies to the quantizer of --plan; pass --plan")
    plan = Plan.load(plan_path) if plan_path else None  # fail on a bad plan before loading the model
    use = (quantizer or plan.quantizer) if plan is not None else None
    if plan is not None:
        _check_plan_calibration(plan, use, calib, not skip_calib_hash_check)
    body = read_text(text)
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    bos_id = leading_bos(loaded.tokenizer) if bos else None
    ids = evaluation_windows(body, loaded.tokenizer, seq_len, windows, bos=bos_id)
    check_token_ids(loaded.model, ids, "evaluation windows")
    reference = None
    scored = loaded.model
    if plan is not None:
        reference = loaded.model
        calibration = _plan_calibration(plan, use, calib, not skip_calib_hash_check, loaded)
        scored = apply(copy.deepcopy(loaded.model), plan, check_hash=not skip_hash_check, quantizer=use,
                       calibration=calibration, progress=not as_json, cache_dir=_cache_arg(cache_dir, no_cache),
                       **settings)
    result = evaluate(scored, ids, reference=reference, progress=not as_json)
    if as_json:
        print(json.dumps({"model": model, "plan": str(plan_path) if plan_path else None, "bos": bos_id, **result.to_dict()},
                         sort_keys=True))
    else:
        out.print(result.describe() + ("" if bos_id is None else f"  (BOS {bos_id} first)"))


@app.command("apply")
def apply_cmd(
    model: str = typer.Argument(..., help="hub id, local directory or .gguf file (the model the plan was made for)"),
    plan_path: Path = typer.Option(..., "--plan", help="plan JSON file"),
    out_path: Path = typer.Option(..., "--out", help="checkpoint folder to write (a .gguf file with --format gguf)"),
    quantizer: Optional[str] = typer.Option(None, "--quantizer", help=QUANTIZERS_TEXT + "; default: the plan's own"),
    quantizer_setting: List[str] = typer.Option([], "--quantizer-setting", help=QUANTIZER_SETTING_HELP),
    fmt: str = typer.Option("compressed-tensors", "--format", help="checkpoint format: compressed-tensors, or gguf (a llama.cpp file from a --target llama.cpp plan; MODEL a .gguf, whose metadata and tokenizer are copied, or a checkpoint folder, converted as convert_hf_to_gguf.py does; llama and qwen2, and gemma3 from a .gguf)"),
    calib: Optional[Path] = typer.Option(None, "--calib", help=PLAN_CALIB_HELP),
    force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
    skip_hash_check: bool = typer.Option(False, "--skip-hash-check", help="apply a plan made for different weights (their hash differs from the plan's)"),
    skip_calib_hash_check: bool = typer.Option(False, "--skip-calib-hash-check", help=SKIP_CALIB_HASH_HELP),
    allow_untied: bool = typer.Option(False, "--allow-untied", help="write q/k/v or gate/up with different schemes (loads in transformers, not in vLLM)"),
    dtype: str = typer.Option("model", "--dtype", help="dtype of the unplanned tensors and of the checkpoint: model (as loaded; with --format gguf from a folder: as stored), bfloat16, float16, float32"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_DIR_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help=APPLY_CACHE_HELP),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Quantize MODEL as the plan says and write a packed checkpoint (safetensors + config.json + tokenizer)."""
    import torch

    from .models import load_model
    from .pack import prepare_checkpoint_out, save_checkpoint
    from .plan import Plan

    dtypes = {"model": None, "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
              "float32": "float32", "fp32": "float32"}
    if dtype not in dtypes:
        raise BadInputError(f"unknown --dtype {dtype!r}; choose model, bfloat16, float16 or float32")
    if fmt not in ("compressed-tensors", "gguf"):
        raise BadInputError(f"unknown checkpoint format {fmt!r}; `bitalloc apply` writes compressed-tensors or gguf "
                            "(other targets: `bitalloc export`)")
    settings = _quantizer_settings(quantizer_setting)
    if fmt == "gguf":
        from .gguf_file import gguf_layout
        from .io import check_output_file

        check_output_file(out_path)
        plan = Plan.load(plan_path)
        gguf_dtype = getattr(torch, dtypes[dtype]) if dtypes[dtype] else None
        gguf_layout(plan, model, gguf_dtype)  # refuse a bad plan, source or architecture before any work
        if out_path.exists() and not force:
            raise BadInputError(f"{out_path} exists; pass --force to replace it")
    else:
        for note in prepare_checkpoint_out(out_path, force)[1]:  # stderr: --json keeps stdout one object
            print(f"note: {note}", file=sys.stderr)
        plan = Plan.load(plan_path)  # fail on a bad plan or --out before loading the model
    use = quantizer or plan.quantizer
    _check_plan_calibration(plan, use, calib, not skip_calib_hash_check)
    loaded = load_model(model, trust_remote_code=trust_remote_code)
    ids = _plan_calibration(plan, use, calib, not skip_calib_hash_check, loaded)
    cache = _cache_arg(cache_dir, no_cache)
    if fmt == "gguf":
        _write_gguf(loaded, plan, model, out_path, quantizer, ids, skip_hash_check, as_json, gguf_dtype, cache, settings)
        return
    report = save_checkpoint(loaded.model, plan, out_path, quantizer, ids, tokenizer=loaded.tokenizer, force=force,
                             check_hash=not skip_hash_check, allow_untied=allow_untied,
                             dtype=getattr(torch, dtypes[dtype]) if dtypes[dtype] else None, progress=not as_json,
                             cache_dir=cache, settings=settings)
    if as_json:
        print(json.dumps(report.to_dict(), sort_keys=True))
        return
    table = Table(title=f"packed checkpoint {out_path}")
    for col in ("option", "format", "modules"):
        table.add_column(col)
    for label, n in report.modules_by_label.items():
        table.add_row(label, report.format_by_label[label], str(n))
    out.print(table)
    out.print(f"planned weights {report.planned_weights:,}: {report.planned_bytes:,} bytes on disk "
              f"(packed weights + scales + zero-points; weight_shape adds {report.shape_bytes:,})")
    out.print(f"storage bits/weight: measured {report.measured_bits_per_weight:.4f}, "
              f"plan predicted {report.predicted_bits_per_weight:.4f}")
    out.print(f"checkpoint size {report.checkpoint_bytes / 1e6:.2f} MB in {len(report.files)} safetensors file(s)")
    for line in report.warnings + report.notes:
        out.print(f"note: {line}")


def _check_plan_calibration(plan, quantizer: str, calib: Optional[Path], check_hash: bool) -> None:
    """Before loading the model: refuse a plan whose calibration `quantizer` needs but cannot get (a file
    plan without --calib, a --calib text that is not the plan's)."""
    from .calibration import plan_calibration_text
    from .quantizers import needs_hessian

    if needs_hessian(quantizer):
        plan_calibration_text(plan.calibration, calib, check_hash)


def _plan_calibration(plan, quantizer: str, calib: Optional[Path], check_hash: bool, loaded):
    """The plan's own calibration windows (token ids) when `quantizer` needs layer Hessians, else None."""
    from .apply import plan_windows

    return plan_windows(loaded.model, plan, quantizer, None, loaded.tokenizer, calib, check_hash)


def _cache_arg(cache_dir: Optional[Path], no_cache: bool) -> Path | bool:
    """--cache-dir / --no-cache as the library's cache_dir argument (profile.store.cache_folder): the profile cache
    that plan fills and apply and eval read awq's scales from; the default one unless --no-cache."""
    return False if no_cache else (cache_dir or True)


def _write_gguf(loaded, plan, source: str, out_path: Path, quantizer, ids, skip_hash_check: bool, as_json: bool,
                dtype=None, cache_dir: Path | bool = False, settings: dict | None = None) -> None:
    from collections import Counter

    from .gguf_file import write_gguf

    layout = write_gguf(loaded.model, plan, source, out_path, quantizer, ids, check_hash=not skip_hash_check,
                        progress=not as_json, dtype=dtype, cache_dir=cache_dir, settings=settings)
    size = out_path.stat().st_size
    planned = layout.planned
    weights = sum(a.shape[0] * a.shape[1] for a in plan.assignments)
    planned_bits = sum(planned[a.module].nbytes * 8 for a in plan.assignments)
    types = dict(sorted(Counter(t.ggml_type for t in planned.values()).items()))
    report = {"file": str(out_path), "file_bytes": size, "predicted_file_bytes": layout.file_bytes,
              "planned_tensor_types": types, "planned_bits_per_weight": planned_bits / weights if weights else 0.0,
              "plan_storage_bits_per_weight": plan.summary.storage_bits_per_weight}
    if as_json:
        print(json.dumps(report, sort_keys=True))
        return
    out.print(f"wrote {out_path}: {size:,} bytes (predicted {layout.file_bytes:,})")
    out.print("planned tensors: " + ", ".join(f"{n} × {t}" for t, n in types.items()))
    out.print(f"planned tensors {report['planned_bits_per_weight']:.4f} bits/weight "
              f"(plan: {plan.summary.storage_bits_per_weight:.4f})")


@app.command("latency")
def latency_cmd(
    model: list[str] = typer.Option(..., "--model", help="model whose planned-layer shapes to time (hub id, directory, .gguf, or config.json with --config-only); repeatable"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    out_path: Path = typer.Option(..., "--out", help="profile JSON to write, e.g. profiles/my-machine.json"),
    name: Optional[str] = typer.Option(None, "--name", help="profile name (default: the file name)"),
    tokens: str = typer.Option("1,512", "--tokens", help="activation rows to time: 1 = decode step, 512 = prefill"),
    context: int = typer.Option(512, "--context", help="cached tokens before each timed decode step of the whole model"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="activation dtype: bfloat16 (default), float16 or float32"),
    samples: int = typer.Option(15, "--samples", help="timed samples per kernel (median and p10/p90 kept)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice); recorded in the profile"),
    bits: str = typer.Option(BITS_TEXT, "--bits", help="integer bit widths to time"),
    group_sizes: str = typer.Option(GROUP_SIZES_TEXT, "--group-sizes", help="group sizes to time; ch = per channel"),
    formats: Optional[str] = typer.Option(None, "--formats", help="format families to time: int,fp8,fp6,fp4,mxfp4,mxfp6,mxfp8,nvfp4,gguf,keep (default int,keep, or the target's)"),
    target: Optional[str] = typer.Option(None, "--target", help="time the formats of a hardware target: cpu, a100, h100, h200, b200, any"),
    include_lm_head: bool = typer.Option(False, "--include-lm-head", help="also time the output head"),
    config_only: bool = typer.Option(False, "--config-only", help="build the model from config.json with random weights (timing needs no trained values)"),
    no_model_timing: bool = typer.Option(False, "--no-model-timing", help="skip timing the whole model's forward pass"),
) -> None:
    """Measure this machine's kernel latencies for every option at MODEL's layer shapes (a hardware profile)."""
    from .io import check_output_file
    from .latency.api import measure_latency

    check_output_file(out_path)
    options = _option_grid(bits, group_sizes, keep=True, formats=formats, target=target)
    if threads is not None:
        if threads < 1:
            raise BadInputError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()
    profile = measure_latency(
        model, options, name=name or out_path.stem, device=device, tokens=_ints(tokens, "--tokens"), context=context,
        dtype=dtype, samples=samples, include_lm_head=include_lm_head, config_only=config_only,
        model_timing=not no_model_timing, progress=True,
    )
    profile.save(out_path)
    _print_latency(profile)
    out.print(f"wrote {out_path} ({len(profile.entries)} timings, {time.perf_counter() - start:.0f}s)")


def _print_latency(profile) -> None:
    table = Table(title=f"{profile.name}: {profile.device_name}, {profile.activation_dtype}, {profile.threads} threads")
    table.add_column("option")
    table.add_column("kernel")
    tokens = sorted({e.tokens for e in profile.entries})
    for t in tokens:
        table.add_column(f"ps/weight @{t} tok", justify="right")
    seconds, weights = Counter(), Counter()  # per (option, tokens), over the shapes the option fits
    for e in profile.entries:
        seconds[e.option, e.tokens] += e.median_s
        weights[e.option, e.tokens] += e.out_features * e.in_features
    for label in sorted({e.option for e in profile.entries}):
        cells = [f"{1e12 * seconds[label, t] / weights[label, t]:.3g}" if weights[label, t] else "-" for t in tokens]
        table.add_row(label, profile.kernel_for_option.get(label, "?"), *cells)
    out.print(table)
    for m in profile.models:
        out.print(f"model {m.model} at {m.tokens} token(s) after {m.context} cached: {m.other_s * 1e3:.2f} ms outside the "
                  f"planned layers (measured), {m.linear_predicted_s * 1e3:.2f} ms in them kept dense (predicted)")


@app.command("solvers")
def solvers_cmd() -> None:
    """List the registered solvers."""
    from . import solvers

    for name, summary in solvers.available_solvers().items():
        print(f"{name:13s}{summary}")  # one line each, whatever the terminal width


@app.command("show")
def show_cmd(plan_path: Path = typer.Argument(..., help="a plan JSON file")) -> None:
    """Validate a plan file and print its summary."""
    from .plan import Plan

    plan = Plan.load(plan_path)
    _print_summary(plan, 0.0)


@app.command("schema")
def schema_cmd(out_path: Optional[Path] = typer.Option(None, "--out", help="write here instead of printing")) -> None:
    """The JSON Schema of plan files (what bitalloc/schema/plan-v1.json holds)."""
    from .io import atomic_write_text, canonical_json, check_output_file
    from .plan import plan_json_schema

    if out_path is not None:
        check_output_file(out_path)
    text = canonical_json(plan_json_schema())
    if out_path is None:
        print(text, end="")
    else:
        atomic_write_text(out_path, text)


SERVE_WITHOUT_ROOT_WARNING = (
    "WARNING: bitalloc serve runs without --allow-root: any file this process can read may be named as a model or "
    "calibration text by anyone holding the token; pass --allow-root FOLDER (repeatable) to confine requests")


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8000, "--port"),
    store: Optional[Path] = typer.Option(None, "--store", help="store folder: SQLite db + profile files (default $BITALLOC_STORE or ~/.local/share/bitalloc/service)"),
    workers: int = typer.Option(1, "--workers", help="worker processes that run profiling jobs"),
    allow_root: List[str] = typer.Option([], "--allow-root", help="model and calibration paths must lie under this folder (repeatable)"),
    allow_hub: bool = typer.Option(False, "--allow-hub", help="let requests name hub ids (the server downloads them)"),
    max_body: int = typer.Option(64 * 1024, "--max-body", help="largest request body in bytes"),
    job_timeout: float = typer.Option(DEFAULT_JOB_TIMEOUT_S, "--job-timeout", help="seconds a job may run before it is failed and its worker replaced; also the most a request's timeout_s may ask for"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run profile jobs' statistics and table rows on this Ray cluster: 'auto' or its address; needs pip install 'bitalloc[ray]'"),
    ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help=RAY_WORKERS_HELP),
) -> None:
    """Serve profiles and plans over HTTP (needs the `serve` extra). Token: $BITALLOC_TOKEN or printed at start."""
    ray_spec = _ray_spec(ray, ray_workers)
    try:
        from .service.app import serve
    except ImportError as e:
        raise BadInputError(f"bitalloc serve needs {e.name}: pip install 'bitalloc[serve]'") from None
    from .service.limits import ServiceLimits

    if not allow_root:
        print(SERVE_WITHOUT_ROOT_WARNING, file=sys.stderr, flush=True)
    serve(host=host, port=port, store_path=store, workers=workers, allowed_roots=allow_root, allow_hub=allow_hub,
          max_body_bytes=max_body, limits=ServiceLimits(job_timeout_s=job_timeout), ray=ray_spec)


@app.command("export")
def export_cmd(
    plan_path: Optional[Path] = typer.Argument(None, help="plan JSON (bitalloc plan --out)"),
    to: Optional[str] = typer.Option(None, "--to", help="target; --list shows them: gguf, modelopt, gptqmodel, autoround, torchao, ..."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="folder for the exported files (default: PLAN-TARGET/ next to the plan)"),
    allow_untied: bool = typer.Option(False, "--allow-untied", help="export even if fused q/k/v or gate/up shards have different options (listed as unsupported)"),
    list_targets: bool = typer.Option(False, "--list", help="list the export targets and exit"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="gguf: the plan's calibration text (its sha256 must be the plan's); also writes imatrix.gguf (mean x² per input column) for llama-quantize --imatrix, which an imatrix plan calibrated on the built-in set or self gets without it"),
    skip_calib_hash_check: bool = typer.Option(False, "--skip-calib-hash-check", help=SKIP_CALIB_HASH_HELP),
) -> None:
    """Write a plan in the form a serving stack or quantization library reads."""
    from .exports import available_exports, export_plan
    from .plan import Plan

    if list_targets:
        for name, desc in available_exports().items():
            print(f"{name:12s} {desc}")
        return
    if plan_path is None or to is None:
        raise BadInputError("pass a plan and a target, e.g. `bitalloc export plan.json --to gguf` (`--list` shows targets)")
    if to not in available_exports():
        raise BadInputError(f"unknown export target {to!r}; choose one of {', '.join(available_exports())}")
    from .io import check_output_dir

    out = out_dir if out_dir is not None else plan_path.with_name(f"{plan_path.stem}-{to}")
    check_output_dir(out)
    plan = Plan.load(plan_path)
    extra = {}
    if calib is not None and to != "gguf":
        raise BadInputError(f"--calib is for --to gguf (it writes imatrix.gguf); {to} takes no calibration")
    # imatrix.gguf carries the importance weights an imatrix plan was made with: written whenever the plan's
    # windows can be had (a built-in or self plan rebuilds them; a file plan needs --calib)
    if to == "gguf" and (calib is not None or plan.quantizer == "imatrix"):
        from .calibration import calibration_for_plan, plan_calibration_text, rebuildable_without_text

        if calib is not None or rebuildable_without_text(plan.calibration):
            from .models import load_model

            plan_calibration_text(plan.calibration, calib, not skip_calib_hash_check)  # refuse other text before loading
            loaded = load_model(plan.model.source)
            c = calibration_for_plan(plan.calibration, loaded.tokenizer, loaded.model, calib, not skip_calib_hash_check)
            extra = dict(model=loaded.model, calibration=c.tokens, calibration_source=c.source)
    result = export_plan(plan, to, out, wording=(flag, cli_step), allow_untied=allow_untied, **extra)
    for f in result.files:
        print(f"wrote {f}")
    for line in result.unsupported:
        print(f"warning: {line}", file=sys.stderr)
    if result.unsupported:
        print(f"warning: {len(result.unsupported)} line(s) above: what {to} cannot express as planned", file=sys.stderr)
    for note in result.notes:
        print(note)


# What a Ctrl-C leaves behind, per command (the one line printed with exit code 130).
KEPT_ON_INTERRUPT = {
    "profile": "finished blocks are kept in the --out folder's parts/; run the same command again to resume from them",
    "plan": "no plan was written; a --profile folder is unchanged",
    "apply": "--out was not changed; the unfinished temporary folder is removed (or by the next apply)",
    "latency": "no hardware profile was written",
}


def _interrupted() -> None:
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "bitalloc")
    kept = KEPT_ON_INTERRUPT.get(command, "nothing was written")
    print(f"interrupted: `bitalloc {command}` stopped by Ctrl-C; {kept}", file=sys.stderr)
    sys.exit(130)


def _click_errors() -> tuple[type, ...]:
    """Usage errors: click's own, and those of the click that newer typer versions vendor as typer._click."""
    import click

    kinds = [click.ClickException]
    try:
        from typer import _click  # typer >= 0.2x
    except ImportError:
        pass
    else:
        kinds.append(_click.ClickException)
    return tuple(kinds)


# Library settings (errors.setting) whose flag is not the setting's name with dashes.
_FLAG_OF_SETTING = {"calibration": "--calib", "ties": "--tie", "pins": "--pin", "ray.workers": "--ray-workers",
                    "model_sources": "--model"}


def flag(setting_name: str) -> str:
    """The command-line flag that sets a library setting named in an error message."""
    return _FLAG_OF_SETTING.get(setting_name, "--" + setting_name.replace("_", "-"))


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """The library's warnings as one line, like its errors: what a user reads, not where in the code."""
    return f"warning: {message}\n"


def main() -> None:
    warnings.formatwarning = _warning_line
    try:
        rc = app(standalone_mode=False)
    except BitallocError as e:
        # One line whatever the terminal width, so scripts can grep it.
        print(f"error: {e.phrased(flag, cli_step)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # outside the command (typer turns one inside into Exit(130), returned below)
        _interrupted()
    except (typer.Exit, typer.Abort) as e:
        sys.exit(getattr(e, "exit_code", 1))
    except _click_errors() as e:  # usage errors carry their own exit code (2)
        e.show()
        sys.exit(e.exit_code)
    # Without standalone mode typer returns an exit code instead of exiting: 130 is a Ctrl-C.
    if rc == 130:
        _interrupted()
    if isinstance(rc, int) and rc != 0:
        sys.exit(rc)


if __name__ == "__main__":
    main()
