"""Interactions measured with one decoder block loaded at a time (profile/streamed_interactions.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bitalloc import api
from bitalloc.checkpoint import open_streamed
from bitalloc.models import decoder_blocks, select_modules
from bitalloc.options import QuantOption
from bitalloc.profile import streamed
from bitalloc.profile.interactions import candidate_pairs, dataflow_graph, measure_interactions
from bitalloc.profile.statistics import input_importance
from bitalloc.profile.streamed_interactions import StreamedInteractions

from conftest import FAMILIES, make_tokenizer

OPTION = QuantOption.int_(2, 32, False)
WINDOWS = 2


def _save(family: str, folder: Path, seed: int = 0) -> nn.Module:
    model = FAMILIES[family](seed=seed)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model


def _both(model, folder: Path, calib_ids, quantizer: str):
    """(whole-model records, streamed records) for every block's pairs, singles reused across blocks as the
    profile pipeline does, and the streamed meter's importance."""
    names = select_modules(model, include_lm_head=True)
    graph = dataflow_graph(model, names, calib_ids[0, :16])
    importance = input_importance(model, names, calib_ids) if quantizer == "rtn-w" else None
    blocks = sorted({graph.nodes[n]["block"] for n in names} - {None})
    whole, stream, singles_w, singles_s = [], [], {}, {}
    loaded = open_streamed(str(folder))
    # the streamed skeleton's graph comes from a forward on meta tensors
    assert sorted(dataflow_graph(loaded.model, names, torch.arange(16, device="meta")).edges) == sorted(graph.edges)
    with StreamedInteractions(loaded, names, calib_ids, WINDOWS, importance=quantizer == "rtn-w") as meter:
        for b in blocks:
            pairs = candidate_pairs(graph, {b})
            whole += measure_interactions(model, pairs, OPTION, calib_ids[:WINDOWS], singles=singles_w,
                                          quantizer=quantizer, importance=importance)
            stream += meter.measure(pairs, OPTION, singles_s, quantizer)
            for records, singles in ((whole, singles_w), (stream, singles_s)):
                for r in records:
                    singles.setdefault(r.a, r.single_a)
                    singles.setdefault(r.b, r.single_b)
        got_importance = meter.importance
    assert all(p.is_meta for p in loaded.model.parameters())  # every block was released again
    return whole, stream, importance, got_importance


def _values(records) -> np.ndarray:
    return np.array([[r.single_a, r.single_b, r.joint, r.correction] for r in records])


@pytest.mark.parametrize("quantizer", ["rtn", "rtn-w"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_interactions_equal_whole_model(family, quantizer, tmp_path, calib_ids, monkeypatch):
    model = _save(family, tmp_path)
    monkeypatch.setattr(streamed, "HEAD_CHUNK_TOKENS", 8)  # the head scores each 32-token window in 4 chunks
    whole, stream, importance, got_importance = _both(model, tmp_path, calib_ids, quantizer)
    assert [(r.a, r.b, r.relation) for r in stream] == [(r.a, r.b, r.relation) for r in whole]
    assert stream[-1].b.endswith("lm_head")  # the last block's output stage → the head (tied in llama, gpt2, opt)
    w, s = _values(whole), _values(stream)
    assert np.abs(w[:, 3]).max() > 1e-5  # real corrections, not all zero
    # the head's float32 NLL sums (about 5 nats per token) are formed per 8-token chunk instead of per window:
    # equal up to that summation order, float32's 6e-8 × 5 nats × a few roundings (seen: up to 8e-7)
    np.testing.assert_allclose(s, w, rtol=0, atol=2e-6)
    if quantizer == "rtn-w":  # diag H over every calibration window, from the same walk
        for n, d in importance.items():
            assert (d is None) == (got_importance[n] is None)
            if d is not None:
                torch.testing.assert_close(got_importance[n], d, rtol=1e-6, atol=0)


def test_streamed_interactions_see_another_model(tmp_path, calib_ids):
    """The comparison above can fail: a checkpoint with other weights gives other corrections."""
    model = FAMILIES["llama"](seed=0)
    _save("llama", tmp_path, seed=1)
    whole, stream, _, _ = _both(model, tmp_path, calib_ids, "rtn")
    assert np.abs(_values(whole) - _values(stream)).max() > 1e-4


def test_only_one_block_is_loaded_while_measuring(tmp_path, calib_ids):
    model = _save("qwen2", tmp_path)
    loaded = open_streamed(str(tmp_path))
    _, blocks = decoder_blocks(loaded.model)
    names = select_modules(model)
    pairs = candidate_pairs(dataflow_graph(model, names, calib_ids[0, :16]), {0})
    seen = []  # blocks with real weights at every real block call

    def pre(mod, args, kwargs):
        if "forward" not in mod.__dict__:  # a real call, not the recorder
            seen.append([j for j, b in enumerate(blocks) if not any(p.is_meta for p in b.parameters())])

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    try:
        with StreamedInteractions(loaded, names, calib_ids, WINDOWS) as meter:
            meter.measure(pairs, OPTION)
    finally:
        for h in handles:
            h.remove()
    assert seen and all(len(now) == 1 for now in seen)
    # each block is loaded once for the clean walk and once for all of block 0's variants together
    loads = [now[0] for i, now in enumerate(seen) if i == 0 or now != seen[i - 1]]
    assert loads == [*range(len(blocks)), *range(len(blocks))]
    variants = len({n for a, b, _ in pairs for n in (a, b)}) + len(pairs)
    assert len(seen) > WINDOWS * (len(blocks) + variants)  # every variant ran through them


def test_profile_streams_interactions(model_dir, tmp_path):
    kw = dict(signals=("interactions",), seq_len=32, calib_tokens=128, include_lm_head=True)
    calib = model_dir / "calib.txt"
    whole = api.profile_model(str(model_dir), calib, tmp_path / "whole", quantizer="rtn-w", **kw)  # a stream's default
    stream = api.profile_model(str(model_dir), calib, tmp_path / "stream", stream=True, **kw)
    assert stream.key == whole.key  # the same signal, measured the same way
    assert len(stream.interactions) == len(whole.interactions) > 0
    assert [(r.a, r.b) for r in stream.interactions] == [(r.a, r.b) for r in whole.interactions]
    # one head chunk per 32-token window: the same float operations in the same order, bit for bit
    np.testing.assert_array_equal(_values(stream.interactions), _values(whole.interactions))
    # one block only, resumed from the folder as it stands
    part = api.profile_model(str(model_dir), calib, tmp_path / "one", stream=True, interaction_blocks=(1,), **kw)
    assert {r.a.split(".")[2] for r in part.interactions} == {"1"}
