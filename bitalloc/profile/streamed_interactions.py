"""interactions.measure_interactions with one decoder block in memory at a time (`--stream`).

A variant (one module quantized, or a pair) changes the hidden states from its first quantized module
on, so its loss needs every block after that module and the head. Per call (the pairs of one
interaction block b) every variant starts from the clean boundary h_l before its first module and all
variants are pushed through blocks l..N-1 together: each later block is loaded once per interaction
block, not once per variant, and the head then scores every variant. The clean boundaries of the
interaction windows come from one forward walk at the start (kept in a temporary folder), which also
gives the base loss and, for importance-only quantizers (rtn-w), diag H over every calibration window.

Memory: one block's weights + each variant's hidden states, (variants × windows × T × hidden) floats:
Llama shapes have about 21 variants per block (7 singles, 14 pairs), so 2 windows × 512 tokens ×
hidden 8192 × 4 B × 21 ≈ 0.7 GB on a 70B model, 50 MB on SmolLM2.
A module whose weight is also used before the blocks (a tied lm_head shares the embedding) is
quantized in the prefix as well, as it is in the whole model. Results equal measure_interactions on
the whole model up to float summation order (the head runs in token chunks, blocks from saved inputs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from ..blockwalk import BlockWalk, record_calls
from ..checkpoint import StreamedModel, outside_modules
from ..models import decoder_blocks
from ..options import QuantOption
from .interactions import block_index, quantized
from .records import Interaction
from .statistics import ImportanceSums
from ..progress import Bar
from .streamed import _Boundaries, _loaded, _without, chunk_nll, head_chunks

Variant = tuple[str, ...]  # the modules quantized together: one (a single) or two (a pair)


class StreamedInteractions:
    """Measures interactions on a checkpoint.StreamedModel; a context manager (the boundaries' folder).

    tokens: the calibration windows [n, T]; the first `windows` are the ones losses are measured on
    (ProfileSettings.interaction_windows, as in the whole-model path). importance: also compute diag H
    of every planned linear over all of `tokens` (what rtn-w quantizes with, statistics.input_importance).
    """

    def __init__(self, loaded: StreamedModel, module_names: list[str], tokens: torch.Tensor, windows: int, *,
                 importance: bool = False, progress: bool = False):
        self.loaded, self.model = loaded, loaded.model
        self.model.eval()
        self.prefix, self.blocks = decoder_blocks(self.model)
        outside = outside_modules(self.model, self.prefix)
        self.prefix_modules = _without(outside, self.model.get_output_embeddings())
        self.head_modules = _without(outside, self.model.get_input_embeddings())
        self.windows = tokens[:windows]
        self.progress = progress
        self._tmp = tempfile.TemporaryDirectory(prefix="bitalloc-interactions-")
        self.clean = _Boundaries(Path(self._tmp.name))
        self.calls: list = []
        self.importance: dict[str, torch.Tensor | None] | None = None
        planned = {n: self.model.get_submodule(n) for n in module_names}
        self.base = self._clean_walk(tokens if importance else self.windows, planned if importance else None)

    def __enter__(self) -> StreamedInteractions:
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()

    # ---- the clean model ---------------------------------------------------------------------------

    @torch.no_grad()
    def _clean_walk(self, tokens: torch.Tensor, importance_of: dict[str, nn.Module] | None) -> float:
        """One forward over `tokens`: saves h_l of the interaction windows for every l and returns their
        mean NLL; with importance_of, also sets self.importance (diag H over all of `tokens`)."""
        keep = self.windows.shape[0]
        sums = ImportanceSums(importance_of or {})
        n_blocks = len(self.blocks)
        bar = Bar(n_blocks, "interactions: clean walk", show=self.progress, unit="block")
        # each window's module inputs are folded into the sums before the next window runs (and at the head)
        walk = BlockWalk(self.model, tokens, holding=lambda l, block: _loaded(self.loaded, self._block(l)),
                         at_window=lambda w: sums.end_window(), to_end=True)
        with sums.hooked():
            with _loaded(self.loaded, self.prefix_modules):
                walk.record()
                sums.window_inputs.clear()  # an embedding has no importance; nothing else ran
            self.calls = walk.calls[:keep]
            for l, (_, inputs) in enumerate(walk):
                self.clean.put(l, torch.cat([h for _, h in inputs[:keep]]))
                bar.update()
            bar.close()
            h = torch.cat(walk.outputs)
            del walk
            self.clean.put(n_blocks, h[:keep])
            total = 0.0
            with _loaded(self.loaded, self.head_modules):
                for w, a, _, logits, n in head_chunks(self.model, self.blocks, tokens, h):
                    sums.end_window()
                    if w < keep and n > 0:
                        total += float(chunk_nll(logits, tokens, w, a, n))
        if importance_of:
            self.importance = sums.finish(tokens.numel())
        return total / self._predicted()

    def _predicted(self) -> int:
        n, t = self.windows.shape
        return n * (t - 1)

    def _block(self, l: int) -> list[tuple[str, nn.Module]]:
        return [(f"{self.prefix}.{l}", self.blocks[l])]

    # ---- variants ----------------------------------------------------------------------------------

    def _start(self, name: str) -> int:
        """The walk step at which quantizing `name` first changes the hidden states: its block, -1 for a
        module whose weight the prefix uses (an embedding, a tied head), len(blocks) for the head."""
        b = block_index(self.model, name)
        if b is not None:
            return b
        weight = self.model.get_submodule(name).weight
        in_prefix = any(p is weight for _, m in self.prefix_modules for p in m.parameters(recurse=False))
        return -1 if in_prefix else len(self.blocks)

    def _quantized_in(self, variant: Variant, option: QuantOption, names: set[str], quantizer: str):
        """The variant's modules among `names` whose weights are loaded now hold their quantized weights."""
        loaded = {n: option for n in variant if n in names and not self.model.get_submodule(n).weight.is_meta}
        return quantized(self.model, loaded, quantizer, self.importance)

    @torch.no_grad()
    def losses(self, variants: list[Variant], option: QuantOption, quantizer: str = "rtn") -> dict[Variant, float]:
        """Mean NLL on the interaction windows with each variant's modules quantized under `option`."""
        if not variants:
            return {}
        start = {v: min(self._start(n) for n in v) for v in variants}
        n_blocks, keep = len(self.blocks), self.windows.shape[0]
        outside = {n for v in variants for n in v if block_index(self.model, n) is None}
        streams: dict[Variant, torch.Tensor] = {}
        if any(s < 0 for s in start.values()):
            with _loaded(self.loaded, self.prefix_modules):
                for v in (v for v in variants if start[v] < 0):
                    with self._quantized_in(v, option, outside, quantizer):
                        streams[v] = torch.cat([record_calls(self.model, self.blocks, self.windows[w][None])[1]
                                                for w in range(keep)])
        first = max(0, min(start.values()))
        bar = Bar(n_blocks - first + 1, f"interactions: {len(variants)} variants", show=self.progress, unit="block")
        for l in range(first, n_blocks):
            active = [v for v in variants if start[v] <= l]
            in_block = {n for v in active for n in v if block_index(self.model, n) == l}
            with _loaded(self.loaded, self._block(l)):
                clean = self.clean.get(l) if any(v not in streams for v in active) else None
                for v in active:
                    h = streams.get(v, clean)
                    with self._quantized_in(v, option, in_block, quantizer):
                        streams[v] = torch.cat([self.calls[w][l](self.blocks[l], h[w : w + 1]) for w in range(keep)])
            bar.update()
        result = {}
        with _loaded(self.loaded, self.head_modules):
            clean = self.clean.get(n_blocks)
            for v in variants:
                with self._quantized_in(v, option, outside, quantizer):
                    h = streams.pop(v, clean)
                    result[v] = sum(float(chunk_nll(logits, self.windows, w, a, n))
                                    for w, a, _, logits, n in head_chunks(self.model, self.blocks, self.windows, h)
                                    if n > 0) / self._predicted()
        bar.update()
        bar.close()
        return result

    def measure(self, pairs: list[tuple[str, str, str]], option: QuantOption, singles: dict[str, float] | None = None,
                quantizer: str = "rtn") -> list[Interaction]:
        """interactions.measure_interactions(model, pairs, option, windows, singles=..., quantizer=...)."""
        singles = dict(singles or {})
        needed = sorted({n for a, b, _ in pairs for n in (a, b)} - set(singles))
        loss = self.losses([(n,) for n in needed] + [(a, b) for a, b, _ in pairs], option, quantizer)
        singles.update({n: loss[(n,)] - self.base for n in needed})
        return [Interaction(a=a, b=b, relation=rel, option=option.label, single_a=singles[a], single_b=singles[b],
                            joint=loss[(a, b)] - self.base) for a, b, rel in pairs]
