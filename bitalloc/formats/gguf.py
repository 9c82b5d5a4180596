"""GGUF (llama.cpp) tensor types: llama.cpp's own quantizers, block bytes included.

Each function follows ggml/src/ggml-quants.c (llama.cpp): the reference quantizers
(`quantize_row_*_ref`) when no importance weights are given, and the importance-weighted ones
(`quantize_row_*_impl`, what llama-quantize runs with an imatrix) when they are. Importance weights
are llama-imatrix's: mean x² per input column, i.e. diag(H) of the layer input.

Vectorized across blocks, sequential within a block: every float32 sum runs in ggml's order (one
element after another), so the search takes the same decisions as the C loops. Results are the
exact block bytes (`blocks`, [out, in / block * block_bytes] uint8, what a GGUF file stores) and
the values those bytes dequantize to, computed in ggml's dequantization order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..lazy import LazyModule
from ..options import QuantOption
from . import Format, QuantizedWeight, register_format

torch = LazyModule("torch")
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)  # ggml-quants.c: a group with a smaller max is all zero
QK_K = 256


@dataclass(frozen=True)
class GGUFLayout:
    """One llama.cpp tensor type's block (ggml-common.h): `block` weights stored in `block_bytes`.

    bits: width of each weight's code; the rest of the block (fp16 super-scales, packed sub-block
    scales and mins) is the per-block overhead. has_min: the block stores a min (zero-point) too.
    """

    block: int
    block_bytes: int
    bits: int
    has_min: bool

    @property
    def overhead_bits(self) -> int:
        return self.block_bytes * 8 - self.block * self.bits


# Linear GGUF types, most bits first; sizes as gguf.GGML_QUANT_SIZES (tests check they agree).
GGUF_TYPES = {
    "Q8_0": GGUFLayout(32, 34, 8, False),
    "Q6_K": GGUFLayout(256, 210, 6, False),
    "Q5_K": GGUFLayout(256, 176, 5, True),
    "Q5_1": GGUFLayout(32, 24, 5, True),
    "Q5_0": GGUFLayout(32, 22, 5, False),
    "Q4_K": GGUFLayout(256, 144, 4, True),
    "Q4_1": GGUFLayout(32, 20, 4, True),
    "Q4_0": GGUFLayout(32, 18, 4, False),
    "IQ4_NL": GGUFLayout(32, 18, 4, False),
    "IQ4_XS": GGUFLayout(256, 136, 4, False),
    "Q3_K": GGUFLayout(256, 110, 3, False),
    "IQ3_S": GGUFLayout(256, 110, 3, False),
    "IQ3_XXS": GGUFLayout(256, 98, 3, False),
    "Q2_K": GGUFLayout(256, 84, 2, True),
    "IQ2_S": GGUFLayout(256, 82, 2, False),
    "IQ2_XS": GGUFLayout(256, 74, 2, False),
    "IQ2_XXS": GGUFLayout(256, 66, 2, False),
}


def gguf_option(ggml_type: str) -> QuantOption:
    """A llama.cpp tensor type (label: its name, Q4_K, ...): its block, code width and exact per-block
    overhead (super-scales, sub-block scales and mins, all counted as scale_bits)."""
    t = GGUF_TYPES[ggml_type]
    return QuantOption("gguf", t.bits, t.block, not t.has_min, t.overhead_bits, 0, ggml_type)


def check(o: QuantOption) -> None:
    if o.element not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {o.element!r}; known: {', '.join(GGUF_TYPES)}")
    t = GGUF_TYPES[o.element]
    layout = (t.bits, t.block, not t.has_min, t.overhead_bits, 0, "fp16", 0)
    if (o.bits, o.group_size, o.symmetric, o.scale_bits, o.zero_bits, o.scale_fmt, o.tensor_scale_bits) != layout:
        raise ValueError(f"GGUF type {o.element} has a fixed layout; build it with QuantOption.gguf({o.element!r})")


@dataclass(frozen=True)
class GGUFQuantized:
    blocks: np.ndarray  # [out, row_bytes] uint8, the tensor's data as a GGUF file stores it
    values: np.ndarray  # [out, in] float32, what those bytes dequantize to


@dataclass(frozen=True)
class BlockGrid:
    """The values a type can store in each weight's place once its block scales are chosen:
    value = scale · T[code] + add, T[code] = code − zero (linear types) or levels[code] (IQ4_NL/XS).

    scale, add: [rows, block] float32, one per weight (the sub-block scales and mins it uses); codes
    lie in [lo, hi]. A type hands it to `choose` (gguf_quantize's hook) before packing, so a quantizer
    with its own rounding (GPTQ) picks the codes and the type still writes them with its own scales.
    """

    scale: np.ndarray
    add: np.ndarray
    lo: int
    hi: int
    zero: int = 0
    levels: np.ndarray | None = None

    def nearest(self, x: np.ndarray, col: int) -> np.ndarray:
        """Codes [rows] of the stored values nearest to x [rows] in column `col` (any code where scale is 0)."""
        s = self.scale[:, col]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(s != 0, (x - self.add[:, col]) / s, F32(0)).astype(F32)
        if self.levels is not None:
            return best_index_iq4(t)
        return np.clip(nearest_int(t) + self.zero, self.lo, self.hi)

    def value(self, codes: np.ndarray, col: int) -> np.ndarray:
        codes = codes.astype(np.int32)  # the caller's array may be uint8 (Q6_K)
        t = self.levels[codes] if self.levels is not None else codes - self.zero
        return self.scale[:, col] * t.astype(F32) + self.add[:, col]


Choose = Callable[[BlockGrid, np.ndarray], np.ndarray]  # (grid, the type's own codes [rows, block]) -> codes


def chosen(choose: Choose | None, codes: np.ndarray, scale: np.ndarray, add=F32(0), lo: int = 0, hi: int = 0,
           zero: int = 0, levels: np.ndarray | None = None) -> np.ndarray:
    """The codes a type packs: its own `codes` [rows, block], or those `choose` picks on its grid.

    scale/add: per weight or per sub-block, [rows, n_sub] (repeated over each sub-block's weights)."""
    if choose is None:
        return codes
    rows, block = codes.shape

    def per_weight(a) -> np.ndarray:
        a = np.broadcast_to(np.asarray(a, F32), np.shape(scale)).reshape(rows, -1)
        return np.repeat(a, block // a.shape[1], axis=1)

    grid = BlockGrid(per_weight(scale), per_weight(add), lo, hi, zero, levels)
    return np.asarray(choose(grid, codes.copy())).astype(codes.dtype)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (the 1.5·2^23 trick): round half to even, as int32."""
    return np.rint(v).astype(np.int32)


def seq_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis one element after another in float32 (the C loop's order).

    np.sum adds pairwise (another rounding), np.cumsum is left to right but slower on short rows."""
    total = terms[..., 0].copy()
    for i in range(1, terms.shape[-1]):
        total += terms[..., i]
    return total


def fp16(x: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 then back: round to nearest even fp16, as float32."""
    return np.asarray(x, F32).astype(np.float16).astype(F32)


def fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, F32).astype(np.float16).reshape(-1, 1).view(np.uint8)


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |x|, the signed value that reaches it first) per row, as ggml's `if (ax > amax)` loop."""
    idx = np.abs(x).argmax(axis=-1)[..., None]
    signed = np.take_along_axis(x, idx, axis=-1)[..., 0]
    return np.abs(signed), signed


def roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: halves away from zero."""
    t = np.trunc(x)
    return t + np.sign(x) * (np.abs(x - t) >= F32(0.5))


# ---------------------------------------------------------------------------------------------
# Scale searches (ggml-quants.c "Helper functions"); x: [n_groups, n] float32, weights likewise.


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale search (rmse_type 1): L in [0, 2·nmax), value = scale · (L - nmax)."""
    amax, vmax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        w = x * x if qw is None else qw

        def try_scale(iscale):
            l = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
            lf = l.astype(F32)
            return l, seq_sum(w * x * lf), seq_sum(w * lf * lf)

        l, sumlx, suml2 = try_scale(F32(-nmax) / vmax)
        L = l + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0)).astype(F32)
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = try_scale(-(F32(nmax) + F32(0.1) * F32(step)) / vmax)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[:, None], l + nmax, L)
            scale = np.where(better, sumlx / suml2, scale).astype(F32)
            best = np.where(better, scale * sumlx, best).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L)


def make_qkx3_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None, rmin: float = -0.9,
                     rdelta: float = 0.05, nstep: int = 36, use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale-and-min search: (scale, the_min, L) with value = scale · L - the_min.

    Also make_qkx2_quants (the reference quantizers' version, given weights): its rounding
    clip(nearest_int(v), 0, nmax) equals qkx3's v > 0 ? nearest_int(min(v, nmax)) : 0 for every v.
    use_mad: weigh absolute instead of squared errors (Q2_K's reference)."""
    w = x * x if weights is None else weights
    xmin = np.minimum(x.min(axis=-1), F32(0))
    xmax = x.max(axis=-1)
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    flat = xmax <= xmin
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = xmax - xmin
        iscale = F32(nmax) / span
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale[:, None] * (x - xmin[:, None])), 0, nmax)
        err = (lambda d: np.abs(d)) if use_mad else (lambda d: d * d)
        diff = scale[:, None] * L.astype(F32) + xmin[:, None] - x
        best = seq_sum(w * err(diff))
        cur_min = xmin.copy()
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (xmax - cur_min)  # ggml: max - (best) min
            v = iscale[:, None] * (x - cur_min[:, None])
            l = np.where(v > 0, nearest_int(np.minimum(v, F32(nmax))), 0)
            lf = l.astype(F32)
            sum_l, sum_l2, sum_xl = seq_sum(w * lf), seq_sum(w * lf * lf), seq_sum(w * lf * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min).astype(F32)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale).astype(F32)
            diff = this_scale[:, None] * lf + this_min[:, None] - x
            mad = seq_sum(w * err(diff))
            better = (D > 0) & (mad < best)
            L = np.where(better[:, None], l, L)
            best = np.where(better, mad, best)
            scale = np.where(better, this_scale, scale).astype(F32)
            cur_min = np.where(better, this_min, cur_min).astype(F32)
    scale = np.where(flat, F32(0), scale).astype(F32)
    L = np.where(flat[:, None], 0, L)
    return scale, (-np.where(flat, xmin, cur_min)).astype(F32), L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K reference's symmetric search (do_rmse): x²-weighted, then coordinate descent on each L."""
    amax, vmax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        L = np.clip(nearest_int((F32(-nmax) / vmax)[:, None] * x), -nmax, nmax - 1)
        Lf = L.astype(F32)
        sumlx, suml2 = seq_sum(w * x * Lf), seq_sum(w * Lf * Lf)
        active = ~zero
        for _ in range(5):
            changed = np.zeros(len(x), dtype=bool)
            for i in range(x.shape[1]):
                wi, xi, li = w[:, i], x[:, i], L[:, i].astype(F32)
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1)
                nf = new_l.astype(F32)
                slx2 = slx + wi * xi * nf
                sl22 = sl2 + wi * nf * nf
                accept = (active & (slx > 0) & (new_l != L[:, i]) & (sl22 > 0)
                          & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
                L[:, i] = np.where(accept, new_l, L[:, i])
                sumlx = np.where(accept, slx2, sumlx).astype(F32)
                suml2 = np.where(accept, sl22, suml2).astype(F32)
                changed |= accept
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L + nmax)


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive values (sub-block scales/mins) to nmax levels, weighted: (scale, L), x ≈ scale · L.

    ggml stores L as uint8: a negative level (IQ2_XXS hands it one flipped value) wraps to 256 + l
    where it is read back from L, and stays negative where the C code uses its int local; kept so."""
    xmax = np.maximum(x.max(axis=-1), F32(0))
    zero = xmax < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / xmax
        L = nearest_int(iscale[:, None] * x) & 255
        scale = F32(1) / iscale
        diff = x - scale[:, None] * L.astype(F32)
        best = seq_sum(qw * diff * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / xmax
            scale_is = F32(1) / iscale_is
            l = np.minimum(nmax, nearest_int(iscale_is[:, None] * x))
            diff = x - scale_is[:, None] * l.astype(F32)
            mse = seq_sum(qw * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale).astype(F32)
        level = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        L = level & 255
        lf = level.astype(F32)
        sumlx, suml2 = seq_sum(qw * x * lf), seq_sum(qw * lf * lf)
        active = np.ones(len(x), dtype=bool)
        for _ in range(5):  # coordinate descent on each L (ggml: itry < 5, stop when nothing changes)
            changed = np.zeros(len(x), dtype=bool)
            for i in range(x.shape[1]):
                w, xi, li = qw[:, i], x[:, i], L[:, i].astype(F32)
                slx = sumlx - w * xi * li
                sl2 = suml2 - w * li * li
                ok = active & (slx > 0) & (sl2 > 0)
                new_l = np.minimum(nmax, nearest_int(xi * sl2 / slx))
                nf = new_l.astype(F32)
                slx2 = slx + w * xi * nf
                sl22 = sl2 + w * nf * nf
                accept = ok & (new_l != L[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
                L[:, i] = np.where(accept, new_l & 255, L[:, i])
                sumlx = np.where(accept, slx2, sumlx).astype(F32)
                suml2 = np.where(accept, sl22, suml2).astype(F32)
                changed |= accept
            active &= changed
            if not active.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero[:, None], 0, L)


# ---------------------------------------------------------------------------------------------
# Bit packing shared by several types.


def pack_nibbles(L: np.ndarray, half: int) -> np.ndarray:
    """[n, 2·half] codes -> [n, half] bytes: low nibble L[j], high nibble L[j + half]."""
    L = L.astype(np.uint8)
    return (L[:, :half] & 0x0F) | ((L[:, half:] & 0x0F) << 4)


def pack_high_bits(L: np.ndarray) -> np.ndarray:
    """Bit 4 of 32 codes -> 4 bytes, code j at bit j (Q5_0/Q5_1's qh, a little-endian uint32)."""
    return np.packbits((L.astype(np.uint8) >> 4) & 1, axis=-1, bitorder="little")


def row_sigma2(x: np.ndarray) -> np.ndarray:
    """sum x² / n over each row (ggml's sigma2 of the legacy importance-weighted quantizers)."""
    return seq_sum(x * x) / F32(x.shape[-1])


def legacy_weights(w: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """[rows, n_blocks, 32] weights qw · sqrt(sigma2 + x²) of quantize_row_q{4,5}_{0,1}_impl."""
    sigma2 = row_sigma2(w)[:, None, None]
    x = w.reshape(w.shape[0], -1, 32)
    return importance.reshape(1, -1, 32) * np.sqrt(sigma2 + x * x)


# ---------------------------------------------------------------------------------------------
# The types. Each takes w [out, in] float32 and importance [in] float32 or None.


def q8_0(w: np.ndarray, importance: np.ndarray | None, choose: Choose | None = None) -> GGUFQuantized:
    x = w.reshape(-1, 32)  # llama.cpp's Q8_0 ignores importance weights
    d = np.abs(x).max(axis=-1) / F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    q = chosen(choose, roundf(x * inv[:, None]).astype(np.int8), fp16(d), lo=-127, hi=127)
    blocks = np.concatenate([fp16_bytes(d), q.view(np.uint8)], axis=1)
    values = q.astype(F32) * fp16(d)[:, None]
    return _rows(blocks, values, w)


def _q_sym(w: np.ndarray, importance: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(d, L) of Q4_0 (nmax 8) / Q5_0 (nmax 16): value = d · (L - nmax)."""
    x = w.reshape(-1, 32)
    if importance is None:
        _, vmax = first_absmax(x)
        d = vmax / F32(-nmax)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        L = np.minimum(2 * nmax - 1, np.trunc(x * inv[:, None] + F32(nmax + 0.5)).astype(np.int32))
        return d, L
    return make_qx_quants(x, nmax, legacy_weights(w, importance).reshape(-1, 32))


def _q_asym(w: np.ndarray, importance: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, m, L) of Q4_1 (nmax 15) / Q5_1 (nmax 31): value = d · L + m."""
    x = w.reshape(-1, 32)
    if importance is None:
        lo, hi = x.min(axis=-1), x.max(axis=-1)
        d = (hi - lo) / F32(nmax)
        with np.errstate(divide="ignore"):
            inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        L = np.minimum(nmax, np.trunc((x - lo[:, None]) * inv[:, None] + F32(0.5)).astype(np.int32))
        return d, lo, L
    d, the_min, L = make_qkx3_quants(x, nmax, legacy_weights(w, importance).reshape(-1, 32))
    return d, -the_min, L


def q4_0(w, importance, choose=None):
    d, L = _q_sym(w, importance, 8)
    L = chosen(choose, L, fp16(d), hi=15, zero=8)
    blocks = np.concatenate([fp16_bytes(d), pack_nibbles(L, 16)], axis=1)
    return _rows(blocks, fp16(d)[:, None] * (L - 8).astype(F32), w)


def q5_0(w, importance, choose=None):
    d, L = _q_sym(w, importance, 16)
    L = chosen(choose, L, fp16(d), hi=31, zero=16)
    blocks = np.concatenate([fp16_bytes(d), pack_high_bits(L), pack_nibbles(L, 16)], axis=1)
    return _rows(blocks, fp16(d)[:, None] * (L - 16).astype(F32), w)


def q4_1(w, importance, choose=None):
    d, m, L = _q_asym(w, importance, 15)
    L = chosen(choose, L, fp16(d), fp16(m), hi=15)
    blocks = np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_nibbles(L, 16)], axis=1)
    return _rows(blocks, fp16(d)[:, None] * L.astype(F32) + fp16(m)[:, None], w)


def q5_1(w, importance, choose=None):
    d, m, L = _q_asym(w, importance, 31)
    L = chosen(choose, L, fp16(d), fp16(m), hi=31)
    blocks = np.concatenate([fp16_bytes(d), fp16_bytes(m), pack_high_bits(L), pack_nibbles(L, 16)], axis=1)
    return _rows(blocks, fp16(d)[:, None] * L.astype(F32) + fp16(m)[:, None], w)


def _k_weights(x: np.ndarray, importance: np.ndarray | None, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q{4,5}_K_impl's per-weight weights [n_super, 8, 32] and their sums [n_super, 8]."""
    sigma2 = F32(2) * seq_sum(x * x) / F32(QK_K)  # x: [n_super, 256]
    xs = x.reshape(-1, 8, 32)
    if importance is None:
        weights = np.sqrt(sigma2)[:, None, None] + np.abs(xs)
    else:
        qw = np.broadcast_to(importance.reshape(1, -1, 8, 32), (n_rows, importance.size // QK_K, 8, 32))
        weights = qw.reshape(-1, 8, 32) * np.sqrt(sigma2[:, None, None] + xs * xs)
    return weights.astype(F32), seq_sum(weights)


def _pack_k_scales(Ls: np.ndarray, Lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12 bytes of Q4_K/Q5_K (ggml-quants.c, get_scale_min_k4)."""
    Ls, Lm = Ls.astype(np.uint8), Lm.astype(np.uint8)
    out = np.zeros((len(Ls), 12), dtype=np.uint8)
    out[:, 0:4] = Ls[:, 0:4] | ((Ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = Lm[:, 0:4] | ((Lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (Ls[:, 4:8] & 0x0F) | ((Lm[:, 4:8] & 0x0F) << 4)
    return out


def _max_scaled(v: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference K-quants' sub-block scale codes: (max / levels, nearest_int(v · levels / max))."""
    vmax = np.maximum(v.max(axis=-1), F32(0))
    with np.errstate(divide="ignore"):
        inv = np.where(vmax > 0, F32(levels) / vmax, F32(0)).astype(F32)
    return vmax / F32(levels), nearest_int(inv[:, None] * v)


def _k_scale_min(w: np.ndarray, importance: np.ndarray | None, nmax: int, choose: Choose | None):
    """Q4_K / Q5_K: (d, dmin, Ls, Lm, L, d·sc, dmin·m) for each 256-weight super-block.

    With importance: quantize_row_q{4,5}_K_impl; without: quantize_row_q{4,5}_K_ref (what
    llama-quantize runs without an imatrix)."""
    x = w.reshape(-1, QK_K)
    if importance is None:
        xs = x.reshape(-1, 32)
        av_x = np.sqrt(seq_sum(xs * xs) / F32(32))
        weights = av_x[:, None] + np.abs(xs)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx3_quants(xs, nmax, weights, rmin, 0.1, nstep)
        d_block, Ls = _max_scaled(scales.reshape(-1, 8), 63)
        m_block, Lm = _max_scaled(mins.reshape(-1, 8), 63)
    else:
        weights, sw = _k_weights(x, importance, w.shape[0])
        scales, mins, L = make_qkx3_quants(x.reshape(-1, 32), nmax, weights.reshape(-1, 32))
        d_block, Ls = make_qp_quants(scales.reshape(-1, 8), 63, sw)
        m_block, Lm = make_qp_quants(mins.reshape(-1, 8), 63, sw)
    Ls, Lm = np.minimum(63, Ls), np.minimum(63, Lm)
    d, dmin = fp16(d_block), fp16(m_block)
    dl = d[:, None] * Ls.astype(F32)  # [n_super, 8]
    ml = dmin[:, None] * Lm.astype(F32)
    xs = x.reshape(-1, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((xs + ml[..., None]) / dl[..., None]), 0, nmax)
    L = np.where((dl != 0)[..., None], requant, L.reshape(-1, 8, 32)).reshape(-1, QK_K)
    return d_block, m_block, Ls, Lm, chosen(choose, L, dl, -ml, hi=nmax), dl, ml


def q4_k(w, importance, choose=None):
    d, dmin, Ls, Lm, L, dl, ml = _k_scale_min(w, importance, 15, choose)
    qs = np.concatenate([pack_nibbles(L[:, j:j + 64], 32) for j in range(0, QK_K, 64)], axis=1)
    blocks = np.concatenate([fp16_bytes(d), fp16_bytes(dmin), _pack_k_scales(Ls, Lm), qs], axis=1)
    values = dl[..., None] * L.reshape(-1, 8, 32).astype(F32) - ml[..., None]
    return _rows(blocks, values.reshape(-1, QK_K), w)


def q5_k(w, importance, choose=None):
    d, dmin, Ls, Lm, L, dl, ml = _k_scale_min(w, importance, 31, choose)
    qs = np.concatenate([pack_nibbles(L[:, j:j + 64], 32) for j in range(0, QK_K, 64)], axis=1)
    high = (L.reshape(-1, 8, 32).astype(np.uint8) >> 4) & 1  # sub-block s sets bit s of qh[j]
    qh = np.zeros((len(L), 32), dtype=np.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    blocks = np.concatenate([fp16_bytes(d), fp16_bytes(dmin), _pack_k_scales(Ls, Lm), qh, qs], axis=1)
    values = dl[..., None] * L.reshape(-1, 8, 32).astype(F32) - ml[..., None]
    return _rows(blocks, values.reshape(-1, QK_K), w)


def q6_k(w, importance, choose=None):
    x = w.reshape(-1, 16)  # 16 sub-blocks of 16 per super-block
    qw = None
    if importance is not None:
        qw = np.broadcast_to(importance.reshape(1, -1, 16), (w.shape[0], importance.size // 16, 16)).reshape(-1, 16)
    scales, L = make_qx_quants(x, 32, qw)
    scales, L = scales.reshape(-1, 16), L.reshape(-1, 16, 16)
    max_abs, max_scale = first_absmax(scales)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(-128) / max_scale
        d_block = np.where(zero, F32(0), F32(1) / iscale).astype(F32)
        sc = np.where(zero[:, None], 0, np.minimum(127, nearest_int(iscale[:, None] * scales))).astype(np.int8)
        dl = fp16(d_block)[:, None] * sc.astype(F32)
        requant = np.clip(nearest_int(x.reshape(-1, 16, 16) / dl[..., None]), -32, 31) + 32
    L = np.where((dl != 0)[..., None], requant, L)
    L = np.where(zero[:, None, None], 0, L).reshape(-1, QK_K).astype(np.uint8)
    L = chosen(choose, L, dl, hi=63, zero=32)
    ql, qh = [], []
    for j in range(0, QK_K, 128):  # ggml's interleaving of 4 × 32 codes per 128
        q = [L[:, j + 32 * k: j + 32 * (k + 1)] for k in range(4)]
        ql += [(q[0] & 0xF) | ((q[2] & 0xF) << 4), (q[1] & 0xF) | ((q[3] & 0xF) << 4)]
        qh.append((q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6))
    blocks = np.concatenate([*ql, *qh, sc.view(np.uint8), fp16_bytes(d_block)], axis=1)
    values = dl[..., None] * (L.reshape(-1, 16, 16).astype(np.int32) - 32).astype(F32)
    return _rows(blocks, values.reshape(-1, QK_K), w)


def _superblock_weights(w: np.ndarray, importance: np.ndarray | None, sub: int, sigma_scale: float) -> np.ndarray:
    """Per-weight weights [n_super, 256/sub, sub] of Q2_K/Q3_K: qw · sqrt(sigma2 + x²), or x² without qw.

    sigma2 = sigma_scale · sum x² / 256 over the super-block (Q2_K: 1, Q3_K: 2)."""
    x = w.reshape(-1, QK_K)
    xs = x.reshape(len(x), -1, sub)
    if importance is None:
        return xs * xs
    sigma2 = F32(sigma_scale) * seq_sum(x * x) / F32(QK_K)
    qw = np.broadcast_to(importance.reshape(1, -1, QK_K // sub, sub), (w.shape[0], importance.size // QK_K, QK_K // sub, sub))
    return qw.reshape(xs.shape) * np.sqrt(sigma2[:, None, None] + xs * xs)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """256 two-bit codes -> 64 bytes, ggml's order: byte j/4 + l of each 128 holds L[j+l], L[j+l+32], +64, +96."""
    L = L.astype(np.uint8)
    out = []
    for j in range(0, QK_K, 128):
        q = [L[:, j + 32 * k: j + 32 * (k + 1)] for k in range(4)]
        out.append(q[0] | (q[1] << 2) | (q[2] << 4) | (q[3] << 6))
    return np.concatenate(out, axis=1)


def q3_k(w, importance, choose=None):
    """quantize_row_q3_K_impl with importance, quantize_row_q3_K_ref without."""
    x = w.reshape(-1, QK_K)
    if importance is None:
        scales, L = make_q3_quants(x.reshape(-1, 16), 4)
        scales = scales.reshape(-1, 16)
        _, max_scale = first_absmax(scales)
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-32) / max_scale
            Ls = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
            d_block = np.where(max_scale != 0, F32(1) / iscale, F32(0)).astype(F32)
        Ls = np.where((max_scale != 0)[:, None], Ls, 0)  # ggml leaves all scale bytes zero
    else:
        weights = _superblock_weights(w, importance, 16, 2.0)  # [n_super, 16, 16]
        sw = seq_sum(weights)
        scales, L = make_qx_quants(x.reshape(-1, 16), 4, weights.reshape(-1, 16))
        d_block, Ls = make_qx_quants(scales.reshape(-1, 16), 32, sw)  # Ls in [0, 64): scale code + 32
    d = fp16(d_block)
    sc = (Ls - 32).astype(F32)  # what the packed 6-bit codes decode to
    dl = d[:, None] * sc
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int(x.reshape(-1, 16, 16) / dl[..., None]), -4, 3) + 4
    L = np.where((dl != 0)[..., None], requant, L.reshape(-1, 16, 16)).reshape(-1, QK_K)
    L = chosen(choose, L, dl, hi=7, zero=4)
    Ls8 = Ls.astype(np.uint8)
    scales_b = np.zeros((len(x), 12), dtype=np.uint8)
    scales_b[:, :8] = (Ls8[:, :8] & 0xF) | ((Ls8[:, 8:] & 0xF) << 4)
    for j in range(16):
        scales_b[:, 8 + j % 4] |= (Ls8[:, j] >> 4) << (2 * (j // 4))
    high = L > 3  # the high bit of code j goes to bit j // 32 of hmask[j % 32]
    hmask = np.zeros((len(x), 32), dtype=np.uint8)
    for k in range(8):
        hmask |= high[:, 32 * k: 32 * (k + 1)].astype(np.uint8) << k
    blocks = np.concatenate([hmask, _pack_2bit(np.where(high, L - 4, L)), scales_b, fp16_bytes(d_block)], axis=1)
    values = dl[..., None] * (L.reshape(-1, 16, 16) - 4).astype(F32)
    return _rows(blocks, values.reshape(-1, QK_K), w)


def q2_k(w, importance, choose=None):
    """quantize_row_q2_K_impl with importance, quantize_row_q2_K_ref without."""
    x = w.reshape(-1, QK_K)
    if importance is None:
        xs = x.reshape(-1, 16)
        scales, mins, L = make_qkx3_quants(xs, 3, np.abs(xs), -0.5, 0.1, 15, use_mad=True)
        dm, Ls = _max_scaled(scales.reshape(-1, 16), 15)
        mm, Lm = _max_scaled(mins.reshape(-1, 16), 15)
    else:
        weights = _superblock_weights(w, importance, 16, 1.0)
        sw = seq_sum(weights)
        scales, mins, L = make_qkx3_quants(x.reshape(-1, 16), 3, weights.reshape(-1, 16))
        dm, Ls = make_qp_quants(scales.reshape(-1, 16), 15, sw)
        mm, Lm = make_qp_quants(mins.reshape(-1, 16), 15, sw)
    Ls, Lm = Ls.astype(np.uint8) & 0xF, Lm.astype(np.uint8) & 0xF  # stored as one byte: Ls | Lm << 4
    dl = fp16(dm)[:, None] * Ls.astype(F32)
    ml = fp16(mm)[:, None] * Lm.astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(nearest_int((x.reshape(-1, 16, 16) + ml[..., None]) / dl[..., None]), 0, 3)
    L = np.where((dl != 0)[..., None], requant, L.reshape(-1, 16, 16)).reshape(-1, QK_K)
    L = chosen(choose, L, dl, -ml, hi=3)
    blocks = np.concatenate([Ls | (Lm << 4), _pack_2bit(L), fp16_bytes(dm), fp16_bytes(mm)], axis=1)
    values = dl[..., None] * L.reshape(-1, 16, 16).astype(F32) - ml[..., None]
    return _rows(blocks, values.reshape(-1, QK_K), w)


# ggml-common.h kvalues_iq4nl: the 16 non-uniform levels of IQ4_NL / IQ4_XS.
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int32)


def best_index_iq4(x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8(16, kvalues_iq4nl, x): the nearest level, the upper one unless strictly farther."""
    v = IQ4NL_VALUES
    mu = np.clip(np.searchsorted(v, x, side="right"), 1, 15)  # v[mu-1] <= x < v[mu]
    lower = (x - v[mu - 1].astype(F32)) < (v[mu].astype(F32) - x)
    idx = np.where(lower, mu - 1, mu)
    return np.where(x <= F32(v[0]), 0, np.where(x >= F32(v[-1]), 15, idx))


def _iq4_block_scales(x: np.ndarray, weight: np.ndarray, ntry: int = 7) -> np.ndarray:
    """quantize_row_iq4_nl_impl's per-32 scale search: d with least weighted error, [n_blocks]."""
    amax, vmax = first_absmax(x)
    v0 = F32(IQ4NL_VALUES[0])
    with np.errstate(divide="ignore", invalid="ignore"):

        def sums(inv):
            q = IQ4NL_VALUES[best_index_iq4(inv[:, None] * x)].astype(F32)
            return seq_sum(weight * q * x), seq_sum(weight * q * q)

        sumqx, sumq2 = sums(F32(1) / (-vmax / v0))
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums(F32(itry + IQ4NL_VALUES[0]) / vmax)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d).astype(F32)
            best = np.where(better, d * sumqx, best).astype(F32)
    return np.where(amax < GROUP_MAX_EPS, F32(0), d).astype(F32)


def _iq4_weights(x: np.ndarray, importance: np.ndarray | None, n_rows: int) -> np.ndarray:
    """x: [n_super, super]; qw · sqrt(sigma2 + x²) with sigma2 = 2 · mean x² over the super-block, or x²."""
    if importance is None:
        return x * x
    sigma2 = seq_sum(x * x) * F32(2.0 / x.shape[1])
    qw = np.broadcast_to(importance.reshape(1, -1, x.shape[1]), (n_rows, importance.size // x.shape[1], x.shape[1]))
    return qw.reshape(x.shape) * np.sqrt(sigma2[:, None] + x * x)


def iq4_nl(w, importance, choose=None):
    """quantize_iq4_nl (ntry 7, what llama-quantize runs; x² weights without an imatrix)."""
    x = w.reshape(-1, 32)
    d = _iq4_block_scales(x, _iq4_weights(x, importance, w.shape[0]))
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
    L = chosen(choose, best_index_iq4(inv[:, None] * x), fp16(d), hi=15, levels=IQ4NL_VALUES)
    blocks = np.concatenate([fp16_bytes(d), pack_nibbles(L, 16)], axis=1)
    return _rows(blocks, fp16(d)[:, None] * IQ4NL_VALUES[L].astype(F32), w)


def iq4_xs(w, importance, choose=None):
    x = w.reshape(-1, QK_K)
    weights = _iq4_weights(x, importance, w.shape[0])
    scales = _iq4_block_scales(x.reshape(-1, 32), weights.reshape(-1, 32)).reshape(-1, 8)
    _, max_scale = first_absmax(scales)
    d = -max_scale / F32(32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0)).astype(F32)
        ls = np.clip(nearest_int(inv[:, None] * scales), -32, 31)
        dl = d[:, None] * ls.astype(F32)
        idl = np.where(dl != 0, F32(1) / dl, F32(0)).astype(F32)
    L = best_index_iq4(idl[..., None] * x.reshape(-1, 8, 32)).reshape(-1, QK_K)
    codes = (ls + 32).astype(np.uint8)
    L = chosen(choose, L, fp16(d)[:, None] * (codes.astype(np.int32) - 32).astype(F32), hi=15, levels=IQ4NL_VALUES)
    scales_l = (codes[:, 0::2] & 0xF) | ((codes[:, 1::2] & 0xF) << 4)
    scales_h = np.zeros(len(x), dtype=np.uint16)
    for ib in range(8):
        scales_h |= (codes[:, ib] >> 4).astype(np.uint16) << (2 * ib)
    qs = np.concatenate([pack_nibbles(L[:, 32 * i: 32 * (i + 1)], 16) for i in range(8)], axis=1)
    blocks = np.concatenate([fp16_bytes(d), scales_h.reshape(-1, 1).view(np.uint8), scales_l, qs], axis=1)
    values = (fp16(d)[:, None] * (codes.astype(np.int32) - 32).astype(F32))[..., None] * IQ4NL_VALUES[L].reshape(-1, 8, 32).astype(F32)
    return _rows(blocks, values.reshape(-1, QK_K), w)


# ---- i-quants on lattices: IQ3_XXS, IQ3_S, IQ2_S, IQ2_XS, IQ2_XXS ------------------------------
# Each stores the signs of the weights apart and the magnitudes of `group` weights as one point of a
# grid of allowed level combinations (value 2l + 1 per weight), with one scale per sub-block and
# 4-bit scale codes under one fp16 scale per 256 weights. The *_XXS/XS types keep 7 sign bits per 8
# weights (an odd count of negatives flips the least important weight). The grids are ggml's
# (iq3xxs_grid, iq3s_grid, iq2s_grid, iq2xs_grid, iq2xxs_grid) as the gguf package carries them.


@dataclass(frozen=True)
class LatticeSearch:
    """One i-quant's search (quantize_row_iq{3_xxs,3_s,2_s,2_xs,2_xxs}_impl in ggml-quants.c).

    group: weights per grid point; level_bits: bits per level in the point's key; kmax: levels
    0..kmax-1; sub: weights per scale; sigma_scale: sigma2 = sigma_scale · Σx² / 256 in the weights;
    trials, step: trial inverse scales (2·kmax − 1 + is·step) / max; eps: a sub-block whose max is
    below it is all zero; parity: 7 sign bits per 8 weights (else 8); shells: how many nearest
    distances an off-grid point's neighbours span; start_on_grid: what the search assumes before a
    trial wins; qp_start (IQ2_XXS): the trials centre on make_qp_quants' scale; redo_all: the final
    rounding on the chosen scale covers every group (else only the off-grid ones); fudge: d is
    stored times this; plain_weights: ggml's weights without an imatrix ("x2": x², "sigma": sigma2/4 + x²;
    None: ggml refuses the type without one, and bitalloc uses an imatrix of ones)."""

    group: int
    level_bits: int
    kmax: int
    sub: int
    sigma_scale: float
    trials: range
    step: float
    eps: float
    parity: bool = True
    shells: int = 2
    start_on_grid: bool = True
    qp_start: bool = False
    redo_all: bool = False
    fudge: float = 1.0
    plain_weights: str | None = None

    @property
    def shifts(self) -> np.ndarray:
        return self.level_bits * np.arange(self.group)


LATTICE_SEARCHES = {
    "IQ3_S": LatticeSearch(4, 3, 8, 32, 2.0, range(-9, 10), 0.2, float(np.finfo(F32).smallest_subnormal),
                           parity=False, shells=3, start_on_grid=False, redo_all=True, fudge=1.033, plain_weights="x2"),
    "IQ3_XXS": LatticeSearch(4, 3, 8, 32, 2.0, range(-15, 16), 0.2, 1e-8, fudge=1.0125, plain_weights="x2"),
    "IQ2_S": LatticeSearch(8, 2, 3, 16, 2.0, range(-9, 10), 0.1, 1e-8, parity=False, shells=1, fudge=0.9875,
                           plain_weights="sigma"),
    "IQ2_XS": LatticeSearch(8, 2, 3, 16, 1.0, range(-9, 10), 0.1, 1e-15),
    "IQ2_XXS": LatticeSearch(8, 2, 3, 32, 1.0, range(-6, 7), 0.1, 1e-15, qp_start=True, redo_all=True),
}
LATTICE_TYPES = frozenset(LATTICE_SEARCHES)


@dataclass(frozen=True)
class Lattice:
    """One i-quant grid's lookup tables, as iq{2,3}xs_init_impl builds them.

    levels: [points, group] each grid point's levels; kmap[key]: the grid index of a group's levels
    (key: levels packed level_bits apart), -1 off the grid; for an off-grid key, its neighbours are
    flat[start[key]: start[key] + count[key]]: the grid points at its `shells` nearest squared
    distances, in the (distance, index) order ggml's qsort leaves them."""

    levels: np.ndarray
    kmap: np.ndarray
    flat: np.ndarray
    start: np.ndarray
    count: np.ndarray

    @functools.cached_property
    def values(self) -> np.ndarray:
        """[group, points] float32: 2l + 1, one row per position in the group."""
        return np.ascontiguousarray((2 * self.levels + 1).T.astype(F32))


@functools.lru_cache(maxsize=None)
def lattice(ggml_type: str) -> Lattice:
    import gguf.quants as gq

    search = LATTICE_SEARCHES[ggml_type]
    cls = getattr(gq, ggml_type)
    cls.init_grid()
    grid = np.asarray(cls.grid, F32).reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, F32), grid)
    shifts = search.shifts
    kmap = np.full(int(((search.kmax - 1) << shifts).sum()) + 1, -1, dtype=np.int64)
    kmap[(levels << shifts).sum(axis=1)] = np.arange(len(levels))
    # only keys whose levels are all < kmax can come out of the rounding
    digits = np.stack(np.meshgrid(*[np.arange(search.kmax)] * search.group, indexing="ij"), -1).reshape(-1, search.group)
    keys = (digits << shifts).sum(axis=1)
    off = kmap[keys] < 0
    keys, digits = keys[off], digits[off]
    count = np.zeros(len(kmap), dtype=np.int64)
    lists = []
    for c in range(0, len(keys), 1024):
        d2 = ((levels[None] - digits[c:c + 1024, None]) ** 2).sum(axis=-1)  # [keys, points]
        order = np.argsort(d2, axis=1, kind="stable")
        sorted_d2 = np.take_along_axis(d2, order, axis=1)
        limit = sorted_d2[:, 0]
        for _ in range(search.shells - 1):
            limit = np.where(sorted_d2 > limit[:, None], sorted_d2, np.iinfo(np.int64).max).min(axis=1)
        take = sorted_d2 <= limit[:, None]
        count[keys[c:c + 1024]] = take.sum(axis=1)
        lists.append(order[take])  # row by row, each row's neighbours in order
    start = np.zeros(len(kmap), dtype=np.int64)
    start[keys] = np.concatenate([[0], np.cumsum(count[keys])[:-1]])
    return Lattice(levels, kmap, np.concatenate(lists), start, count)


def _on_grid(ggml_type: str, L: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """iq{2,3}_find_best_neighbour for every off-grid group of L [N, groups, group]: (levels, all on the
    grid; which groups were on it). The neighbour with the least Σ waux·(scale·(2l+1) − xval)² wins,
    the first one on ties."""
    lat = lattice(ggml_type)
    keys = (L << LATTICE_SEARCHES[ggml_type].shifts).sum(axis=-1)
    on = lat.kmap[keys] >= 0
    off = np.flatnonzero(~on.reshape(-1))  # off-grid groups, flat over [N, groups]
    if len(off):
        group = L.shape[-1]
        off_keys = keys.reshape(-1)[off]
        counts = lat.count[off_keys]
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        owner = np.repeat(np.arange(len(off)), counts)  # the off-grid group each candidate belongs to
        cand = lat.flat[np.repeat(lat.start[off_keys] - first, counts) + np.arange(counts.sum())]
        owner_group = off[owner]
        owner_scale = scale[owner_group // L.shape[1]]
        x, wa = xval.reshape(-1, group), waux.reshape(-1, group)
        d2 = None
        for i in range(group):  # ggml's order: one weight after another
            diff = owner_scale * lat.values[i][cand] - x[:, i][owner_group]
            term = wa[:, i][owner_group] * diff * diff
            d2 = term if d2 is None else d2 + term
        best = d2 == np.minimum.reduceat(d2, first)[owner]
        _, pick = np.unique(owner[best], return_index=True)  # the first minimum of each group
        L = L.copy()
        L.reshape(-1, group)[off] = lat.levels[cand[np.flatnonzero(best)[pick]]]
    return L, on


def _lattice_round(ggml_type: str, inv: np.ndarray, xval: np.ndarray, waux: np.ndarray, scale: np.ndarray):
    kmax = LATTICE_SEARCHES[ggml_type].kmax
    L = np.clip(nearest_int(F32(0.5) * (inv[:, None, None] * xval - F32(1))), 0, kmax - 1).astype(np.int64)
    return _on_grid(ggml_type, L, xval, waux, scale)


def _lattice_sums(weight: np.ndarray, xval: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = (2 * L + 1).astype(F32).reshape(weight.shape)
    x = xval.reshape(weight.shape)
    return seq_sum(weight * x * q), seq_sum(weight * q * q)


def _lattice_weights(w: np.ndarray, importance: np.ndarray | None, search: LatticeSearch) -> np.ndarray:
    if importance is not None or search.plain_weights == "x2":
        return _superblock_weights(w, importance, search.sub, search.sigma_scale)
    x = w.reshape(-1, QK_K)
    sigma2 = F32(search.sigma_scale) * seq_sum(x * x) / F32(QK_K)
    xs = x.reshape(len(x), -1, search.sub)
    return F32(0.25) * sigma2[:, None, None] + xs * xs


def lattice_quantize(w: np.ndarray, importance: np.ndarray | None, ggml_type: str):
    """The search every lattice i-quant runs: (grid indices [n_sub, sub/group], signs [n_sub, sub/8]
    (7 or 8 bits each), d [n_super] as stored, sub-block scale codes [n_super, 256/sub] (4 bits),
    which sub-blocks were all zero [n_sub])."""
    search = LATTICE_SEARCHES[ggml_type]
    if importance is None and search.plain_weights is None:
        # ggml refuses these without an imatrix; bitalloc then weights every column alike, which is
        # what llama.cpp does given an imatrix of ones (so the blocks still match llama.cpp's)
        importance = np.ones(w.shape[1], F32)
    sub, group = search.sub, search.group
    xb = w.reshape(-1, sub)
    n = len(xb)
    weight = _lattice_weights(w, importance, search).reshape(n, sub).astype(F32)
    waux = np.sqrt(weight).reshape(n, -1, group)
    neg = ~(xb >= 0)
    bits = neg.reshape(n, -1, 8)
    xval = np.where(neg, -xb, xb).astype(F32).reshape(n, -1, 8)
    sign_mask = 255
    if search.parity:
        odd = bits.sum(axis=-1) % 2 == 1
        imin = (weight * xb * xb).reshape(n, -1, 8).argmin(axis=-1)
        flip = odd[..., None] & (np.arange(8) == imin[..., None])
        xval = np.where(flip, -xval, xval)
        bits = bits ^ flip
        sign_mask = 127
    xval = xval.reshape(n, -1, group)
    signs = (bits.astype(np.uint32) << np.arange(8, dtype=np.uint32)).sum(axis=-1).astype(np.uint32) & sign_mask
    vmax = xval.reshape(n, sub).max(axis=-1)
    empty = vmax < F32(search.eps)
    centre = 2 * search.kmax - 1
    if search.qp_start:
        scale, _ = make_qp_quants(xval.reshape(n, sub), search.kmax + 1, weight)
        top = (scale * F32(search.kmax)).astype(F32)
        empty |= top <= 0
    else:
        top = vmax
        scale = (vmax / F32(centre)).astype(F32)
    top = np.where(empty, F32(1), top).astype(F32)
    best = np.zeros(n, F32)
    L = np.zeros(xval.shape, dtype=np.int64)
    on_grid = np.full(xval.shape[:2], search.start_on_grid)
    for trial in search.trials:
        inv = ((F32(centre) + F32(trial) * F32(search.step)) / top).astype(F32)
        trial_L, trial_on = _lattice_round(ggml_type, inv, xval, waux, (F32(1) / inv).astype(F32))
        sumqx, sumq2 = _lattice_sums(weight, xval, trial_L)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, sumqx / sumq2, scale).astype(F32)
        best = np.where(better, scale * sumqx, best).astype(F32)
        L = np.where(better[:, None, None], trial_L, L)
        on_grid = np.where(better[:, None], trial_on, on_grid)
    # round again on the chosen scale (IQ2_XXS always; the others when a group was off the grid)
    again = (scale > 0) & (search.qp_start | ~on_grid.all(axis=1))
    if again.any():
        with np.errstate(divide="ignore"):
            inv = np.where(again, F32(1) / scale, F32(0)).astype(F32)
        redo, _ = _lattice_round(ggml_type, inv, xval, waux, scale)
        which = again[:, None] & (search.redo_all | ~on_grid)
        L = np.where(which[..., None], redo, L)
        sumqx, sumq2 = _lattice_sums(weight, xval, L)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(again & (sumq2 > 0), sumqx / sumq2, scale).astype(F32)
    negative = scale < 0  # "should never happen" in ggml too: flip the scale and every sign
    signs = np.where(negative[:, None], ~signs & sign_mask, signs).astype(np.uint32)
    scale = np.where(empty, F32(0), np.abs(scale)).astype(F32)
    index = lattice(ggml_type).kmap[(L << search.shifts).sum(axis=-1)]  # every group is on the grid by now
    scales = scale.reshape(-1, QK_K // sub)
    max_scale = scales.max(axis=-1)
    d = (max_scale / F32(31)).astype(F32)
    with np.errstate(divide="ignore"):
        inv_d = np.where(max_scale > 0, F32(1) / d, F32(0)).astype(F32)
    codes = np.clip(nearest_int(F32(0.5) * (inv_d[:, None] * scales - F32(1))), 0, 15).astype(np.uint32)
    zero = np.repeat(max_scale == 0, QK_K // sub)  # ggml writes the whole block as zeros
    empty |= zero
    index = np.where(empty[:, None], 0, index)
    signs = np.where(empty[:, None], 0, signs).astype(np.uint32)
    codes = np.where((max_scale == 0)[:, None], 0, codes).astype(np.uint32)
    d_stored = np.where(max_scale == 0, F32(0), d * F32(search.fudge)).astype(F32)
    return index, signs, d_stored, codes, empty


def _iq_values(blocks: np.ndarray, ggml_type: str, w: np.ndarray) -> GGUFQuantized:
    """The blocks and the values they dequantize to (the gguf package's dequantizer, ggml's order)."""
    import gguf
    import gguf.quants as gq

    blocks = np.ascontiguousarray(blocks.reshape(w.shape[0], -1))
    return _rows(blocks, gq.dequantize(blocks, gguf.GGMLQuantizationType[ggml_type]), w)


def _no_choose(ggml_type: str, choose: Choose | None) -> None:
    if choose is not None:
        raise ValueError(f"{ggml_type} stores lattice points of several weights: its codes cannot be chosen one weight at a time")


def _pack_sub_scales(codes: np.ndarray) -> np.ndarray:
    """4-bit sub-block scale codes, two per byte (low nibble first)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def _high_bits(index: np.ndarray, bits: int) -> np.ndarray:
    """Bits 8.. of each grid index [n_super, points] packed 8 // bits per byte, lowest first."""
    per_byte = 8 // bits
    high = (index >> 8).astype(np.uint8).reshape(len(index), -1, per_byte)
    return (high << (bits * np.arange(per_byte, dtype=np.uint8))).sum(axis=-1).astype(np.uint8)


def _signs_and_code(signs: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The XXS types' uint32 per 32 weights: 4 × 7 sign bits, the 4-bit scale code in bits 28-31."""
    packed = (signs << np.array([0, 7, 14, 21], dtype=np.uint32)).sum(axis=-1).astype(np.uint32).reshape(-1, 8)
    return np.ascontiguousarray(packed | (codes << 28))


def iq3_xxs(w, importance, choose=None):
    """quantize_row_iq3_xxs_impl (x² weights without an imatrix, as llama.cpp): 4-weight points,
    one scale per 32; block: d, 64 grid-index bytes, 8 × uint32 (4 × 7 sign bits | scale code << 28)."""
    _no_choose("IQ3_XXS", choose)
    index, signs, d, codes, _ = lattice_quantize(w, importance, "IQ3_XXS")
    sas = _signs_and_code(signs, codes).view(np.uint8)
    return _iq_values(np.concatenate([fp16_bytes(d), index.astype(np.uint8).reshape(-1, 64), sas], axis=1), "IQ3_XXS", w)


def iq3_s(w, importance, choose=None):
    """quantize_row_iq3_s_impl: 4-weight points of a 512-point grid, 8 sign bits per 8, one scale per
    32; block: d, 64 low index bytes, 8 bytes of index bit 8, 32 sign bytes, 4 bytes of scale codes.

    ggml advances its qs/signs pointers only past sub-blocks that are not all zero, so the ones
    after an all-zero sub-block move up (what llama.cpp writes, kept byte for byte)."""
    _no_choose("IQ3_S", choose)
    index, signs, d, codes, empty = lattice_quantize(w, importance, "IQ3_S")
    n_super = len(d)
    kept = ~empty.reshape(n_super, 8)
    slot = np.cumsum(kept, axis=1) - 1  # where each kept sub-block's qs/signs land
    qs = np.zeros((n_super, 8, 8), dtype=np.uint8)
    sb = np.zeros((n_super, 8, 4), dtype=np.uint8)
    rows, subs = np.nonzero(kept)
    qs[rows, slot[rows, subs]] = (index.reshape(n_super, 8, 8)[rows, subs] & 255).astype(np.uint8)
    sb[rows, slot[rows, subs]] = signs.reshape(n_super, 8, 4)[rows, subs].astype(np.uint8)
    qh = _high_bits(index.reshape(n_super, 64), 1)
    return _iq_values(np.concatenate([fp16_bytes(d), qs.reshape(n_super, 64), qh, sb.reshape(n_super, 32),
                                      _pack_sub_scales(codes)], axis=1), "IQ3_S", w)


def iq2_s(w, importance, choose=None):
    """quantize_row_iq2_s_impl: 8-weight points of a 1024-point grid, 8 sign bits per 8, one scale per
    16; block: d, 32 low index bytes, 32 sign bytes, 8 bytes of index bits 8-9, 8 bytes of scale codes."""
    _no_choose("IQ2_S", choose)
    index, signs, d, codes, _ = lattice_quantize(w, importance, "IQ2_S")
    n_super = len(d)
    index = index.reshape(n_super, 32)
    return _iq_values(np.concatenate([fp16_bytes(d), (index & 255).astype(np.uint8), signs.reshape(n_super, 32).astype(np.uint8),
                                      _high_bits(index, 2), _pack_sub_scales(codes)], axis=1), "IQ2_S", w)


def iq2_xxs(w, importance, choose=None):
    """quantize_row_iq2_xxs_impl: 8-weight points, one scale per 32; block: d, then per 32 weights
    4 grid-index bytes and a uint32 (4 × 7 sign bits | scale code << 28)."""
    _no_choose("IQ2_XXS", choose)
    index, signs, d, codes, _ = lattice_quantize(w, importance, "IQ2_XXS")
    aux = _signs_and_code(signs, codes).reshape(-1, 8, 1).view(np.uint8)
    per_sub = np.concatenate([index.astype(np.uint8).reshape(-1, 8, 4), aux], axis=2)
    return _iq_values(np.concatenate([fp16_bytes(d), per_sub.reshape(-1, 64)], axis=1), "IQ2_XXS", w)


def iq2_xs(w, importance, choose=None):
    """quantize_row_iq2_xs_impl: 8-weight points of a 512-point grid, one scale per 16; block: d,
    32 × uint16 (9-bit grid index | 7 sign bits << 9), 8 bytes of scale codes."""
    _no_choose("IQ2_XS", choose)
    index, signs, d, codes, _ = lattice_quantize(w, importance, "IQ2_XS")
    qs = np.ascontiguousarray((index.astype(np.uint16) | (signs.astype(np.uint16) << 9)).reshape(-1, 32)).view(np.uint8)
    return _iq_values(np.concatenate([fp16_bytes(d), qs, _pack_sub_scales(codes)], axis=1), "IQ2_XS", w)


def _rows(blocks: np.ndarray, values: np.ndarray, w: np.ndarray) -> GGUFQuantized:
    out_f = w.shape[0]
    return GGUFQuantized(np.ascontiguousarray(blocks.reshape(out_f, -1)), values.reshape(w.shape).astype(F32))


QUANTIZERS = {"Q8_0": q8_0, "Q6_K": q6_k, "Q5_K": q5_k, "Q5_1": q5_1, "Q5_0": q5_0, "Q4_K": q4_k,
              "Q4_1": q4_1, "Q4_0": q4_0, "IQ4_NL": iq4_nl, "IQ4_XS": iq4_xs, "Q3_K": q3_k, "IQ3_S": iq3_s, "IQ3_XXS": iq3_xxs,
              "Q2_K": q2_k, "IQ2_S": iq2_s, "IQ2_XS": iq2_xs, "IQ2_XXS": iq2_xxs}


def gguf_quantize(weight: torch.Tensor | np.ndarray, ggml_type: str,
                  importance: torch.Tensor | np.ndarray | None = None, choose: Choose | None = None) -> GGUFQuantized:
    """Quantize `weight` [out, in] to `ggml_type` as llama.cpp does; importance [in]: mean x² per
    input column (llama-imatrix's values); None = llama.cpp's reference quantizer.

    choose: given the block scales llama.cpp's search picked (a BlockGrid) and its codes, return the codes
    to store instead (GPTQ's rounding); the result is then those codes packed with those scales."""
    if ggml_type not in QUANTIZERS:
        raise ValueError(f"no GGUF quantizer for {ggml_type}; implemented: {', '.join(QUANTIZERS)}")
    w = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, F32)
    block = GGUF_TYPES[ggml_type].block
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"{ggml_type} quantizes rows in blocks of {block}; shape {list(w.shape)} does not fit")
    if importance is not None:
        importance = importance.detach().float().cpu().numpy() if isinstance(importance, torch.Tensor) else np.asarray(importance, F32)
        importance = importance.reshape(-1).astype(F32)
        if importance.size != w.shape[1]:
            raise ValueError(f"importance has {importance.size} entries, the weight {w.shape[1]} input columns")
    return QUANTIZERS[ggml_type](np.ascontiguousarray(w, dtype=F32), importance, choose)


def quantize(w: torch.Tensor, o: QuantOption) -> QuantizedWeight:
    """llama.cpp's reference quantizer (no importance weights): what llama-quantize does without an imatrix."""
    q = gguf_quantize(w, o.element)
    return QuantizedWeight(o, torch.from_numpy(q.values), blocks=q.blocks)


# What llama-quantize writes when a tensor's rows are not a multiple of the type's 256-weight block
# (llama-quant.cpp, tensor_type_fallback): the 32-weight type it demotes to.
LLAMA_CPP_FALLBACK = {"IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL",
                      "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def fallback(o: QuantOption) -> QuantOption | None:
    return gguf_option(LLAMA_CPP_FALLBACK[o.element]) if o.element in LLAMA_CPP_FALLBACK else None


# Two grids of the one family: "gguf" by default for --target llama.cpp, "gguf-iq" (the lattice i-quants,
# slow to search) only when named
register_format(Format(
    "gguf", "gguf", check, lambda o: o.element, lambda text: gguf_option(text.upper()) if text.upper() in GGUF_TYPES else None,
    quantize, elements=tuple(GGUF_TYPES), label_examples=("Q4_K",), fallback=fallback,
    grids={"gguf": lambda g: [gguf_option(t) for t in QUANTIZERS if t not in LATTICE_TYPES],
           "gguf-iq": lambda g: [gguf_option(t) for t in QUANTIZERS if t in LATTICE_TYPES]}))
