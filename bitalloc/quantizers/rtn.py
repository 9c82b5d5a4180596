"""Round-to-nearest: each group's scale from its own range, every weight to the nearest code.

Each format family's own quantizer (bitalloc/formats); GGUF types get llama.cpp's reference
quantizer, what llama-quantize does without an imatrix."""

from __future__ import annotations

import torch

from ..formats import quantize
from ..options import QuantOption
from . import QuantizedWeight, register_quantizer


@register_quantizer("rtn")
def rtn(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    return quantize(weight, option)
