"""llama.cpp's importance-weighted quantization: what `llama-quantize --imatrix` does to a GGUF type.

llama-imatrix collects, per linear layer, the mean of x² over the calibration tokens for each input
column, running the unquantized model; that is the diagonal of the layer-input Hessian H = mean x xᵀ
that bitalloc profiles anyway. llama.cpp's quantizers (formats/gguf.py) weigh each weight's rounding
error by it. So this quantizer is importance-only, like rtn-w: applying a plan takes one forward pass
of the unquantized model over the plan's calibration windows, and gives exactly the weights whose
errors the candidate table holds (and what llama-quantize makes with the exported imatrix.gguf).
"""

from __future__ import annotations

import torch

from ..errors import BadInputError, setting
from ..formats.gguf import gguf_quantize
from ..options import QuantOption
from . import QuantizedWeight, register_quantizer
from .rtn import rtn
from .rtn_weighted import importance


@register_quantizer("imatrix", importance_only=True)
def imatrix(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """GGUF type `option.element` with importance diag(hessian) (hessian: H [in, in] or diag H [in]);
    keep options stay fp16."""
    if option.fmt == "keep":
        return rtn(weight, option)
    if option.fmt != "gguf":
        raise BadInputError(f"the imatrix quantizer is llama.cpp's and quantizes GGUF types only, not {option.label}; "
                            f"plan with {setting('target')} llama.cpp or use {setting('quantizer')} rtn/gptq")
    q = gguf_quantize(weight, option.element, importance(hessian))
    return QuantizedWeight(option, torch.from_numpy(q.values), blocks=q.blocks)
