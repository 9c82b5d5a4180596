"""Quantize-dequantize functions, one per number-format family, looked up by `QuantOption.fmt`."""

from __future__ import annotations

from typing import Callable

import torch

from ..options import QuantOption

QuantizeFn = Callable[[torch.Tensor, QuantOption], torch.Tensor]
_FORMATS: dict[str, QuantizeFn] = {}


def register_format(name: str) -> Callable[[QuantizeFn], QuantizeFn]:
    def deco(fn: QuantizeFn) -> QuantizeFn:
        _FORMATS[name] = fn
        return fn

    return deco


def quantize_dequantize(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    """Return the values the stored option would reproduce for `weight` [out, in] (same dtype)."""
    try:
        fn = _FORMATS[option.fmt]
    except KeyError:
        raise ValueError(f"no quantizer registered for format {option.fmt!r}") from None
    return fn(weight, option)


from . import int as _int  # noqa: E402,F401  (registers "int")
from . import keep as _keep  # noqa: E402,F401  (registers "keep")
