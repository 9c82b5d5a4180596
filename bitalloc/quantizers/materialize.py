"""Quantize a whole model's planned modules with one quantizer, in place, keeping the codes for packers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import BadInputError
from ..models import set_weight_matrix, weight_matrix
from ..options import QuantOption
from . import QuantizedWeight, needs_hessian, quantize_weight


def quantize_model(model: nn.Module, options: dict[str, QuantOption], quantizer: str = "rtn",
                   calibration: torch.Tensor | None = None, progress: bool = False,
                   **settings: Any) -> dict[str, QuantizedWeight]:
    """Replace each named module's weight by its quantized values; return module -> QuantizedWeight.

    calibration: token ids [windows, seq_len], needed by quantizers that use the layer Hessian.
    """
    if needs_hessian(quantizer):
        raise BadInputError(f"the {quantizer} quantizer is not available for whole models yet; use --quantizer rtn")
    result = {}
    for name, option in tqdm(options.items(), desc=f"quantize ({quantizer})", disable=not progress, unit="module"):
        module = model.get_submodule(name)
        w = weight_matrix(module).detach()
        q = quantize_weight(w, option, quantizer, **settings)
        set_weight_matrix(module, q.values.to(w.dtype))
        result[name] = q
    return result
