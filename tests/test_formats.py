"""Round-to-nearest integer quantization (bitalloc.formats.quantize_dequantize) against first principles."""

from __future__ import annotations

import pytest
import numpy as np
import torch

from bitalloc.formats import quantize_dequantize
from bitalloc.options import QuantOption

FP16_REL = 2.0**-11  # relative rounding error of a value stored as fp16 (scales are)


def gaussian(out_f=64, in_f=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g).to(dtype)


def groups(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    return w.reshape(out_f, in_f // g, g)


def fp16_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= x (numpy's nextafter, independent of the library's bit trick)."""
    h = x.half()
    up = torch.from_numpy(np.nextafter(h.numpy(), np.float16(np.inf)))
    return torch.where(h.to(x.dtype) < x, up, h).to(x.dtype)


def asym_scale(g: torch.Tensor, bits: int) -> torch.Tensor:
    """(max(w,0) - min(w,0)) / (2^b - 1), rounded up to fp16 like the stored scale."""
    rng = g.amax(-1, keepdim=True).clamp(min=0) - g.amin(-1, keepdim=True).clamp(max=0)
    return fp16_up((rng / (2**bits - 1)).float())


def brute_force_nearest(w: torch.Tensor, option: QuantOption) -> torch.Tensor:
    """For every weight, the nearest point of its group's grid, by enumerating all 2^b grid points.

    The grid is built independently of the library: symmetric q*s with q in [-2^(b-1), 2^(b-1)-1]
    and s = fp16_up(max|w| / (2^(b-1)-1)); asymmetric (q - z)*s with q in [0, 2^b-1],
    s = fp16_up((max(w,0)-min(w,0)) / (2^b-1)) and z = round(-min(w,0)/s).
    """
    b = option.bits
    g = groups(w.double(), option.group_size)
    if option.symmetric:
        s = fp16_up((g.abs().amax(-1, keepdim=True) / (2 ** (b - 1) - 1)).float()).double()
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.arange(-(2 ** (b - 1)), 2 ** (b - 1), dtype=torch.float64)
        grid = q * s  # [out, groups, 2^b]
    else:
        qmax = 2**b - 1
        lo = g.amin(-1, keepdim=True).clamp(max=0)
        hi = g.amax(-1, keepdim=True).clamp(min=0)
        s = fp16_up(((hi - lo) / qmax).float()).double()
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s).clamp(0, qmax)
        q = torch.arange(0, qmax + 1, dtype=torch.float64)
        grid = (q - z) * s
    dist = (g[..., :, None] - grid[..., None, :]).abs()  # [out, groups, group, 2^b]
    nearest = grid[..., None, :].expand_as(dist).gather(-1, dist.argmin(-1, keepdim=True))[..., 0]
    return nearest.reshape(w.shape), s


ALL_INT = [QuantOption.int_(b, gs, sym) for b in range(2, 9) for gs in (32, 64, None) for sym in (False, True)]


@pytest.mark.parametrize("option", ALL_INT, ids=lambda o: o.label)
def test_at_most_2_pow_bits_distinct_values_per_group(option):
    w = gaussian(16, 128, seed=option.bits)
    dq = groups(quantize_dequantize(w, option), option.group_size)
    counts = [len(torch.unique(row)) for row in dq.reshape(-1, dq.shape[-1])]
    assert max(counts) <= 2**option.bits
    if option.symmetric:
        # scale = max|w| / (2^(b-1)-1), so the level -2^(b-1) is never reached: at most 2^b - 1 values
        assert max(counts) <= 2**option.bits - 1
    # and the grid is really used: with 32+ gaussian values per group, 2-bit uses every reachable level
    if option.bits == 2:
        assert max(counts) == (3 if option.symmetric else 4)


@pytest.mark.parametrize("option", [o for o in ALL_INT], ids=lambda o: o.label)
def test_matches_brute_force_nearest_grid_point(option):
    w = gaussian(32, 128, seed=100 + option.bits)
    dq = quantize_dequantize(w, option).double()
    nearest, s = brute_force_nearest(w, option)
    # The library's value is a nearest grid point: same distance as the brute force (ties may pick
    # either neighbour, hence distances, not values), up to float32 arithmetic on the scale.
    scale = s.expand(groups(w, option.group_size).shape).reshape(w.shape)
    d_lib = (dq - w.double()).abs()
    d_bf = (nearest - w.double()).abs()
    assert torch.all(d_lib <= d_bf + 1e-6 * scale)
    # away from ties the values themselves agree exactly (to float32)
    assert torch.allclose(dq, nearest, rtol=0, atol=1e-6 * float(scale.max()))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_symmetric_error_at_most_half_step(bits, group_size):
    w = gaussian(64, 256, seed=bits)
    opt = QuantOption.int_(bits, group_size, symmetric=True)
    g = groups(w, group_size)
    step = g.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)  # exact (unrounded) scale
    err = (groups(quantize_dequantize(w, opt), group_size) - g).abs()
    # half a step, widened only by the fp16 rounding of the stored scale
    assert torch.all(err <= step / 2 * (1 + 2 * FP16_REL) + 1e-7 * step)
    # the error is not trivially zero: 2-bit symmetric loses a lot
    if bits == 2:
        assert float(err.max()) > 0.1 * float(step.max())


def test_asymmetric_error_within_brief_bound_for_low_bits():
    """For 2-bit asymmetric the fp16 scale rounding can only widen the bound by qmax*2^-11 < 0.2%."""
    w = gaussian(64, 256, seed=7)
    opt = QuantOption.int_(2, 64, symmetric=False)
    g = groups(w, 64)
    s = asym_scale(g, 2)
    err = (groups(quantize_dequantize(w, opt), 64) - g).abs()
    assert torch.all(err <= s * (0.5 + 3 * FP16_REL) + 1e-7 * s)


def test_asymmetric_error_at_most_half_step():
    w = gaussian(512, 256, seed=0)
    violations = {}
    for bits in range(2, 9):
        for group_size in (32, None):
            opt = QuantOption.int_(bits, group_size, symmetric=False)
            g = groups(w, group_size)
            s = asym_scale(g, bits)
            ratio = float(((groups(quantize_dequantize(w, opt), group_size) - g).abs() / s).max())
            if ratio > 0.5 + 1e-6:
                violations[opt.label] = round(ratio, 4)
    assert violations == {}


@pytest.mark.parametrize("bits", range(2, 9))
def test_symmetric_grid_reproduced_exactly(bits):
    qmax = 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(-qmax, qmax + 1, (8, 4, 32), generator=gen).float()
    q[..., 0] = qmax  # every group reaches the extreme, so the scale is max|w|/qmax = s exactly
    s = torch.tensor([2.0**-3, 2.0**-6, 0.375, 1.5]).view(1, 4, 1)  # fp16-exact scales
    w = (q * s).reshape(8, 128)
    dq = quantize_dequantize(w, QuantOption.int_(bits, 32, symmetric=True))
    assert torch.equal(dq, w)


@pytest.mark.parametrize("bits", range(2, 9))
def test_asymmetric_grid_reproduced_exactly(bits):
    qmax = 2**bits - 1
    gen = torch.Generator().manual_seed(bits)
    z = torch.randint(1, qmax, (8, 4, 1), generator=gen).float()  # zero-point strictly inside
    q = torch.randint(0, qmax + 1, (8, 4, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, qmax  # full range used in every group
    s = torch.tensor([2.0**-4, 0.25, 0.75, 2.0**-9]).view(1, 4, 1)
    w = ((q - z) * s).reshape(8, 128)
    dq = quantize_dequantize(w, QuantOption.int_(bits, 32, symmetric=False))
    assert torch.equal(dq, w)


@pytest.mark.parametrize("option", [QuantOption.int_(b, 32, s) for b in (2, 4, 8) for s in (False, True)],
                         ids=lambda o: o.label)
def test_all_zero_group_stays_zero(option):
    w = gaussian(4, 128, seed=3)
    w[1, 32:64] = 0.0
    w[3, :] = 0.0
    dq = quantize_dequantize(w, option)
    assert torch.equal(dq[1, 32:64], torch.zeros(32))
    assert torch.equal(dq[3], torch.zeros(128))
    assert torch.isfinite(dq).all()
    # other groups are quantized as if the zero groups were not there
    ref = quantize_dequantize(w[0:1], option)
    assert torch.equal(dq[0:1], ref)


@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize("symmetric", [False, True])
def test_more_bits_strictly_lower_mse(group_size, symmetric):
    w = gaussian(128, 256, seed=11)
    mse = [float(((quantize_dequantize(w, QuantOption.int_(b, group_size, symmetric)) - w) ** 2).mean())
           for b in range(2, 9)]
    assert all(a > b for a, b in zip(mse, mse[1:])), mse
    # each extra bit roughly quarters the error: from 2 to 8 bits it drops by > 4^4
    assert mse[0] / mse[-1] > 4**4


def test_smaller_groups_lower_mse():
    w = gaussian(128, 256, seed=12)
    mse = [float(((quantize_dequantize(w, QuantOption.int_(3, g, False)) - w) ** 2).mean()) for g in (32, 64, 128, None)]
    assert all(a < b for a, b in zip(mse, mse[1:])), mse


@pytest.mark.parametrize("in_f, gs", [(96, 64), (100, 32), (64, 128)])
def test_non_dividing_group_size_raises(in_f, gs):
    with pytest.raises(ValueError, match="does not divide"):
        quantize_dequantize(torch.randn(4, in_f), QuantOption.int_(4, gs))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_and_shape_preserved(dtype):
    w = gaussian(8, 64, dtype=dtype)
    dq = quantize_dequantize(w, QuantOption.int_(4, 32))
    assert dq.dtype == dtype and dq.shape == w.shape
    assert not torch.equal(dq, w)  # 4-bit changes gaussian weights


def test_keep_is_fp16_rounding():
    w = gaussian(8, 64).double() * 1.000001
    dq = quantize_dequantize(w, QuantOption.keep())
    assert dq.dtype == torch.float64
    assert torch.equal(dq, w.half().double())
    assert not torch.equal(dq, w)
