"""Straight-through pieces for quantization-aware training (qat.py, and the formats' fake_quant hooks).

Autograd functions rather than the `x + (f(x) - x).detach()` idiom: the forward value is exactly
f(x), bit for bit, so a freshly prepared model equals the RTN-applied one exactly.
"""

from __future__ import annotations

import torch


class RoundSTE(torch.autograd.Function):
    """torch.round forward; gradient passes through (Bengio et al. 2013)."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class Fp16STE(torch.autograd.Function):
    """Round to the nearest fp16 value (how a scale is stored); gradient passes through."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class GradScale(torch.autograd.Function):
    """Identity forward, gradient times `factor` (LSQ §2.2)."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class FormatSTE(torch.autograd.Function):
    """quantize_dequantize of any registered format forward; identity backward (the fake_quant of a
    family that declares none)."""

    @staticmethod
    def forward(ctx, w, option):
        from .formats import quantize_dequantize

        return quantize_dequantize(w, option)

    @staticmethod
    def backward(ctx, grad):
        return grad, None
