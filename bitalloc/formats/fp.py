"""Minifloat elements (FP8 E4M3/E5M2, FP6 E2M3/E3M2, FP4 E2M1) with an fp16 scale per channel or
group, or one fp32 scale per tensor. The element rounding here is shared by mx.py and nvfp4.py."""

from __future__ import annotations

import torch

from ..options import ELEMENTS, Element, QuantOption
from . import register_format
from .int import fp16_round_up


def pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as float32, exactly, for integer k in [-149, 127] (built from the bit pattern, so no
    pow/exp rounding can creep in; k < -126 gives float32 subnormals)."""
    k = k.to(torch.int32)
    normal = torch.bitwise_left_shift((k + 127).clamp(min=1), 23)
    subnormal = torch.bitwise_left_shift(torch.ones_like(k), (k + 149).clamp(0, 22))
    return torch.where(k >= -126, normal, subnormal).view(torch.float32)


def round_to_element(x: torch.Tensor, element: Element | str) -> torch.Tensor:
    """x (float32) rounded to the nearest value of `element`, ties to even, saturating at ±max.

    OCP FP8 spec / MX v1.0 §6.3 conversion with roundTiesToEven and saturation: the step in the
    binade of |x| is 2^(e - mbits), with e = floor(log2|x|) but never below the smallest normal
    exponent (that is the subnormal range). |x| / step is exact (a power-of-two division), and
    torch.round rounds halves to even; a carry into the next binade lands on a representable
    value, so one rounding suffices.
    """
    el = ELEMENTS[element] if isinstance(element, str) else element
    a = x.abs()
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1): floor(log2 a) = e - 1
    exp = (e.to(torch.int32) - 1).clamp(min=el.min_exp)
    step = pow2(exp - el.mbits)
    q = (torch.round(a / step) * step).clamp(max=el.max_value)
    return torch.copysign(q, x)


def grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group]; None = one group per row, 0 = the whole tensor."""
    out_f, in_f = weight.shape
    if group_size == 0:
        return weight.reshape(1, 1, out_f * in_f)
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise ValueError(f"group size {g} does not divide in_features={in_f}")
    return weight.reshape(out_f, in_f // g, g)


@register_format("fp")
def rtn_fp(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    """Scale each group so its largest magnitude maps to the element's max, round elements to nearest.

    The fp16 scale is rounded up (as for INT) so the group max never clips; a per-tensor scale
    is computed and stored in fp32, and the rare 1-ulp overshoot is absorbed by saturation.
    """
    el = ELEMENTS[option.element]
    w = grouped(weight.float(), option.group_size)
    scale = w.abs().amax(dim=-1, keepdim=True) / el.max_value
    if option.scale_fmt == "fp16":
        scale = fp16_round_up(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    q = round_to_element(w / scale, el)
    return (q * scale).reshape(weight.shape).to(weight.dtype)
