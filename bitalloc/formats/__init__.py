"""Quantize-dequantize functions, one per number-format family, looked up by `QuantOption.scheme`."""

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
        fn = _FORMATS[option.scheme]
    except KeyError:
        raise ValueError(f"no quantizer registered for {option.scheme!r} ({option.label})") from None
    return fn(weight, option)


from . import int as _int  # noqa: E402,F401  (registers "int")
from . import keep as _keep  # noqa: E402,F401  (registers "keep")
from . import fp as _fp  # noqa: E402,F401  (registers "fp")
from . import mx as _mx  # noqa: E402,F401  (registers "mx")
from . import nvfp4 as _nvfp4  # noqa: E402,F401  (registers "nvfp4")
