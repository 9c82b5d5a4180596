"""The matmul kernels a quantized linear layer can run on, per device, behind one registry.

A kernel turns a stored weight [out, in] and a QuantOption into a callable y = f(x) that computes
x @ Wᵀ from the *stored* representation. Each kernel is checked against a dense matmul on the
dequantized weight before it is timed, so a timing never belongs to a kernel that computes
something else. An option no real kernel supports runs `dequant_dense`: unpack codes, scale,
dense matmul on every call — what a runtime without a kernel for that format has to do, and
timed as such rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..formats import quantize, quantize_dequantize
from ..options import QuantOption

LinearFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    name: str
    devices: tuple[str, ...]
    summary: str
    supports: Callable[[QuantOption], bool]
    # prepare(weight [out, in] float32 on the device, option, activation dtype) -> y = f(x)
    prepare: Callable[[torch.Tensor, QuantOption, torch.dtype], LinearFn]


_KERNELS: dict[str, Kernel] = {}  # insertion order = preference order


def register_kernel(kernel: Kernel) -> Kernel:
    _KERNELS[kernel.name] = kernel
    return kernel


def kernels_for(device: str) -> list[Kernel]:
    return [k for k in _KERNELS.values() if device in k.devices]


def get_kernel(name: str) -> Kernel:
    try:
        return _KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(_KERNELS)}") from None


def reference_weight(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    """The weight values the option stores (what every kernel for it must multiply by)."""
    return quantize_dequantize(weight.float(), option)


# --- dense: the weight kept in 16-bit (or the activation dtype on CPU) ------------------------


def _prepare_dense(weight: torch.Tensor, option: QuantOption, dtype: torch.dtype) -> LinearFn:
    w = reference_weight(weight, option).to(dtype)
    return lambda x: F.linear(x, w)


register_kernel(Kernel(
    "dense", ("cpu", "cuda"), "dense matmul with the weight held in the activation dtype",
    supports=lambda o: o.fmt == "keep", prepare=_prepare_dense,
))


# --- int8 weight-only, per output channel, symmetric (torch's CPU kernel) -----------------------


def _is_int8_channel_sym(o: QuantOption) -> bool:
    return o.fmt == "int" and o.bits == 8 and o.per_channel and o.symmetric


def _prepare_int8_weight_only(weight: torch.Tensor, option: QuantOption, dtype: torch.dtype) -> LinearFn:
    q = quantize(weight, option)  # codes in [-128, 127], one scale per row
    codes, s = q.codes.to(torch.int8), q.scale.reshape(-1).to(dtype)
    return lambda x: torch._weight_int8pack_mm(x, codes, s)


register_kernel(Kernel(
    "int8_weight_only", ("cpu",), "torch._weight_int8pack_mm: int8 weights, per-channel scales",
    supports=_is_int8_channel_sym, prepare=_prepare_int8_weight_only,
))


# --- int4 weight-only, grouped (tinygemm layout; CPU and CUDA variants) --------------------------

_TINYGEMM_GROUPS = (32, 64, 128, 256)


def _is_int4_grouped(o: QuantOption) -> bool:
    return o.fmt == "int" and o.bits == 4 and o.group_size in _TINYGEMM_GROUPS


def _int4_codes_and_scale_zeros(weight: torch.Tensor, option: QuantOption, dtype: torch.dtype):
    """Codes in [0, 15] and the [in/g, out, 2] (scale, zero) tensor of tinygemm, whose
    dequantization is w = (q - 8)·scale + zero. Our asymmetric integer zero-point z gives
    w = (q - z)·s = (q - 8)·s + (8 - z)·s; a symmetric q in [-8, 7] is stored as q + 8 (z = 0, offset 0)."""
    q = quantize(weight, option)  # codes [out, in], scale and zero [out, n_groups]
    shift = 8 if option.symmetric else 0
    offset = (8 - shift - q.zero) * q.scale
    scale_zeros = torch.stack([q.scale, offset], dim=-1).transpose(0, 1).contiguous()
    return q.codes + shift, scale_zeros.to(dtype)


def _prepare_int4_cpu(weight: torch.Tensor, option: QuantOption, dtype: torch.dtype) -> LinearFn:
    q, sz = _int4_codes_and_scale_zeros(weight, option, dtype)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    g = option.group_size
    return lambda x: torch._weight_int4pack_mm_for_cpu(x, packed, g, sz)


def _prepare_int4_cuda(weight: torch.Tensor, option: QuantOption, dtype: torch.dtype) -> LinearFn:
    q, sz = _int4_codes_and_scale_zeros(weight, option, torch.bfloat16)
    q = q.to(torch.uint8)
    # The packed layout tiles the input dimension in inner_k_tiles x 16 columns; take the widest tiling
    # the layer allows (576 = 2 x 16 x 18 allows 2, not 8).
    inner_k_tiles = next((t for t in (8, 4, 2) if weight.shape[1] % (16 * t) == 0), None)
    if inner_k_tiles is None:
        raise ValueError(f"tinygemm tiles the input in multiples of 32; in_features={weight.shape[1]} is not one")
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), inner_k_tiles)
    g = option.group_size
    return lambda x: torch._weight_int4pack_mm(x.to(torch.bfloat16), packed, g, sz).to(x.dtype)


register_kernel(Kernel(
    "int4_tinygemm_cpu", ("cpu",), "torch._weight_int4pack_mm_for_cpu: int4 weights, group 32-256",
    supports=_is_int4_grouped, prepare=_prepare_int4_cpu,
))
register_kernel(Kernel(
    "int4_tinygemm", ("cuda",), "torch._weight_int4pack_mm (tinygemm): int4 weights, group 32-256, bf16",
    supports=_is_int4_grouped, prepare=_prepare_int4_cuda,
))


# --- FP8 (CUDA, sm_89+): torch._scaled_mm, weights per-channel, activations per-token ------------


def _is_fp8_channel(o: QuantOption) -> bool:
    return o.fmt == "fp" and o.element in ("e4m3", "e5m2") and (o.per_channel or o.per_tensor)


def _prepare_fp8_scaled_mm(weight: torch.Tensor, option: QuantOption, dtype: torch.dtype) -> LinearFn:
    # The stored weight is fp8 with one fp32 scale per output row (or per tensor). _scaled_mm needs
    # fp8 activations too, so x is quantized per token to e4m3 on every call (vLLM's dynamic FP8):
    # this kernel computes W8A8, and its timing includes that activation quantization.
    fp8 = torch.float8_e4m3fn if option.element == "e4m3" else torch.float8_e5m2
    w_ref = reference_weight(weight, option).float()
    w_scale = w_ref.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(fp8).max
    w_fp8 = (w_ref / w_scale).to(fp8)
    w_t = w_fp8.t()  # column-major [in, out], as _scaled_mm wants its second operand
    scale_b = w_scale.reshape(1, -1).contiguous()
    e4m3_max = torch.finfo(torch.float8_e4m3fn).max

    def fn(x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        pad = (-m) % 16  # _scaled_mm wants rows in multiples of 16
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / e4m3_max
        x_fp8 = (x2 / x_scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x_fp8, w_t, scale_a=x_scale, scale_b=scale_b, out_dtype=torch.bfloat16)
        return y[:m].reshape(*lead, -1).to(x.dtype)

    return fn


register_kernel(Kernel(
    "fp8_scaled_mm", ("cuda",), "torch._scaled_mm: fp8 weights per channel × fp8 activations per token (W8A8)",
    supports=_is_fp8_channel, prepare=_prepare_fp8_scaled_mm,
))


# --- fallback: dequantize on every call, then dense matmul --------------------------------------


def _codes_scales_offsets(weight: torch.Tensor, option: QuantOption):
    """Codes [out, in] (uint8), value table [2^bits at most], scale and offset [out, n_groups, 1]
    (offset None without a zero-point) such that table[codes]·scale + offset is the stored weight:
    the format family's own codes and scales (formats.quantize), indexed into the values they take."""
    q = quantize(weight, option)
    out_f, in_f = weight.shape
    scale = q.scale.float() if q.tensor_scale is None else q.scale.float() * q.tensor_scale
    scale = scale.expand(out_f, -1).unsqueeze(-1)  # one per tensor: the same for every row
    if q.codes.is_floating_point():  # element values (fp, mx, nvfp4): a table of those present
        table = q.codes.unique()
        codes = torch.bucketize(q.codes, table)
    else:  # integers: consecutive, from the smallest
        lo = int(q.codes.min())
        table = torch.arange(lo, int(q.codes.max()) + 1, dtype=torch.float32, device=weight.device)
        codes = q.codes - lo
    offset = None if q.zero is None or not q.zero.any() else -q.zero.unsqueeze(-1) * scale
    return codes.to(torch.uint8), table, scale, offset


def _prepare_dequant_dense(weight: torch.Tensor, option: QuantOption, dtype: torch.dtype) -> LinearFn:
    """Codes one per byte and a scale per group (plus a zero-point for asymmetric INT); every call
    turns codes into values, scales them and runs the dense matmul. Consecutive integer codes (INT)
    take a conversion and one fused multiply-add; other codes (FP elements) are looked up in the
    table of their values (at most 2^bits entries)."""
    out_f, in_f = weight.shape
    codes, table, scale, offset = _codes_scales_offsets(weight.float(), option)
    n_groups = scale.shape[1]
    if torch.equal(table, table[0] + torch.arange(len(table), device=table.device)):
        # table[q] = table[0] + q, so w = q·scale + (table[0]·scale + offset)
        bias = (table[0] * scale + (0 if offset is None else offset)).to(dtype)
        scale = scale.to(dtype)

        def fn(x: torch.Tensor) -> torch.Tensor:
            w = torch.addcmul(bias, codes.to(dtype).reshape(out_f, n_groups, -1), scale)
            return F.linear(x, w.reshape(out_f, in_f))
    else:
        table, scale = table.to(dtype), scale.to(dtype)

        def fn(x: torch.Tensor) -> torch.Tensor:
            w = table[codes.long()].reshape(out_f, n_groups, -1) * scale
            return F.linear(x, w.reshape(out_f, in_f))
    return fn


DEQUANT_DENSE = register_kernel(Kernel(
    "dequant_dense", ("cpu", "cuda"), "no kernel for the format: dequantize every call, then dense matmul",
    supports=lambda o: o.fmt != "keep", prepare=_prepare_dequant_dense,
))
