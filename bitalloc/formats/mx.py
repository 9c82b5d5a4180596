"""OCP Microscaling (MX v1.0): blocks of 32 elements share one E8M0 scale, a power of two.

Spec §6.3 ("minimally supported" conversion): X = floor(log2(max|v|)) - emax_elem, clamped to the
E8M0 range [-127, 127]; each element is v / 2^X rounded to nearest-even and saturated at the
element's max. Known consequence (the spec's own choice, kept here): max|v| / 2^X lies in
[2^emax, 2^(emax+1)), which can exceed the element max (6 for E2M1, 448 for E4M3, ...), so the
block's largest values may be clipped — by up to 25% for MXFP4 (a block max of 7.9·2^X is stored
as 6·2^X). Rounding the scale up instead (torchao's RCEIL/CEIL modes) avoids the clipping at the
cost of resolution; it is not offered as an option here.

Label: mxfp{bits}{element}, the element omitted for MXFP4 (E2M1 is its only one). Plans store MX
options as fmt "fp" with scale_fmt "e8m0".
"""

from __future__ import annotations

import re

from ..lazy import LazyModule
from ..options import QuantOption
from . import Format, QuantizedWeight, register_format
from .fp import ELEMENTS, SCALE_BITS, check_element, checked_bits, element_bits, grouped, pow2, round_to_element

torch = LazyModule("torch")
MX_BLOCK = 32  # OCP MX v1.0 §5: k = 32 elements share one E8M0 scale
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # 0xFF is NaN, no zero: 2^-127 .. 2^127
_LABEL = re.compile(r"mxfp(\d+)(e\dm\d)?")


def mx_option(element: str) -> QuantOption:
    """OCP MX v1.0: blocks of 32 elements sharing one E8M0 (power-of-two) scale."""
    return QuantOption("fp", element_bits(element), MX_BLOCK, True, SCALE_BITS["e8m0"], 0, element, "e8m0")


def check(o: QuantOption) -> None:
    check_element(o)
    if o.group_size != MX_BLOCK or o.tensor_scale_bits:
        raise ValueError(f"MX (e8m0 scales) uses blocks of {MX_BLOCK}")


def label(o: QuantOption) -> str:
    return f"mxfp{o.bits}" + ("" if o.element == "e2m1" else o.element)


def parse(text: str) -> QuantOption | None:
    if not (m := _LABEL.fullmatch(text)):
        return None
    element = m[2] or ("e2m1" if m[1] == "4" else "")
    if not element:
        raise ValueError(f"mxfp{m[1]} needs an element, e.g. mxfp{m[1]}{'e2m3' if m[1] == '6' else 'e4m3'}")
    return checked_bits(mx_option(element), int(m[1]))


def mx_shared_exponent(amax: torch.Tensor, emax_elem: int) -> torch.Tensor:
    """The E8M0 exponent X of each block (int32), per spec §6.3; an all-zero block gets the minimum."""
    _, e = torch.frexp(amax)  # floor(log2 amax) = e - 1 for amax > 0
    x = e.to(torch.int32) - 1 - emax_elem
    x = torch.where(amax > 0, x, torch.full_like(x, E8M0_MIN_EXP))
    return x.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def quantize(w: torch.Tensor, o: QuantOption) -> QuantizedWeight:
    el = ELEMENTS[o.element]
    g = grouped(w, MX_BLOCK)  # [out, in/32, 32]
    scale = pow2(mx_shared_exponent(g.abs().amax(dim=-1, keepdim=True), el.emax))
    q = round_to_element(g / scale, el)  # dividing by a power of two is exact
    return QuantizedWeight(o, (q * scale).reshape(w.shape), codes=q.reshape(w.shape), scale=scale.squeeze(-1))


register_format(Format(
    "mx", "fp", check, label, parse, quantize, scale_fmts=("e8m0",), elements=tuple(ELEMENTS), label_examples=("mxfp4", "mxfp6e3m2"),
    grid_of=lambda o: f"mxfp{o.bits}",
    grids={"mxfp4": lambda g: [mx_option("e2m1")], "mxfp6": lambda g: [mx_option("e2m3"), mx_option("e3m2")],
           "mxfp8": lambda g: [mx_option("e4m3"), mx_option("e5m2")]}))
