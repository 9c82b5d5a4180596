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

It runs block by block on the calibration windows (blockwalk), with each block's H from inputs of the
blocks before it (already folded: the same activations), so memory stays one block's. The same windows
give the same scales, bit for bit: the profile and `apply` fold the same model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from .blockwalk import BlockWalk, stage_hessian
from .errors import BadInputError, setting
from .models import weight_matrix, weights_hash
from .options import PER_CHANNEL, parse_option
from .progress import steps

ALPHAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# The options whose error the scales minimise: the low-bit ones a budget plan puts most weights at (at 8
# bits the grid is fine enough that scaling hardly matters). rtn-w is the quantizer the search uses.
REFERENCE = ("int3-g64-asym", "int4-g64-asym")
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
    """The equalization groups of one decoder block (Llama, Qwen2, Mistral, Gemma 3 naming), in call order."""
    names = dict(block.named_modules())
    attn, mlp = "self_attn", "mlp"
    mlp_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in names else "post_attention_layernorm"
    needed = ["input_layernorm", mlp_norm, *(f"{attn}.{p}_proj" for p in "qkvo"),
              *(f"{mlp}.{p}_proj" for p in ("gate", "up", "down"))]
    missing = [n for n in needed if n not in names]
    if missing:
        raise BadInputError(f"equalization folds scales into pre-norm decoder blocks with q/k/v/o and gate/up/down "
                            f"projections (Llama, Qwen2, Mistral, Gemma 3); {type(block).__name__} has no "
                            f"{', '.join(missing)}: quantize with {setting('quantizer')} rtn-w instead")
    for n in needed[:2]:
        if getattr(names[n], "weight", None) is None:
            raise BadInputError(f"equalization divides the norm's weight by its scales; {n} of {type(block).__name__} "
                                f"has none: quantize with {setting('quantizer')} rtn-w instead")
    for n in needed[2:]:
        if not isinstance(names[n], nn.Linear):
            raise BadInputError(f"equalization needs nn.Linear projections; {n} of {type(block).__name__} is "
                                f"{type(names[n]).__name__}: quantize with {setting('quantizer')} rtn-w instead")
    groups = [Group("input_layernorm", tuple(f"{attn}.{p}_proj" for p in "qkv"))]
    v, o = names[f"{attn}.v_proj"], names[f"{attn}.o_proj"]
    # A norm on V (Gemma 3n's v_norm) would make attention non-linear in v_proj's rows: o is left alone.
    head_dim = getattr(names[attn], "head_dim", 0)
    if ("v_norm" not in dict(names[attn].named_children()) and head_dim and v.out_features % head_dim == 0
            and o.in_features % v.out_features == 0):
        groups.append(Group(f"{attn}.v_proj", (f"{attn}.o_proj",), o.in_features // v.out_features, head_dim))
    groups += [Group(mlp_norm, (f"{mlp}.gate_proj", f"{mlp}.up_proj")),
               Group(f"{mlp}.up_proj", (f"{mlp}.down_proj",))]
    return groups


# Set on a model once its scales are folded in: the windows they came from, and the content hash of the weights
# before (what a plan made on those weights is checked against: apply.check_plan_matches).
FOLDED = "_bitalloc_equalized"


def equalize(model: nn.Module, windows: torch.Tensor, progress: bool = False, content_hash: str | None = None) -> None:
    """Fold equalization scales into `model` in place, from calibration token ids [windows, seq_len].
    A model already folded on the same windows is left as it is (folding twice would fold other scales).
    content_hash: models.weights_hash of `model` when the caller has it already (it is recorded, not recomputed)."""
    digest = hashlib.sha256(windows.long().cpu().numpy().tobytes()).hexdigest()
    done = getattr(model, FOLDED, None)
    if done is not None:
        if done["windows"] != digest:
            raise BadInputError("this model already has equalization scales folded in from other calibration windows; "
                                "load the model again to equalize it on these")
        return
    weights = content_hash or weights_hash(model)
    model.eval()
    references = [parse_option(label) for label in REFERENCE]
    with torch.no_grad():
        blocks = BlockWalk(model, windows)
        for block, inputs in steps(blocks, "equalize", show=progress, unit="block"):
            groups = block_groups(block)
            # Every group's H from the block as it came in: folding one group does not change another's input.
            hessians = [stage_hessian(block, g.consumers[0], inputs) for g in groups]
            for group, H in zip(groups, hessians):
                fold(block, group, search_scales(block, group, H, references))
    setattr(model, FOLDED, {"windows": digest, "weights": weights})


def weights_before(model: nn.Module) -> str | None:
    """The content hash of the weights an equalized model was folded from; None for a model never equalized."""
    done = getattr(model, FOLDED, None)
    return None if done is None else done["weights"]


def search_scales(block: nn.Module, group: Group, H: torch.Tensor, references) -> torch.Tensor:
    """s [producer channels] for `group` under its consumers' input Hessian H [in, in]: the α of ALPHAS
    whose scales give the least reference error, relative to unscaled."""
    from .quantizers import quantize_weight

    weights = [weight_matrix(block.get_submodule(c)).detach().float() for c in group.consumers]
    in_features = weights[0].shape[1]
    # a row the reference groups do not tile is measured per channel
    references = [o if o.fits(in_features) else replace(o, group_size=PER_CHANNEL) for o in references]
    h = torch.diagonal(H).clamp(min=torch.finfo(torch.float32).tiny)
    rms = _per_producer_channel(h, group).sqrt()
    rms = rms.clamp(min=float(rms.max()) * 1e-6)  # a dead channel must not get a scale that overflows its producer
    best, best_cost = torch.ones_like(rms), None
    baseline: list[float] = []
    for alpha in ALPHAS:
        s = rms.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        s_in = _per_consumer_channel(s, group)
        errors = []
        for option in references:
            err = 0.0
            for w in weights:
                q = quantize_weight(w * s_in, option, SEARCH_QUANTIZER, hessian=h / s_in**2).values / s_in
                d = q - w
                err += float(((d @ H) * d).sum())
            errors.append(err)
        if not baseline:  # α = 0 comes first: s = 1
            baseline = [max(e, torch.finfo(torch.float32).tiny) for e in errors]
        cost = sum(e / b for e, b in zip(errors, baseline))
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


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
