"""Round-to-nearest integer quantization, symmetric or asymmetric, per group or per channel."""

from __future__ import annotations

import torch

from ..options import QuantOption
from . import register_format


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out_f, in_f = weight.shape
    g = in_f if group_size is None else group_size
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


def int_codes(weight: torch.Tensor, option: QuantOption) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes [out, in] (int32), scales and zero-points [out, n_groups] (float32).

    The weight is reproduced as (codes - zero) * scale, group by group along the input dimension.
    """
    w = _grouped(weight.float(), option.group_size)
    scale, zero = int_scales(w, option)
    lo, hi = int_range(option)
    q = torch.clamp(torch.round(w / scale) + zero, lo, hi)
    return q.reshape(weight.shape).to(torch.int32), scale.squeeze(-1), zero.squeeze(-1)


def int_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(codes - zero) * scale with codes [out, in] and scale/zero [out, n_groups]; float32."""
    out_f, in_f = codes.shape
    n_groups = scale.shape[1]
    q = codes.float().reshape(out_f, n_groups, in_f // n_groups)
    return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(out_f, in_f)


@register_format("int")
def rtn_int(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    codes, scale, zero = int_codes(weight, option)
    return int_dequantize(codes, scale, zero).to(weight.dtype)
