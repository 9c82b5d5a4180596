"""Integers, symmetric or asymmetric, with an fp16 scale per group or per output channel.

Label: int{bits}-{g<size>|ch}-{sym|asym}. An asymmetric zero-point is stored with the weight's own
bit width (as GPTQ/AWQ pack it).
"""

from __future__ import annotations

import re

from ..lazy import LazyModule
from ..options import PER_CHANNEL, PER_TENSOR, QuantOption
from . import Format, QuantizedWeight, register_format

torch = LazyModule("torch")
_LABEL = re.compile(r"int(\d+)-(ch|g\d+)-(sym|asym)")


def int_option(bits: int, group_size: int | None, symmetric: bool = False) -> QuantOption:
    return QuantOption("int", bits, group_size, symmetric, 16, 0 if symmetric else bits)


def check_plain(o: QuantOption) -> None:
    """What int and keep options obey: no per-tensor scale, no element, no other scale format."""
    if o.per_tensor:
        raise ValueError(f"group_size must be positive or None (per channel) for {o.fmt}; "
                         "0 (one scale per tensor) is for fp formats only")
    if o.element or o.scale_fmt != "fp16" or o.tensor_scale_bits:
        raise ValueError(f"{o.fmt} options take no element, scale_fmt or tensor scale")


def check(o: QuantOption) -> None:
    check_plain(o)
    if not 2 <= o.bits <= 8:
        raise ValueError(f"int bits must be 2..8, got {o.bits}")


def group_label(group_size: int | None) -> str:
    return "ch" if group_size is PER_CHANNEL else ("tensor" if group_size == PER_TENSOR else f"g{group_size}")


def label(o: QuantOption) -> str:
    return f"int{o.bits}-{group_label(o.group_size)}-{'sym' if o.symmetric else 'asym'}"


def parse_group(text: str) -> int | None:
    """'ch' -> None (per channel), 'g64' -> 64."""
    if text == "ch":
        return PER_CHANNEL
    if int(text[1:]) == 0:
        raise ValueError("group size must be positive")
    return int(text[1:])


def parse(text: str) -> QuantOption | None:
    if m := _LABEL.fullmatch(text):
        return int_option(int(m[1]), parse_group(m[2]), m[3] == "sym")
    return None


def grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group]; None = one group per row, 0 = the whole tensor (fp)."""
    out_f, in_f = weight.shape
    if group_size == PER_TENSOR:
        return weight.reshape(1, 1, out_f * in_f)
    g = in_f if group_size is PER_CHANNEL else group_size
    if in_f % g:
        raise ValueError(f"group size {g} does not divide in_features={in_f}")
    return weight.reshape(out_f, in_f // g, g)


def int_scales(w: torch.Tensor, option: QuantOption) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point per group for w: [out, n_groups, group] (float32).

    Asymmetric: the range is widened to include 0 so the zero-point is an integer in
    [0, 2^b - 1] (GPTQ/compressed-tensors convention). Symmetric: q in [-2^(b-1), 2^(b-1)-1],
    scale = max|w| / (2^(b-1)-1) so the largest magnitude is never clipped.
    Scales are stored in fp16, so they are rounded to fp16 — upwards, so that the grid still
    reaches the extreme weights and no weight is clipped by more than half a step.
    """
    b = option.bits
    if option.symmetric:
        qmax = 2 ** (b - 1) - 1
        scale = w.abs().amax(dim=-1, keepdim=True) / qmax
        zero = torch.zeros_like(scale)
    else:
        qmax = 2**b - 1
        wmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
        wmax = w.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (wmax - wmin) / qmax
    scale = fp16_round_up(scale)
    # An all-zero group has scale 0; any positive scale reproduces it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not option.symmetric:
        zero = torch.round(-wmin / scale).clamp(0, qmax)
    return scale, zero


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 value >= x (x >= 0), returned as float32."""
    h = x.to(torch.float16)
    low = h.to(torch.float32) < x
    # Positive fp16 values are ordered like their bit patterns: +1 on the bits is the next value up.
    bumped = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(low, bumped, h).to(torch.float32)


def int_range(option: QuantOption) -> tuple[int, int]:
    """Smallest and largest integer code: signed for symmetric, unsigned (with a zero-point) for asymmetric."""
    if option.symmetric:
        return -(2 ** (option.bits - 1)), 2 ** (option.bits - 1) - 1
    return 0, 2**option.bits - 1


def int_codes(weight: torch.Tensor, option: QuantOption, scale: torch.Tensor | None = None,
              zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes [out, in] (int32), scales and zero-points [out, n_groups] (float32).

    The weight is reproduced as (codes - zero) * scale, group by group along the input dimension.
    scale / zero: given (a scale learned in QAT), or int_scales' from the weight.
    """
    w = grouped(weight.float(), option.group_size)
    if scale is None:
        scale, zero = (t.squeeze(-1) for t in int_scales(w, option))
    lo, hi = int_range(option)
    q = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), lo, hi)
    return q.reshape(weight.shape).to(torch.int32), scale, zero


def int_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(codes - zero) * scale with codes [out, in] and scale/zero [out, n_groups]; float32."""
    out_f, in_f = codes.shape
    n_groups = scale.shape[1]
    q = codes.float().reshape(out_f, n_groups, in_f // n_groups)
    return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(out_f, in_f)


def quantize(w: torch.Tensor, o: QuantOption) -> QuantizedWeight:
    codes, scale, zero = int_codes(w, o)
    return QuantizedWeight(o, int_dequantize(codes, scale, zero), codes, scale, zero)


def fake_quant_int(w: torch.Tensor, option: QuantOption, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(clamp(round(w/s) + z) - z)·s per group, rounding by STE; w [out, in] float32, scale/zero [out, n_groups].

    The same operations in the same order as int_codes + int_dequantize, so with the RTN scales the
    values are those `bitalloc.apply` stores, bit for bit. The gradient is zero where the code clamps.
    """
    from ..ste import RoundSTE

    g = grouped(w, option.group_size)  # [out, n_groups, group]
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    lo, hi = int_range(option)
    q = torch.clamp(RoundSTE.apply(g / s) + z, lo, hi)
    return ((q - z) * s).reshape(w.shape)


def fake_quant(w: torch.Tensor, o: QuantOption) -> torch.Tensor:
    """QAT's view of `o`: the RTN scales of the current weight (no gradient), rounding by STE."""
    scale, zero = int_scales(grouped(w.detach(), o.group_size), o)
    return fake_quant_int(w, o, scale.squeeze(-1), zero.squeeze(-1))


register_format(Format(
    "int", "int", check, label, parse, quantize, fake_quant=fake_quant, label_examples=("int4-g64-asym", "int8-ch-sym"),
    grids={"int": lambda g: [int_option(b, gs, s) for b in g.bits for gs in g.group_sizes for s in g.symmetric]}))
