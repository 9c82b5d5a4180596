"""Data-free calibration (`--calib self`): token windows sampled from the model itself.

ZeroQ (Cai et al., 2020) calibrates without data by synthesizing inputs from the model; LLM-QAT
(Liu et al., 2023, Sec. 2.1) does it for language models by letting the model generate text. Here each
window starts from BOS and one of a few generic prompts and continues by temperature sampling with a
seeded generator, so a seed gives the same windows (on the same machine and thread count: sampling
follows the float logits).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from .calibration import Calibration
from .errors import BadInputError, setting
from .models import cache_argument

# Generic openings, cycled over the windows, so the samples are not all one continuation of BOS.
PROMPTS = ("The", "In", "It was", "A new", "One of the", "When", "This is", "There are")
TEMPERATURE = 1.0
TOP_K = 50  # drops the long tail of the vocabulary that plain T=1 sampling wanders into


@torch.no_grad()
def self_calibration(model: torch.nn.Module, tokenizer: Any, *, seq_len: int = 512, tokens: int = 8192,
                     seed: int = 0, batch_size: int = 8) -> Calibration:
    """tokens // seq_len windows of seq_len ids each, sampled from `model` with `seed`."""
    if tokenizer is None:
        raise BadInputError(f"calibrating on the model's own samples ({setting('calibration')} self) needs the model's tokenizer: "
                            "load the model from a source (hub id, directory, .gguf)")
    if seq_len < 2 or tokens < seq_len:
        raise BadInputError(f"need seq_len >= 2 and calibration tokens >= seq_len, got {seq_len} and {tokens}")
    n_windows = tokens // seq_len
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    banned = sorted(set(tokenizer.all_special_ids))  # keep every window ordinary text: no EOS / chat markers
    prompt_ids = [bos + tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    windows: list[torch.Tensor | None] = [None] * n_windows
    try:
        # windows sharing a prompt share a prompt length, so each batch needs no padding
        for p, prompt in enumerate(prompt_ids):
            idx = list(range(p, n_windows, len(prompt_ids)))
            for start in range(0, len(idx), batch_size):
                chunk = idx[start:start + batch_size]
                ids = torch.tensor([prompt] * len(chunk), dtype=torch.long)
                out = _sample(model, ids[:, :seq_len], seq_len, g, banned, device)
                for i, w in zip(chunk, out):
                    windows[i] = w
    finally:
        model.train(was_training)
    stacked = torch.stack(windows)  # [n_windows, seq_len]
    digest = "sha256:" + hashlib.sha256(stacked.numpy().tobytes()).hexdigest()
    sampling = (f"sampled from the model: BOS + prompts {list(PROMPTS)} cycled over windows, temperature {TEMPERATURE}, "
                f"top-k {TOP_K}, special tokens excluded")
    return Calibration(tokens=stacked, text_sha256=digest, source="self", seed=seed, sampling=sampling)


def _sample(model, ids: torch.Tensor, seq_len: int, g: torch.Generator, banned: list[int], device) -> torch.Tensor:
    """Extend ids [batch, prompt] to [batch, seq_len] by top-k temperature sampling, with the KV cache."""
    cache_arg = cache_argument(model)
    out = model(input_ids=ids.to(device), use_cache=True)
    past, seq = out[cache_arg], ids
    while seq.shape[1] < seq_len:
        logits = out.logits[:, -1, :].float().cpu() / TEMPERATURE  # [batch, vocab]
        logits[:, banned] = float("-inf")
        top, where = logits.topk(TOP_K, dim=-1)
        pick = torch.multinomial(torch.softmax(top, dim=-1), 1, generator=g)  # [batch, 1]
        nxt = where.gather(1, pick)
        seq = torch.cat([seq, nxt], dim=1)
        if seq.shape[1] == seq_len:
            break
        out = model(input_ids=nxt.to(device), use_cache=True, **{cache_arg: past})
        past = out[cache_arg]
    return seq
