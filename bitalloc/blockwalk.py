"""Running a decoder-only model one block at a time: what GPTQ's sequential pass (quantizers/sequential.py),
equalization (equalize.py) and the streamed profile (profile/streamed.py, profile/streamed_interactions.py) share.

record_calls runs one window's forward with every decoder block replaced by a recorder (an identity
that keeps how the model called it: attention mask, position embeddings, cache flags, ...), stopping
at the last block; a BlockCall then maps a block input h_l to h_{l+1} for that block alone, which is
all a block-by-block pass needs. Each block keeps its own call, so models whose blocks get different
arguments (sliding-window layers next to global ones) are replayed as the whole model runs them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from .errors import BadInputError, setting
from .models import decoder_blocks, forward_hooks


class StopForward(Exception):
    """Raised inside a forward pass to end it once the wanted inputs are seen."""


@dataclass
class BlockCall:
    """How the model called one block in one window, minus the hidden state."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_kwarg:
            out = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            out = block(hidden, *self.args, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


@contextmanager
def blocks_replaced(blocks: nn.ModuleList, fn: Callable) -> Iterator[None]:
    """Within the block, block i's forward is fn(i, *args, **kwargs)."""
    # An instance attribute shadows the class's forward; nn.Module.__call__ (and hooks) still run.
    for i, blk in enumerate(blocks):
        blk.forward = partial(fn, i)
    try:
        yield
    finally:
        for blk in blocks:
            blk.__dict__.pop("forward", None)


def record_calls(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> tuple[list[BlockCall], torch.Tensor]:
    """One window's forward up to the last block: each block's call, and the input of block 0."""
    calls: list[BlockCall] = []
    seen: dict[str, torch.Tensor] = {}
    last = len(blocks) - 1

    def recorder(i, *args, **kwargs):
        if args:
            hidden, call = args[0], BlockCall(args[1:], kwargs, False)
        else:
            hidden, call = kwargs.pop("hidden_states"), BlockCall((), kwargs, True)
        if i == 0:
            seen["h0"] = hidden
        elif hidden is not seen["returned"]:  # the model changed block i-1's output before passing it on
            raise BadInputError(f"{type(model).__name__} does not pass each block's output to the next block as is; "
                                f"block-by-block passes ({setting('stream')}, GPTQ) cannot replay its blocks")
        calls.append(call)
        if i == last:
            raise StopForward
        seen["returned"] = hidden  # recorders are identities: the next block sees this very tensor
        return hidden

    with blocks_replaced(blocks, recorder):
        try:
            model(input_ids=ids, use_cache=False)
        except StopForward:
            pass
        else:
            raise RuntimeError("the forward pass never reached the last decoder block")
    return calls, seen["h0"]


Inputs = list[tuple[BlockCall, torch.Tensor]]  # per calibration window: the block's call and its hidden input


class BlockWalk:
    """Iterate (block, inputs) over a model's decoder blocks, each block's inputs from the calibration windows
    [n, seq_len] as the blocks before it (in their state when the walk reached them) passed them on.

    What a caller changes in a block while it holds it (quantized weights, folded scales) shapes the next
    block's inputs; breaking out of the loop skips running the rest. GPTQ (quantizers/sequential.py),
    equalization and the streamed profile's forward pass all walk this way:

    holding(i, block): a context entered while block i is in use, the caller's turn and the pass that makes
        the next inputs (the streamed profile loads the block's weights there and hooks its spike sites);
    at_window(w): called before window w enters the prefix or a block (for hooks that file what they see by window);
    to_end: run the last block too; its outputs are then `outputs`.
    record() runs the prefix (the model up to block 0) once per window; call it first where the prefix needs a
    context of its own (weights to load), else the walk calls it when it starts. `calls` then holds how the model
    called each block, per window (calls[w][i]), for passes of the caller's own (the streamed backward).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, *,
                 holding: Callable[[int, nn.Module], AbstractContextManager] | None = None,
                 at_window: Callable[[int], None] | None = None, to_end: bool = False):
        self.prefix, self.blocks = decoder_blocks(model)
        self.model, self.windows = model, windows
        self.holding = holding or (lambda i, block: nullcontext())
        self.at_window = at_window or (lambda w: None)
        self.to_end = to_end
        self.calls: list[list[BlockCall]] = []
        self.outputs: list[torch.Tensor] | None = None
        self._first: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def record(self) -> None:
        self.calls, self._first = [], []
        for w, window in enumerate(self.windows):
            self.at_window(w)
            calls, first = record_calls(self.model, self.blocks, window[None])
            self.calls.append(calls)
            self._first.append(first)

    def __iter__(self) -> Iterator[tuple[nn.Module, Inputs]]:
        if self._first is None:
            self.record()
        hidden, self._first = self._first, None  # the walk owns the boundaries from here: one in memory at a time
        for i, block in enumerate(self.blocks):
            with self.holding(i, block):
                inputs = [(calls[i], h) for calls, h in zip(self.calls, hidden)]
                yield block, inputs
                if i + 1 < len(self.blocks) or self.to_end:
                    hidden = []
                    for w, (call, h) in enumerate(inputs):
                        self.at_window(w)
                        hidden.append(call(block, h))
                    del inputs
        if self.to_end:
            self.outputs = hidden


@dataclass
class _Gram:
    """Σ x xᵀ over the rows of every input a hook saw, and their count: H = mean_t x xᵀ."""

    xtx: torch.Tensor | None = None
    n: int = 0

    def add(self, args: tuple, token_weights: torch.Tensor | None = None) -> None:
        """token_weights [tokens]: Σ a_t x xᵀ instead (still divided by the token count)."""
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
        xtx = x.T @ x if token_weights is None else (x * token_weights[:, None]).T @ x
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.n += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.xtx / self.n


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A module input as [tokens, in], in float32 (a view where it already is: modules sharing an input share it)."""
    return x.detach().reshape(-1, x.shape[-1]).float()


def module_input(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """`module`'s input [tokens, in] in one forward pass, stopped there."""
    seen = []

    def grab(mod, args):
        seen.append(_rows(args[0]))
        raise StopForward

    with forward_hooks([(module, grab)], pre=True):
        try:
            run()
        except StopForward:
            pass
    return seen[0]


def input_hessian(module: nn.Module, passes: Iterable[Callable[[], Any]]) -> torch.Tensor:
    """H = mean_t x xᵀ [in, in] of `module`'s input over the forward passes, each stopped at the module."""
    gram = _Gram()
    for run in passes:
        gram.add((module_input(module, run),))
    return gram.mean()


def stage_hessians(block: nn.Module, locals_: list[str], inputs: Inputs) -> list[torch.Tensor]:
    """H = mean x xᵀ of each module in `locals_`'s input over all windows, from one pass of the block over the windows
    instead of one pass per module stopped at it (stage_grams: the same inputs reach each module, so the same H, bit
    for bit)."""
    grams = {n: _Gram() for n in locals_}
    hooks = [(block.get_submodule(n), lambda mod, args, gram=grams[n]: gram.add(args)) for n in locals_]
    with forward_hooks(hooks, pre=True):
        for call, hidden in inputs:
            call(block, hidden)
    return [grams[n].mean() for n in locals_]


def stage_grams(block: nn.Module, local: str, inputs: Inputs, token_weights: list[torch.Tensor | None],
                float_input: Callable[[int], torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(H, G) of module `local` over all windows, per weighting in `token_weights` (a [windows, seq_len] tensor,
    or None for every token alike), from one pass over the windows: H = mean_t a_t x̃ x̃ᵀ of its input in `block`
    (inputs: the quantized model's) and, given the float model's input x [tokens, in] to the same module window by
    window (float_input(w)), G = mean_t a_t x x̃ᵀ, token by token (G is None without it). The modules of a stage share
    the input; each may weigh its tokens by its own output's gradient (statistics.output_gradient_weights).
    Unweighted, H is stage_hessians', bit for bit."""
    grams = [_Gram() for _ in token_weights]
    crosses: list[Any] = [None if float_input is None else 0 for _ in token_weights]
    for w, (call, hidden) in enumerate(inputs):
        x_q = module_input(block.get_submodule(local), partial(call, block, hidden))
        x_f = None if float_input is None else float_input(w)
        for k, weights in enumerate(token_weights):
            a = None if weights is None else weights[w].reshape(-1)
            grams[k].add((x_q,), a)
            if x_f is not None:
                crosses[k] = crosses[k] + (x_f if a is None else x_f * a[:, None]).T @ x_q
    return [(g.mean(), None if c is None else c / g.n) for g, c in zip(grams, crosses)]


def module_inputs(block: nn.Module, locals_: list[str], inputs: Inputs, hidden: list[torch.Tensor] | None = None
                  ) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """Each module in `locals_`'s input [tokens, in] window by window, and the block's output per window, from one
    whole pass of the block per window (on `hidden` in place of the inputs' own hidden states, where given): what
    module_input gives one module at a time, for a block that does not change between its stages. Modules that
    share an input share its tensor."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in locals_}
    hooks = [(block.get_submodule(n), lambda mod, args, n=n: seen[n].append(_rows(args[0]))) for n in locals_]
    outputs = []
    with forward_hooks(hooks, pre=True):
        for w, (call, h) in enumerate(inputs):
            outputs.append(call(block, h if hidden is None else hidden[w]))
    return seen, outputs
