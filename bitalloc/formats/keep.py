"""'keep': the weight stays in 16-bit floating point."""

import torch

from . import register_format


@register_format("keep")
def keep_fp16(weight: torch.Tensor, option) -> torch.Tensor:
    # Stored as fp16, so the simulation rounds to fp16 (bf16 models round-trip exactly anyway).
    return weight.to(torch.float16).to(weight.dtype)
