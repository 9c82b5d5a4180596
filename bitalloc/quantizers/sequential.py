"""Whole-model quantization with a Hessian-based quantizer (GPTQ), one decoder block at a time.

As in the GPTQ reference's `llama_sequential`: the calibration windows' inputs to the first block
are captured once, with how the model calls every block (attention mask, position embeddings, ...;
blockwalk.record_calls, shared with the streamed profile). Then, block by block, each planned
layer's Hessian H = mean_t x xᵀ is
collected from inputs produced by the *already quantized* earlier blocks and earlier layers of the
same block ("true sequential": q/k/v, then o, then gate/up, then down, each stage re-run after the
previous one is quantized), and the quantized block is run once more to give the next block's
inputs. Only the block-boundary activations are kept, so memory stays bounded by one block's
inputs for all windows. Planned modules outside the blocks (the output head) come last, with H
from a full forward pass of the quantized model; a planned input embedding is quantized by RTN
(its inputs are one-hot, so H is diagonal and GPTQ reduces to rounding to nearest).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from ..blockwalk import BlockWalk, Inputs, input_hessian, stage_hessian
from ..models import forward_hooks, set_weight_matrix, stages_by_shared_input, weight_matrix
from ..options import QuantOption
from . import QuantizedWeight, quantize_weight
from ..progress import steps


def quantize_sequential(model: nn.Module, options: dict[str, QuantOption], quantizer: str,
                        calibration: torch.Tensor, progress: bool = False,
                        **settings: Any) -> dict[str, QuantizedWeight]:
    """Quantize each named module in place with a Hessian-based quantizer; return module -> QuantizedWeight.

    calibration: token ids [windows, seq_len].
    """
    walk = BlockWalk(model, calibration)
    prefix, blocks = walk.prefix, walk.blocks
    result: dict[str, QuantizedWeight] = {}
    in_block = {i: {} for i in range(len(blocks))}
    outside = {}
    for name, opt in options.items():
        head, _, rest = name.partition(prefix + ".")
        idx, _, local = rest.partition(".")
        if head == "" and rest and idx.isdigit() and local:
            in_block[int(idx)][local] = opt
        else:
            outside[name] = opt
    with torch.no_grad():
        if any(in_block.values()):
            for i, (block, inputs) in enumerate(steps(walk, f"{quantizer} blocks", show=progress, unit="block")):
                for local, q in _quantize_block(block, in_block[i], inputs, quantizer, settings).items():
                    result[f"{prefix}.{i}.{local}"] = q
                if not any(in_block[j] for j in range(i + 1, len(blocks))):
                    break
        for name, opt in outside.items():
            result[name] = _quantize_outside(model, name, opt, quantizer, calibration, settings)
    return result


def _stages(block: nn.Module, planned: dict[str, QuantOption], inputs: Inputs) -> list[list[str]]:
    """Planned modules in the order the block calls them, grouped by shared input (q/k/v, o, gate/up, down)."""
    # The input tensors themselves are kept (not their ids), so a freed tensor's id cannot be reused.
    order: list[tuple[str, torch.Tensor]] = []
    with forward_hooks(((block.get_submodule(local), lambda mod, args, local=local: order.append((local, args[0])))
                        for local in planned), pre=True):
        call, hidden = inputs[0]
        call(block, hidden)
    stages = stages_by_shared_input(order)
    done = {name for stage in stages for name in stage}
    missing = set(planned) - done
    if missing:
        raise RuntimeError(f"planned modules {sorted(missing)} were not called by their block's forward pass")
    return stages


def _quantize_block(block: nn.Module, planned: dict[str, QuantOption], inputs: Inputs, quantizer: str,
                    settings: dict) -> dict[str, QuantizedWeight]:
    todo = {n: o for n, o in planned.items() if o.fmt != "keep"}
    result = {n: quantize_weight(weight_matrix(block.get_submodule(n)).detach(), o, "rtn")
              for n, o in planned.items() if o.fmt == "keep"}  # keep: values unchanged
    if not todo:
        return result
    for stage in _stages(block, todo, inputs):
        H = stage_hessian(block, stage[0], inputs)
        for local in stage:
            module = block.get_submodule(local)
            w = weight_matrix(module).detach()
            q = quantize_weight(w, todo[local], quantizer, hessian=H, **settings)
            set_weight_matrix(module, q.values.to(w.dtype))
            result[local] = q
    return result


def _quantize_outside(model: nn.Module, name: str, option: QuantOption, quantizer: str,
                      calibration: torch.Tensor, settings: dict) -> QuantizedWeight:
    module = model.get_submodule(name)
    w = weight_matrix(module).detach()
    if option.fmt == "keep" or isinstance(module, nn.Embedding):
        q = quantize_weight(w, option, "rtn")
    else:
        H = input_hessian(module, (partial(model, input_ids=window[None], use_cache=False) for window in calibration))
        q = quantize_weight(w, option, quantizer, hessian=H, **settings)
    set_weight_matrix(module, q.values.to(w.dtype))
    return q
