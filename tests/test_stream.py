"""Block-streamed profiling (bitalloc/checkpoint.py, bitalloc/profile/streamed.py) against the whole-model path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bitalloc import api
from bitalloc.calibration import calibration_from_tokens
from bitalloc.checkpoint import gguf_layout, meta_skeleton, open_streamed
from bitalloc.errors import BadInputError
from bitalloc.models import decoder_blocks, load_model, select_modules, weights_hash
from bitalloc.profile import streamed
from bitalloc.profile.statistics import collect_statistics

from conftest import FAMILIES, make_tokenizer

SMOLLM2 = Path(os.environ.get("BITALLOC_SMOLLM2_GGUF", ""))  # .ci/run sets it (scripts/fetch_smollm2.sh)


def _save(family: str, folder: Path):
    model = FAMILIES[family]()
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("on_disk", [True, False], ids=["boundaries-on-disk", "boundaries-in-memory"])
def test_streamed_statistics_equal_whole_model(family, on_disk, tmp_path, calib_ids, monkeypatch):
    model = _save(family, tmp_path)
    # chunks of 8 tokens in the head pass: 32-token windows cross chunk borders
    monkeypatch.setattr(streamed, "HEAD_CHUNK_TOKENS", 8)
    names = select_modules(model, include_lm_head=True, include_embeddings=True)
    calib = calibration_from_tokens(calib_ids)
    ref = collect_statistics(model, names, calib)

    loaded = open_streamed(str(tmp_path))
    got = streamed.streamed_statistics(loaded, names, calib, boundaries_on_disk=on_disk)

    assert list(got) == names
    assert loaded.content_hash == weights_hash(model)
    for n in names:
        assert float(ref[n].fisher.abs().max()) > 0
        assert _rel(ref[n].fisher, got[n].fisher) < 1e-5, n
        if ref[n].hessian is not None:
            assert _rel(ref[n].hessian, got[n].hessian) < 1e-5, n
            # the head's gradients come in token chunks: the token-weighted sum must not care
            assert _rel(ref[n].grad_weighted_hessian, got[n].grad_weighted_hessian) < 1e-5, n
        else:
            assert torch.equal(ref[n].token_share, got[n].token_share), n
    # nothing stays loaded afterwards
    assert all(p.is_meta for p in loaded.model.parameters())


def test_streamed_statistics_detect_a_different_model(tmp_path, calib_ids):
    """The comparison above can fail: a checkpoint of another seed gives other statistics."""
    model = FAMILIES["llama"](seed=0)
    FAMILIES["llama"](seed=1).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    names = select_modules(model)
    calib = calibration_from_tokens(calib_ids)
    ref = collect_statistics(model, names, calib)
    got = streamed.streamed_statistics(open_streamed(str(tmp_path)), names, calib)
    assert max(_rel(ref[n].fisher, got[n].fisher) for n in names) > 1e-2


def test_only_one_block_is_materialized_at_a_time(tmp_path, calib_ids):
    _save("llama", tmp_path)
    loaded = open_streamed(str(tmp_path))
    _, blocks = decoder_blocks(loaded.model)
    seen = []  # (block called, blocks with real weights) at every real block call

    def hook(i):
        def pre(mod, args, kwargs):
            if "forward" not in mod.__dict__:  # a real call, not the recorder/replay
                seen.append((i, [j for j, b in enumerate(blocks) if not any(p.is_meta for p in b.parameters())]))
        return pre

    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        streamed.streamed_statistics(loaded, select_modules(loaded.model), calibration_from_tokens(calib_ids))
    finally:
        for h in handles:
            h.remove()
    n = len(blocks)
    windows = calib_ids.shape[0]
    # forward (0..n-1) then backward (n-1..0), every window, each with exactly the called block loaded
    assert [i for i, _ in seen] == [i for i in [*range(n), *reversed(range(n))] for _ in range(windows)]
    assert all(loaded_now == [i] for i, loaded_now in seen)


def test_streamed_table_equals_whole_table_and_shares_its_cache_entry(model_dir, tmp_path, monkeypatch):
    kw = dict(seq_len=32, calib_tokens=128, include_lm_head=True, include_embeddings=True)
    calib = model_dir / "calib.txt"
    # a stream never holds the whole model, so nothing is folded: its default quantizer is rtn-w, not awq
    whole, loaded_w, _ = api.prepare(str(model_dir), calib, cache_dir=False, quantizer="rtn-w", **kw)
    stream, loaded_s, _ = api.prepare(str(model_dir), calib, cache_dir=False, stream=True, **kw)
    assert (whole.quantizer, stream.quantizer) == ("rtn-w", "rtn-w")
    assert type(loaded_s).__name__ == "StreamedModel"
    assert loaded_s.content_hash == loaded_w.content_hash
    assert stream.groups == whole.groups and stream.shapes == whole.shapes
    np.testing.assert_array_equal(stream.storage_bits, whole.storage_bits)
    for m in whole.errors:
        assert np.isfinite(whole.errors[m]).any()
        np.testing.assert_allclose(stream.errors[m], whole.errors[m], rtol=1e-5, atol=0)

    # same cache key: a whole-model run's entry serves the streamed run (which then computes nothing)
    cache = tmp_path / "cache"
    api.prepare(str(model_dir), calib, cache_dir=cache, quantizer="rtn-w", **kw)
    monkeypatch.setattr(streamed, "streamed_candidate_table", lambda *a, **k: pytest.fail("cache entry not reused"))
    again, _, _ = api.prepare(str(model_dir), calib, cache_dir=cache, stream=True, **kw)
    np.testing.assert_array_equal(again.errors["fisher"], whole.errors["fisher"])


def test_plan_streams_and_matches(model_dir):
    kw = dict(seq_len=32, calib_tokens=128, cache_dir=False)
    calib = model_dir / "calib.txt"
    a = api.plan(str(model_dir), "4bits", calib, quantizer="rtn-w", **kw)  # a stream's default (it folds nothing)
    b = api.plan(str(model_dir), "4bits", calib, stream=True, **kw)
    assert [x.label for x in a.assignments] == [x.label for x in b.assignments]
    assert b.model.content_hash == a.model.content_hash


def test_stream_rejects_in_memory_models_and_scoring_solvers(llama, model_dir):
    with pytest.raises(BadInputError, match="local path"):
        api.prepare(llama, torch.zeros(2, 8, dtype=torch.long), stream=True, cache_dir=False)
    with pytest.raises(BadInputError, match="streaming"):
        api.prepare(str(model_dir), model_dir / "calib.txt", stream=True, solver="evolutionary", cache_dir=False)


def test_cli_plan_stream(model_dir, tmp_path):
    from typer.testing import CliRunner

    from bitalloc.cli import app

    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", str(model_dir), "--budget", "4bits", "--calib", str(model_dir / "calib.txt"),
                                   "--calib-tokens", "128", "--seq-len", "32", "--no-cache", "--stream", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file()


# ---- GGUF ---------------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF rotary halves -> GGUF interleaved pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_llama_gguf(model, path: Path) -> None:
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied
        base, suffix = name.rsplit(".", 1)
        w = t.numpy()
        if name.endswith("q_proj.weight"):
            w = _permute(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = _permute(w, cfg.num_key_value_heads)
        target = names.get_name(base) + "." + suffix
        if name.endswith("mlp.up_proj.weight"):  # one quantized tensor: dequantize is exercised too
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(target, np.ascontiguousarray(w, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_tensors_equal_transformers_gguf_loading(llama, tmp_path):
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from bitalloc.checkpoint import _gguf_tensors

    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(llama, path)
    reader = GGUFReader(str(path))
    arch, layout = gguf_layout(path)
    assert arch == "llama"
    assert layout == [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors]

    skeleton = meta_skeleton(llama.config)
    ours = _gguf_tensors(path, skeleton)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert sorted(ours) == sorted(theirs)
    original = llama.state_dict()
    for name, entry in ours.items():
        got = entry.read()
        assert torch.equal(got, theirs[name].to(got.dtype)), name
        if "up_proj" in name:  # Q8_0: close to the original
            assert _rel(original[name], got) < 0.02
        else:  # q/k un-permuted exactly
            assert torch.equal(got, original[name]), name


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="set BITALLOC_SMOLLM2_GGUF (scripts/fetch_smollm2.sh)")
def test_smollm2_streamed_weights_equal_whole_load():
    """Every tensor of the real GGUF (Q4_1, q/k permuted) reads as load_model has it: equal content hash."""
    assert open_streamed(str(SMOLLM2)).content_hash == load_model(str(SMOLLM2)).content_hash


def test_profile_folder_streams_per_block_signals(model_dir, tmp_path):
    kw = dict(signals=("fisher", "salience", "table"), seq_len=32, calib_tokens=128, include_lm_head=True)
    calib = model_dir / "calib.txt"
    whole = api.profile_model(str(model_dir), calib, tmp_path / "whole", quantizer="rtn-w", **kw)  # a stream's default
    stream = api.profile_model(str(model_dir), calib, tmp_path / "stream", stream=True, **kw)
    assert stream.key == whole.key  # same inputs, same profile
    assert [m.name for m in stream.modules] == [m.name for m in whole.modules]
    for a, b in zip(whole.modules, stream.modules):
        assert a.shape == b.shape
        np.testing.assert_allclose(b.fisher, a.fisher, rtol=1e-5, atol=0)
        np.testing.assert_allclose(b.h_diag, a.h_diag, rtol=1e-5, atol=0)
        if a.salience is not None:
            for kind in a.salience.column:
                np.testing.assert_allclose(b.salience.column[kind], a.salience.column[kind], rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(stream.table.errors["fisher"], whole.table.errors["fisher"], rtol=1e-5, atol=0)


def test_cli_profile_stream(model_dir, tmp_path):
    from typer.testing import CliRunner

    from bitalloc.cli import app

    out = tmp_path / "prof"
    args = ["profile", str(model_dir), "--calib", str(model_dir / "calib.txt"), "--calib-tokens", "128", "--seq-len", "32",
            "--out", str(out), "--stream"]
    res = CliRunner().invoke(app, [*args, "--signals", "fisher,table"])
    assert res.exit_code == 0, res.output
    assert (out / "profile.json").is_file()
    res = CliRunner().invoke(app, [*args[:-2], str(tmp_path / "inter"), "--stream", "--signals", "interactions"])
    assert res.exit_code == 0, res.output
    assert "measured pairs; largest correction" in res.output
