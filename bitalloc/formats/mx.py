"""OCP Microscaling (MX v1.0): blocks of 32 elements share one E8M0 scale, a power of two.

Spec §6.3 ("minimally supported" conversion): X = floor(log2(max|v|)) - emax_elem, clamped to the
E8M0 range [-127, 127]; each element is v / 2^X rounded to nearest-even and saturated at the
element's max. Known consequence (the spec's own choice, kept here): max|v| / 2^X lies in
[2^emax, 2^(emax+1)), which can exceed the element max (6 for E2M1, 448 for E4M3, ...), so the
block's largest values may be clipped — by up to 25% for MXFP4 (a block max of 7.9·2^X is stored
as 6·2^X). Rounding the scale up instead (torchao's RCEIL/CEIL modes) avoids the clipping at the
cost of resolution; it is not offered as an option here.
"""

from __future__ import annotations

import torch

from ..options import ELEMENTS, MX_BLOCK, QuantOption
from . import register_format
from .fp import grouped, pow2, round_to_element

E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # 0xFF is NaN, no zero: 2^-127 .. 2^127


def mx_shared_exponent(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """The E8M0 exponent X of each block (int32), per spec §6.3; an all-zero block gets the minimum."""
    _, e = torch.frexp(amax)  # floor(log2 amax) = e - 1 for amax > 0
    x = e.to(torch.int32) - 1 - emax_elem
    x = torch.where(amax > 0, x, torch.full_like(x, E8M0_MIN_EXP))
    return x.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


@register_format("mx")
def mx_quantize(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    el = ELEMENTS[option.element]
    w = grouped(weight.float(), MX_BLOCK)  # [out, in/32, 32]
    scale = pow2(mx_shared_exponent(w.abs().amax(dim=-1, keepdim=True), el.emax))
    q = round_to_element(w / scale, el)  # dividing by a power of two is exact
    return (q * scale).reshape(weight.shape).to(weight.dtype)
