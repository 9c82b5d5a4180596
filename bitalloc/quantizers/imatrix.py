"""llama.cpp's importance-weighted quantization: what `llama-quantize --imatrix` does to a GGUF type.

llama-imatrix collects, per linear layer, the mean of x² over the calibration tokens for each input
column; that is the diagonal of the layer-input Hessian H = mean x xᵀ that bitalloc profiles anyway.
llama.cpp's quantizers (formats/gguf.py) weigh each weight's rounding error by it.
"""

from __future__ import annotations

import torch

from ..errors import BadInputError, setting
from ..formats.gguf import gguf_quantize
from ..options import QuantOption
from . import QuantizedWeight, register_quantizer
from .rtn import rtn


@register_quantizer("imatrix", needs_hessian=True)
def imatrix(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """GGUF type `option.element` with importance diag(hessian) [in]; keep options stay fp16."""
    if option.fmt == "keep":
        return rtn(weight, option)
    if option.fmt != "gguf":
        raise BadInputError(f"the imatrix quantizer is llama.cpp's and quantizes GGUF types only, not {option.label}; "
                            f"plan with {setting('target')} llama.cpp or use {setting('quantizer')} rtn/gptq")
    q = gguf_quantize(weight, option.element, torch.diagonal(hessian))
    return QuantizedWeight(option, torch.from_numpy(q.values), blocks=q.blocks)
