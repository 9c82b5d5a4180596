"""Importance-weighted scale search: each group's scale (and zero-point) minimises Σ_j h_j (w_j − q_j)².

h_j is the importance of input column j — diag H = mean x_j² of the layer's calibration inputs for
round-to-nearest (llama.cpp's imatrix weights), or GPTQ's own per-column cost 1/[H_F⁻¹]_jj inside
GPTQ (see gptq.py). The idea is llama.cpp's `make_qx_quants` / `make_qkx2_quants` (ggml-quants.c):
try a small grid of scales around the min/max scale, round the group with each, refit the scale (and
the min) to those codes by weighted least squares in closed form, keep whichever is best.

What is ours: every candidate is first made storable — fp16 scales with integer zero-points for INT,
fp16/fp32 scales for minifloats, powers of two (E8M0) for MX, E4M3 block scales for NVFP4 — and is
scored with the codes that rounding to nearest gives under exactly that stored (scale, zero). For a
fixed (scale, zero), nearest rounding (with clamping) is the best code of every weight whatever h is,
so the score of a candidate is its true weighted error, and the codes/scales returned reproduce the
values exactly. The min/max (RTN) scale is always candidate 0 and a candidate replaces the incumbent
only when strictly better, so no group ends worse than RTN under h — and with h = 0 everywhere the
result is RTN's.

All groups of a weight are searched at once: tensors are [rows, groups, group_size] and the loop runs
over the few candidates only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..formats.fp import ELEMENTS, grouped, pow2, round_to_element
from ..formats.int import fp16_round_up, int_range, int_scales
from ..formats.mx import E8M0_MAX_EXP, E8M0_MIN_EXP, MX_BLOCK, mx_shared_exponent
from ..formats.nvfp4 import E2M1, E4M3, E4M3_MIN_SUBNORMAL, NVFP4_BLOCK, nvfp4_scales
from ..options import QuantOption


@dataclass(frozen=True)
class SearchGrid:
    """Which scales the search tries besides the min/max one.

    steps: clip ratios r = 1 − k·(1 − min_ratio)/steps, k = 1..steps: the group's range (asym: both
    ends, [r·min, r·max]) or max-abs (sym) shrunk by r before the min/max rule — the clipping sweep
    of rtn-mse, and of llama.cpp's sweep of nmax ± 0.9 code steps (r ≈ 0.8–1.1 at 4 bits).
    halvings: then, per group, the ratios half a grid step either side of the best one, and again
    with half that step (a bisection that ends at (1 − min_ratio) / (steps · 2^halvings)).
    refits: rounds of the closed-form weighted least-squares refit of the best candidate's scale
    (and min) to its codes (make_qkx2_quants), each kept only if it lowers the error.
    signed: symmetric INT only: a group whose largest-magnitude weight is positive is searched with a
    negative scale, so that weight can take the code −2^(b−1) that a positive scale leaves to negative
    maxima only (llama.cpp's Q4_0/Q5_0/Q8_0 do the same). The quantizer "rtn-w-signed"; off in rtn-w
    and gptq, because its plans did not measure better everywhere (docs/results.md, *Signed scales*).
    """

    steps: int = 4
    min_ratio: float = 0.5
    halvings: int = 2
    refits: int = 2
    signed: bool = False


DEFAULT_GRID = SearchGrid()


def _fp16_nearest(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest fp16 value, as float32 (inf where out of range)."""
    return x.to(torch.float16).to(torch.float32)


def _usable(s: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(s) & (s > 0)


def _keep_better(best: list[torch.Tensor], err: torch.Tensor, *new: torch.Tensor) -> None:
    """In place: where err < best err (strictly), take the candidate. best = [err, *fields]."""
    better = err < best[0]
    best[0] = torch.where(better, err, best[0])
    for i, t in enumerate(new, start=1):
        best[i] = torch.where(better, t, best[i])


def _ratios(grid: SearchGrid) -> list[float]:
    return [1.0 - k * (1.0 - grid.min_ratio) / grid.steps for k in range(1, grid.steps + 1)]


# ---- integers ----------------------------------------------------------------------------------


def _int_codes(w, s, z, lo, hi):
    return torch.div(w, s).round_().add_(z).clamp_(lo, hi)


def _int_error(w, h, s, z, lo, hi):
    """Σ h (value − w)² per group, values by nearest rounding under (s, z). w: [R, G, g]; s, z: [R, G, 1]."""
    d = _int_codes(w, s, z, lo, hi).sub_(z).mul_(s).sub_(w)
    return d.square_().mul_(h).sum(-1, keepdim=True)


def search_int_scales(w: torch.Tensor, h: torch.Tensor, option: QuantOption,
                      grid: SearchGrid = DEFAULT_GRID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best stored (scale, zero) per group of w [R, G, g] under importances h (≥ 0, broadcastable to w).

    Returns (codes [R, G, g], scale [R, G, 1], zero [R, G, 1]) as float32: fp16-representable
    scales, integer zero-points (all 0 when symmetric), codes = nearest rounding under them.
    Symmetric with grid.signed: a scale is negative where the group's largest-magnitude weight is
    positive (see SearchGrid).
    """
    if option.symmetric and grid.signed:
        # Codes span [−2^(b−1), 2^(b−1) − 1]: the long side is the negative one. Orient each group so its
        # largest-magnitude weight is negative, search there with positive scales, and give the scale
        # the orientation's sign: codes of −w under s are the codes of w under −s. Rounding is
        # symmetric (half to even), so the min/max candidate keeps RTN's error and the no-worse-than-RTN
        # guarantee holds. The clip ratio that maps that weight to −2^(b−1) is 1 − 1/2^(b−1): a grid
        # ratio at 2–4 bits (1/2, 3/4, 7/8), reached by the halvings at 5–6, approached by the refit.
        peak = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))  # [R, G, 1]
        sign = torch.where(peak > 0, -1.0, 1.0)
        q, s, z = search_int_scales(w * sign, h, option, replace(grid, signed=False))
        return q, s * sign, z
    lo, hi = int_range(option)
    s0, z0 = int_scales(w, option)  # candidate 0: the min/max rule, exactly as RTN stores it
    err0 = _int_error(w, h, s0, z0, lo, hi)
    # error, scale, zero, clip ratio. Not the codes: they follow from (scale, zero) and are the size of w, so
    # keeping the best ones cost a full-size select per candidate; they are rounded again where needed.
    best = [err0, s0, z0, torch.ones_like(s0)]
    if option.symmetric:
        amax = w.abs().amax(dim=-1, keepdim=True)
    else:
        wmin = w.amin(dim=-1, keepdim=True).clamp(max=0)
        span = w.amax(dim=-1, keepdim=True).clamp(min=0) - wmin

    def try_ratio(r: torch.Tensor) -> None:
        """The min/max rule on the range shrunk by r [R, G, 1], the scale rounded to the nearest fp16."""
        if option.symmetric:
            s, z = _fp16_nearest(amax * r / hi), z0
        else:
            s = _fp16_nearest(span * r / hi)
            z = torch.round(wmin * -r / s).clamp_(lo, hi)
        ok = _usable(s)
        s, z = torch.where(ok, s, s0), torch.where(ok, z, z0)
        err = _int_error(w, h, s, z, lo, hi)
        _keep_better(best, err, s, z, r)

    for r in _ratios(grid):
        try_ratio(torch.full_like(s0, r))
    step = (1.0 - grid.min_ratio) / max(grid.steps, 1)
    for _ in range(grid.halvings if grid.steps else 0):
        step /= 2
        centre = best[3]
        for r in (centre - step, (centre + step).clamp(max=1.0)):
            try_ratio(r)
    if grid.refits:
        Sw, Sx = h.sum(-1, keepdim=True), (h * w).sum(-1, keepdim=True)
    for _ in range(grid.refits):
        # Weighted least squares of w ≈ a·q + b over the group with the best codes q fixed
        # (make_qkx2_quants): the 2×2 normal equations in closed form; symmetric has b = 0.
        q = _int_codes(w, best[1], best[2], lo, hi)
        hq = h * q
        Sq, Sqq, Sxq = hq.sum(-1, keepdim=True), (hq * q).sum(-1, keepdim=True), (hq * w).sum(-1, keepdim=True)
        if option.symmetric:
            a, b = Sxq / Sqq, torch.zeros_like(Sxq)
        else:
            D = Sw * Sqq - Sq * Sq
            a = (Sw * Sxq - Sx * Sq) / D
            b = (Sqq * Sx - Sq * Sxq) / D
            # The stored grid must contain 0 (zero-point in [0, 2^b-1]): a positive min is clamped to 0.
            pos = b > 0
            a = torch.where(pos, Sxq / Sqq, a)
            b = torch.where(pos, torch.zeros_like(b), b)
        s = _fp16_nearest(a)
        ok = _usable(s) & torch.isfinite(b)
        s = torch.where(ok, s, s0)
        z = z0 if option.symmetric else torch.where(ok, torch.round(-b / s).clamp_(lo, hi), z0)
        err = _int_error(w, h, s, z, lo, hi)
        _keep_better(best, err, s, z, best[3])
    _, s, z, _ = best
    return _int_codes(w, s, z, lo, hi), s, z


# ---- minifloats with an fp16 / fp32 scale ------------------------------------------------------


def _element_error(w, h, s, el):
    e = round_to_element(w / s, el)
    d = e * s - w
    return e, (h * d * d).sum(-1, keepdim=True)


def search_fp_scales(w: torch.Tensor, h: torch.Tensor, option: QuantOption,
                     grid: SearchGrid = DEFAULT_GRID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp options with fp16 (per group/channel) or fp32 (per tensor) scales: (values [R, G, g], scale [R, G, 1],
    elements [R, G, g]).

    Candidate 0 is formats/fp.py's scale (max|w| / element max, fp16 rounded up); the grid shrinks
    it by the clip ratios, then the best is refit (w ≈ a·e), as for INT.
    """
    el = ELEMENTS[option.element]
    h = h.expand_as(w) if h.dim() < w.dim() else h
    amax = w.abs().amax(dim=-1, keepdim=True)
    store = (lambda x: x) if option.scale_fmt == "fp32" else _fp16_nearest
    s0 = amax / el.max_value
    if option.scale_fmt == "fp16":
        s0 = fp16_round_up(s0)
    s0 = torch.where(s0 > 0, s0, torch.ones_like(s0))
    _, err0 = _element_error(w, h, s0, el)
    best = [err0, s0]
    for r in _ratios(grid):
        s = store(amax * (r / el.max_value))
        s = torch.where(_usable(s), s, s0)
        _, err = _element_error(w, h, s, el)
        _keep_better(best, err, s)
    for _ in range(grid.refits):  # weighted least squares of w ≈ a·e with the best elements e fixed
        e = round_to_element(w / best[1], el)
        he = h * e
        s = store((he * w).sum(-1, keepdim=True) / (he * e).sum(-1, keepdim=True))
        s = torch.where(_usable(s), s, s0)
        _, err = _element_error(w, h, s, el)
        _keep_better(best, err, s)
    s = best[1]
    e = round_to_element(w / s, el)
    return e * s, s, e


# ---- MX: power-of-two (E8M0) block scales ------------------------------------------------------


def search_mx_scales(weight: torch.Tensor, h: torch.Tensor, option: QuantOption,
                     grid: SearchGrid = DEFAULT_GRID) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MX blocks of 32: the E8M0 exponent X per block from {X_spec − 1, X_spec, X_spec + 1}.

    weight [out, in], h [in]. X_spec (OCP MX §6.3) may clip the block max by up to 25% (E2M1); X + 1
    never clips, X − 1 clips more but resolves the small weights twice as finely. Only powers of two
    can be stored, so there is no refit. Returns (values [out, in], scale 2^X [out, in/32], elements [out, in]).
    """
    el = ELEMENTS[option.element]
    w = grouped(weight.float(), MX_BLOCK)  # [out, in/32, 32]
    hh = grouped(h.expand_as(weight).float(), MX_BLOCK)
    x0 = mx_shared_exponent(w.abs().amax(dim=-1, keepdim=True), el.emax)
    best = None
    for dx in (0, 1, -1) if grid.steps else (0,):  # spec's exponent first: ties keep it
        x = (x0 + dx).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
        _, err = _element_error(w, hh, pow2(x), el)
        if best is None:
            best = [err, x]
        else:
            _keep_better(best, err, x)
    s = pow2(best[1])
    e = round_to_element(w / s, el)
    return (e * s).reshape(weight.shape), s.squeeze(-1), e.reshape(weight.shape)


# ---- NVFP4: E4M3 block scales under the fp32 tensor scale --------------------------------------


def search_nvfp4_scales(weight: torch.Tensor, h: torch.Tensor,
                        grid: SearchGrid = DEFAULT_GRID) -> tuple[torch.Tensor, ...]:
    """NVFP4: the E4M3 block scale per block of 16 (the fp32 tensor scale is formats/nvfp4.py's).

    weight [out, in] with max|w| > 0, h [in]. Candidates: the format's own block scale, the E4M3
    roundings of the clipped ones (r · max|block| / 6 / global) and of the weighted least-squares
    refit. Returns (values [out, in], E4M3 block scales [out, in/16], elements [out, in], the fp32
tensor scale []).
    """
    w = weight.float()
    blocks = grouped(w, NVFP4_BLOCK)  # [out, in/16, 16]
    hh = grouped(h.expand_as(weight).float(), NVFP4_BLOCK)
    b0, g = nvfp4_scales(w)  # [out, in/16, 1], []

    def score(b):
        s = torch.where(b > 0, b * g, torch.ones_like(b))  # an all-zero block keeps scale 1, codes 0
        return _element_error(blocks, hh, s, E2M1)

    _, err0 = score(b0)
    best = [err0, b0]
    bmax = blocks.abs().amax(dim=-1, keepdim=True)

    def storable(x):
        b = round_to_element(x, E4M3)
        b = torch.where((b == 0) & (bmax > 0), torch.full_like(b, E4M3_MIN_SUBNORMAL), b)
        return torch.where(torch.isfinite(b) & (bmax > 0), b, b0)

    for r in _ratios(grid):
        _, err = score(b := storable(bmax * (r / E2M1.max_value) / g))
        _keep_better(best, err, b)
    for _ in range(grid.refits):  # weighted least squares of w ≈ a·e with the best elements e fixed
        b = best[1]
        e = round_to_element(blocks / torch.where(b > 0, b * g, torch.ones_like(b)), E2M1)
        he = hh * e
        _, err = score(b := storable((he * blocks).sum(-1, keepdim=True) / (he * e).sum(-1, keepdim=True) / g))
        _keep_better(best, err, b)
    b = best[1]
    s = torch.where(b > 0, b * g, torch.ones_like(b))
    e = round_to_element(blocks / s, E2M1)
    return (e * s).reshape(weight.shape), b.squeeze(-1), e.reshape(weight.shape), g
