"""Measured inter-layer corrections: joint vs summed single-layer loss increase for pairs of modules.

The candidate table's error model is additive over modules. Where two layers' errors compound (or
cancel), the true loss of quantizing both differs from the sum of their single effects; "Augmenting
Hessians with Inter-Layer Dependencies" (2024) adds such cross terms for layers that interact. We
measure the correction directly for a given option:
    correction(a, b) = ΔL(a, b) − ΔL(a) − ΔL(b)
with ΔL the increase of mean next-token NLL on calibration windows (RTN, true forward passes).
All pairs would be O(modules²) forward passes; the dataflow graph limits them to pairs that touch:
siblings reading the same tensor (q/k/v, gate/up) and producer → consumer stages (q/k/v → o → gate/up
→ down → the next block's q/k/v), i.e. same-block projections and adjacent blocks.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..models import decoder_blocks, forward_hooks, set_weight_matrix, stages_by_shared_input, weight_matrix
from ..options import QuantOption
from ..quantizers import weight_values
from .records import Interaction
from ..progress import steps

if TYPE_CHECKING:
    import networkx as nx


def block_index(model: nn.Module, name: str) -> int | None:
    prefix, _ = decoder_blocks(model)
    rest = name[len(prefix) + 1:] if name.startswith(prefix + ".") else None
    return int(rest.split(".")[0]) if rest else None


@torch.no_grad()
def dataflow_graph(model: nn.Module, module_names: list[str], sample_ids: torch.Tensor) -> nx.DiGraph:
    """Stages of planned modules in execution order (modules reading one tensor form one stage);
    edges: within a stage ("sibling") and from each stage to the next ("sequential")."""
    # Keep the input tensors themselves: comparing ids of freed tensors could match a reused address.
    order: list[tuple[str, torch.Tensor]] = []
    with forward_hooks((model.get_submodule(n), lambda mod, args, out, n=n: order.append((n, args[0])))
                       for n in module_names):
        model(input_ids=sample_ids.reshape(1, -1))
    stages = stages_by_shared_input(order)
    import networkx as nx  # here, not at the top: planning from a profile loads this module but never draws a graph

    g = nx.DiGraph()
    for i, stage in enumerate(stages):
        for n in stage:
            g.add_node(n, stage=i, block=block_index(model, n))
        for x in range(len(stage)):
            for y in range(x + 1, len(stage)):
                g.add_edge(stage[x], stage[y], relation="sibling")
        if i + 1 < len(stages):
            for a in stage:
                for b in stages[i + 1]:
                    g.add_edge(a, b, relation="sequential")
    return g


def candidate_pairs(graph: nx.DiGraph, blocks: set[int] | None = None) -> list[tuple[str, str, str]]:
    """(a, b, relation) for every dataflow edge whose first module lies in `blocks` (all if None)."""
    pairs = []
    for a, b, data in graph.edges(data=True):
        if blocks is None or graph.nodes[a]["block"] in blocks:
            pairs.append((a, b, data["relation"]))
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(pairs, key=lambda p: (order[p[0]], order[p[1]]))


@contextlib.contextmanager
def quantized(model: nn.Module, assign: dict[str, QuantOption], quantizer: str = "rtn",
              importance: dict[str, torch.Tensor | None] | None = None):
    """Within the block, the named modules hold their quantized weights (`quantizer`: rtn, rtn-mse, or rtn-w
    with each module's `importance`); the originals come back after."""
    original = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in assign}
    try:
        for n, opt in assign.items():
            set_weight_matrix(model.get_submodule(n), weight_values(original[n], opt, quantizer,
                                                                    (importance or {}).get(n)))
        yield model
    finally:
        for n, w in original.items():
            set_weight_matrix(model.get_submodule(n), w)


@torch.no_grad()
def mean_nll(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token NLL over every predicted token of the windows (float64 accumulation)."""
    total, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        total += float(nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += w.numel() - 1
    return total / count


def measure_interactions(model: nn.Module, pairs: list[tuple[str, str, str]], option: QuantOption,
                         windows: torch.Tensor, progress: bool = False,
                         singles: dict[str, float] | None = None, quantizer: str = "rtn",
                         importance: dict[str, torch.Tensor | None] | None = None) -> list[Interaction]:
    """Joint and single loss increases for each pair under `option` (singles measured once per module;
    pass `singles` to reuse ones measured before). quantizer: the profile's, rtn, rtn-mse or rtn-w (with
    `importance`, statistics.input_importance on the profile's calibration windows)."""
    base = mean_nll(model, windows)
    singles = dict(singles or {})
    needed = sorted({n for a, b, _ in pairs for n in (a, b)} - set(singles))
    for n in steps(needed, f"single ablations {option.label}", show=progress, unit="module"):
        with quantized(model, {n: option}, quantizer, importance):
            singles[n] = mean_nll(model, windows) - base
    result = []
    for a, b, rel in steps(pairs, f"pair ablations {option.label}", show=progress, unit="pair"):
        with quantized(model, {a: option, b: option}, quantizer, importance):
            joint = mean_nll(model, windows) - base
        result.append(Interaction(a=a, b=b, relation=rel, option=option.label, single_a=singles[a],
                                  single_b=singles[b], joint=joint))
    return result
