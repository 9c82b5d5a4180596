"""Spikes and the trace from the block-streamed walk (profile/streamed.py, profile/fisher_trace.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bitalloc import api
from bitalloc.calibration import calibration_from_tokens
from bitalloc.checkpoint import open_streamed
from bitalloc.errors import BadInputError
from bitalloc.models import select_modules
from bitalloc.profile import streamed
from bitalloc.profile.fisher_trace import fisher_trace_estimate, row_sums
from bitalloc.profile.spikes import SpikeCollector, collect_spikes

from conftest import FAMILIES, make_tokenizer


def _save(family: str, folder: Path) -> nn.Module:
    model = FAMILIES[family]()
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model


def _streamed_spikes(folder: Path, names, calib, statistics: bool):
    collector = SpikeCollector(names, top_k=4)
    loaded = open_streamed(str(folder))
    for _ in streamed.iter_block_statistics(loaded, names if statistics else [], calib, spikes=collector,
                                            statistics=statistics):
        pass
    assert all(p.is_meta for p in loaded.model.parameters())
    return collector.finish()


# Tolerance: the float64 sums of the head's sites are added chunk by chunk instead of window by window,
# and the blocks' activations are recomputed from saved boundaries: equal up to float summation order.
RTOL = 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("statistics", [False, True], ids=["forward-only", "with-statistics"])
def test_streamed_spikes_equal_whole_model(family, statistics, tmp_path, calib_ids, monkeypatch):
    model = _save(family, tmp_path)
    monkeypatch.setattr(streamed, "HEAD_CHUNK_TOKENS", 8)  # 32-token windows arrive at the head in 4 chunks
    names = select_modules(model, include_lm_head=True, include_embeddings=True)
    calib = calibration_from_tokens(calib_ids)
    ref = collect_spikes(model, names, calib, top_k=4)
    got = _streamed_spikes(tmp_path, names, calib, statistics)
    assert list(got) == names
    for n in names:
        for site in ("input", "output"):
            a, b = getattr(ref[n], site), getattr(got[n], site)
            assert b.tokens == a.tokens
            np.testing.assert_allclose(b.channel_max, a.channel_max, rtol=RTOL, err_msg=n)
            np.testing.assert_allclose(b.channel_rms, a.channel_rms, rtol=RTOL, err_msg=n)
            np.testing.assert_allclose([b.max_abs, b.ratio, b.kurtosis], [a.max_abs, a.ratio, a.kurtosis], rtol=RTOL,
                                       err_msg=n)
            # (window, position, channel) of the largest values: positions in later head chunks included
            np.testing.assert_array_equal(b.top_tokens, a.top_tokens, err_msg=n)
            np.testing.assert_array_equal(b.top_channels, a.top_channels, err_msg=n)
            assert b.flagged == a.flagged
    head = next(n for n in names if n.endswith("lm_head"))
    assert ref[head].output.top_tokens[:, 1].max() >= 8  # the positions checked above cross a chunk border


def test_streamed_spikes_see_another_model(tmp_path, calib_ids):
    """The comparison above can fail: spikes of a checkpoint with other weights differ."""
    model = FAMILIES["llama"](seed=0)
    FAMILIES["llama"](seed=1).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    names = select_modules(model)
    calib = calibration_from_tokens(calib_ids)
    ref = collect_spikes(model, names, calib, top_k=4)
    got = _streamed_spikes(tmp_path, names, calib, statistics=False)
    assert max(abs(got[n].input.max_abs / ref[n].input.max_abs - 1) for n in names[1:]) > 1e-2


def test_fisher_trace_rows_equal_the_per_token_gradient_norms():
    """Σ_t g_{t,i}² ‖x_t‖² is Σ_t Σ_j (∂ℓ_t/∂W_ij)² when each token's loss sees only its own x_t."""
    g = torch.Generator().manual_seed(0)
    layer = nn.Linear(5, 7, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(7, 5, generator=g))
    x = torch.randn(11, 5, generator=g)
    labels = torch.randint(0, 7, (11,), generator=g)
    y = layer(x).detach().requires_grad_(True)  # ∂(Σ_t ℓ_t)/∂y_t = ∂ℓ_t/∂y_t
    nn.functional.cross_entropy(y, labels, reduction="sum").backward()
    got = row_sums(x, y.grad)

    want = torch.zeros(7, dtype=torch.float64)
    for t in range(11):  # brute force: one token's weight gradient at a time
        layer.weight.grad = None
        nn.functional.cross_entropy(layer(x[t : t + 1]), labels[t : t + 1]).backward()
        want += (layer.weight.grad.double() ** 2).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # not the window gradient's norm: the cross terms between tokens are what the estimator drops
    layer.weight.grad = None
    nn.functional.cross_entropy(layer(x), labels, reduction="sum").backward()
    assert not torch.allclose((layer.weight.grad.double() ** 2).sum(1), want, rtol=0.05)


def test_fisher_trace_estimate_sums_rows_and_windows():
    per_window = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=torch.float64)  # [windows, rows]
    est = fisher_trace_estimate(per_window, numel=12, group_rows=2)
    assert est.probes == 2 and est.trace == 6.0 and est.per_param == 0.5
    np.testing.assert_array_equal(est.group_trace, [4.0, 2.0])  # rows (0, 1), (2, pad)
    assert est.stderr == 0.0  # both windows have trace 6


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights stored [in, out]
def test_streamed_fisher_trace_equals_its_definition_on_the_whole_model(family, tmp_path, calib_ids, monkeypatch):
    """ModuleStats.fisher_trace from the streamed walk = per-token g and x captured on the whole model."""
    model = _save(family, tmp_path)
    monkeypatch.setattr(streamed, "HEAD_CHUNK_TOKENS", 8)
    names = select_modules(model, include_lm_head=True, include_embeddings=True)
    calib = calibration_from_tokens(calib_ids)
    n_windows, seq_len = calib_ids.shape

    want = {n: torch.zeros(n_windows, _rows(model.get_submodule(n)), dtype=torch.float64) for n in names}
    window = {"w": 0}

    def hook(name):
        def on_forward(mod, args, out):
            x = args[0]
            if isinstance(mod, nn.Embedding):  # ‖x_t‖ = 1 (one-hot), row = token id
                def on_grad(g):
                    want[name][window["w"]].index_add_(0, x.reshape(-1), (g.double() ** 2).reshape(-1, g.shape[-1]).sum(1))
            else:
                xs = x.detach().double().reshape(-1, x.shape[-1])

                def on_grad(g):
                    want[name][window["w"]] += (xs**2).sum(1) @ (g.double() ** 2).reshape(-1, g.shape[-1])
            out.register_hook(on_grad)
        return on_forward

    emb = model.get_input_embeddings()
    handles = [emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True))]
    handles += [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in range(n_windows):
        window["w"] = w
        logits = model(input_ids=calib_ids[w : w + 1]).logits
        nn.functional.cross_entropy(logits[0, :-1], calib_ids[w, 1:], reduction="sum").backward()
    for h in handles:
        h.remove()

    got = streamed.streamed_statistics(open_streamed(str(tmp_path)), names, calib, fisher_trace=True)
    for n in names:
        expect = want[n] / (seq_len - 1)
        assert float(expect.min()) >= 0 and float(expect.sum()) > 0
        torch.testing.assert_close(got[n].fisher_trace, expect, rtol=1e-4, atol=1e-7 * float(expect.max()))


def _rows(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    w = module.weight
    return w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0]


def test_profile_streams_trace_and_spikes(model_dir, tmp_path):
    kw = dict(seq_len=32, calib_tokens=128, include_lm_head=True)
    calib = model_dir / "calib.txt"
    # rtn-w: a stream's default (it folds no equalization scales, which would move the spikes)
    whole = api.profile_model(str(model_dir), calib, tmp_path / "whole", signals=("fisher", "trace", "spikes"),
                              trace_max_probes=8, quantizer="rtn-w", **kw)
    stream = api.profile_model(str(model_dir), calib, tmp_path / "stream", stream=True,
                               signals=("fisher", "trace", "spikes"), **kw)
    assert whole.settings["trace_estimator"] == "hutchinson"
    assert stream.settings["trace_estimator"] == "empirical-fisher"
    assert stream.key != whole.key
    windows = 128 // 32
    for a, b in zip(whole.modules, stream.modules):
        assert a.name == b.name
        assert b.trace.probes == windows and b.trace.trace > 0 and b.trace.numel == a.trace.numel
        assert b.trace.group_trace.shape == a.trace.group_trace.shape
        np.testing.assert_allclose(b.spikes.input.channel_max, a.spikes.input.channel_max, rtol=RTOL)
        np.testing.assert_array_equal(b.spikes.output.top_tokens, a.spikes.output.top_tokens)
    # reading the folder back gives the same record
    again = api.profile_model(str(model_dir), calib, tmp_path / "stream", stream=True,
                              signals=("fisher", "trace", "spikes"), **kw)
    assert [m.trace.trace for m in again.modules] == [m.trace.trace for m in stream.modules]

    with pytest.raises(BadInputError, match="needs the whole model"):
        api.profile_model(str(model_dir), calib, tmp_path / "x", stream=True, signals=("trace",),
                          trace_estimator="hutchinson", **kw)
    with pytest.raises(BadInputError, match="profile with stream,"):
        api.profile_model(str(model_dir), calib, tmp_path / "y", signals=("trace",), trace_estimator="empirical-fisher",
                          **kw)


def test_profile_streams_spikes_alone_without_a_backward(model_dir, tmp_path, monkeypatch):
    def no_backward(*a, **k):
        raise AssertionError("spikes alone need no backward pass")

    monkeypatch.setattr(streamed.StatisticAccumulator, "pop_sums", no_backward)
    prof = api.profile_model(str(model_dir), model_dir / "calib.txt", tmp_path / "p", stream=True, signals=("spikes",),
                             seq_len=32, calib_tokens=128)
    assert all(m.spikes is not None and m.spikes.input.tokens == 128 for m in prof.modules)


def test_an_untied_vocabulary_matrix_is_loaded_only_where_it_is_used(tmp_path, calib_ids):
    """The prefix passes run without the head's weights, the head pass without the embedding's."""
    _save("qwen2", tmp_path)  # untied embedding and head
    loaded = open_streamed(str(tmp_path))
    model = loaded.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    seen = []
    h1 = emb.register_forward_pre_hook(lambda m, a: seen.append(("embedding", head.weight.is_meta)))
    h2 = head.register_forward_pre_hook(lambda m, a: seen.append(("head", emb.weight.is_meta)))
    try:
        streamed.streamed_statistics(loaded, select_modules(model, include_lm_head=True), calibration_from_tokens(calib_ids))
    finally:
        h1.remove()
        h2.remove()
    assert {s[0] for s in seen} == {"embedding", "head"}
    assert all(other_is_meta for _, other_is_meta in seen)  # the other matrix was never loaded beside it
