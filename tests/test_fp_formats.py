"""FP element rounding, fp16/fp32-scaled FP, OCP MX and NVFP4 against reference casts and the specs.

References: torch's float8_e4m3fn / float8_e5m2 casts, ml_dtypes' FP6/FP4 types, torchao's MX
reference (to_mx / to_dtype) and compressed-tensors' NVFP4 fake quantization where installed,
and brute-force checks written from the OCP MX v1.0 spec and NVIDIA's two-level NVFP4 scaling.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.formats import quantize_dequantize
from bitalloc.formats.fp import pow2, round_to_element
from bitalloc.formats.mx import mx_shared_exponent
from bitalloc.options import ELEMENTS, QuantOption

ml_dtypes = pytest.importorskip("ml_dtypes")

TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
ML_DTYPES = {"e2m3": "float6_e2m3fn", "e3m2": "float6_e3m2fn", "e2m1": "float4_e2m1fn"}


def f32(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float32))


def probe_values(grid: np.ndarray, max_value: float, seed: int) -> torch.Tensor:
    """Every representable value, every midpoint (the ties), one float32 ulp either side of each
    midpoint, values past the max, and log-uniform random values over the whole range; both signs."""
    pos = np.unique(np.abs(grid[np.isfinite(grid)])).astype(np.float32)
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)
    assert np.all(mids.astype(np.float64) == (pos[:-1].astype(np.float64) + pos[1:]) / 2)  # ties exact in fp32
    up, down = np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))
    smallest = pos[pos > 0].min()
    beyond = np.float32(max_value) * np.array([1.0001, 1.03, 1.0625, 1.1, 1.5, 2, 1e3], dtype=np.float32)
    rng = np.random.default_rng(seed)
    rand = np.exp(rng.uniform(np.log(smallest / 8), np.log(max_value * 4), 20000)).astype(np.float32)
    v = np.concatenate([pos, mids, up, down, beyond, [smallest / 4, smallest / 2, smallest * 0.75], rand])
    return f32(np.concatenate([v, -v]))


def assert_same_values(ours: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    bad = ours != ref
    assert not bad.any(), f"{int(bad.sum())} mismatches, e.g. x={x[bad][:5].tolist()} ours={ours[bad][:5].tolist()} ref={ref[bad][:5].tolist()}"
    assert torch.equal(ours.signbit(), ref.signbit())  # -0 stays -0


# ---- elements -----------------------------------------------------------------------------------


def test_element_table_matches_references():
    for name, dtype in TORCH_FP8.items():
        el = ELEMENTS[name]
        assert el.max_value == torch.finfo(dtype).max
        assert 2.0**el.min_exp == torch.finfo(dtype).smallest_normal
    for name, dtype in ML_DTYPES.items():
        el, fi = ELEMENTS[name], ml_dtypes.finfo(getattr(ml_dtypes, dtype))
        assert el.max_value == float(fi.max)
        assert 2.0**el.min_exp == float(fi.smallest_normal)
    # the spec's emax_elem (OCP MX v1.0 table 1) and widths
    assert {k: e.emax for k, e in ELEMENTS.items()} == {"e4m3": 8, "e5m2": 15, "e2m3": 2, "e3m2": 4, "e2m1": 2}
    assert {k: e.bits for k, e in ELEMENTS.items()} == {"e4m3": 8, "e5m2": 8, "e2m3": 6, "e3m2": 6, "e2m1": 4}


def test_e2m1_value_set_is_the_spec_table():
    x = torch.linspace(-8, 8, 4001)
    assert sorted(set(round_to_element(x, "e2m1").abs().tolist())) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_fp8_rounding_equals_torch_cast(name):
    dtype = TORCH_FP8[name]
    grid = torch.arange(256, dtype=torch.uint8).view(dtype).float().numpy()
    x = probe_values(grid, ELEMENTS[name].max_value, seed=len(name))
    ours, ref = round_to_element(x, name), x.to(dtype).float()
    # torch's E5M2 cast overflows to inf (IEEE-like), and E4M3 before torch 2.13 to NaN; there
    # our conversion saturates (OCP's saturating mode, as MX conversion specifies)
    finite = torch.isfinite(ref)
    assert_same_values(ours[finite], ref[finite], x[finite])
    assert torch.equal(ours[~finite].abs(), torch.full_like(ours[~finite], ELEMENTS[name].max_value))
    if name == "e4m3" and torch.__version__ >= "2.13":
        assert bool(finite.all())  # torch 2.13's E4M3 cast saturates too, so all of it was compared
    if name == "e5m2":
        assert int((~finite).sum()) > 0  # the saturating branch was exercised
    # a range of random normals, the common case
    g = torch.Generator().manual_seed(3)
    y = torch.randn(200000, generator=g) * torch.exp2(torch.randint(-20, 12, (200000,), generator=g).float())
    ry = y.to(dtype).float()
    ok = torch.isfinite(ry)
    assert_same_values(round_to_element(y, name)[ok], ry[ok], y[ok])


@pytest.mark.parametrize("name", ["e2m3", "e3m2", "e2m1"])
def test_fp6_fp4_rounding_equals_ml_dtypes(name):
    dtype = getattr(ml_dtypes, ML_DTYPES[name])
    grid = np.arange(2 ** ELEMENTS[name].bits, dtype=np.uint8).view(dtype).astype(np.float32)
    x = probe_values(grid, ELEMENTS[name].max_value, seed=7)
    x = torch.cat([x, f32([np.inf, -np.inf])])  # saturate too
    ref = torch.from_numpy(x.numpy().astype(dtype).astype(np.float32))
    assert_same_values(round_to_element(x, name), ref, x)
    # the grid itself is what the spec says
    assert set(np.abs(grid).tolist()) == set(round_to_element(f32(grid), name).abs().tolist())
    assert float(np.abs(grid).max()) == ELEMENTS[name].max_value


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=64))
def test_rounding_equals_references_on_any_float32(values):
    x = f32(values)
    for name, dtype in TORCH_FP8.items():
        ref = x.to(dtype).float()
        ok = torch.isfinite(ref)
        assert_same_values(round_to_element(x, name)[ok], ref[ok], x[ok])
        assert torch.all(round_to_element(x, name)[~ok].abs() == ELEMENTS[name].max_value)
    for name, dtype in ML_DTYPES.items():
        ref = torch.from_numpy(x.numpy().astype(getattr(ml_dtypes, dtype)).astype(np.float32))
        assert_same_values(round_to_element(x, name), ref, x)


@pytest.mark.parametrize("name", list(ELEMENTS))
def test_rounding_ties_go_to_even_mantissa(name):
    el = ELEMENTS[name]
    step = 2.0 ** (0 - el.mbits)  # binade [1, 2)
    one_up = 1 + step
    # 1 + step/2 lies between 1 (even mantissa 0) and 1 + step (odd): goes down;
    # 1 + 3*step/2 lies between 1+step (odd) and 1+2*step (even): goes up
    assert round_to_element(f32([1 + step / 2]), el).item() == 1.0
    assert round_to_element(f32([one_up + step / 2]), el).item() == 1 + 2 * step
    assert round_to_element(f32([-(one_up + step / 2)]), el).item() == -(1 + 2 * step)


def test_pow2_is_exact_over_the_float32_range():
    k = torch.arange(-149, 128)
    assert pow2(k).tolist() == [math.ldexp(1.0, int(i)) for i in k]


# ---- fp with fp16 / fp32 scales -------------------------------------------------------------------


def gaussian(out_f=64, in_f=256, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def groups_of(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out_f, in_f = w.shape
    if group_size == 0:
        return w.reshape(1, 1, -1)
    return w.reshape(out_f, -1, in_f if group_size is None else group_size)


def fp16_up(x: torch.Tensor) -> torch.Tensor:
    h = x.half()
    up = torch.from_numpy(np.nextafter(h.numpy(), np.float16(np.inf)))
    return torch.where(h.float() < x, up.float(), h.float())


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
@pytest.mark.parametrize("group_size", [None, 32, 128, 0], ids=["ch", "g32", "g128", "tensor"])
def test_scaled_fp8_equals_torch_cast_of_scaled_weights(name, group_size):
    w = gaussian(32, 256, seed=1) * 0.02
    w[3, 5] = 0.9  # an outlier
    opt = QuantOption.fp(name, group_size)
    g = groups_of(w, group_size)
    amax = g.abs().amax(-1, keepdim=True)
    # the stored scale: fp16 rounded up per channel/group (no clipping), fp32 per tensor
    s = amax / ELEMENTS[name].max_value if group_size == 0 else fp16_up(amax / ELEMENTS[name].max_value)
    ref = ((g / s).to(TORCH_FP8[name]).float() * s).reshape(w.shape)
    assert torch.equal(quantize_dequantize(w, opt), ref)


@pytest.mark.parametrize("name", ["e2m3", "e3m2", "e2m1"])
@pytest.mark.parametrize("group_size", [None, 32], ids=["ch", "g32"])
def test_scaled_fp6_fp4_equals_ml_dtypes(name, group_size):
    w = gaussian(32, 256, seed=2)
    g = groups_of(w, group_size)
    s = fp16_up(g.abs().amax(-1, keepdim=True) / ELEMENTS[name].max_value)
    q = torch.from_numpy((g / s).numpy().astype(getattr(ml_dtypes, ML_DTYPES[name])).astype(np.float32))
    dq = quantize_dequantize(w, QuantOption.fp(name, group_size))
    assert torch.equal(dq, (q * s).reshape(w.shape))
    # the group max is never clipped: its error is at most half a top-binade step
    el = ELEMENTS[name]
    top_step = 2.0 ** (el.emax - el.mbits) * s
    err_at_max = (groups_of(dq, group_size) - g).abs().gather(-1, g.abs().argmax(-1, keepdim=True))
    assert torch.all(err_at_max <= top_step / 2)


def test_scaled_fp_zero_groups_and_dtypes():
    w = gaussian(4, 64, seed=3)
    w[1] = 0
    for opt in (QuantOption.fp("e4m3", 32), QuantOption.fp("e2m1", None), QuantOption.fp("e5m2", 0),
                QuantOption.mx("e2m1"), QuantOption.nvfp4()):
        dq = quantize_dequantize(w, opt)
        assert torch.equal(dq[1], torch.zeros(64)) and torch.isfinite(dq).all(), opt.label
        for dtype in (torch.bfloat16, torch.float16):
            out = quantize_dequantize(w.to(dtype), opt)
            assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(quantize_dequantize(torch.zeros(4, 64), QuantOption.nvfp4()), torch.zeros(4, 64))


def test_more_element_bits_lower_error():
    w = gaussian(64, 256, seed=4)
    mse = {n: float(((quantize_dequantize(w, QuantOption.fp(n, 32)) - w) ** 2).mean()) for n in ELEMENTS}
    assert mse["e4m3"] < mse["e2m3"] < mse["e3m2"] < mse["e2m1"]
    assert mse["e4m3"] < mse["e5m2"]  # for Gaussian weights mantissa beats exponent range
    # with a scale per 32 weights the exponent bits beyond E3M2's range go unused: E5M2 and E3M2
    # (both 2 mantissa bits) are equally accurate
    assert mse["e5m2"] == pytest.approx(mse["e3m2"], rel=0.01)


# ---- OCP MX --------------------------------------------------------------------------------------


def mx_test_weights(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[0, :32] = 0  # an all-zero block
    w[1, :32] *= 1e-30  # tiny block, near the bottom of E8M0's range
    w[2, :32] *= 1e6
    w[3, :32] = torch.tensor([2.0**k for k in range(-16, 16)])  # exact powers of two: floor(log2) boundaries
    w[4, 32:64] = 7.9  # a block max that MXFP4's scale choice clips
    w[5, :] *= torch.exp(torch.randn(256, generator=g) * 3)  # wide dynamic range inside blocks
    return w


@pytest.mark.parametrize("name", list(ELEMENTS))
def test_mx_matches_spec_brute_force(name):
    el = ELEMENTS[name]
    w = mx_test_weights(seed=11)
    dq = quantize_dequantize(w, QuantOption.mx(name)).double()
    blocks, dqb = w.double().reshape(64, 8, 32), dq.reshape(64, 8, 32)
    for r in range(64):
        for b in range(8):
            block = blocks[r, b]
            amax = float(block.abs().max())
            # OCP MX v1.0 §6.3: X = floor(log2(amax)) - emax_elem, clamped to E8M0's [-127, 127]
            x = -127 if amax == 0 else min(max(math.floor(math.log2(amax)) - el.emax, -127), 127)
            scale = math.ldexp(1.0, x)
            q = (dqb[r, b] / scale).float()
            # each stored element is an element value, and the nearest one to v / 2^X (saturated)
            assert torch.equal(round_to_element(q, el), q)
            assert torch.equal(q, round_to_element((block / scale).float(), el))


def test_mx_shared_exponent_edges():
    amax = f32([0.0, 1.0, 1.9999999, 2.0, 7.9, 8.0, 2.0**-140, 3e38])
    assert mx_shared_exponent(amax, 2).tolist() == [-127, -2, -2, -1, 0, 1, -127, 127 - 2]
    assert mx_shared_exponent(f32([2.0**-124]), 2).item() == -126
    assert mx_shared_exponent(f32([2.0**-125]), 2).item() == -127  # clamped, not below E8M0's range


def test_mxfp4_clips_block_max_as_the_spec_says():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 7.9, 1.0
    dq = quantize_dequantize(w, QuantOption.mx("e2m1"))
    # X = floor(log2 7.9) - 2 = 0, so 7.9 saturates to 6 (documented in formats/mx.py)
    assert dq[0, 0].item() == 6.0 and dq[0, 1].item() == 1.0


@pytest.mark.parametrize("name", list(ELEMENTS))
def test_mx_equals_torchao_reference(name):
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")
    constants = pytest.importorskip("torchao.prototype.mx_formats.constants")
    dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m3": constants.DTYPE_FP6_E2M3,
              "e3m2": constants.DTYPE_FP6_E3M2, "e2m1": torch.float4_e2m1fn_x2}
    for seed in (0, 1, 2):
        w = mx_test_weights(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scale, data = mx_tensor.to_mx(w, dtypes[name], 32)  # FLOOR: the spec's scale choice
            ref = mx_tensor.to_dtype(data, scale, dtypes[name], 32, torch.float32)
        assert_same_values(quantize_dequantize(w, QuantOption.mx(name)), ref, w)


# ---- NVFP4 ---------------------------------------------------------------------------------------


def nvfp4_reference(w: torch.Tensor) -> torch.Tensor:
    """NVFP4 from the description, with torch's E4M3 cast for the block scales and a nearest-point
    search over the 15 E2M1 values for the elements."""
    amax = w.abs().max()
    s_global = amax / (448.0 * 6.0)
    blocks = w.reshape(w.shape[0], -1, 16)
    s_block = (blocks.abs().amax(-1, keepdim=True) / 6.0 / s_global).to(torch.float8_e4m3fn).float()
    eff = s_block * s_global
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    grid = torch.cat([-values.flip(0), values[1:]])
    dist = (blocks[..., None] / eff[..., None] - grid).abs()
    q = grid[dist.argmin(-1)]
    return (q * eff).reshape(w.shape), eff


def test_nvfp4_matches_brute_force():
    w = gaussian(64, 256, seed=5) * 0.05
    w[7, 3] = 1.0  # the tensor max, in a block of its own
    dq = quantize_dequantize(w, QuantOption.nvfp4())
    ref, eff = nvfp4_reference(w)
    blocks = w.reshape(64, -1, 16)
    # same distance to the weight (argmin may pick the other side of an exact tie)
    d_ours, d_ref = (dq - w).abs().reshape(blocks.shape), (ref - w).abs().reshape(blocks.shape)
    assert torch.all(d_ours <= d_ref + 1e-6 * eff)
    assert float((dq != ref).float().mean()) < 1e-3
    # every element is an E2M1 value times its block's scale, which is an E4M3 value times the
    # fp32 tensor scale amax / 2688; the block holding the tensor max gets the E4M3 max, 448
    q = dq.reshape(blocks.shape) / eff
    assert torch.allclose(q, round_to_element(q, "e2m1"), rtol=0, atol=1e-5)
    s_block = eff / (w.abs().max() / 2688.0)
    assert torch.allclose(s_block, round_to_element(s_block, "e4m3"), rtol=1e-6, atol=0)
    assert s_block[7, 0].item() == pytest.approx(448.0, rel=1e-6)
    # the block max is off by at most the E4M3 rounding of its scale (<= 1/16 relative)
    at_max = blocks.abs().argmax(-1, keepdim=True)
    err_max = (dq.reshape(blocks.shape) - blocks).abs().gather(-1, at_max) / blocks.abs().gather(-1, at_max)
    assert float(err_max.max()) <= 1 / 16 + 1e-6


def test_nvfp4_tiny_block_keeps_smallest_scale_instead_of_zero():
    w = torch.zeros(1, 32)
    w[0, 0] = 1.0
    w[0, 16:] = 1e-6  # block scale 1e-6 / 6 * 2688 ≈ 0.00045 < 2^-10: rounds to 0 in E4M3
    dq = quantize_dequantize(w, QuantOption.nvfp4())
    eff = 2.0**-9 / 2688.0  # the smallest E4M3 subnormal instead
    assert 1e-6 / eff == pytest.approx(1.376, abs=1e-3)  # nearest E2M1 value: 1.5
    assert torch.allclose(dq[0, 16:], torch.full((16,), 1.5 * eff), rtol=1e-6)
    assert float(dq[0, 16:].abs().min()) > 0


def test_nvfp4_equals_compressed_tensors_reference():
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import preset_name_to_scheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    args = preset_name_to_scheme("NVFP4A16", ["Linear"]).weights
    for seed in range(3):
        w = gaussian(128, 256, seed=20 + seed) * torch.exp(torch.randn(128, 1, generator=torch.Generator().manual_seed(seed)))
        amax = w.abs().amax().reshape(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gscale = generate_gparam(-amax, amax)  # stored as 2688 / amax: the reciprocal of ours
            g = w.reshape(128, -1, 16)
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args, global_scale=gscale)
            ref = fake_quantize(w, scale, zp, args, global_scale=gscale)
        ours = quantize_dequantize(w, QuantOption.nvfp4())
        # The two store reciprocal global scales, so effective scales differ in the last float32
        # bit; the E4M3 block scales and E2M1 codes agree (a different code would differ by at
        # least 1/12 of the block max, far above this tolerance).
        assert torch.allclose(ours, ref, rtol=2**-21, atol=0)


# ---- every family returns what it stores ---------------------------------------------------------

STORED_OPTIONS = [QuantOption.int_(4, 32, False), QuantOption.int_(3, None, True), QuantOption.fp("e4m3", 0),
                  QuantOption.fp("e5m2", 32), QuantOption.fp("e2m1", None), QuantOption.mx("e2m1"),
                  QuantOption.mx("e4m3"), QuantOption.nvfp4()]


@pytest.mark.parametrize("quantizer", ["rtn", "rtn-w"])
@pytest.mark.parametrize("option", STORED_OPTIONS, ids=lambda o: o.label)
def test_codes_and_scales_give_back_the_values_exactly(option, quantizer):
    """values == (codes - zero) · scale (· tensor scale) group by group, bit for bit, so a packer stores
    the quantizer's own codes and scales and never re-derives them from the unquantized weight."""
    from bitalloc.formats.fp import round_to_element
    from bitalloc.quantizers import quantize_weight

    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, 128, generator=g) * torch.rand(1, 128, generator=g)
    w[3, :32] = 0  # an all-zero group
    q = quantize_weight(w, option, quantizer, hessian=torch.rand(128, generator=g) if quantizer == "rtn-w" else None)
    scale = q.scale if q.tensor_scale is None else q.scale * q.tensor_scale
    codes = q.codes.float().reshape(*scale.shape, -1)
    zero = 0 if q.zero is None else q.zero.unsqueeze(-1)
    assert torch.equal(((codes - zero) * scale.unsqueeze(-1)).reshape(w.shape), q.values)
    if option.fmt == "fp":
        assert torch.equal(round_to_element(q.codes, option.element), q.codes)  # on the element grid
    else:
        assert not q.codes.is_floating_point() and q.codes.min() >= -(2 ** (option.bits - 1))
        assert q.codes.max() < 2 ** option.bits
