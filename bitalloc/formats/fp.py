"""Minifloat elements (FP8 E4M3/E5M2, FP6 E2M3/E3M2, FP4 E2M1) with an fp16 scale per channel or
group, or one fp32 scale per tensor. Label: fp{bits}{element}-{g<size>|ch|tensor}.

The element formats and their rounding here are shared by mx.py and nvfp4.py (fmt "fp" as well).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..lazy import LazyModule
from ..options import PER_TENSOR, QuantOption
from . import Format, QuantizedWeight, register_format
from .int import fp16_round_up, group_label, grouped

torch = LazyModule("torch")


@dataclass(frozen=True)
class Element:
    """A sign-exponent-mantissa element format without infinities (OCP FP8 / MX v1.0 §5.3).

    max_value is given rather than derived: E4M3 ("fn") spends its top code on NaN (max 448),
    E5M2 keeps IEEE inf/NaN (max 57344), the MX FP6/FP4 formats use every code for numbers.
    """

    ebits: int
    mbits: int
    max_value: float

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return 2 ** (self.ebits - 1) - 1

    @property
    def min_exp(self) -> int:
        """Exponent of the smallest normal binade (subnormals share its step)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal binade: floor(log2(max_value)) (MX spec's emax_elem)."""
        return int(self.max_value).bit_length() - 1


ELEMENTS = {
    "e4m3": Element(4, 3, 448.0),
    "e5m2": Element(5, 2, 57344.0),
    "e2m3": Element(2, 3, 7.5),
    "e3m2": Element(3, 2, 28.0),
    "e2m1": Element(2, 1, 6.0),
}
# Width of each scale format. e8m0: MX power-of-two block scale; e4m3: NVFP4 block scale.
SCALE_BITS = {"fp16": 16, "fp32": 32, "e8m0": 8, "e4m3": 8}
_LABEL = re.compile(r"fp(\d+)(e\dm\d)-(ch|tensor|g\d+)")


def element_bits(element: str) -> int:
    return ELEMENTS[element].bits if element in ELEMENTS else 0  # 0: check() names the unknown element


def fp_option(element: str, group_size: int | None) -> QuantOption:
    """Minifloat elements with an fp16 scale per channel (None) or group, or one fp32 scale (0)."""
    scale_fmt = "fp32" if group_size == PER_TENSOR else "fp16"
    return QuantOption("fp", element_bits(element), group_size, True, SCALE_BITS[scale_fmt], 0, element, scale_fmt)


def check_element(o: QuantOption) -> None:
    """What every fmt "fp" option obeys (fp, mx, nvfp4): a known element of its width, symmetric,
    no zero-point, a known scale format of its width."""
    if o.element not in ELEMENTS:
        raise ValueError(f"unknown fp element {o.element!r}; known: {', '.join(ELEMENTS)}")
    if o.bits != (width := ELEMENTS[o.element].bits):
        raise ValueError(f"fp element {o.element} is {width} bits wide, not {o.bits}")
    if not o.symmetric or o.zero_bits:
        raise ValueError("fp options are symmetric and store no zero-point")
    if o.scale_fmt not in SCALE_BITS or o.scale_bits != SCALE_BITS[o.scale_fmt]:
        raise ValueError(f"scale_fmt {o.scale_fmt!r} with scale_bits={o.scale_bits}; "
                         f"known: {', '.join(f'{k} ({v} bits)' for k, v in SCALE_BITS.items())}")


def check(o: QuantOption) -> None:
    # Each scale format belongs to one layout (family), so every valid option has exactly one label.
    check_element(o)
    if o.scale_fmt == "fp16" and (o.per_tensor or o.tensor_scale_bits):
        raise ValueError("fp16 scales are per channel or per group")
    if o.scale_fmt == "fp32" and (not o.per_tensor or o.tensor_scale_bits):
        raise ValueError("an fp32 scale is one per tensor (group_size=0)")


def label(o: QuantOption) -> str:
    return f"fp{o.bits}{o.element}-{group_label(o.group_size)}"


def checked_bits(o: QuantOption, bits: int) -> QuantOption:
    """`o`, if a label's bit count agrees with its element."""
    if o.bits != bits:
        raise ValueError(f"{o.element} is {o.bits} bits wide, the label says {bits}")
    return o


def parse(text: str) -> QuantOption | None:
    if not (m := _LABEL.fullmatch(text)):
        return None
    group = {"ch": None, "tensor": 0}.get(m[3])
    if m[3].startswith("g"):
        group = int(m[3][1:])
        if group == 0:
            raise ValueError("group size must be positive; per tensor is '-tensor'")
    return checked_bits(fp_option(m[2], group), int(m[1]))


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


def quantize(w: torch.Tensor, o: QuantOption) -> QuantizedWeight:
    """Scale each group so its largest magnitude maps to the element's max, round elements to nearest.

    The fp16 scale is rounded up (as for INT) so the group max never clips; a per-tensor scale
    is computed and stored in fp32, and the rare 1-ulp overshoot is absorbed by saturation.
    """
    el = ELEMENTS[o.element]
    g = grouped(w, o.group_size)  # [out, n_groups, group]; per tensor [1, 1, out·in]
    scale = g.abs().amax(dim=-1, keepdim=True) / el.max_value
    if o.scale_fmt == "fp16":
        scale = fp16_round_up(scale)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
    q = round_to_element(g / scale, el)
    return QuantizedWeight(o, (q * scale).reshape(w.shape), codes=q.reshape(w.shape), scale=scale.squeeze(-1))


register_format(Format(
    "fp", "fp", check, label, parse, quantize, scale_fmts=("fp16", "fp32"), elements=tuple(ELEMENTS),
    label_examples=("fp8e4m3-ch", "fp8e4m3-tensor", "fp4e2m1-g32"), grid_of=lambda o: f"fp{o.bits}",
    grids={"fp8": lambda g: [fp_option(e, gs) for e in ("e4m3", "e5m2") for gs in (0, *g.group_sizes)],
           "fp6": lambda g: [fp_option(e, gs) for e in ("e2m3", "e3m2") for gs in g.group_sizes],
           "fp4": lambda g: [fp_option("e2m1", gs) for gs in g.group_sizes]}))
