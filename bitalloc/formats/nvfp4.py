"""NVFP4: E2M1 elements in blocks of 16, an E4M3 scale per block, and one fp32 scale per tensor.

Two-level scaling as NVIDIA's TensorRT Model Optimizer stores it: global = amax(W) / (448 · 6)
(fp32), so the largest block's scale lands on E4M3's max; block scale = amax(block) / 6 / global,
rounded to nearest-even E4M3; element = w / (block scale · global), rounded to nearest-even E2M1
and saturated at 6 (a block scale rounded down clips its max slightly, as on the hardware).
compressed-tensors stores the reciprocal of the same global scale; the values agree.
Label: nvfp4. Plans store it as fmt "fp" with scale_fmt "e4m3".
"""

from __future__ import annotations

from ..lazy import LazyModule
from ..options import QuantOption
from . import Format, QuantizedWeight, register_format
from .fp import ELEMENTS, SCALE_BITS, check_element, grouped, round_to_element

torch = LazyModule("torch")
E2M1, E4M3 = ELEMENTS["e2m1"], ELEMENTS["e4m3"]
E4M3_MIN_SUBNORMAL = 2.0**-9
NVFP4_BLOCK = 16
NVFP4_TENSOR_SCALE_BITS = 32  # one fp32 second-level scale per tensor


def nvfp4_option() -> QuantOption:
    """E2M1 in blocks of 16 with an E4M3 scale each, plus one fp32 scale per tensor."""
    return QuantOption("fp", 4, NVFP4_BLOCK, True, SCALE_BITS["e4m3"], 0, "e2m1", "e4m3", NVFP4_TENSOR_SCALE_BITS)


def check(o: QuantOption) -> None:
    check_element(o)
    if (o.group_size, o.tensor_scale_bits, o.element) != (NVFP4_BLOCK, NVFP4_TENSOR_SCALE_BITS, "e2m1"):
        raise ValueError(f"NVFP4 (e4m3 scales) is e2m1 in blocks of {NVFP4_BLOCK} plus a "
                         f"{NVFP4_TENSOR_SCALE_BITS}-bit tensor scale")


def nvfp4_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 block scales [out, in/16, 1], fp32 global scale []) of w [out, in] (float32, amax > 0).

    The importance-weighted search (quantizers/scale_search.py) starts from these."""
    global_scale = w.abs().amax() / (E4M3.max_value * E2M1.max_value)  # fp32, stored once per tensor
    bmax = grouped(w, NVFP4_BLOCK).abs().amax(dim=-1, keepdim=True)
    block_scale = round_to_element(bmax / E2M1.max_value / global_scale, E4M3)
    # A block far below the tensor max can round to a zero scale and vanish; the smallest
    # subnormal is a legal stored scale whose grid contains 0, so it is never worse.
    block_scale = torch.where((block_scale == 0) & (bmax > 0), torch.full_like(block_scale, E4M3_MIN_SUBNORMAL), block_scale)
    return block_scale, global_scale


def quantize(w: torch.Tensor, o: QuantOption) -> QuantizedWeight:
    if w.abs().amax() == 0:  # zero codes under any scales
        zero_scales = torch.zeros(w.shape[0], w.shape[1] // NVFP4_BLOCK, device=w.device)
        return QuantizedWeight(o, torch.zeros_like(w), torch.zeros_like(w), zero_scales, tensor_scale=torch.ones((), device=w.device))
    blocks = grouped(w, NVFP4_BLOCK)  # [out, in/16, 16]
    block_scale, global_scale = nvfp4_scales(w)
    scale = block_scale * global_scale
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero block
    q = round_to_element(blocks / scale, E2M1)
    return QuantizedWeight(o, (q * scale).reshape(w.shape), codes=q.reshape(w.shape), scale=block_scale.squeeze(-1),
                           tensor_scale=global_scale)


register_format(Format("nvfp4", "fp", check, lambda o: "nvfp4", lambda text: nvfp4_option() if text == "nvfp4" else None,
                       quantize, scale_fmts=("e4m3",), elements=("e2m1",), label_examples=("nvfp4",),
                       grids={"nvfp4": lambda g: [nvfp4_option()]}))
