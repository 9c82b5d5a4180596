"""Perplexity, KL divergence to the unquantized model, and top-1 agreement on fixed windows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .calibration import check_windows, sequential_windows, tokenize, with_bos
from .models import check_token_ids
from .progress import steps


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    nll: float
    kl: float | None  # mean KL(P_reference || P_model) per scored token, nats
    top1: float | None  # fraction of scored tokens where both models' argmax agree
    windows: int
    seq_len: int
    scored_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        extra = "" if self.kl is None else f"  KL {self.kl:.4f}  top-1 {self.top1:.2%}"
        return f"ppl {self.ppl:.3f}{extra}  ({self.windows}×{self.seq_len} tokens)"


def evaluation_windows(text_or_ids: str | torch.Tensor, tokenizer: Any = None, seq_len: int = 512,
                       windows: int | None = 16, bos: int | None = None) -> torch.Tensor:
    """Tokenize once, cut non-overlapping windows from the start (same windows for every config).

    bos: an id written over each window's first token (calibration.leading_bos: as llama-perplexity
    scores a model whose tokenizer starts sequences with BOS); None keeps the text's tokens only."""
    ids = tokenize(tokenizer, text_or_ids) if isinstance(text_or_ids, str) else text_or_ids.reshape(-1)
    return with_bos(sequential_windows(ids, seq_len, windows), bos)


@torch.no_grad()
def reference_logprobs(model: nn.Module, windows: torch.Tensor, progress: bool = False) -> list[torch.Tensor]:
    """Log-probabilities of `model` per window (float32), to compare many quantized variants against."""
    return [_logprobs(model, w) for w in steps(windows, "reference", show=progress, unit="win")]


@torch.no_grad()
def evaluate(
    model: nn.Module | list[torch.Tensor],
    windows: torch.Tensor,
    reference: nn.Module | list[torch.Tensor] | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score every token after the first of each window; ppl = exp(mean NLL).

    model and reference: a module, or its per-window log-probabilities from `reference_logprobs`
    (so a model already run on these windows is not run again)."""
    check_windows(windows, "evaluation windows")
    for m in (model, reference):
        if isinstance(m, nn.Module):
            check_token_ids(m, windows, "evaluation windows")
    nll_sum = kl_sum = agree = 0.0
    n = 0
    for i, w in enumerate(steps(windows, "evaluate", show=progress, unit="win")):
        logp = model[i] if isinstance(model, list) else _logprobs(model, w)
        nll_sum += float(-logp.gather(1, w[1:, None]).sum())
        n += w.numel() - 1
        if reference is not None:
            ref = reference[i] if isinstance(reference, list) else _logprobs(reference, w)
            kl_sum += float((ref.exp() * (ref - logp)).sum())
            agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
    nll = nll_sum / n
    has_ref = reference is not None
    return EvalResult(
        ppl=math.exp(nll),
        nll=nll,
        kl=kl_sum / n if has_ref else None,
        top1=agree / n if has_ref else None,
        windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        scored_tokens=n,
    )


def _logprobs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    # Positions 0..T-2 predict tokens 1..T-1: [T-1, vocab]
    logits = model(input_ids=window[None]).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)
