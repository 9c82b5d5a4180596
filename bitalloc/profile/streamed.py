"""statistics.collect_statistics with memory bounded by one decoder block (GPTQ-style sequential pipeline).

The model is a meta skeleton (checkpoint.StreamedModel); weights are read when needed:
  1. prefix   embeddings etc. materialized; every block's forward is replaced by a recorder that
              keeps its call (masks, position embeddings, ...) and the block-0 input h₀ per window.
  2. forward  block l alone is materialized and maps the saved boundary h_l to h_{l+1} (no grad).
              Steps 1-2 are blockwalk.BlockWalk, the walk GPTQ and equalization take, holding one block.
  3. head     final norm + head materialized; the loss gradient g_N = ∂L/∂h_N at the last boundary
              (and the head's own statistics) come from the model's forward with the blocks
              replaced by a replay that returns h_N, in token chunks so the logits stay small; it is
              fed zeros as embeddings (the replay ignores them), so only the head is loaded.
  4. backward for l = N-1..0: block l is materialized again, recomputes h_{l+1} from h_l with
              autograd and backpropagates g_{l+1}; hooks accumulate H (inputs) and F (output
              gradients²) of its planned modules; g_l = ∂L/∂h_l goes down. The block's statistics
              are complete here, and are yielded while its weights are loaded (for table rows).
  5. embed    only when a module before the blocks is planned: the prefix with autograd, fed g₀.
Boundaries h_l [windows, T, hidden] live in a temporary folder (one file each) or in memory.
The numbers equal collect_statistics on the whole model up to float summation order.
The same walk feeds a spikes.SpikeCollector from the forward passes of steps 1-3 (equal to
collect_spikes), and, when asked, each module's empirical-Fisher trace (fisher_trace.py) from the
backward hooks of steps 3-5. With statistics=False it stops after step 3 (spikes only: no backward).
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..blockwalk import BlockWalk, StopForward, blocks_replaced
from ..calibration import Calibration
from ..candidates import ERROR_MODELS, CandidateTable, build_candidate_table
from ..checkpoint import StreamedModel, materialize, outside_modules, release, return_freed_memory
from ..config import supplied_calibration
from ..models import decoder_blocks, forward_hooks
from ..options import QuantOption
from .spikes import SpikeCollector
from .statistics import ModuleStats, StatisticAccumulator, mean_stats, output_requires_grad
from ..progress import Bar

HEAD_CHUNK_TOKENS = 128  # logits [chunk, vocab] instead of [window, vocab]: the largest activation


class _Boundaries:
    """h_l for every window, [windows, T, hidden]: one .npy per boundary in `folder`, or a dict in memory."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.memory: dict[int, torch.Tensor] = {}

    def put(self, index: int, value: torch.Tensor) -> None:
        if self.folder is None:
            self.memory[index] = value
        else:
            np.save(self.folder / f"h{index:04d}.npy", value.numpy())

    def get(self, index: int) -> torch.Tensor:
        if self.folder is None:
            return self.memory[index]
        return torch.from_numpy(np.load(self.folder / f"h{index:04d}.npy"))

    def drop(self, index: int) -> None:
        if self.folder is None:
            self.memory.pop(index, None)
        else:
            (self.folder / f"h{index:04d}.npy").unlink(missing_ok=True)


@contextmanager
def _loaded(loaded: StreamedModel, modules: list[tuple[str, nn.Module]]) -> Iterator[None]:
    for name, mod in modules:
        materialize(loaded, mod, name)
    try:
        yield
    finally:
        for _, mod in modules:
            release(loaded, mod)
        return_freed_memory()


def iter_block_statistics(
    loaded: StreamedModel,
    module_names: list[str],
    calibration: Calibration,
    *,
    boundaries_on_disk: bool = True,
    progress: bool = False,
    spikes: SpikeCollector | None = None,
    statistics: bool = True,
    fisher_trace: bool = False,
) -> Iterator[dict[str, ModuleStats]]:
    """Statistics of the planned modules, one decoder block (or the outside modules) at a time.

    Each yielded dict holds the finished stats of one group of modules while their weights are
    loaded in `loaded.model` (so table rows can be computed right then); blocks come last to
    first, the outside modules (embeddings, head) last. Never more than one block is loaded.
    spikes: fed from the forward passes (its modules' inputs and outputs, every window).
    statistics: False walks forward only (for `spikes`) and yields nothing.
    fisher_trace: also fill each ModuleStats.fisher_trace (fisher_trace.py).
    """
    model = loaded.model
    model.eval()
    prefix, blocks = decoder_blocks(model)
    n_blocks = len(blocks)
    outside = outside_modules(model, prefix)
    planned = {n: model.get_submodule(n) for n in module_names}
    in_block = {l: {n: m for n, m in planned.items() if n.startswith(f"{prefix}.{l}.")} for l in range(n_blocks)}
    planned_outside = {n: m for n, m in planned.items() if not n.startswith(prefix + ".")}
    tokens = calibration.tokens  # [windows, T]
    n_windows, seq_len = tokens.shape
    n_inputs, n_predicted = n_windows * seq_len, n_windows * (seq_len - 1)
    acc = StatisticAccumulator(fisher_trace)
    spikes = spikes or SpikeCollector([])
    spiked = {n: model.get_submodule(n) for n in spikes.acc}  # may differ from the planned (a resumed profile)
    spiked_in_block = {l: {n: m for n, m in spiked.items() if n.startswith(f"{prefix}.{l}.")} for l in range(n_blocks)}
    spiked_outside = {n: m for n, m in spiked.items() if not n.startswith(prefix + ".")}
    for p in model.parameters():
        p.requires_grad_(False)

    with tempfile.TemporaryDirectory(prefix="bitalloc-boundaries-") as tmp:
        store = _Boundaries(Path(tmp) if boundaries_on_disk else None)
        bar = Bar((2 if statistics else 1) * n_blocks, "streamed blocks", show=progress, unit="block")

        # 1-2. prefix, then forward block by block (blockwalk): every block's call per window, and h_0 .. h_N
        before_blocks: set[str] = set()
        # the prefix passes never reach the head, and the head pass feeds zeros instead of embeddings: an
        # untied vocabulary matrix (4.2 GB fp32 for Llama-3.1-70B) is loaded only where it is used
        prefix_modules = _without(outside, model.get_output_embeddings())
        head_modules = _without(outside, model.get_input_embeddings())

        @contextmanager
        def holding(l: int, block: nn.Module) -> Iterator[None]:
            with _loaded(loaded, [(f"{prefix}.{l}", block)]), spikes.hooked(spiked_in_block[l]):
                yield

        walk = BlockWalk(model, tokens, holding=holding, at_window=spikes.at, to_end=True)
        with (_loaded(loaded, prefix_modules), torch.no_grad(), spikes.hooked(spiked_outside),  # only those before block 0 run
              forward_hooks((mod, lambda m, a, o, n=n: before_blocks.add(n)) for n, mod in outside)):
            walk.record()
        with torch.no_grad():
            for l, (_, inputs) in enumerate(walk):
                store.put(l, torch.cat([h for _, h in inputs]))
                bar.update()
        store.put(n_blocks, torch.cat(walk.outputs))
        calls = walk.calls
        del walk

        # 3. head: g_N and the statistics of planned modules after the blocks
        after = {n: m for n, m in planned_outside.items() if _owner(n, outside) not in before_blocks}
        spiked_after = {n: m for n, m in spiked_outside.items() if _owner(n, outside) not in before_blocks}
        if not statistics:
            with _loaded(loaded, head_modules), spikes.hooked(spiked_after), torch.no_grad():
                _head_pass(model, blocks, tokens, store.get(n_blocks), acc, spikes, backward=False)
            bar.close()
            return
        with _loaded(loaded, head_modules), acc.hooked(after), spikes.hooked(spiked_after):
            grad = _head_pass(model, blocks, tokens, store.get(n_blocks), acc, spikes)
        store.drop(n_blocks)

        # 4. backward, block by block
        for l in reversed(range(n_blocks)):
            with _loaded(loaded, [(f"{prefix}.{l}", blocks[l])]):
                h = store.get(l)
                grad_in = torch.empty_like(h)
                with acc.hooked(in_block[l]):
                    for w in range(n_windows):
                        acc.window = w
                        x = h[w : w + 1].clone().requires_grad_(True)
                        out = calls[w][l](blocks[l], x)
                        out.backward(grad[w : w + 1])
                        grad_in[w : w + 1] = x.grad
                        acc.end_pass()
                        del out, x
                grad = grad_in
                if l > 0:
                    store.drop(l)
                bar.update()
                if in_block[l]:
                    yield {n: _means(acc, n, m, n_inputs, n_predicted, n_windows) for n, m in in_block[l].items()}
        bar.close()

        # 5. embeddings (planned modules before the blocks), then every outside module's stats
        if planned_outside:
            with _loaded(loaded, prefix_modules if not after else outside):  # the head's own stats are popped here too
                before = {n: m for n, m in planned_outside.items() if n not in after}
                if before:
                    _embedding_backward(model, blocks, tokens, grad, acc, before)
                yield {n: _means(acc, n, m, n_inputs, n_predicted, n_windows) for n, m in planned_outside.items()}


def _means(acc: StatisticAccumulator, name: str, module: nn.Module, n_inputs: int, n_predicted: int,
           n_windows: int) -> ModuleStats:
    # fisher_trace is kept per window, each over its own predicted tokens
    return mean_stats(name, acc.pop_sums(name, module), n_inputs, n_predicted, per_window=n_predicted // n_windows)


def streamed_statistics(loaded: StreamedModel, module_names: list[str], calibration: Calibration,
                        *, boundaries_on_disk: bool = True, progress: bool = False,
                        fisher_trace: bool = False) -> dict[str, ModuleStats]:
    """collect_statistics(model, module_names, calibration) without ever loading more than one block."""
    stats: dict[str, ModuleStats] = {}
    for part in iter_block_statistics(loaded, module_names, calibration, boundaries_on_disk=boundaries_on_disk,
                                      progress=progress, fisher_trace=fisher_trace):
        stats.update(part)
    return {n: stats[n] for n in module_names}


def _without(outside: list[tuple[str, nn.Module]], module: nn.Module | None) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in outside if m is not module]


def _owner(name: str, outside: list[tuple[str, nn.Module]]) -> str:
    """The outside module holding parameters that `name` is (or lies inside)."""
    return max((n for n, _ in outside if name == n or name.startswith(n + ".")), key=len, default=name)


def head_chunks(model, blocks, tokens, h_last, *, grad: bool = False,
                before: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, int]]:
    """(window w, chunk start a, leaf, logits, n) per token chunk of every window: the model's forward from
    h_N[w, a:b] (the leaf, requiring grad when `grad`) through the final norm and head; n of the chunk's
    positions predict a next token. before(w, a) runs just before each chunk's forward (for hooks' bookkeeping)."""
    n_windows, seq_len = tokens.shape
    last = len(blocks) - 1
    # the blocks are replayed, so what enters them is never used: zeros spare the embedding matrix
    zeros = torch.zeros(1, min(HEAD_CHUNK_TOKENS, seq_len), model.get_input_embeddings().embedding_dim)
    for w in range(n_windows):
        for a in range(0, seq_len, HEAD_CHUNK_TOKENS):
            b = min(a + HEAD_CHUNK_TOKENS, seq_len)
            if before is not None:
                before(w, a)
            leaf = h_last[w : w + 1, a:b].clone().requires_grad_(grad)

            def replay(i, *args, _leaf=leaf, **kwargs):  # bound now: `leaf` is deleted after the chunk
                return _leaf if i == last else (args[0] if args else kwargs["hidden_states"])

            with blocks_replaced(blocks, replay):
                logits = model(inputs_embeds=zeros[:, : b - a], use_cache=False).logits  # [1, b-a, vocab]
            yield w, a, leaf, logits, min(b, seq_len - 1) - a
            del logits, leaf


def chunk_nll(logits: torch.Tensor, tokens: torch.Tensor, w: int, a: int, n: int) -> torch.Tensor:
    """Summed next-token NLL of one head chunk's n predicting positions."""
    return nn.functional.cross_entropy(logits[0, :n].float(), tokens[w, a + 1 : a + 1 + n], reduction="sum")


def _head_pass(model, blocks, tokens, h_last, acc: StatisticAccumulator, spikes: SpikeCollector,
               backward: bool = True) -> torch.Tensor | None:
    """∂L/∂h_N [windows, T, hidden] for L = summed next-token NLL, from h_N and the head, in token chunks
    (backward=False: the head's forward only, for the spike hooks; returns None)."""
    grad = torch.zeros_like(h_last) if backward else None

    def before(w, a):
        acc.window = w
        spikes.at(w, a)

    for w, a, leaf, logits, n in head_chunks(model, blocks, tokens, h_last, grad=backward, before=before):
        if backward and n > 0:
            chunk_nll(logits, tokens, w, a, n).backward()
            grad[w, a : a + leaf.shape[1]] = leaf.grad[0]
        acc.end_pass()
    return grad


def _embedding_backward(model, blocks, tokens, grad0, acc: StatisticAccumulator, modules: dict[str, nn.Module]) -> None:
    """Backpropagate ∂L/∂h₀ through the modules before block 0, accumulating statistics of `modules`."""
    # entered before the statistics hooks, which need the flag set (as in collect_statistics)
    with output_requires_grad(model.get_input_embeddings()), acc.hooked(modules):
        _prefix_backward(model, blocks, tokens, grad0, acc)


def _prefix_backward(model, blocks, tokens, grad0, acc: StatisticAccumulator) -> None:
    """One window at a time: the prefix with autograd up to block 0's input h₀, then h₀.backward(∂L/∂h₀)."""
    for w in range(tokens.shape[0]):
        acc.window = w
        got: list[torch.Tensor] = []

        def stop(i, *args, **kwargs):
            got.append(args[0] if args else kwargs["hidden_states"])
            raise StopForward

        with blocks_replaced(blocks, stop):
            try:
                model(input_ids=tokens[w : w + 1], use_cache=False)
            except StopForward:
                pass
        got[0].backward(grad0[w : w + 1])
        acc.end_pass()


def streamed_candidate_table(loaded: StreamedModel, module_names: list[str], calibration: Calibration,
                             options: list[QuantOption], *, boundaries_on_disk: bool = True,
                             progress: bool = False, quantizer: str = "rtn") -> CandidateTable:
    """candidates.build_candidate_table(collect_statistics(...)) with one block loaded at a time:
    each block's rows are computed as soon as its statistics are done, while its weights are loaded."""
    supplied = supplied_calibration(calibration)
    rows: dict[str, tuple[CandidateTable, int]] = {}
    for stats in iter_block_statistics(loaded, module_names, calibration, boundaries_on_disk=boundaries_on_disk,
                                       progress=progress):
        names = list(stats)
        part = build_candidate_table(loaded.model, names, stats, options, quantizer=quantizer, supplied=supplied)
        rows.update({n: (part, i) for i, n in enumerate(names)})
        del stats  # H of a block is not needed once its rows exist
    return CandidateTable(
        groups=list(module_names),
        shapes=[rows[n][0].shapes[rows[n][1]] for n in module_names],
        options=list(options),
        storage_bits=np.stack([rows[n][0].storage_bits[rows[n][1]] for n in module_names]),
        errors={m: np.stack([rows[n][0].errors[m][rows[n][1]] for n in module_names]) for m in ERROR_MODELS},
        quantizer=quantizer,
    )
