"""`bitalloc apply --format gguf`: a complete GGUF written by bitalloc, from tiny Llama / Qwen2 GGUFs built here.

Widths 256/512 so that every GGUF type (256-weight K-quant blocks included) fits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from typer.testing import CliRunner

from bitalloc import api
from bitalloc.apply import apply
from bitalloc.cli import app, main
from bitalloc.errors import BadInputError
from bitalloc.gguf_file import gguf_layout, write_gguf
from bitalloc.models import load_model
from bitalloc.options import QuantOption, parse_option
from bitalloc.plan import Plan

HIDDEN, MLP, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 256


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute (rotary halves interleaved per head)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_model(arch: str = "llama", seed: int = 0, vocab: int = VOCAB):
    """A tiny seeded Llama or Qwen2 (q/k/v biases, made non-zero so that a lost bias shows) from a config."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    return model


def tiny_gguf_writer(path: Path, arch: str, kv_heads: int, rms_eps: float, pre: str) -> gguf.GGUFWriter:
    """A GGUFWriter holding the tiny models' shared metadata: sizes, and a byte-level BPE tokenizer."""
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(MLP)
    w.add_head_count(HEADS)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(rms_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    tokens = list(bytes_to_unicode().values())
    tokens[255] = tokens[104] + tokens[101]  # one merge ("h e" -> "he") so the BPE has one
    w.add_token_list(tokens)
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([f"{tokens[104]} {tokens[101]}"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    return w


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """An F16 GGUF as convert_hf_to_gguf.py writes one: byte-level BPE tokenizer, tied embeddings.

    llama: attn_q/attn_k rows permuted (LlamaModel.permute); qwen2: Hugging Face row order, and the
    q/k/v biases as F32 tensors (Qwen2Model)."""
    sd = {k: v.detach().numpy() for k, v in tiny_hf_model(arch, seed).state_dict().items()}
    w = tiny_gguf_writer(path, arch, KV_HEADS, 1e-5, "default" if arch == "llama" else "qwen2")
    if arch == "llama":  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(VOCAB)
        w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    f16 = lambda k: sd[k].astype(np.float16)  # noqa: E731
    qk = (lambda w_, n: _permute(w_, n)) if arch == "llama" else (lambda w_, n: w_)  # noqa: E731
    w.add_tensor("token_embd.weight", f16("model.embed_tokens.weight"))
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", qk(f16(p + "self_attn.q_proj.weight"), HEADS))
        w.add_tensor(f"blk.{i}.attn_k.weight", qk(f16(p + "self_attn.k_proj.weight"), KV_HEADS))
        w.add_tensor(f"blk.{i}.attn_v.weight", f16(p + "self_attn.v_proj.weight"))
        if arch == "qwen2":
            for x in "qkv":
                w.add_tensor(f"blk.{i}.attn_{x}.bias", sd[p + f"self_attn.{x}_proj.bias"])
        w.add_tensor(f"blk.{i}.attn_output.weight", f16(p + "self_attn.o_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f16(p + "mlp.gate_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f16(p + "mlp.up_proj.weight"))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f16(p + "mlp.down_proj.weight"))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("src") / "tiny-F16.gguf")


@pytest.fixture(scope="module")
def calib_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, VOCAB, (4, 32), generator=g)


# A spread of the types (block 32 and 256, with and without a min, non-linear); the two-parameter
# min searches of Q4_1/Q5_1/Q5_K/Q2_K cost the most and are covered in test_gguf_types.py.
TYPES = ["Q8_0", "Q6_K", "Q5_0", "Q4_K", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K"]
OPTIONS = [QuantOption.gguf(t) for t in TYPES] + [QuantOption.keep()]


@pytest.fixture(scope="module")
def gguf_table(tiny_gguf, calib_ids):
    return api.prepare(load_model(str(tiny_gguf)), calib_ids, options=OPTIONS, cache_dir=False, quantizer="imatrix")


@pytest.fixture(scope="module")
def gguf_plan(gguf_table) -> Plan:
    table, loaded, calib = gguf_table
    return api.plan_from_table(table, "5bits", loaded, calib)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_the_source_fixture_loads_in_transformers_like_the_hf_model(tiny_gguf):
    loaded = load_model(str(tiny_gguf))
    assert loaded.model.config.hidden_size == HIDDEN
    assert loaded.tokenizer.decode(loaded.tokenizer("hello world").input_ids) == "hello world"


def check_written_file(source: Path, plan: Plan, calib_ids: torch.Tensor, out: Path, options=OPTIONS,
                       exact: bool = True) -> gguf.GGUFReader:
    """Write `plan` from `source` and check the file: size and per-tensor types as predicted before any
    quantization, and transformers' GGUF loader running exactly the plan's simulated weights (exact False:
    to float32 rounding)."""
    labels = {a.label for a in plan.assignments}
    assert labels <= {o.label for o in options} and len(labels) >= 2
    model = load_model(str(source)).model
    layout = write_gguf(model, plan, source, out, calibration=calib_ids)
    assert out.stat().st_size == layout.file_bytes == gguf_layout(plan, source).file_bytes
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert [t.name for t in reader.tensors] == [e.name for e in layout.tensors]
    for a in plan.assignments:
        entry = layout.planned[a.module]
        expected = "F16" if a.label == "fp16" else a.label
        assert types[entry.name] == entry.ggml_type == expected
        # The planned tensor's bytes are exactly the plan's storage bits.
        assert entry.nbytes * 8 == a.storage_bits
    written = load_model(str(out)).model
    simulated = apply(load_model(str(source)).model, plan, calibration=calib_ids)
    if exact:
        assert torch.equal(_logits(written, calib_ids), _logits(simulated, calib_ids))
    else:
        torch.testing.assert_close(_logits(written, calib_ids), _logits(simulated, calib_ids), rtol=1e-5, atol=1e-5)
    return reader


def test_written_gguf_matches_the_plan_and_the_simulation(tiny_gguf, gguf_plan, calib_ids, tmp_path):
    assert gguf_plan.quantizer == "imatrix"
    reader = check_written_file(tiny_gguf, gguf_plan, calib_ids, tmp_path / "tiny-bitalloc.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    src = gguf.GGUFReader(tiny_gguf)
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.attention.head_count_kv"):
        assert reader.get_field(key).contents() == src.get_field(key).contents()
    # A plan file round-trips with its GGUF types.
    assert Plan.from_json(gguf_plan.to_json()).assignments[0].option == gguf_plan.assignments[0].option


def test_an_applied_imatrix_plan_holds_the_blocks_whose_errors_the_table_predicts(tiny_gguf, gguf_table, gguf_plan):
    """imatrix is importance-only, as llama-imatrix is (mean x² of the unquantized model's inputs): applying
    the plan quantizes each module with exactly the diag H its candidate errors were measured with."""
    from bitalloc.profile.statistics import collect_statistics
    from bitalloc.quantizers import quantize_weight
    from bitalloc.quantizers.materialize import quantize_model

    table, loaded, calib = gguf_table
    stats = collect_statistics(loaded.model, list(table.groups), calib)
    got = quantize_model(load_model(str(tiny_gguf)).model, gguf_plan.options_by_module(), "imatrix", calib.tokens)
    weighted = 0
    for name, option in gguf_plan.options_by_module().items():
        w = loaded.model.get_submodule(name).weight.detach()
        expected = quantize_weight(w, option, "imatrix", hessian=stats[name].hessian)
        assert torch.equal(got[name].values, expected.values), name
        if option.fmt == "gguf":
            assert np.array_equal(got[name].blocks, expected.blocks), name
            weighted += not np.array_equal(expected.blocks, quantize_weight(w, option, "rtn").blocks)
    assert weighted > 0  # the importance weights changed blocks: the comparison is not rtn against rtn


def test_gptq_plan_in_gguf_types_writes_the_file_it_simulates(tiny_gguf, gguf_table, calib_ids, tmp_path):
    """--target llama.cpp --quantizer gptq: GPTQ's codes on llama.cpp's block scales, written as the
    types' own blocks; the candidate errors are GPTQ's, below llama.cpp's (imatrix) on the same H."""
    table, loaded, calib = api.prepare(load_model(str(tiny_gguf)), calib_ids, options=OPTIONS, cache_dir=False,
                                       quantizer="gptq")
    plan = api.plan_from_table(table, "5bits", loaded, calib)
    assert plan.quantizer == "gptq" and table.quantizer == "gptq"
    check_written_file(tiny_gguf, plan, calib_ids, tmp_path / "tiny-gptq.gguf")
    imatrix = gguf_table[0]
    gguf_columns = [k for k, o in enumerate(table.options) if o.fmt == "gguf"]
    ours, theirs = table.errors["local"][:, gguf_columns], imatrix.errors["local"][:, gguf_columns]
    fits = ~np.isnan(ours)
    assert np.array_equal(fits, ~np.isnan(theirs))
    # Seen: lower in every (module, type) pair, 0.17x in total (128 calibration tokens: H has low rank,
    # which GPTQ's error feedback exploits much more than on real models).
    assert (ours[fits] < theirs[fits]).mean() > 0.9 and ours[fits].sum() < 0.5 * theirs[fits].sum()


@pytest.mark.parametrize("quantizer", ["rtn", "imatrix", "gptq"])
def test_i_quant_plans_write_the_file_they_simulate(tiny_gguf, calib_ids, tmp_path, quantizer):
    """The lattice i-quants (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS) through the whole path: profiled,
    planned, applied and written; the file reads back in transformers to the simulated plan's logits."""
    options = [QuantOption.gguf(t) for t in ("IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS")] + [QuantOption.keep()]
    table, loaded, calib = api.prepare(load_model(str(tiny_gguf)), calib_ids, options=options, cache_dir=False,
                                       quantizer=quantizer)
    plan = api.plan_from_table(table, "2.8bits", loaded, calib)
    used = {a.option.element for a in plan.assignments if a.option.fmt == "gguf"}
    assert plan.quantizer == quantizer and len(used) >= 2, used
    check_written_file(tiny_gguf, plan, calib_ids, tmp_path / f"tiny-iq-{quantizer}.gguf", options)


def test_qwen2_gguf_keeps_row_order_and_copies_biases(tmp_path, calib_ids):
    """qwen2: no q/k permutation (convert_hf_to_gguf's Qwen2Model and transformers' loader keep HF order),
    the q/k/v biases copied byte for byte; logits equal the simulated plan's."""
    source = write_tiny_gguf(tmp_path / "tiny-qwen2-F16.gguf", "qwen2", seed=1)
    loaded = load_model(str(source))
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    table, loaded, calib = api.prepare(loaded, calib_ids, options=OPTIONS, cache_dir=False, quantizer="imatrix")
    plan = api.plan_from_table(table, "5bits", loaded, calib)
    reader = check_written_file(source, plan, calib_ids, tmp_path / "tiny-qwen2-bitalloc.gguf")
    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    biases = [t for t in reader.tensors if t.name.endswith(".bias")]
    assert len(biases) == 6
    for t in biases:
        assert t.tensor_type.name == "F32" and bytes(t.data) == bytes(src[t.name].data)
    assert reader.get_field("general.architecture").contents() == "qwen2"
    assert reader.get_field("tokenizer.ggml.pre").contents() == "qwen2"
    assert_attn_q_in_model_row_order(source, plan, calib_ids, tmp_path)


def assert_attn_q_in_model_row_order(source: Path, plan: Plan, calib_ids: torch.Tensor, tmp_path: Path) -> None:
    """A planned attn_q in F16 holds the model's rows in their own order (llama's would be permuted)."""
    f16 = _with_option(plan, "model.layers.0.self_attn.q_proj", "fp16")
    out = tmp_path / "q-f16.gguf"
    write_gguf(load_model(str(source)).model, f16, source, out, calibration=calib_ids)
    q = next(t for t in gguf.GGUFReader(out).tensors if t.name == "blk.0.attn_q.weight")
    hf = load_model(str(source)).model.model.layers[0].self_attn.q_proj.weight.detach().to(torch.float16).numpy()
    assert np.array_equal(np.asarray(q.data).reshape(hf.shape), hf)


def write_tiny_gemma3_gguf(path: Path, seed: int = 2) -> Path:
    """A tiny Gemma 3 GGUF as convert_hf_to_gguf.py's Gemma3Model writes one: HF row order, q/k norms, four
    norms per block, each norm stored as 1 + w (Gemma's RMSNorm scales by 1 + w; transformers subtracts 1)."""
    torch.manual_seed(seed)
    head_dim = 64  # Gemma's head_dim is its own setting, not hidden / heads
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=1, head_dim=head_dim, max_position_embeddings=128, sliding_window=16,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-6))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)  # the init's zeros would hide a norm stored without its + 1
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = tiny_gguf_writer(path, "gemma3", 1, 1e-6, "default")
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_sliding_window(16)
    f16 = lambda k: sd[k].astype(np.float16)  # noqa: E731
    norm = lambda k: sd[k] + np.float32(1)  # noqa: E731
    w.add_tensor("token_embd.weight", f16("model.embed_tokens.weight"))
    for i in range(2):
        p = f"model.layers.{i}."
        for gguf_name, hf_name in [("attn_norm", "input_layernorm"), ("attn_q", "self_attn.q_proj"),
                                   ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                                   ("attn_q_norm", "self_attn.q_norm"), ("attn_k_norm", "self_attn.k_norm"),
                                   ("attn_output", "self_attn.o_proj"), ("post_attention_norm", "post_attention_layernorm"),
                                   ("ffn_norm", "pre_feedforward_layernorm"), ("ffn_gate", "mlp.gate_proj"),
                                   ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"),
                                   ("post_ffw_norm", "post_feedforward_layernorm")]:
            key = f"{p}{hf_name}.weight"
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", norm(key) if gguf_name.endswith("norm") else f16(key))
    w.add_tensor("output_norm.weight", norm("model.norm.weight"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gemma3_gguf_keeps_row_order_and_copies_its_norms(tmp_path, calib_ids):
    """gemma3 from a .gguf: HF row order (no permutation), the 1 + w norms copied byte for byte, q/k/v of
    different widths (one KV head of 64); transformers reads the file back to the simulated plan's logits."""
    source = write_tiny_gemma3_gguf(tmp_path / "tiny-gemma3-F16.gguf")
    loaded = load_model(str(source))
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    table, loaded, calib = api.prepare(loaded, calib_ids, options=OPTIONS, cache_dir=False)
    plan = api.plan_from_table(table, "5bits", loaded, calib)
    assert plan.quantizer == "imatrix" and plan.error_model == "fisher-tw"  # a GGUF grid's defaults
    reader = check_written_file(source, plan, calib_ids, tmp_path / "tiny-gemma3-bitalloc.gguf")
    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    norms = [t for t in reader.tensors if t.name.endswith("norm.weight")]
    assert len(norms) == 2 * 6 + 1
    for t in norms:
        assert t.tensor_type.name == "F32" and bytes(t.data) == bytes(src[t.name].data)
    assert reader.get_field("general.architecture").contents() == "gemma3"
    assert reader.get_field("gemma3.attention.key_length").contents() == 64
    assert_attn_q_in_model_row_order(source, plan, calib_ids, tmp_path)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_an_awq_plan_in_gguf_types_writes_its_folded_norms(family, tiny_gguf, calib_ids, tmp_path):
    """--target llama.cpp --quantizer awq: llama.cpp's importance-weighted types on the equalized model. The file
    holds the divided norms, not the source's, and reads back to the simulated plan's logits (Gemma stores a norm
    as 1 + w, so a folded one comes back within a float32 rounding)."""
    source = tiny_gguf if family == "llama" else write_tiny_gemma3_gguf(tmp_path / "tiny-gemma3-F16.gguf")
    table, loaded, calib = api.prepare(load_model(str(source)), calib_ids, options=OPTIONS, cache_dir=False,
                                       quantizer="awq")
    plan = api.plan_from_table(table, "5bits", loaded, calib)
    assert plan.quantizer == "awq" and {a.option.fmt for a in plan.assignments} <= {"gguf", "keep"}
    reader = check_written_file(source, plan, calib_ids, tmp_path / f"tiny-{family}-awq.gguf", exact=family == "llama")
    src = {t.name: t for t in gguf.GGUFReader(source).tensors}
    attn_norms = [t for t in reader.tensors if re.fullmatch(r"blk\.\d+\.attn_norm\.weight", t.name)]
    assert attn_norms and all(bytes(t.data) != bytes(src[t.name].data) for t in attn_norms)


def _with_option(plan: Plan, module: str, label: str) -> Plan:
    o = parse_option(label)
    assignments = [a.model_copy(update={"option": o, "label": o.label,
                                        "storage_bits": o.storage_bits(*a.shape)}) if a.module == module else a
                   for a in plan.assignments]
    return plan.model_copy(update={"assignments": assignments})


def test_refuses_a_type_the_row_cannot_hold(tiny_gguf, gguf_plan, tmp_path):
    # Every type fits the tiny model's 256/512 rows; a plan claiming a 160-wide row must not get Q4_K.
    a = gguf_plan.assignments[0]
    bad = _with_option(gguf_plan, a.module, "Q4_K")
    bad = bad.model_copy(update={"assignments": [x.model_copy(update={"shape": (a.shape[0], 160)}) if x.module == a.module
                                                 else x for x in bad.assignments]})
    with pytest.raises(BadInputError, match=rf"{a.module} .*Q4_K.*row width 160; types that fit: Q8_0, Q5_1, Q5_0, Q4_1, Q4_0, IQ4_NL"):
        gguf_layout(bad, tiny_gguf)
    nongguf = _with_option(gguf_plan, a.module, "int4-g32-asym")
    with pytest.raises(BadInputError, match="not a GGUF type.*plan with target llama.cpp"):
        write_gguf(load_model(str(tiny_gguf)).model, nongguf, tiny_gguf, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())  # nothing written


def test_refuses_unsupported_architecture_before_any_work(tiny_gguf, gguf_plan, tmp_path):
    src = gguf.GGUFReader(tiny_gguf)
    other = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(other, "phi3")
    for t in src.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BadInputError, match=r"writes GGUF files for llama, qwen2, gemma3 models only; this one is 'phi3'"):
        gguf_layout(gguf_plan, other)
    with pytest.raises(BadInputError, match=r"needs the source model as a \.gguf file .* or a Hugging Face checkpoint folder"):
        gguf_layout(gguf_plan, tmp_path)


def test_cli_apply_format_gguf(tiny_gguf, gguf_plan, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(tmp_path / "cache"))
    rtn_plan = gguf_plan.model_copy(update={"quantizer": "rtn"})
    plan_path = rtn_plan.save(tmp_path / "plan.json")
    out = tmp_path / "out.gguf"
    runner = CliRunner()
    r = runner.invoke(app, ["apply", str(tiny_gguf), "--plan", str(plan_path), "--format", "gguf", "--out", str(out),
                            "--json"])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, r.stdout
    report = json.loads(lines[0])
    assert report["file_bytes"] == out.stat().st_size == gguf_layout(rtn_plan, tiny_gguf).file_bytes
    # Bad input: one `error:` line, exit 2, before the model is loaded.
    monkeypatch.setattr("sys.argv", ["bitalloc", "apply", str(tmp_path), "--plan", str(plan_path), "--format", "gguf",
                                     "--out", str(tmp_path / "other.gguf")])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: writing a GGUF needs the source model as a .gguf")
    assert not (tmp_path / "other.gguf").exists()


def test_export_to_gguf_writes_the_plans_exact_types(gguf_plan, tmp_path):
    from bitalloc.exports import export_plan

    result = export_plan(gguf_plan, "gguf", tmp_path / "exp")
    lines = (tmp_path / "exp" / "tensor-types.txt").read_text().split()
    written = dict(line.split("=") for line in lines)
    assert not result.unsupported  # no nearest mapping, no fallback
    for a in gguf_plan.assignments:
        layer, leaf = a.module.split(".")[2], a.module.split(".")[-1]
        gguf_leaf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[leaf]
        assert written[rf"^blk\.{layer}\.{gguf_leaf}\.weight$"] == ("F16" if a.label == "fp16" else a.label)
    a = gguf_plan.assignments[0]
    bad = _with_option(gguf_plan, a.module, "Q6_K")
    bad = bad.model_copy(update={"assignments": [x.model_copy(update={"shape": (a.shape[0], 96)}) if x.module == a.module
                                                 else x for x in bad.assignments]})
    with pytest.raises(BadInputError, match=r"Q6_K to a tensor with rows of 96 weights.*types that fit: .*Q8_0"):
        export_plan(bad, "gguf", tmp_path / "bad")


def test_whole_file_budget_holds_for_the_written_file(tiny_gguf, gguf_table, calib_ids, tmp_path):
    """A whole-model budget of a GGUF-typed plan is of the file: sizes and bits over every weight."""
    import gguf

    from bitalloc.budget import parse_budget
    from bitalloc.errors import BudgetInfeasibleError
    from bitalloc.gguf_file import file_outside

    table, loaded, calib = gguf_table
    outside = file_outside(tiny_gguf, list(table.groups), "LlamaForCausalLM")
    all_weights = sum(int(t.n_elements) for t in gguf.GGUFReader(tiny_gguf).tensors)
    assert outside.weights == all_weights - table.num_weights
    sizes = []
    for text in ("700KB", "900KB", "6bits"):
        plan = api.plan_from_table(table, parse_budget(text, "model"), loaded, calib)
        assert plan.budget.scope == "model" and plan.budget.fixed_bits == outside.bits
        out = tmp_path / f"{text}.gguf"
        layout = write_gguf(load_model(str(tiny_gguf)).model, plan, tiny_gguf, out, calibration=calib_ids)
        size = out.stat().st_size
        assert size == layout.file_bytes
        limit = parse_budget(text).value if text.endswith("KB") else 6 * all_weights / 8
        assert limit - 20_000 < size <= limit  # the budget holds for the file, and is used, not wasted
        sizes.append(size)
    assert sizes[0] < sizes[1]
    # the same budget of the planned weights only is a larger file
    planned = api.plan_from_table(table, parse_budget("700KB", "planned"), loaded, calib)
    assert planned.summary.storage_bytes > api.plan_from_table(table, parse_budget("700KB", "model"), loaded,
                                                               calib).summary.storage_bytes
    with pytest.raises(BudgetInfeasibleError, match=r"100KB \(whole model: the GGUF file's header, metadata"):
        api.plan_from_table(table, parse_budget("100KB", "model"), loaded, calib)


def test_export_writes_an_imatrix_llama_quantize_reads(tiny_gguf, gguf_plan, calib_ids, tmp_path):
    from bitalloc.calibration import Calibration
    from bitalloc.exports import export_plan
    from bitalloc.profile.statistics import collect_statistics

    loaded = load_model(str(tiny_gguf))
    result = export_plan(gguf_plan, "gguf", tmp_path / "exp", model=loaded.model, calibration=calib_ids,
                         calibration_source="calib.txt")
    path = tmp_path / "exp" / "imatrix.gguf"
    assert path in result.files and any(f"--imatrix {path}" in n for n in result.notes)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.datasets").contents() == ["calib.txt"]
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    # llama-quantize's importance = in_sum2 / counts, the diag of the Hessian the plan was profiled with.
    names = {f"model.layers.{i}.self_attn.q_proj": f"blk.{i}.attn_q.weight" for i in range(2)}
    names |= {f"model.layers.{i}.mlp.down_proj": f"blk.{i}.ffn_down.weight" for i in range(2)}
    stats = collect_statistics(loaded.model, list(names), Calibration(calib_ids, "", "calib.txt", 0))
    for module, tensor in names.items():
        importance = tensors[f"{tensor}.in_sum2"] / tensors[f"{tensor}.counts"][0]
        np.testing.assert_allclose(importance, torch.diagonal(stats[module].hessian).double().numpy(), rtol=1e-5)
    assert "token_embd.weight.in_sum2" in tensors  # the tied output head reads the token embedding


def test_export_of_a_builtin_imatrix_plan_writes_its_imatrix_without_calib(tiny_gguf, tmp_path, monkeypatch, capsys):
    from bitalloc.calibration import builtin_text, make_calibration
    from bitalloc.exports import export_plan

    loaded = load_model(str(tiny_gguf))
    # neither quantizer nor error model named: a grid of GGUF types is profiled and applied with imatrix and
    # solved under fisher-tw (config.default_quantizer, default_error_model)
    plan = api.plan(loaded, "5bits", options=OPTIONS, seq_len=16, calib_tokens=64, seed=2, cache_dir=False)
    assert plan.quantizer == "imatrix" and plan.error_model == "fisher-tw"
    assert plan.calibration["source"] == "builtin:austen"
    plan_path = plan.save(tmp_path / "plan.json")
    monkeypatch.setattr("sys.argv", ["bitalloc", "export", str(plan_path), "--to", "gguf", "--out", str(tmp_path / "cli")])
    try:
        main()
    except SystemExit as e:
        assert e.code == 0, capsys.readouterr().err
    assert "--imatrix" in capsys.readouterr().out
    # The plan's own windows (shipped text, recorded seq_len/tokens/seed), as if passed explicitly.
    ids = make_calibration(loaded.tokenizer, builtin_text(), seq_len=16, tokens=64, seed=2).tokens
    export_plan(plan, "gguf", tmp_path / "api", model=loaded.model, calibration=ids, calibration_source="builtin:austen")
    assert (tmp_path / "cli" / "imatrix.gguf").read_bytes() == (tmp_path / "api" / "imatrix.gguf").read_bytes()
