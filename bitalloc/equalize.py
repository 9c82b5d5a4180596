"""Equalization: AWQ's activation-aware input scaling (Lin et al., 2024), folded into the model.

Before anything is profiled or quantized, each input channel j of the linears that read the same
activations is multiplied by s_j, and whatever produces those activations is divided by it:

- the RMSNorm in front of q/k/v (`input_layernorm`) and in front of gate/up (`post_attention_layernorm`,
  Gemma's `pre_feedforward_layernorm`): its weight (Gemma: 1 + weight) and bias;
- up_proj in front of down_proj (down reads act(gate)·up, linear in up): its rows;
- v_proj in front of o_proj (attention is linear in V): its rows; with grouped-query attention every
  query head sharing a kv head gets that head's scales.

The model computes the same function (up to float rounding), and the checkpoint it is written to is an
ordinary one: the divided norms and rows are stored like any other tensor. What changes is where the
quantization grid has resolution: channels that see large activations get larger weights, so their
share of each group's scale grows and their rounding error, which the layer's output feels most,
shrinks. s = rms(x_j)^α, normalised to a geometric mean of max and min of 1; α ∈ ALPHAS is chosen per
group to minimise the group's output error Σ tr(ΔW H ΔWᵀ) at the REFERENCE options, each relative to
α = 0 (no scaling, which is among the candidates: the proxy never gets worse). The scaling does not
depend on the plan, so one candidate table holds every option of the equalized model.

The search walks α upward and stops PATIENCE steps past the best so far: the error falls to one
minimum (α 0 to 0.5 on trained models) and then climbs steeply, so the sweep ends after about 6 or 7
of the 11 quantize-and-measure rounds and picks the full sweep's α on every group of SmolLM2 and
Gemma 3 (bench/equalize_search.py). Three steps of patience ride out the bumps of a noisy curve (a
tiny random model's), which a stop at the first rise would not.

It runs block by block on the calibration windows (blockwalk), with each block's H from inputs of the
blocks before it (already folded: the same activations), so memory stays one block's. The same windows
give the same scales, bit for bit: the profile and `apply` fold the same model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .blockwalk import BlockWalk, stage_hessians
from .errors import BadInputError
from .models import decoder_blocks, weight_matrix, weights_hash
from .options import PER_CHANNEL, parse_option
from .progress import steps

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# The options whose error the scales minimise: the low-bit ones a budget plan puts most weights at (at 8
# bits the grid is fine enough that scaling hardly matters). rtn-w is the quantizer the search uses.
REFERENCE = ("int3-g64-asym", "int4-g64-asym")
PATIENCE = 3  # α steps past the best so far before the search stops (first_minimum)
SEARCH_QUANTIZER = "rtn-w"


@dataclass(frozen=True)
class Group:
    """Linears that read one activation (`consumers`), and what produces it (`producer`: a norm, or a
    linear whose rows are divided). heads: query heads per kv head when the producer is v_proj (o_proj's
    input channels repeat v's, one copy per query head), else 1; head_dim: the channels of one head."""

    producer: str
    consumers: tuple[str, ...]
    heads: int = 1
    head_dim: int = 0


def block_groups(block: nn.Module) -> list[Group]:
    """The equalization groups of one decoder block, in call order: those of the Llama-family parts it has
    (Llama, Qwen2, Mistral, Gemma 3 naming). A block with none (GPT-2's Conv1D, OPT's and BERT's post-norm
    or GELU blocks) gives none: its weights are quantized as they are (awq is rtn-w there)."""
    names = dict(block.named_modules())
    attn, mlp = "self_attn", "mlp"
    mlp_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in names else "post_attention_layernorm"

    def linears(*parts: str) -> bool:
        return all(isinstance(names.get(p), nn.Linear) for p in parts)

    def norm(name: str) -> bool:  # a norm with a weight to divide (a LayerNorm/RMSNorm, not a bare function)
        return getattr(names.get(name), "weight", None) is not None and not isinstance(names[name], nn.Linear)

    qkv = tuple(f"{attn}.{p}_proj" for p in "qkv")
    gate_up = (f"{mlp}.gate_proj", f"{mlp}.up_proj")
    v, o, up, down = f"{attn}.v_proj", f"{attn}.o_proj", f"{mlp}.up_proj", f"{mlp}.down_proj"
    groups = []
    if norm("input_layernorm") and linears(*qkv):
        groups.append(Group("input_layernorm", qkv))
    # A norm on V (Gemma 3n's v_norm) would make attention non-linear in v_proj's rows: o is left alone.
    head_dim = getattr(names.get(attn), "head_dim", 0)
    if (linears(v, o) and f"{attn}.v_norm" not in names and head_dim and names[v].out_features % head_dim == 0
            and names[o].in_features % names[v].out_features == 0):
        groups.append(Group(v, (o,), names[o].in_features // names[v].out_features, head_dim))
    if norm(mlp_norm) and linears(*gate_up):
        groups.append(Group(mlp_norm, gate_up))
    # down reads act(gate)·up, linear in up's rows; without a gate (act(up) itself) it is not
    if linears(*gate_up, down):
        groups.append(Group(up, (down,)))
    return groups


# Set on a model once its scales are folded in: the windows they came from, and the content hash of the weights
# before (what a plan made on those weights is checked against: apply.check_plan_matches).
FOLDED = "_bitalloc_equalized"


def equalize(model: nn.Module, windows: torch.Tensor, progress: bool = False, content_hash: str | None = None,
             scales: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Fold equalization scales into `model` in place, from calibration token ids [windows, seq_len]; returns them
    ("<block index>.<producer>" -> s), or {} for a model already folded on these windows (left as it is: folding
    twice would fold other scales). content_hash: models.weights_hash of `model` when the caller has it already
    (it is recorded, not recomputed). scales: what an earlier equalize of the same weights on the same windows
    returned (a cache): folded as they are, without the search, so the same fold bit for bit."""
    digest = windows_digest(windows)
    done = getattr(model, FOLDED, None)
    if done is not None:
        if done["windows"] != digest:
            raise BadInputError("this model already has equalization scales folded in from other calibration windows; "
                                "load the model again to equalize it on these")
        return {}
    weights = content_hash or weights_hash(model)
    model.eval()
    references = [parse_option(label) for label in REFERENCE]
    found: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if scales is not None:
            for i, block in enumerate(decoder_blocks(model)[1] if scales else ()):
                for group in block_groups(block):
                    fold(block, group, scales[f"{i}.{group.producer}"])
            found = scales
        elif equalizable(model):
            for i, (block, inputs) in enumerate(steps(BlockWalk(model, windows), "equalize", show=progress,
                                                      unit="block")):
                groups = block_groups(block)
                # Every group's H from the block as it came in: folding one group does not change another's input.
                hessians = stage_hessians(block, [g.consumers[0] for g in groups], inputs)
                for group, H in zip(groups, hessians):
                    found[f"{i}.{group.producer}"] = search_scales(block, group, H, references)
                    fold(block, group, found[f"{i}.{group.producer}"])
    setattr(model, FOLDED, {"windows": digest, "weights": weights})
    return found


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of calibration token ids: which windows a fold (or its cached scales) came from."""
    return hashlib.sha256(windows.long().cpu().numpy().tobytes()).hexdigest()


def equalizable(model: nn.Module) -> bool:
    """Whether any decoder block of `model` has an equalization group (else equalize leaves it as it is)."""
    try:
        blocks = decoder_blocks(model)[1]
    except BadInputError:  # no repeated blocks at all
        return False
    return any(block_groups(block) for block in blocks)


def weights_before(model: nn.Module) -> str | None:
    """The content hash of the weights an equalized model was folded from; None for a model never equalized."""
    done = getattr(model, FOLDED, None)
    return None if done is None else done["weights"]


def search_scales(block: nn.Module, group: Group, H: torch.Tensor, references) -> torch.Tensor:
    """s [producer channels] for `group` under its consumers' input Hessian H [in, in]: the α of ALPHAS
    whose scales give the least reference error, relative to unscaled (first_minimum)."""
    cost, scales = alpha_cost(block, group, H, references)
    return scales(first_minimum(cost, len(ALPHAS)))


def first_minimum(cost: Callable[[int], float], n: int, patience: int = PATIENCE) -> int:
    """The index in range(n) of least cost(i), swept upward and stopped once `patience` indices in a row have
    not lowered it (ties keep the smaller index, as a full sweep does)."""
    best, best_cost = 0, cost(0)
    for i in range(1, n):
        if i - best > patience:
            break
        c = cost(i)
        if c < best_cost:
            best, best_cost = i, c
    return best


def alpha_cost(block: nn.Module, group: Group, H: torch.Tensor, references):
    """(cost, scales): cost(i) is the group's reference error at α = ALPHAS[i], each option's relative to
    α = 0, summed; scales(i) the producer-channel scales s at that α."""
    from .quantizers import quantize_weight

    weights = [weight_matrix(block.get_submodule(c)).detach().float() for c in group.consumers]
    in_features = weights[0].shape[1]
    # a row the reference groups do not tile is measured per channel
    references = [o if o.fits(in_features) else replace(o, group_size=PER_CHANNEL) for o in references]
    h = torch.diagonal(H).clamp(min=torch.finfo(torch.float32).tiny)
    rms = _per_producer_channel(h, group).sqrt()
    rms = rms.clamp(min=float(rms.max()) * 1e-6)  # a dead channel must not get a scale that overflows its producer

    def scales(i: int) -> torch.Tensor:
        s = rms.pow(ALPHAS[i])
        return s / (s.max() * s.min()).sqrt()

    def errors(i: int) -> list[float]:
        s_in = _per_consumer_channel(scales(i), group)
        out = []
        for option in references:
            err = 0.0
            for w in weights:
                q = quantize_weight(w * s_in, option, SEARCH_QUANTIZER, hessian=h / s_in**2).values / s_in
                d = q - w
                err += float(((d @ H) * d).sum())
            out.append(err)
        return out

    unscaled = errors(0)  # α = 0: s = 1
    baseline = [max(e, torch.finfo(torch.float32).tiny) for e in unscaled]

    def cost(i: int) -> float:
        return sum(e / b for e, b in zip(unscaled if i == 0 else errors(i), baseline))

    return cost, scales


def fold(block: nn.Module, group: Group, s: torch.Tensor) -> None:
    """Multiply the consumers' input channels by s and divide the producer's output channels by it."""
    s_in = _per_consumer_channel(s, group)
    for c in group.consumers:
        w = block.get_submodule(c).weight
        w.copy_((w.float() * s_in).to(w.dtype))
    producer = block.get_submodule(group.producer)
    if isinstance(producer, nn.Linear):
        producer.weight.copy_((producer.weight.float() / s[:, None]).to(producer.weight.dtype))
    elif "gemma" in type(producer).__name__.lower():  # Gemma's RMSNorm multiplies by (1 + weight)
        producer.weight.copy_(((1 + producer.weight.float()) / s - 1).to(producer.weight.dtype))
    else:
        producer.weight.copy_((producer.weight.float() / s).to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.copy_((producer.bias.float() / s).to(producer.bias.dtype))


def _per_producer_channel(per_input: torch.Tensor, group: Group) -> torch.Tensor:
    # o_proj's input is [query heads, head_dim]; query heads j·heads … (j+1)·heads − 1 read kv head j.
    # Each kv channel's statistic is the mean over the query heads that read it.
    if group.heads == 1:
        return per_input
    return per_input.view(-1, group.heads, group.head_dim).mean(1).reshape(-1)


def _per_consumer_channel(s: torch.Tensor, group: Group) -> torch.Tensor:
    if group.heads == 1:
        return s
    return s.view(-1, 1, group.head_dim).expand(-1, group.heads, -1).reshape(-1)
