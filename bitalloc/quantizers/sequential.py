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

With float_target > 0 the walk also carries the float model's block-boundary states (a second copy, and an
unquantized copy of the block in hand), and each layer in a block is quantized toward a target moved that far toward
the weight that best reproduces the float layer's output from the quantized inputs (float_target_weight: GPTAQ's
asymmetric calibration), so each layer takes back part of the error the layers before it left. The output head keeps
GPTQ's own target.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from ..blockwalk import BlockCall, BlockWalk, Inputs, input_hessian, module_input, module_inputs, stage_grams
from ..models import forward_hooks, set_weight_matrix, stages_by_shared_input, weight_matrix
from ..options import QuantOption
from . import QuantizedWeight, quantize_weight
from .gptq import DAMP
from ..progress import steps


def quantize_sequential(model: nn.Module, options: dict[str, QuantOption], quantizer: str,
                        calibration: torch.Tensor, progress: bool = False, float_target: float = 0.0,
                        token_weighted: bool = False, **settings: Any) -> dict[str, QuantizedWeight]:
    """Quantize each named module in place with a Hessian-based quantizer; return module -> QuantizedWeight.

    calibration: token ids [windows, seq_len].
    float_target: how far (0 to 1) each layer's target moves from its own weight toward the weight that best gives
    the float model's output on the quantized model's inputs (float_target_weight; 0: GPTQ as published).
    token_weighted: each layer in a block weighs every calibration token by its output's loss gradient,
    H = mean_t a_t x̃ x̃ᵀ (and G likewise; statistics.output_gradient_weights, from the float model before any layer
    is quantized), so GPTQ minimises the loss increase fisher-tw predicts instead of the plain output error.
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
    token_weights = None
    if token_weighted:
        from ..profile.statistics import output_gradient_weights

        planned = [n for n, o in options.items() if n not in outside and o.fmt != "keep"]
        token_weights = output_gradient_weights(model, planned, calibration, progress=progress)
    with torch.no_grad():
        if any(in_block.values()):
            float_hidden = None
            for i, (block, inputs) in enumerate(steps(walk, f"{quantizer} blocks", show=progress, unit="block")):
                planned = [local for local, o in in_block[i].items() if o.fmt != "keep"]
                float_side = None
                if float_target:
                    float_hidden = float_hidden or [h for _, h in inputs]  # block 0: the prefix is not quantized yet
                    float_side = FloatSide.of(block, inputs, float_hidden, planned)
                weights = None if token_weights is None else {
                    local: token_weights[f"{prefix}.{i}.{local}"] for local in planned}
                for local, q in _quantize_block(block, in_block[i], inputs, quantizer, settings,
                                                float_side, float_target, weights).items():
                    result[f"{prefix}.{i}.{local}"] = q
                if not any(in_block[j] for j in range(i + 1, len(blocks))):
                    break
                if float_side is not None:  # the next block's float inputs (none needed after the last planned one)
                    float_hidden = float_side.outputs()
        for name, opt in outside.items():
            result[name] = _quantize_outside(model, name, opt, quantizer, calibration, settings)
    return result


# Where the float block's inputs to a block's planned modules, for every calibration window, fit in this, one pass of
# the float block keeps them for all of its stages (and gives the next block's float inputs): a fifth less CPU time
# applying SmolLM2 halfway toward the float model (bench/apply_speed.py), the same weights bit for bit. Above it (large
# models on much text), each stage runs the float block again up to its modules.
FLOAT_INPUTS_CACHE_BYTES = 4 << 30


@dataclass
class FloatSide:
    """The float model beside the walk at one block: an unquantized copy of the block, the float model's hidden states
    entering it, and how the model calls it per window. The copy never changes while the block's stages are quantized,
    so its inputs to the planned modules are the same at every stage: kept from one pass where they fit in
    FLOAT_INPUTS_CACHE_BYTES, the same numbers as a pass per stage stopped at the module (bit for bit)."""

    block: nn.Module
    hidden: list[torch.Tensor]
    calls: list[BlockCall]
    kept: dict[str, list[torch.Tensor]] | None = None
    kept_outputs: list[torch.Tensor] | None = None

    @classmethod
    def of(cls, block: nn.Module, inputs: Inputs, hidden: list[torch.Tensor], planned: list[str]) -> "FloatSide":
        side = cls(copy.deepcopy(block), hidden, [call for call, _ in inputs])
        tokens = sum(h[..., 0].numel() for h in hidden)
        # an upper bound: modules that share an input (q/k/v, gate/up) keep one tensor, counted here once each
        needed = tokens * sum(weight_matrix(block.get_submodule(n)).shape[1] for n in planned) * 4
        if planned and needed <= FLOAT_INPUTS_CACHE_BYTES:
            side.kept, side.kept_outputs = module_inputs(side.block, planned, inputs, hidden)
        return side

    def input_of(self, local: str) -> Callable[[int], torch.Tensor]:
        """Window w -> the float block's input [tokens, in] to module `local`."""
        if self.kept is not None:
            return self.kept[local].__getitem__
        module = self.block.get_submodule(local)
        return lambda w: module_input(module, partial(self.calls[w], self.block, self.hidden[w]))

    def outputs(self) -> list[torch.Tensor]:
        """The float block's output per window: the next block's float inputs."""
        if self.kept_outputs is not None:
            return self.kept_outputs
        return [call(self.block, h) for call, h in zip(self.calls, self.hidden)]


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
                    settings: dict, float_side: FloatSide | None = None, float_target: float = 0.0,
                    token_weights: dict[str, torch.Tensor] | None = None) -> dict[str, QuantizedWeight]:
    todo = {n: o for n, o in planned.items() if o.fmt != "keep"}
    result = {n: quantize_weight(weight_matrix(block.get_submodule(n)).detach(), o, "rtn")
              for n, o in planned.items() if o.fmt == "keep"}  # keep: values unchanged
    if not todo:
        return result
    for stage in _stages(block, todo, inputs):
        # one (H, G) for the stage; with token weights one per module, each weighing tokens by its own output's gradient
        weightings = [None] if token_weights is None else [token_weights[n] for n in stage]
        grams = stage_grams(block, stage[0], inputs, weightings, None if float_side is None else float_side.input_of(stage[0]))
        grams = dict(zip(stage, grams)) if token_weights is not None else dict.fromkeys(stage, grams[0])
        for local in stage:
            H, G = grams[local]
            module = block.get_submodule(local)
            w = weight_matrix(module).detach()
            target = w if float_side is None else float_target_weight(w, H, G, settings.get("damp", DAMP), float_target)
            q = quantize_weight(target, todo[local], quantizer, hessian=H, **settings)
            set_weight_matrix(module, q.values.to(w.dtype))
            result[local] = q
    return result


def float_target_weight(weight: torch.Tensor, H: torch.Tensor, G: torch.Tensor, damp: float,
                        strength: float = 1.0) -> torch.Tensor:
    """The weight Ŵ [out, in] whose outputs on the quantized model's inputs x̃ come closest to the float layer's on
    the float model's inputs x: argmin Σ_t ‖Ŵ x̃_t − W x_t‖² + λ‖Ŵ − W‖² = W (G + λI)(H + λI)⁻¹, with H = mean x̃ x̃ᵀ,
    G = mean x x̃ᵀ and λ = damp · mean diag H (GPTQ's damping). GPTQ of Ŵ under H then minimizes the same
    objective (the rest is constant), so each layer also undoes the error the quantized layers before it left
    in its input, as GPTAQ (Li et al., 2025, "asymmetric calibration") does column by column. strength < 1 moves
    only that far from W toward Ŵ (GPTAQ's alpha, 0.25 in its code)."""
    lam = damp * float(torch.diagonal(H).mean())
    eye = torch.eye(H.shape[0], dtype=torch.float64)
    A = H.double() + lam * eye
    B = G.double() + lam * eye
    w = weight.double()
    best = torch.linalg.solve(A, B.T @ w.T).T
    return (w + strength * (best - w)).to(weight.dtype)


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
