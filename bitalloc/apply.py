"""Materialize a plan: each planned weight is replaced by the values its quantizer stores (RTN by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import (FLOAT_TARGET, FLOAT_TARGET_WIDENED, HESSIAN_TEXT_MULTIPLE, TOKEN_WEIGHTED_ON_TEXT, quantizer_settings,
                     supplied_calibration)
from .errors import PlanMismatchError
from .formats import quantize_dequantize
from .models import check_weights, set_weight_matrix, weight_matrix, weights_hash
from .options import QuantOption
from .plan import Plan
from .quantizers.materialize import quantize_model


def check_plan_matches(model: nn.Module, plan: Plan, check_hash: bool = True) -> None:
    """Raise PlanMismatchError unless every planned module exists with the planned shape
    (and, with check_hash, the weights are the ones the plan was made for)."""
    check_weights(model)  # meta-device or NaN/Inf weights: refused with the module's name, not a traceback
    names = dict(model.named_modules())
    for a in plan.assignments:
        if a.module not in names:
            raise PlanMismatchError(f"plan names module {a.module!r}, which this model does not have; use the model the plan was made for")
        shape = tuple(weight_matrix(names[a.module]).shape)
        if shape != tuple(a.shape):
            raise PlanMismatchError(f"module {a.module} has weight shape {list(shape)}, the plan expects {list(a.shape)}")
    if check_hash:
        from .equalize import weights_before

        actual = weights_before(model) or weights_hash(model)  # an equalized model: the weights it was folded from
        if actual != plan.model.content_hash:
            raise PlanMismatchError(
                f"plan was made for weights {plan.model.content_hash[:19]}…, this model has {actual[:19]}…; "
                "re-plan for this model, or skip the check (--skip-hash-check / check_hash=False)"
            )


def apply(model: nn.Module, plan: Plan, check_hash: bool = True, quantizer: str | None = None,
          calibration: torch.Tensor | None = None, progress: bool = False, *, tokenizer: Any = None,
          cache_dir: str | Path | bool | None = None, **settings) -> nn.Module:
    """Quantize the planned weights in place with `quantizer` (default: the one the plan was made for).

    calibration: token ids [windows, seq_len] (or a Calibration) for quantizers that need layer
    Hessians (gptq, rtn-w, awq); without it, a plan made in this process uses the windows it was made on, and
    a loaded one needs `tokenizer` to rebuild its own (built-in set or self; calibration.calibration_for_plan)
    or `calibration`. settings go to the quantizer (gptq: damp, block_size, act_order, hessian_tokens, float_target,
    token_weighted; their defaults follow the plan's calibration text: plan_quantizer_settings); one it does not take
    is refused.
    cache_dir: the profile cache, where an equalizing quantizer (awq) finds the scales its profile searched (a
    folder, True = the default one, None/False = none: profile.store.cache_folder).
    """
    check_plan_matches(model, plan, check_hash)
    quantizer = quantizer or plan.quantizer
    settings = plan_quantizer_settings(plan, quantizer, settings)
    calibration = plan_windows(model, plan, quantizer, calibration, tokenizer)
    quantize_model(model, plan.options_by_module(), quantizer, calibration, progress=progress, cache_dir=cache_dir,
                   content_hash=checked_hash(plan, check_hash), **settings)
    return model


def plan_quantizer_settings(plan: Plan, quantizer: str, settings: dict) -> dict:
    """`settings` over the defaults `quantizer` runs with for this plan. Those its profile's table was made with:
    GPTQ's column order follows whether the plan was calibrated on text the user supplied (config.quantizer_settings).
    And those the table does not use: a block-by-block quantizer (gptq, awq-gptq) takes its Hessians from
    HESSIAN_TEXT_MULTIPLE times the plan's calibration tokens of its text, the user's or the built-in set (its
    hessian_tokens; as much as the text holds), and fits each layer FLOAT_TARGET of the way toward the float model's
    output (quantize_model's float_target); on supplied text FLOAT_TARGET_WIDENED of the way, each token weighed by
    its loss gradient (TOKEN_WEIGHTED_ON_TEXT). Text sampled from the model (self) has no more windows to read."""
    from .quantizers import importance_only, needs_hessian

    source, tokens = plan.calibration.get("source"), plan.calibration.get("tokens")
    supplied = supplied_calibration(source)
    defaults = quantizer_settings(quantizer, supplied)
    if needs_hessian(quantizer) and not importance_only(quantizer):
        defaults["float_target"] = FLOAT_TARGET
        if tokens and source != "self":
            defaults["hessian_tokens"] = HESSIAN_TEXT_MULTIPLE * int(tokens)
        if supplied and tokens:
            defaults["float_target"] = FLOAT_TARGET_WIDENED
            defaults["token_weighted"] = TOKEN_WEIGHTED_ON_TEXT
    return {**defaults, **settings}


def checked_hash(plan: Plan, check_hash: bool) -> str | None:
    """The content hash of the weights being quantized, known without hashing them when check_plan_matches has
    checked they are the plan's (else None)."""
    return plan.model.content_hash if check_hash else None


def plan_windows(model: nn.Module, plan: Plan, quantizer: str, calibration: Any, tokenizer: Any,
                 text_path: Any = None, check_hash: bool = True) -> Any:
    """`calibration` as given; else, when `quantizer` needs layer Hessians, the plan's own windows (a Calibration):
    those it was made on when it was made in this process (plan.calibration_windows), or, with a tokenizer at hand,
    rebuilt on the (still unquantized) model (from `text_path` for a plan calibrated on a file:
    calibration.calibration_for_plan); else None."""
    from .quantizers import needs_hessian

    if calibration is not None or not needs_hessian(quantizer):
        return calibration
    if plan.calibration_windows is not None:  # made in this process: the very windows it was profiled on
        return plan.calibration_windows
    if tokenizer is None:
        return None
    from .calibration import calibration_for_plan

    return calibration_for_plan(plan.calibration, tokenizer, model, text_path, check_hash)


def apply_options(model: nn.Module, options: dict[str, QuantOption]) -> nn.Module:
    """Quantize-dequantize each named module's weight with its option, in place."""
    for name, option in options.items():
        module = model.get_submodule(name)
        set_weight_matrix(module, quantize_dequantize(weight_matrix(module).detach(), option))
    return model
