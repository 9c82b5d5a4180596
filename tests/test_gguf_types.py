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
from bitalloc.formats.gguf import LATTICE_SEARCHES, QUANTIZERS, gguf_quantize, lattice
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
    assert set(labels) == set(QUANTIZERS) - set(LATTICE_SEARCHES) | {"fp16"}
    # the i-quants are llama.cpp's too, offered when named (their search is slow: opt in)
    with_iq = resolve_formats("gguf,gguf-iq,keep", "llama.cpp")
    assert set(o.label for o in default_options(formats=with_iq)) == set(QUANTIZERS) | {"fp16"}
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


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "IQ4_NL", "IQ4_XS",
                                  "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS"])
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
    w[5, 64:96] = 0  # an all-zero sub-block (IQ3_S then moves the later sub-blocks' bytes up, as ggml does)
    w.tofile(tmp_path / "w.f32")
    importance.tofile(tmp_path / "imp.f32")
    np.ones(512, np.float32).tofile(tmp_path / "ones.f32")
    for name in QUANTIZERS:
        # llama.cpp refuses IQ2_XXS / IQ2_XS without an imatrix; bitalloc's plain search = an imatrix of ones
        needs_imatrix = name in LATTICE_SEARCHES and LATTICE_SEARCHES[name].plain_weights is None
        imatrix = "imp.f32" if weighted else "ones.f32" if needs_imatrix else None
        out = tmp_path / f"{name}.bin"
        subprocess.run([str(exe), str(int(gguf.GGMLQuantizationType[name])), "24", "512", str(tmp_path / "w.f32"),
                        str(tmp_path / imatrix) if imatrix else "-", str(out)], check=True)
        ours = gguf_quantize(w, name, importance if weighted else None).blocks
        assert np.array_equal(np.fromfile(out, dtype=np.uint8).reshape(ours.shape), ours), name


@pytest.mark.parametrize("name", sorted(LATTICE_SEARCHES))
def test_lattice_tables_are_ggml_s(name):
    """The i-quant grids: every point's levels in range, each point's key maps back to it, and every
    off-grid key that rounding can produce has neighbours, the nearest first (iq{2,3}xs_init_impl)."""
    search = LATTICE_SEARCHES[name]
    lat = lattice(name)
    levels = lat.levels
    assert len(levels) == {"IQ3_XXS": 256, "IQ3_S": 512, "IQ2_XXS": 256, "IQ2_XS": 512, "IQ2_S": 1024}[name]
    assert levels.min() == 0 and levels.max() == search.kmax - 1
    keys = (levels << search.shifts).sum(axis=1)
    assert np.array_equal(lat.kmap[keys], np.arange(len(levels)))
    rng = np.random.default_rng(0)
    probe = (rng.integers(0, search.kmax, size=(200, search.group)) << search.shifts).sum(axis=1)
    for key in probe[lat.kmap[probe] < 0]:
        cand = lat.flat[lat.start[key]: lat.start[key] + lat.count[key]]
        digits = (key >> search.shifts) & ((1 << search.level_bits) - 1)
        d2 = ((levels[cand] - digits) ** 2).sum(axis=1)
        all_d2 = ((levels - digits) ** 2).sum(axis=1)
        assert len(cand) and d2[0] == all_d2.min() and np.all(np.diff(d2) >= 0)
        assert np.array_equal(np.sort(cand), np.flatnonzero(np.isin(all_d2, d2)))  # every point of those shells
        assert len(np.unique(d2)) == min(search.shells, len(np.unique(all_d2)))
