"""RTN with importance-weighted scales ("rtn-w"): round to nearest, each group's stored scale (and
zero-point) chosen to minimise Σ_j h_j (w_j − q_j)² with h = diag H, the mean x_j² of the layer's
calibration inputs (scale_search.py). Every format family gets it: INT (sym/asym, any group size),
fp8/fp6/fp4 with fp16 or fp32 scales, MX (E8M0) and NVFP4 (E4M3 block scales). "rtn-w-signed" is the
same with signed scales for symmetric INT (SearchGrid.signed). "awq" is rtn-w on an equalized model
(equalize.py: AWQ's activation-aware input scaling, folded into norms and weights; rtn-w's scale search
is AWQ's clipping search).

It needs calibration like GPTQ, but only H's diagonal from the unquantized model, and no column
loop: the candidate table stays within about the cost of RTN's, and applying a plan takes one
forward pass over the plan's calibration windows (statistics.input_importance) instead of GPTQ's
block-by-block run, giving exactly the weights whose errors the table holds. Without H (an
embedding) it is plain RTN, in the table and at apply.
"""

from __future__ import annotations

import torch

from ..formats.int import grouped, int_dequantize
from ..options import QuantOption
from . import QuantizedWeight, register_quantizer
from .rtn import rtn
from .scale_search import (DEFAULT_GRID, SearchGrid, search_fp_scales, search_int_scales, search_mx_scales,
                           search_nvfp4_scales)


def importance(hessian: torch.Tensor) -> torch.Tensor:
    """Per-input-column importance h [in] = diag H (mean x² of each input), float32, ≥ 0.

    hessian: H [in, in], or its diagonal [in] already (statistics.input_importance, at apply time)."""
    h = hessian if hessian.dim() == 1 else torch.diagonal(hessian)
    return h.detach().float().clamp(min=0)


def quantize_weighted(weight: torch.Tensor, option: QuantOption, h: torch.Tensor,
                      grid: SearchGrid = DEFAULT_GRID) -> QuantizedWeight:
    """Quantize `weight` [out, in] as `option` with scales searched under column importances h [in].

    Codes and scales as RTN returns them (formats.QuantizedWeight), holding the scales it chose.
    """
    w = weight.detach().float()
    out_f, in_f = w.shape
    if h.shape != (in_f,):
        raise ValueError(f"importance has shape {tuple(h.shape)}, the weight has {in_f} inputs")
    scheme = option.scheme
    if scheme == "int":
        g = in_f if option.per_channel else option.group_size
        wg = grouped(w, option.group_size)  # [out, n_groups, g]
        q, s, z = search_int_scales(wg, h.view(1, in_f // g, g), option, grid)
        codes = q.reshape(out_f, in_f).to(torch.int32)
        s, z = s.squeeze(-1), z.squeeze(-1)
        return QuantizedWeight(option, int_dequantize(codes, s, z), codes, s, z)
    if scheme == "fp":
        wg = grouped(w, option.group_size)
        hg = grouped(h.expand(out_f, in_f), option.group_size)
        values, s, e = search_fp_scales(wg, hg, option, grid)
        return QuantizedWeight(option, values.reshape(out_f, in_f), e.reshape(out_f, in_f), s.squeeze(-1))
    if scheme == "mx":
        values, s, e = search_mx_scales(w, h, option, grid)
        return QuantizedWeight(option, values, e, s)
    if scheme == "nvfp4" and w.abs().amax() > 0:
        values, b, e, g = search_nvfp4_scales(w, h, grid)
        return QuantizedWeight(option, values, e, b, tensor_scale=g)
    return rtn(w, option)  # keep, or an all-zero NVFP4 weight


@register_quantizer("rtn-w", importance_only=True)
def rtn_w(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None,
          steps: int = DEFAULT_GRID.steps, min_ratio: float = DEFAULT_GRID.min_ratio,
          halvings: int = DEFAULT_GRID.halvings, refits: int = DEFAULT_GRID.refits,
          signed: bool = DEFAULT_GRID.signed) -> QuantizedWeight:
    """Round to nearest with scales searched under h = diag(hessian) (hessian: the layer's H [in, in] or diag H [in])."""
    return quantize_weighted(weight, option, importance(hessian), SearchGrid(steps, min_ratio, halvings, refits, signed))


@register_quantizer("rtn-w-signed", importance_only=True)
def rtn_w_signed(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """rtn-w with a negative scale for every symmetric INT group whose largest-magnitude weight is positive."""
    return rtn_w(weight, option, hessian, signed=True)


@register_quantizer("awq", importance_only=True, unfolded="rtn-w")
def awq(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None) -> QuantizedWeight:
    """rtn-w of a weight of the equalized model (the pipeline folds the scales in first: equalize.py); a GGUF type
    gets llama.cpp's own importance-weighted quantizer (imatrix), which rtn-w does not search."""
    if option.fmt == "gguf":
        from .imatrix import imatrix

        return imatrix(weight, option, hessian)
    return rtn_w(weight, option, hessian)
