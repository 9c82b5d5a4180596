"""Quantizers: how a planned weight becomes stored codes. Looked up by name (`--quantizer rtn|gptq`).

A quantizer takes one weight [out, in], its option, and (for second-order methods) the layer's input
Hessian H = mean_t x_t x_tᵀ [in, in], and returns a QuantizedWeight: the values the stored weight
reproduces, plus the codes and scales the format stores (formats.QuantizedWeight; what the packers
write to disk). The candidate table and the applier both call `quantize_weight`, so the
error the planner predicts is the error of the quantizer that will be applied.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator

import torch

from ..errors import BadInputError, setting
from ..formats import QuantizedWeight
from ..options import QuantOption


Quantizer = Callable[..., QuantizedWeight]  # (weight, option, hessian=None, **settings)
_QUANTIZERS: dict[str, Quantizer] = {}
_NEEDS_HESSIAN: set[str] = set()
_IMPORTANCE_ONLY: set[str] = set()
_UNFOLDED: dict[str, str] = {}  # an equalizing quantizer -> the one it is on the folded model
_MEASURED_BY: dict[str, str] = {}  # a quantizer -> the cheaper one whose errors its candidate table holds
_ORDERS_COLUMNS: set[str] = set()
_SETTINGS_OF: dict[str, str] = {}  # a quantizer that passes its settings on -> the one that takes them


def register_quantizer(name: str, needs_hessian: bool = False, importance_only: bool = False,
                       unfolded: str | None = None, measured_by: str | None = None,
                       orders_columns: bool = False, settings_of: str | None = None) -> Callable[[Quantizer], Quantizer]:
    """importance_only: the quantizer reads only diag H [in] of the *unquantized* model's inputs (it may
    be passed as that vector), so one forward pass gives every module's, and a single module can be
    swapped in on its own; otherwise a Hessian quantizer (gptq) runs block by block on quantized inputs.
    unfolded: the model is equalized (equalize.py: scales folded into norms and weights, the same
    function) on the calibration windows before it is profiled or quantized, and the quantizer is then
    the one named here on the equalized weights (awq: rtn-w); what a step that cannot fold uses instead.
    measured_by: the candidate table of a plan for `name` holds this quantizer's errors, and the steps that
    swap single weights in (interactions, --verify, the evolutionary objective) use it: a stand-in measured to
    pick plans as good as `name`'s own table does, at less profiling time (awq-gptq: awq; docs/results.md).
    orders_columns: the quantizer takes `act_order`, whose default follows the calibration text (config.quantizer_settings).
    settings_of: the quantizer passes its keyword settings on to this one (setting_names reads that one's)."""
    def deco(fn: Quantizer) -> Quantizer:
        _QUANTIZERS[name] = fn
        if needs_hessian or importance_only or unfolded:
            _NEEDS_HESSIAN.add(name)
        if importance_only:
            _IMPORTANCE_ONLY.add(name)
        if unfolded:
            _UNFOLDED[name] = unfolded
        if measured_by:
            _MEASURED_BY[name] = measured_by
        if orders_columns:
            _ORDERS_COLUMNS.add(name)
        if settings_of:
            _SETTINGS_OF[name] = settings_of
        return fn

    return deco


_BATCHED: dict[str, Callable[..., list[QuantizedWeight]]] = {}


def register_batched(name: str) -> Callable:
    """Register the several-options-at-once form of quantizer `name` (same results, shared work)."""
    def deco(fn):
        _BATCHED[name] = fn
        return fn

    return deco


def available_quantizers() -> list[str]:
    return sorted(_QUANTIZERS)


def needs_hessian(name: str) -> bool:
    return name in _NEEDS_HESSIAN


def importance_only(name: str) -> bool:
    return name in _IMPORTANCE_ONLY


def equalizes(name: str) -> bool:
    return name in _UNFOLDED


def unfolded_quantizer(name: str) -> str:
    """What `name` is on a model it cannot fold its scales into (awq: rtn-w); `name` itself when it folds none."""
    return _UNFOLDED.get(name, name)


def orders_columns(name: str) -> bool:
    """Whether quantizer `name` takes `act_order` (GPTQ's column order; config.quantizer_settings picks it)."""
    return name in _ORDERS_COLUMNS


def setting_names(name: str) -> tuple[str, ...]:
    """The keyword settings quantizer `name` takes for one weight (damp, act_order, ... for gptq), read from its
    function's signature (or that of the quantizer it passes them on to), so a new setting needs no list."""
    if name not in _QUANTIZERS:
        raise BadInputError(f"unknown quantizer {name!r}; choose one of {', '.join(available_quantizers())}")
    fn = _QUANTIZERS[_SETTINGS_OF.get(name, name)]
    return tuple(p.name for p in inspect.signature(fn).parameters.values()
                 if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("weight", "option", "hessian"))


def measuring_quantizer(name: str) -> str:
    """The quantizer whose ΔW the candidate table of a `name` plan holds (its measured_by; else `name` itself)."""
    return _MEASURED_BY.get(name, name)


def quantize_weight(weight: torch.Tensor, option: QuantOption, quantizer: str = "rtn",
                    hessian: torch.Tensor | None = None, **settings: Any) -> QuantizedWeight:
    """Quantize `weight` [out, in] as `option` with the named quantizer."""
    try:
        fn = _QUANTIZERS[quantizer]
    except KeyError:
        raise BadInputError(f"unknown quantizer {quantizer!r}; choose one of {', '.join(available_quantizers())}") from None
    if quantizer in _NEEDS_HESSIAN and hessian is None:
        raise BadInputError(f"the {quantizer} quantizer needs the layer's input Hessian from calibration data; "
                            f"pass calibration text ({setting('calibration')}) or use {setting('quantizer')} rtn")
    return fn(weight, option, hessian=hessian, **settings)


def check_without_hessian(quantizer: str, what: str, fix: str) -> None:
    """Refuse a sequential Hessian quantizer (gptq) for a step that swaps single weights in without
    running the model block by block (importance-only quantizers, rtn-w, are fine there)."""
    if quantizer in _NEEDS_HESSIAN and quantizer not in _IMPORTANCE_ONLY:
        raise BadInputError(f"{what} quantizes each weight without its layer's calibration Hessian, so it cannot "
                            f"follow the {quantizer} quantizer; {fix}")


def weight_values(weight: torch.Tensor, option: QuantOption, quantizer: str = "rtn",
                  importance: torch.Tensor | None = None) -> torch.Tensor:
    """The values `weight` [out, in] takes stored as `option` (same dtype), for the steps that swap weights
    in place (a scoring solver's trials, measured interactions, --verify).

    rtn is formats.quantize_dequantize exactly; an importance-only quantizer (rtn-w) needs `importance`,
    the module's diag H [in] (statistics.input_importance; None for an embedding, which is rounded to
    nearest as the candidate table does). Callers refuse sequential quantizers up front
    (check_without_hessian), naming their step.
    """
    if quantizer == "rtn" or (quantizer in _IMPORTANCE_ONLY and importance is None):
        from ..formats import quantize_dequantize

        return quantize_dequantize(weight, option)
    check_without_hessian(quantizer, "quantize-dequantize", "use rtn, rtn-mse or rtn-w")
    return quantize_weight(weight, option, quantizer, hessian=importance).values.to(weight.dtype)


def quantize_weight_options(weight: torch.Tensor, options: list[QuantOption], quantizer: str = "rtn",
                            hessian: torch.Tensor | None = None, chunk: int = 16,
                            **settings: Any) -> Iterator[QuantizedWeight]:
    """`quantize_weight` of one weight under each of `options` in turn (the candidate table's row).

    A quantizer with a batched form handles `chunk` options per call: shared work, bounded memory.
    """
    options = list(options)
    if quantizer in _BATCHED and hessian is not None:
        for start in range(0, len(options), chunk):
            yield from _BATCHED[quantizer](weight, options[start:start + chunk], hessian, **settings)
        return
    for o in options:
        yield quantize_weight(weight, o, quantizer, hessian=hessian, **settings)


from . import rtn as _rtn  # noqa: E402,F401  (registers "rtn")
from . import gptq as _gptq  # noqa: E402,F401  (registers "gptq", "gptq-signed", "gptq-minmax")
from . import rtn_mse as _rtn_mse  # noqa: E402,F401  (registers "rtn-mse")
from . import imatrix as _imatrix  # noqa: E402,F401  (registers "imatrix")
from . import rtn_weighted as _rtn_weighted  # noqa: E402,F401  (registers "rtn-w", "rtn-w-signed")
