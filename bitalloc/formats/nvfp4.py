"""NVFP4: E2M1 elements in blocks of 16, an E4M3 scale per block, and one fp32 scale per tensor.

Two-level scaling as NVIDIA's TensorRT Model Optimizer stores it: global = amax(W) / (448 · 6)
(fp32), so the largest block's scale lands on E4M3's max; block scale = amax(block) / 6 / global,
rounded to nearest-even E4M3; element = w / (block scale · global), rounded to nearest-even E2M1
and saturated at 6 (a block scale rounded down clips its max slightly, as on the hardware).
compressed-tensors stores the reciprocal of the same global scale; the values agree.
"""

from __future__ import annotations

import torch

from ..options import ELEMENTS, NVFP4_BLOCK, QuantOption
from . import register_format
from .fp import grouped, round_to_element

E2M1, E4M3 = ELEMENTS["e2m1"], ELEMENTS["e4m3"]
E4M3_MIN_SUBNORMAL = 2.0**-9


def nvfp4_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 block scales [out, in/16, 1], fp32 global scale []) of w [out, in] (float32, amax > 0).

    Packers (bitalloc.pack) call this too, to store the scales the simulation used."""
    global_scale = w.abs().amax() / (E4M3.max_value * E2M1.max_value)  # fp32, stored once per tensor
    bmax = grouped(w, NVFP4_BLOCK).abs().amax(dim=-1, keepdim=True)
    block_scale = round_to_element(bmax / E2M1.max_value / global_scale, E4M3)
    # A block far below the tensor max can round to a zero scale and vanish; the smallest
    # subnormal is a legal stored scale whose grid contains 0, so it is never worse.
    block_scale = torch.where((block_scale == 0) & (bmax > 0), torch.full_like(block_scale, E4M3_MIN_SUBNORMAL), block_scale)
    return block_scale, global_scale


@register_format("nvfp4")
def nvfp4_quantize(weight: torch.Tensor, option: QuantOption) -> torch.Tensor:
    w = weight.float()
    if w.abs().amax() == 0:
        return torch.zeros_like(weight)
    blocks = grouped(w, NVFP4_BLOCK)  # [out, in/16, 16]
    block_scale, global_scale = nvfp4_scales(w)
    scale = block_scale * global_scale
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero block
    q = round_to_element(blocks / scale, E2M1)
    return (q * scale).reshape(weight.shape).to(weight.dtype)
