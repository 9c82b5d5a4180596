"""GGUF tensor types as options: layouts, labels, plan JSON, and llama.cpp's quantizers (formats/gguf.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import gguf
import gguf.quants as gq
import numpy as np
import pytest
import torch

from bitalloc.errors import BadInputError
from bitalloc.formats import quantize_dequantize
from bitalloc.formats.gguf import QUANTIZERS, gguf_quantize
from bitalloc.options import GGUF_TYPES, QuantOption, default_options, parse_option
from bitalloc.plan import OptionSpec
from bitalloc.quantizers import quantize_weight
from bitalloc.targets import resolve_formats

LEGACY = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def _weights(out_f=48, in_f=512, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    w[1, :32] = 0  # an all-zero legacy block
    w[2, 256:] = 0  # an all-zero super-block
    w[3, 5] = 0.9  # an outlier
    w[4] = np.abs(w[4])  # a row without negatives (min clamps to 0 in the min searches)
    importance = (rng.random(in_f) ** 3 + 1e-3).astype(np.float32)
    return w, importance


def test_layouts_match_ggml_sizes():
    for name, t in GGUF_TYPES.items():
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert (t.block, t.block_bytes) == (block, type_size), name
        o = QuantOption.gguf(name)
        assert o.storage_bits(10, 2 * block) == 10 * 2 * type_size * 8
    assert QuantOption.gguf("Q4_K").bits_per_weight(256) == 4.5
    assert QuantOption.gguf("Q6_K").bits_per_weight(1536) == 6.5625
    assert QuantOption.gguf("Q4_0").bits_per_weight(576) == 4.5


def test_fit_rule_follows_the_block():
    k, legacy = QuantOption.gguf("Q4_K"), QuantOption.gguf("Q4_0")
    assert k.fits(512) and k.fits(1536) and not k.fits(576)
    assert legacy.fits(576) and not legacy.fits(48)


def test_labels_parse_and_plan_json_round_trip():
    for name in GGUF_TYPES:
        o = QuantOption.gguf(name)
        assert o.label == name and o.family == "gguf"
        assert parse_option(name) == o == parse_option(name.lower())
        spec = OptionSpec.of(o)
        assert spec.model_dump(mode="json")["element"] == name  # the plan records the ggml type
        assert OptionSpec.model_validate_json(spec.model_dump_json(), strict=True).to_option() == o
    with pytest.raises(ValueError, match="fixed layout"):
        QuantOption("gguf", 4, 128, False, 128, 0, "Q4_K")


def test_llama_cpp_target_offers_gguf_types_and_f16():
    families = resolve_formats(None, "llama.cpp")
    assert families == ["gguf", "keep"]
    labels = [o.label for o in default_options(formats=families)]
    assert set(labels) == set(QUANTIZERS) | {"fp16"}
    with pytest.raises(BadInputError, match="llama.cpp"):
        resolve_formats("int", "llama.cpp")


@pytest.mark.parametrize("name", LEGACY)
def test_reference_quantizer_is_bit_exact_with_gguf_package(name):
    w, _ = _weights()
    q = gguf_quantize(w, name)
    assert np.array_equal(q.blocks, gq.quantize(w, gguf.GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("weighted", [False, True])
def test_blocks_dequantize_to_the_values(name, weighted):
    w, importance = _weights()
    q = gguf_quantize(w, name, importance if weighted else None)
    t = GGUF_TYPES[name]
    assert q.blocks.dtype == np.uint8 and q.blocks.shape == (w.shape[0], w.shape[1] // t.block * t.block_bytes)
    assert np.array_equal(gq.dequantize(q.blocks, gguf.GGMLQuantizationType[name]), q.values)
    rel = np.sqrt(((q.values - w) ** 2).mean()) / w.std()
    # Relative RMS error of a b-bit grid on Gaussian-like data: well under 2^-(b-1).
    assert rel < 2.0 ** -(t.bits - 1), rel


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_importance_weights_lower_the_weighted_error(name):
    # llama.cpp's point of an imatrix: the importance-weighted squared error goes down.
    w, importance = _weights(out_f=64, seed=1)
    plain = gguf_quantize(w, name)
    weighted = gguf_quantize(w, name, importance)
    err = lambda v: float((((v - w) ** 2) * importance).sum())  # noqa: E731
    assert err(weighted.values) < err(plain.values)


def test_format_registry_and_quantizers():
    w, importance = _weights(out_f=16)
    wt = torch.from_numpy(w)
    o = QuantOption.gguf("Q4_K")
    sim = quantize_dequantize(wt, o)
    assert torch.equal(sim, torch.from_numpy(gguf_quantize(w, "Q4_K").values))
    q = quantize_weight(wt, o, "rtn")
    assert torch.equal(q.values, sim) and q.blocks.shape == (16, 2 * 144)
    h = torch.diag(torch.from_numpy(importance))
    qi = quantize_weight(wt, o, "imatrix", hessian=h)
    assert np.array_equal(qi.blocks, gguf_quantize(w, "Q4_K", importance).blocks)
    assert not np.array_equal(qi.blocks, q.blocks)
    with pytest.raises(BadInputError, match="GGUF types only"):
        quantize_weight(wt, QuantOption.int_(4, 32), "imatrix", hessian=h)


# ---- GPTQ on llama.cpp's block scales (quantizers/gptq._gptq_gguf) -------------------------------


def _correlated_hessian(in_f: int, seed: int = 0) -> torch.Tensor:
    """H = mean x xᵀ of inputs with correlated columns and uneven scales (what GPTQ exploits)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=g) / in_f**0.5
    x = torch.randn(4 * in_f, in_f, generator=g) @ mix * (torch.rand(in_f, generator=g) ** 2 * 3 + 0.1)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_gptq_blocks_decode_to_its_values_and_beat_imatrix_on_the_layer_error(name):
    w, _ = _weights(out_f=48, in_f=512, seed=4)
    wt, h = torch.from_numpy(w), _correlated_hessian(512)
    o = QuantOption.gguf(name)
    g = quantize_weight(wt, o, "gptq", hessian=h)
    # The blocks GPTQ's codes are packed into are a valid tensor of the type, decoding to its values.
    assert np.array_equal(gq.dequantize(g.blocks, gguf.GGMLQuantizationType[name]), g.values.numpy())
    layer_error = lambda v: float((((v - wt) @ h) * (v - wt)).sum())  # noqa: E731  tr(ΔW H ΔWᵀ)
    imatrix = quantize_weight(wt, o, "imatrix", hessian=h)
    # Seen: gptq/imatrix 0.82-0.90 for every type (Q8_0 and Q2_K the ends).
    assert layer_error(g.values) < 0.95 * layer_error(imatrix.values), name


@pytest.mark.parametrize("name", ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"])
def test_the_block_grid_is_the_one_the_type_stores(name):
    """The K-types end by rounding every weight to nearest on their stored sub-block scales: picking
    each code with BlockGrid.nearest must give back their own bytes, so the grid's scales, mins and
    code range are the stored ones."""
    w, importance = _weights(out_f=32, in_f=512, seed=5)

    def nearest_everywhere(grid, codes):  # where a scale is 0 any code decodes alike: keep the type's
        return np.stack([np.where(grid.scale[:, j] != 0, grid.nearest(w_block[:, j], j), codes[:, j])
                         for j in range(codes.shape[1])], axis=1)

    for imp in (None, importance):
        w_block = w.reshape(-1, 256)  # the rows a type sees: one per super-block
        own = gguf_quantize(w, name, imp)
        assert np.array_equal(gguf_quantize(w, name, imp, choose=nearest_everywhere).blocks, own.blocks)
        assert np.array_equal(gguf_quantize(w, name, imp, choose=lambda grid, codes: codes).blocks, own.blocks)


# ---- against llama.cpp itself ------------------------------------------------------------------


def _llama_cpp_quantizer(tmp_path: Path) -> Path:
    """bench/llama_cpp/quantize_rows.c linked against llama.cpp's libggml-base.a (the code
    llama-quantize runs); skips unless BITALLOC_LLAMA_CPP_BIN names a llama.cpp build's bin/."""
    bin_dir = os.environ.get("BITALLOC_LLAMA_CPP_BIN")
    if not bin_dir:
        pytest.skip("set BITALLOC_LLAMA_CPP_BIN to a llama.cpp build's bin/ to compare with llama.cpp")
    lib = Path(bin_dir).resolve().parent / "ggml" / "src" / "libggml-base.a"
    cc = shutil.which("cc") or shutil.which("gcc")
    if not lib.is_file() or cc is None:
        pytest.skip(f"no {lib} or no C compiler")
    exe = tmp_path / "quantize_rows"
    src = Path(__file__).parent.parent / "bench" / "llama_cpp" / "quantize_rows.c"
    subprocess.run([cc, "-O2", str(src), str(lib), "-lm", "-lpthread", "-lstdc++", "-fopenmp", "-o", str(exe)],
                   check=True, capture_output=True)
    return exe


@pytest.mark.parametrize("weighted", [False, True])
def test_bit_exact_with_llama_cpp(tmp_path, weighted):
    exe = _llama_cpp_quantizer(tmp_path)
    w, importance = _weights(out_f=24, in_f=512, seed=3)
    w.tofile(tmp_path / "w.f32")
    importance.tofile(tmp_path / "imp.f32")
    for name in QUANTIZERS:
        out = tmp_path / f"{name}.bin"
        subprocess.run([str(exe), str(int(gguf.GGMLQuantizationType[name])), "24", "512", str(tmp_path / "w.f32"),
                        str(tmp_path / "imp.f32") if weighted else "-", str(out)], check=True)
        ours = gguf_quantize(w, name, importance if weighted else None).blocks
        assert np.array_equal(np.fromfile(out, dtype=np.uint8).reshape(ours.shape), ours), name
