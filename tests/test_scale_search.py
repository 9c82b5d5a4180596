"""Importance-weighted scale search (quantizers/scale_search.py, quantizer "rtn-w", and inside GPTQ)."""

from __future__ import annotations

import pytest
import torch

from bitalloc.formats.fp import grouped, round_to_element
from bitalloc.formats.int import int_dequantize, int_range
from bitalloc.formats.nvfp4 import nvfp4_scales
from bitalloc.options import ELEMENTS, QuantOption
from bitalloc.quantizers import quantize_weight
from bitalloc.quantizers.rtn_weighted import quantize_weighted
from bitalloc.quantizers.scale_search import SearchGrid

from test_gptq import correlated_layer, layer_error

INT_OPTIONS = [QuantOption.int_(b, g, s) for b in (2, 3, 4, 8) for g in (32, 64, 128, None) for s in (False, True)]
FP_OPTIONS = [QuantOption.fp("e4m3", 32), QuantOption.fp("e4m3", None), QuantOption.fp("e4m3", 0),
              QuantOption.fp("e2m1", 32), QuantOption.fp("e2m3", 64), QuantOption.mx("e2m1"), QuantOption.mx("e4m3"),
              QuantOption.nvfp4()]


def weights_and_importance(seed: int, out_f: int = 24, in_f: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed weights (some outlier columns) and random positive importances spanning 4 decades."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g) * torch.exp(0.5 * torch.randn(1, in_f, generator=g))
    W[:, torch.randint(0, in_f, (4,), generator=g)] *= 6
    h = torch.exp(torch.empty(in_f).uniform_(-4.6, 4.6, generator=g))  # 0.01 .. 100
    return W, h


def group_errors(values: torch.Tensor, W: torch.Tensor, h: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Σ h (v − w)² per group [out, n_groups] (group_size 0: one number)."""
    d2 = (values - W) ** 2 * h
    return grouped(d2, group_size).sum(-1)


@pytest.mark.parametrize("opt", INT_OPTIONS + FP_OPTIONS, ids=lambda o: o.label)
def test_never_worse_than_rtn_per_group_and_better_overall(opt):
    for seed in range(3):
        W, h = weights_and_importance(seed)
        rtn = quantize_weight(W, opt, "rtn")
        searched = quantize_weighted(W, opt, h)
        g = 32 if opt.scheme == "mx" else (16 if opt.scheme == "nvfp4" else opt.group_size)
        e_rtn, e_w = group_errors(rtn.values, W, h, g), group_errors(searched.values, W, h, g)
        # RTN's own (scale, zero) is candidate 0 and only a strictly better one replaces it.
        assert torch.all(e_w <= e_rtn), (opt.label, float((e_w - e_rtn).max()))
        if opt.bits < 8:  # 8-bit INT/FP8 grids are fine already; below that the search must find something
            assert float(e_w.sum()) < 0.95 * float(e_rtn.sum()), (opt.label, float(e_w.sum()), float(e_rtn.sum()))


@pytest.mark.parametrize("opt", INT_OPTIONS + FP_OPTIONS, ids=lambda o: o.label)
def test_empty_grid_is_exactly_rtn(opt):
    """Without grid points or refits the search returns the min/max candidate: RTN, bit for bit. With
    signed scales a symmetric group whose largest weight is positive stores RTN's codes and scale negated."""
    W, h = weights_and_importance(7)
    rtn = quantize_weight(W, opt, "rtn")
    for signed in (False, True):
        bare = quantize_weighted(W, opt, h, SearchGrid(steps=0, refits=0, signed=signed))
        assert torch.equal(bare.values, rtn.values)
        if opt.fmt == "int":
            sign = torch.ones_like(rtn.scale)
            if signed and opt.symmetric:
                wg = grouped(W, opt.group_size)
                sign = torch.where(wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1) > 0, -1.0, 1.0)
                assert (sign < 0).any() and (sign > 0).any()
            codes_sign = sign.repeat_interleave(W.shape[1] // sign.shape[1], dim=1)
            assert torch.equal(bare.codes, (rtn.codes * codes_sign).to(torch.int32))
            assert torch.equal(bare.scale, rtn.scale * sign) and torch.equal(bare.zero, rtn.zero)


@pytest.mark.parametrize("opt", [o for o in INT_OPTIONS if o.symmetric and o.bits < 8], ids=lambda o: o.label)
def test_signed_scales_use_the_extra_negative_code(opt):
    """A positive scale leaves the code −2^(b−1) to groups whose largest weight is negative; signed scales
    give it to every group (llama.cpp's Q4_0), which lowers Σ h (w − q)² on these weights (summed over
    three seeds: 0.83–0.93 of the positive-scale search at 2–4 bits, per channel the least)."""
    lo, _ = int_range(opt)
    e_pos = e_signed = 0.0
    for seed in range(3):
        W, h = weights_and_importance(seed)
        positive = quantize_weighted(W, opt, h)
        signed = quantize_weighted(W, opt, h, SearchGrid(signed=True))
        assert torch.equal(signed.values, quantize_weight(W, opt, "rtn-w-signed", hessian=h).values)
        e_pos += float(group_errors(positive.values, W, h, opt.group_size).sum())
        e_signed += float(group_errors(signed.values, W, h, opt.group_size).sum())
        # the long side is used by positive-maximum groups too (their scale is negative)
        negative_scale = signed.scale.lt(0).repeat_interleave(W.shape[1] // signed.scale.shape[1], dim=1)
        assert bool((signed.codes[negative_scale] == lo).any())
    assert e_signed < 0.97 * e_pos, (opt.label, e_signed / e_pos)


@pytest.mark.parametrize("opt", INT_OPTIONS, ids=lambda o: o.label)
def test_int_codes_scales_zeros_reproduce_values(opt):
    W, h = weights_and_importance(1)
    W[3] = 0  # an all-zero row stays zero
    q = quantize_weighted(W, opt, h)
    lo, hi = int_range(opt)
    assert q.codes.dtype == torch.int32 and int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    assert torch.equal(int_dequantize(q.codes, q.scale, q.zero), q.values)
    assert torch.equal(q.scale.to(torch.float16).float(), q.scale) and bool((q.scale > 0).all())  # fp16, positive
    if opt.symmetric:  # signed: negative where the group's largest weight is positive, codes still in range
        signed = quantize_weighted(W, opt, h, SearchGrid(signed=True))
        assert torch.equal(int_dequantize(signed.codes, signed.scale, signed.zero), signed.values)
        assert bool((signed.scale != 0).all() and (signed.scale < 0).any())
        assert int(signed.codes.min()) >= lo and int(signed.codes.max()) <= hi
    assert torch.equal(q.zero, q.zero.round()) and int(q.zero.min()) >= lo and int(q.zero.max()) <= hi
    if opt.symmetric:
        assert not q.zero.any()
    assert not q.values[3].any()


@pytest.mark.parametrize("opt", FP_OPTIONS, ids=lambda o: o.label)
def test_fp_scales_are_storable_and_reproduce_values(opt):
    W, h = weights_and_importance(2)
    q = quantize_weighted(W, opt, h)
    el = ELEMENTS[opt.element]
    s = q.scale.float().unsqueeze(-1)  # [out, n_groups, 1] (per tensor [1, 1, 1])
    if opt.scheme == "fp":
        block = opt.group_size
        if opt.scale_fmt == "fp16":
            assert torch.equal(q.scale.to(torch.float16).float(), q.scale)
        assert q.scale.shape == ((1, 1) if block == 0 else (W.shape[0], W.shape[1] // (block or W.shape[1])))
    elif opt.scheme == "mx":
        block = 32
        mantissa, exponent = torch.frexp(q.scale)
        assert bool((mantissa == 0.5).all())  # powers of two: E8M0
        assert int(exponent.min()) - 1 >= -127 and int(exponent.max()) - 1 <= 127
    else:  # nvfp4: E4M3 block scales under the format's own fp32 tensor scale
        block = 16
        assert torch.equal(q.scale.to(torch.float8_e4m3fn).float(), q.scale) and bool((q.scale > 0).all())
        _, tensor_scale = nvfp4_scales(W)
        s = s * tensor_scale
    v = grouped(q.values, block)
    elements = round_to_element(v / s, el)
    assert torch.equal(elements * s, v)  # values are exact element multiples of the stored scale
    assert bool((elements.abs() <= el.max_value).all())


@pytest.mark.parametrize("opt", [QuantOption.int_(b, g, s) for b in (3, 4) for g in (32, None) for s in (False, True)],
                         ids=lambda o: o.label)
def test_uniform_importance_equals_or_beats_rtn_mse(opt):
    """h ≡ 1 is plain squared error, what rtn-mse's clip search minimises: the weighted search is at least as good."""
    for seed in range(3):
        W, _ = weights_and_importance(seed)
        eye = torch.eye(W.shape[1])
        e_w = float(((quantize_weight(W, opt, "rtn-w", hessian=eye).values - W) ** 2).sum())
        e_mse = float(((quantize_weight(W, opt, "rtn-mse").values - W) ** 2).sum())
        assert e_w <= e_mse, (opt.label, seed, e_w, e_mse)


def test_same_input_same_bits():
    W, h = weights_and_importance(4)
    opt = QuantOption.int_(3, 64, False)
    a, b = quantize_weighted(W, opt, h), quantize_weighted(W.clone(), opt, h.clone())
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("opt", [QuantOption.int_(3, 32, False), QuantOption.int_(4, 32, True), QuantOption.int_(3, None, True)],
                         ids=lambda o: o.label)
def test_gptq_with_searched_scales_lowers_layer_error(opt):
    """tr(ΔW H ΔWᵀ) on a tiny correlated layer: GPTQ with the weighted scale search below min/max GPTQ in the same
    column order and damping (the exact H is the one scored, where the reference's lighter damping has an edge)."""
    from bitalloc.quantizers.gptq import DAMP

    W, H = correlated_layer(seed=5)
    errors = {q: layer_error(quantize_weight(W, opt, q, hessian=H).values, W, H) for q in ("rtn", "rtn-w", "gptq")}
    errors["gptq-minmax"], errors["gptq natural order"] = (
        layer_error(quantize_weight(W, opt, q, hessian=H, damp=DAMP, act_order=False).values, W, H) for q in ("gptq-minmax", "gptq"))
    assert errors["gptq natural order"] < 0.95 * errors["gptq-minmax"], errors
    assert errors["rtn-w"] < errors["rtn"], errors
    assert errors["gptq"] < errors["rtn-w"], errors


@pytest.mark.parametrize("opt", [QuantOption.int_(b, g, True) for b in (2, 3, 4) for g in (32, None)], ids=lambda o: o.label)
def test_gptq_signed_uses_the_extra_code_and_lowers_layer_error(opt):
    """gptq-signed: GPTQ whose symmetric groups search signed scales. Its codes reach −2^(b−1) in groups with
    a negative scale, stored codes and scales reproduce the values, and tr(ΔW H ΔWᵀ) is below gptq's
    (summed over three correlated layers)."""
    lo, hi = int_range(opt)
    e_gptq = e_signed = 0.0
    for seed in (5, 6, 7):
        W, H = correlated_layer(seed=seed)
        plain = quantize_weight(W, opt, "gptq", hessian=H)
        signed = quantize_weight(W, opt, "gptq-signed", hessian=H)
        assert bool((plain.scale > 0).all()) and bool((signed.scale < 0).any())
        assert torch.equal(int_dequantize(signed.codes, signed.scale, signed.zero), signed.values)
        assert int(signed.codes.min()) >= lo and int(signed.codes.max()) <= hi
        negative_scale = signed.scale.lt(0).repeat_interleave(W.shape[1] // signed.scale.shape[1], dim=1)
        assert bool((signed.codes[negative_scale] == lo).any())
        e_gptq += layer_error(plain.values, W, H)
        e_signed += layer_error(signed.values, W, H)
    assert e_signed < 0.99 * e_gptq, (opt.label, e_signed / e_gptq)


@pytest.mark.parametrize("opt", [QuantOption.fp("e4m3", 32), QuantOption.fp("e4m3", 0), QuantOption.nvfp4(), QuantOption.mx("e2m1")],
                         ids=lambda o: o.label)
def test_packer_stores_the_searched_scales(opt):
    """compressed-tensors packing of rtn-w's fp results: the stored scales are the searched ones, and the
    stored elements times them are the values (the packer writes the quantizer's codes and scales)."""
    from bitalloc.pack import compressed_tensors_of

    W, h = weights_and_importance(3, in_f=128)
    q = quantize_weighted(W, opt, h)
    assert not torch.equal(q.values, quantize_weight(W, opt, "rtn").values)  # the search changed something
    tensors, _ = compressed_tensors_of(q)
    if opt.scheme == "fp":
        scale = tensors["weight_scale"].float().reshape(q.scale.shape)
        assert torch.equal(scale, q.scale)
        v = grouped(tensors["weight"].float(), opt.group_size) * scale.unsqueeze(-1)
        assert torch.equal(v.reshape(W.shape), q.values)
    elif opt.scheme == "nvfp4":
        assert torch.equal(tensors["weight_scale"].float(), q.scale)
    else:
        assert torch.equal(2.0 ** (tensors["weight_scale"].float() - 127), q.scale)
