"""'keep': the weight stays in 16-bit floating point (label fp16; keep and bf16 parse too)."""

from __future__ import annotations

from ..lazy import LazyModule
from ..options import QuantOption
from . import Format, QuantizedWeight, register_format
from .int import check_plain

torch = LazyModule("torch")
KEEP_BITS = 16


def keep_option() -> QuantOption:
    return QuantOption("keep", KEEP_BITS, None, True, 0, 0)


def quantize(w: torch.Tensor, o: QuantOption) -> QuantizedWeight:
    # Stored as fp16, so the simulation rounds to fp16 (bf16 models round-trip exactly anyway).
    return QuantizedWeight(o, w.to(torch.float16).float())


register_format(Format("keep", "keep", check_plain, lambda o: "fp16",
                       lambda text: keep_option() if text in ("fp16", "keep", "bf16") else None,
                       quantize, label_examples=("fp16",), grids={"keep": lambda g: [keep_option()]}))
