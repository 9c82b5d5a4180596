"""RTN with MSE-optimal clipping: each group's range is shrunk by the ratio (from a grid) that
minimises that group's squared rounding error, as the GPTQ reference's `Quantizer(mse=True)` and
AWQ's clip search do. Ratio 1 (plain RTN) is on the grid, so no group is worse than with RTN.
"""

from __future__ import annotations

import torch

from ..formats.int import grouped, int_dequantize, int_range, int_scales
from ..options import QuantOption
from . import QuantizedWeight, register_quantizer
from .rtn import rtn


@register_quantizer("rtn-mse")
def rtn_mse(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None, steps: int = 20,
            min_ratio: float = 0.5) -> QuantizedWeight:
    """INT: per group, the clip ratio in {1, 1 - δ, ..., > min_ratio} (`steps` values) with least Σ (Q(w) - w)².

    The clipped scales come from formats/int.py's rules applied to ratio · w (fp16-representable,
    integer zero-points), so codes/scale/zero reproduce the values exactly. Other formats: RTN.
    """
    if option.fmt != "int":
        return rtn(weight, option)
    w = grouped(weight.detach().float(), option.group_size)  # [out, n_groups, g]
    lo, hi = int_range(option)
    best = None
    for i in range(steps):
        ratio = 1.0 - i * (1.0 - min_ratio) / steps
        scale, zero = int_scales(w * ratio, option)  # [out, n_groups, 1]
        q = torch.clamp(torch.round(w / scale) + zero, lo, hi)
        err = (((q - zero) * scale - w) ** 2).sum(-1, keepdim=True)  # [out, n_groups, 1]
        if best is None:
            best = [q, scale, zero, err]
            continue
        better = err < best[3]
        best = [torch.where(better, new, old) for new, old in zip((q, scale, zero, err), best)]
    q, scale, zero, _ = best
    codes = q.reshape(weight.shape).to(torch.int32)
    scale, zero = scale.squeeze(-1), zero.squeeze(-1)
    return QuantizedWeight(option, int_dequantize(codes, scale, zero), codes, scale, zero)
