"""Round-to-nearest: each group's scale from its own range, every weight to the nearest code."""

from __future__ import annotations

import torch

from ..formats import quantize_dequantize
from ..formats.gguf import gguf_quantize
from ..formats.int import int_codes, int_dequantize
from ..options import QuantOption
from . import QuantizedWeight, register_quantizer


@register_quantizer("rtn")
def rtn(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    w = weight.detach().float()
    if option.fmt == "int":
        codes, scale, zero = int_codes(w, option)
        return QuantizedWeight(option, int_dequantize(codes, scale, zero), codes, scale, zero)
    if option.fmt == "gguf":  # llama.cpp's reference quantizer: what llama-quantize does without an imatrix
        q = gguf_quantize(w, option.element)
        return QuantizedWeight(option, torch.from_numpy(q.values), blocks=q.blocks)
    return QuantizedWeight(option, quantize_dequantize(w, option).float())
