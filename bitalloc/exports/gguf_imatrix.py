"""An `imatrix.gguf` as llama-imatrix writes it, from bitalloc's calibration windows.

llama-quantize --imatrix weighs each weight's rounding error by the mean x² of its input column
(tools/imatrix/imatrix.cpp: per tensor `NAME.in_sum2` = Σ x² over the tokens and `NAME.counts` = the
number of tokens; the quantizer divides the two). That mean is the diagonal of the layer-input
Hessian H = mean x xᵀ bitalloc profiles, so a user who quantizes with llama-quantize gets the same
importance weighting as bitalloc's `imatrix` quantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import atomic_output
from ..models import forward_hooks, is_linear


def input_square_sums(model: nn.Module, windows: torch.Tensor, modules: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """(module -> Σ x² per input column over every calibration token [in] float64, token count)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().double()
            sums[name] = sums.get(name, 0) + (x * x).reshape(-1, x.shape[-1]).sum(dim=0)
        return fn

    with torch.no_grad(), forward_hooks(((model.get_submodule(m), hook(m)) for m in modules), pre=True):
        for window in windows:
            model(input_ids=window[None])
    return sums, int(windows.numel())


def imatrix_modules(model: nn.Module) -> list[str]:
    """Every linear layer a matrix product reads (llama-imatrix records them all, output head included)."""
    return sorted(name for name, m in model.named_modules() if is_linear(m))


def write_imatrix(path: str | Path, sums: dict[str, torch.Tensor], count: int, tensor_names: dict[str, str],
                  dataset: str, chunk_size: int) -> Path:
    """Write `imatrix.gguf`: for each module with a GGUF tensor name, NAME.in_sum2 and NAME.counts."""
    import gguf

    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="")  # imatrix files carry no architecture key
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        w.add_type("imatrix")
        w.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, max(1, count // chunk_size))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
        for module in sorted(sums, key=lambda m: tensor_names.get(m, "")):
            name = tensor_names.get(module)
            if name is None:
                continue
            w.add_tensor(f"{name}.in_sum2", sums[module].float().numpy().reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)
