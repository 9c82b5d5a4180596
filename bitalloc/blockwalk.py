"""Running a decoder-only model one block at a time: what GPTQ's sequential pass (quantizers/sequential.py)
and the streamed profile (profile/streamed.py, profile/streamed_interactions.py) share.

record_calls runs one window's forward with every decoder block replaced by a recorder (an identity
that keeps how the model called it: attention mask, position embeddings, cache flags, ...), stopping
at the last block; a BlockCall then maps a block input h_l to h_{l+1} for that block alone, which is
all a block-by-block pass needs. Each block keeps its own call, so models whose blocks get different
arguments (sliding-window layers next to global ones) are replayed as the whole model runs them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch
from torch import nn

from .errors import BadInputError, setting


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
