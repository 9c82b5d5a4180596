"""Quantize a whole model's planned modules with one quantizer, in place, keeping the codes for packers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BadInputError
from ..models import set_weight_matrix, weight_matrix
from ..options import QuantOption
from . import QuantizedWeight, equalizes, importance_only, needs_hessian, quantize_weight, setting_names
from ..progress import steps


def quantize_model(model: nn.Module, options: dict[str, QuantOption], quantizer: str = "rtn",
                   calibration: torch.Tensor | None = None, progress: bool = False, *, cache_dir: str | Path | bool | None = None,
                   content_hash: str | None = None, hessian_tokens: int | None = None, float_target: float = 0.0,
                   token_weighted: bool = False, **settings: Any) -> dict[str, QuantizedWeight]:
    """Replace each named module's weight by its quantized values; return module -> QuantizedWeight.

    calibration: token ids [windows, seq_len] (or a Calibration), needed by quantizers that use the
    layer Hessian: importance-only ones (rtn-w) take diag H from one forward pass of the unquantized
    model (as the candidate table did); the others (gptq) run block by block (quantizers/sequential.py).
    An equalizing quantizer (awq) first folds its scales into `model` (equalize.py), as profiling did; with
    cache_dir, scales a profile of these weights (content_hash: theirs, when the caller has it) left there.
    hessian_tokens: a block-by-block quantizer (gptq) takes its Hessians from this many tokens of the calibration
    text instead (calibration.widened: the same windows and more of the text, as many as it holds), while the
    fold stays on the calibration's own windows; ids given as they are hold no more text and are used as they are.
    float_target: a block-by-block quantizer fits each layer that far (0 to 1) toward the float model's output
    (quantizers/sequential.py).
    token_weighted: a block-by-block quantizer weighs each calibration token by its output's loss gradient
    (quantizers/sequential.py).
    """
    sequential = needs_hessian(quantizer) and not importance_only(quantizer)
    walk_settings = {"hessian_tokens": hessian_tokens, "float_target": float_target or None,
                     "token_weighted": token_weighted or None}  # the block walk's own, not the quantizer's
    for name, value in walk_settings.items():
        if value is not None and not sequential:
            raise BadInputError(f"{name} applies to quantizers that run block by block on layer Hessians (gptq, awq-gptq); "
                                f"{quantizer} takes none: drop it")
    unknown = sorted(set(settings) - set(setting_names(quantizer)))
    if unknown:
        takes = [*setting_names(quantizer), *(walk_settings if sequential else ())]
        raise BadInputError(f"the {quantizer} quantizer takes no setting {', '.join(map(repr, unknown))}; "
                            + (f"it takes {', '.join(takes)}" if takes else "it takes none"))
    if not isinstance(float_target, (int, float)) or not 0 <= float_target <= 1:
        raise BadInputError(f"float_target must be a number from 0 to 1, got {float_target!r}")
    importances: dict[str, Any] = {}
    if needs_hessian(quantizer):
        if calibration is None:
            raise BadInputError(f"the {quantizer} quantizer needs calibration windows to collect layer Hessians; pass "
                                "calibration=ids, or tokenizer= to rebuild the plan's own, or use quantizer='rtn'")
        if equalizes(quantizer):
            from ..equalize_cache import equalize_cached

            equalize_cached(model, _as_windows(calibration), cache_dir, content_hash, progress=progress)
        if sequential:
            from .sequential import quantize_sequential

            if hessian_tokens is not None:
                windows = _as_windows(calibration)
                if not isinstance(hessian_tokens, int) or hessian_tokens < windows.shape[1]:
                    from ..config import HESSIAN_TEXT_MULTIPLE

                    raise BadInputError(f"hessian_tokens must be a whole number of at least one window ({windows.shape[1]} "
                                        f"tokens), got {hessian_tokens!r}; e.g. {HESSIAN_TEXT_MULTIPLE} times the plan's "
                                        "calibration tokens (the default on text you supply)")
                if hasattr(calibration, "seeded_pick"):  # a Calibration, not bare ids
                    from ..calibration import widened

                    calibration = widened(calibration, hessian_tokens) or calibration
            return quantize_sequential(model, options, quantizer, _as_windows(calibration), progress=progress,
                                       float_target=float_target, token_weighted=bool(token_weighted), **settings)
        from ..profile.statistics import input_importance

        importances = input_importance(model, list(options), _as_windows(calibration), progress=progress)
    result = {}
    for name, option in steps(options.items(), f"quantize ({quantizer})", show=progress, unit="module"):
        module = model.get_submodule(name)
        w = weight_matrix(module).detach()
        if importances and importances[name] is None:  # an embedding: rounded to nearest, as in the table
            q = quantize_weight(w, option, "rtn")
        else:
            q = quantize_weight(w, option, quantizer, hessian=importances.get(name), **settings)
        set_weight_matrix(module, q.values.to(w.dtype))
        result[name] = q
    return result


def _as_windows(calibration: Any) -> torch.Tensor:
    tokens = getattr(calibration, "tokens", calibration)  # a Calibration or its token ids
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise BadInputError("calibration for a Hessian-based quantizer must be token ids [windows, seq_len] or a Calibration")
    return tokens
