"""Whole-model quantization with a Hessian-based quantizer (GPTQ), one decoder block at a time.

As in the GPTQ reference's `llama_sequential`: the calibration windows' inputs to the first block
are captured once (hidden states plus the keyword arguments the blocks need: attention mask,
position embeddings, ...). Then, block by block, each planned layer's Hessian H = mean_t x xᵀ is
collected from inputs produced by the *already quantized* earlier blocks and earlier layers of the
same block ("true sequential": q/k/v, then o, then gate/up, then down, each stage re-run after the
previous one is quantized), and the quantized block is run once more to give the next block's
inputs. Only the block-boundary activations are kept, so memory stays bounded by one block's
inputs for all windows. Planned modules outside the blocks (the output head) come last, with H
from a full forward pass of the quantized model; a planned input embedding is quantized by RTN
(its inputs are one-hot, so H is diagonal and GPTQ reduces to rounding to nearest).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import decoder_blocks, set_weight_matrix, stages_by_shared_input, weight_matrix
from ..options import QuantOption
from . import QuantizedWeight, quantize_weight


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are seen."""


def quantize_sequential(model: nn.Module, options: dict[str, QuantOption], quantizer: str,
                        calibration: torch.Tensor, progress: bool = False,
                        **settings: Any) -> dict[str, QuantizedWeight]:
    """Quantize each named module in place with a Hessian-based quantizer; return module -> QuantizedWeight.

    calibration: token ids [windows, seq_len].
    """
    prefix, blocks = decoder_blocks(model)
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
            inputs = _first_block_inputs(model, blocks[0], calibration)
            bar = tqdm(range(len(blocks)), desc=f"{quantizer} blocks", disable=not progress, unit="block")
            for i in bar:
                block = blocks[i]
                for local, q in _quantize_block(block, in_block[i], inputs, quantizer, settings).items():
                    result[f"{prefix}.{i}.{local}"] = q
                if i + 1 < len(blocks) and any(in_block[j] for j in range(i + 1, len(blocks))):
                    inputs = [(_with_hidden(args, kwargs, _hidden(block(*args, **kwargs))), kwargs)
                              for args, kwargs in inputs]
        for name, opt in outside.items():
            result[name] = _quantize_outside(model, name, opt, quantizer, calibration, settings)
    return result


def _first_block_inputs(model: nn.Module, first: nn.Module, calibration: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first block's call, one per calibration window."""
    captured: list[tuple[tuple, dict]] = []

    def grab(mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in calibration:
            try:
                model(input_ids=window[None], use_cache=False)  # no cache: blocks are re-run many times
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple:
    """The block's positional arguments with new hidden states (passed first, or as a keyword)."""
    if args:
        return (hidden, *args[1:])
    kwargs["hidden_states"] = hidden
    return args


def _stages(block: nn.Module, planned: dict[str, QuantOption], inputs) -> list[list[str]]:
    """Planned modules in the order the block calls them, grouped by shared input (q/k/v, o, gate/up, down)."""
    # The input tensors themselves are kept (not their ids), so a freed tensor's id cannot be reused.
    order: list[tuple[str, torch.Tensor]] = []
    handles = []
    for local in planned:
        def seen(mod, args, local=local):
            order.append((local, args[0]))
        handles.append(block.get_submodule(local).register_forward_pre_hook(seen))
    try:
        args, kwargs = inputs[0]
        block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    stages = stages_by_shared_input(order)
    done = {name for stage in stages for name in stage}
    missing = set(planned) - done
    if missing:
        raise RuntimeError(f"planned modules {sorted(missing)} were not called by their block's forward pass")
    return stages


def _quantize_block(block: nn.Module, planned: dict[str, QuantOption], inputs, quantizer: str,
                    settings: dict) -> dict[str, QuantizedWeight]:
    todo = {n: o for n, o in planned.items() if o.fmt != "keep"}
    result = {n: quantize_weight(weight_matrix(block.get_submodule(n)).detach(), o, "rtn")
              for n, o in planned.items() if o.fmt == "keep"}  # keep: values unchanged
    if not todo:
        return result
    for stage in _stages(block, todo, inputs):
        H = _stage_hessian(block, stage[0], inputs)
        for local in stage:
            module = block.get_submodule(local)
            w = weight_matrix(module).detach()
            q = quantize_weight(w, todo[local], quantizer, hessian=H, **settings)
            set_weight_matrix(module, q.values.to(w.dtype))
            result[local] = q
    return result


def _stage_hessian(block: nn.Module, local: str, inputs) -> torch.Tensor:
    """H = mean_t x xᵀ [in, in] of module `local`'s input over all windows, stopping each pass there."""
    acc: dict[str, Any] = {"xtx": None, "n": 0}

    def grab(mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
        acc["xtx"] = x.T @ x if acc["xtx"] is None else acc["xtx"] + x.T @ x
        acc["n"] += x.shape[0]
        raise _Stop

    handle = block.get_submodule(local).register_forward_pre_hook(grab)
    try:
        for args, kwargs in inputs:
            try:
                block(*args, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc["xtx"] / acc["n"]


def _quantize_outside(model: nn.Module, name: str, option: QuantOption, quantizer: str,
                      calibration: torch.Tensor, settings: dict) -> QuantizedWeight:
    module = model.get_submodule(name)
    w = weight_matrix(module).detach()
    if option.fmt == "keep" or isinstance(module, nn.Embedding):
        q = quantize_weight(w, option, "rtn")
    else:
        acc: dict[str, Any] = {"xtx": None, "n": 0}

        def grab(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc["xtx"] = x.T @ x if acc["xtx"] is None else acc["xtx"] + x.T @ x
            acc["n"] += x.shape[0]
            raise _Stop

        handle = module.register_forward_pre_hook(grab)
        try:
            for window in calibration:
                try:
                    model(input_ids=window[None], use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        q = quantize_weight(w, option, quantizer, hessian=acc["xtx"] / acc["n"], **settings)
    set_weight_matrix(module, q.values.to(w.dtype))
    return q
