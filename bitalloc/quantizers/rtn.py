"""Round-to-nearest: each group's scale from its own range, every weight to the nearest code."""

from __future__ import annotations

import torch

from ..formats import quantize_dequantize
from ..formats.int import int_codes, int_dequantize
from ..options import QuantOption
from . import QuantizedWeight, register_quantizer


@register_quantizer("rtn")
def rtn(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    w = weight.detach().float()
    if option.fmt == "int":
        codes, scale, zero = int_codes(w, option)
        return QuantizedWeight(option, int_dequantize(codes, scale, zero), codes, scale, zero)
    return QuantizedWeight(option, quantize_dequantize(w, option).float())
