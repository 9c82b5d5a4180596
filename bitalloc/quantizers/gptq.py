"""GPTQ (Frantar et al., 2023): quantize a weight column by column, spreading each column's rounding
error over the not-yet-quantized columns through the inverse layer Hessian.

Follows IST-DASLab's reference `fasterquant`: damping λ = damp · mean(diag H), dead inputs
(diag H = 0) zeroed, the upper Cholesky factor of H⁻¹ (paper §4, "Cholesky reformulation"), lazy
batch updates of `block_size` columns (§4, "lazy batch-updates"), and act-order (§4 and the
reference's `--act-order`: columns in order of decreasing diag H), which bitalloc does by default
(ACT_ORDER) where the reference does not: the columns that matter most are rounded first, while the
others are still free to compensate them.

Group scales. Natural order: each group's scale and zero-point are chosen from the error-updated
weights when the loop reaches the group's first column (as the reference does). Per-channel: one
scale per row from the whole (dead-zeroed) weight before the loop (reference). Act-order: "static
groups" — every group's scale is taken from the original weight before the loop, so the codes/scales
stay in natural group order (what packers write) even though the columns are visited in a permuted
order. The choice itself is the importance-weighted scale search (scale_search.py) with column
weights h_j = 1 / [H_F⁻¹]_jj = 1 / U_jj², U the Cholesky factor below: in GPTQ, rounding column j
by e_j (then compensating the columns after it) raises the layer error by e_j² / [H_F⁻¹]_jj (paper
eq. 3, OBS), so these are the weights GPTQ's own objective puts on each column's rounding error —
diag H would be the weights if nothing were compensated (RTN). `scale_search=False` (the quantizer
"gptq-minmax") keeps the reference's min/max scales: the GPTQ of bitalloc before the search existed.
`signed=True` (the quantizer "gptq-signed") searches symmetric groups with signed scales, as
"rtn-w-signed" does (SearchGrid.signed): the code −2^(b−1) becomes usable for the group's largest weight.
"awq-gptq" is GPTQ on the equalized model (equalize.py), as "awq" is rtn-w there: AWQ's scales move
resolution to the inputs that matter before GPTQ compensates what rounding still loses.
Either way scales are fp16 values and zero-points integers, so stored codes reproduce the values.

Formats: INT, and llama.cpp's GGUF types (`_gptq_gguf`): each GGUF block of columns (32 or 256
inputs) gets its scales (and mins, sub-block scales) from llama.cpp's own importance-weighted search
(imatrix = diag H) on the error-updated weights when the loop reaches it, as natural-order groups
do; then its columns are rounded one by one on that grid with GPTQ's error feedback, and the type
packs the chosen codes with those scales, so the stored blocks decode to exactly the values GPTQ
kept. The lattice i-quants (IQ3_S, IQ3_XXS, IQ2_*: one code per 4 or 8 weights) cannot round one
column at a time: the type quantizes each error-updated block whole, and the block's error reaches
the later columns by the exact block form of the update, (W_b − Q_b)·U_bb⁻¹·U_b,later. Other
options (fp8/fp6/fp4, MX, NVFP4) and keep fall back to RTN (`gptq_many`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import solve_triangular

from ..formats.gguf import GGUF_TYPES, LATTICE_TYPES, BlockGrid, gguf_quantize
from ..formats.int import int_dequantize, int_range, int_scales
from ..options import QuantOption
from . import QuantizedWeight, register_batched, register_quantizer
from .rtn import rtn
from .rtn_weighted import importance as input_importance
from .scale_search import SearchGrid, search_int_scales


@dataclass(frozen=True)
class HessianFactor:
    """What the column loop needs from H, shared by every option of one module.

    dead: [in] bool, inputs that were always zero (their weights are set to 0, as in the reference).
    perm: [in] column visiting order (act-order) or None for natural order.
    hinv: [in, in] upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, rows/columns in visiting order.
    """

    dead: torch.Tensor
    perm: torch.Tensor | None
    hinv: torch.Tensor


# Measured (awq tables' plans applied with awq-gptq, WikiText-2, bench/out/gptq-act-order*): on SmolLM2-135M
# act-order lowered ppl at six of seven sizes from 3.2 to 5.5 bits per weight (62.8 → 59.6 at 3.2 bits; +0.16
# at 5.5) and KL at four (+1-2 % at the other three); on Gemma 3 both at 3.5 bits (38.4 → 37.7 ppl), and at 4.5 and
# 5.2 bits it was 0.07-0.08 ppl worse. Applied with two threads instead of one, the 3.2-bit gain held (59.3 vs 62.8)
# and the 3.5-bit one reversed (+1.5 ppl): float summation order moves GPTQ by that much. It pays where rounding is
# coarsest and was not seen to lose by more than that noise elsewhere. Calibrated on the built-in set (text unlike
# the test's) it lost to natural order at every size on both (+0.9 to +4.5 ppl), so a profile or a plan picks the order
# by where its calibration came from (config.quantizer_settings); this is the default of a direct call with a Hessian.
# "gptq-minmax", the reference GPTQ, keeps natural order.
ACT_ORDER = True
# Damping λ = DAMP · mean(diag H). The reference's 1 % lets GPTQ fit the noise of a Hessian from tens of thousands of
# tokens: on SmolLM2 at 3.5 bits (awq-gptq, act-order, 32768 tokens of WikiText-2 validation) KL to the float model
# was 0.335 at 1 %, 0.311 at 5 % and at 20 %, and 0.308 at 1 % with four times the text. 5 % lowered KL at all eleven
# sizes measured on SmolLM2 (3.2 to 5.53 bits) and Gemma 3 (3.5 to 5.18), by 0.6 to 7 %, and perplexity at nine (+0.10
# and +0.05 at Q4_K_S's size) (docs/results.md, *GPTQ's damping*). "gptq-minmax", the reference GPTQ, keeps the reference's 1 %.
DAMP = 0.05
REFERENCE_DAMP = 0.01


def hessian_factor(hessian: torch.Tensor, damp: float = DAMP, act_order: bool = False) -> HessianFactor:
    """Damped inverse-Hessian Cholesky factor; depends only on H, damp and act_order, not on the option."""
    H = hessian.detach().float().clone()  # [in, in]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    idx = torch.arange(H.shape[0])
    mean_diag = float(torch.diagonal(H).mean())
    # A rank-deficient H (fewer calibration tokens than inputs) can defeat the default damping in
    # float32; raise it tenfold until the factorization succeeds, as AutoGPTQ does.
    for attempt in range(6):
        Hd = H.clone()
        Hd[idx, idx] += damp * (10**attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            break
    else:
        raise RuntimeError("GPTQ: the layer Hessian is not positive definite even with 10^5 x damping; "
                           "check the calibration inputs for NaN/inf")
    Hinv = torch.cholesky_inverse(L)  # (H + λI)⁻¹
    U = torch.linalg.cholesky(Hinv, upper=True)
    return HessianFactor(dead=dead, perm=perm, hinv=U)


# The candidate table quantizes one weight with ~50 options against the same H; the factor depends
# only on (H, damp, act_order), so keep the last one. The cache holds the tensor itself (so its
# address cannot be reused by another tensor) and its version counter (so in-place edits miss).
_last_factor: tuple | None = None


def _cached_factor(hessian: torch.Tensor, damp: float, act_order: bool) -> HessianFactor:
    global _last_factor
    if _last_factor is not None:
        h, version, d, a, factor = _last_factor
        if h is hessian and version == hessian._version and d == damp and a == act_order:
            return factor
    factor = hessian_factor(hessian, damp, act_order)
    _last_factor = (hessian, hessian._version, damp, act_order, factor)
    return factor


@register_quantizer("gptq", needs_hessian=True, orders_columns=True)
def gptq(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None, damp: float = DAMP,
         block_size: int = 128, act_order: bool = ACT_ORDER, scale_search: bool = True,
         signed: bool = False) -> QuantizedWeight:
    """GPTQ-quantize `weight` [out, in] as `option` given the layer input Hessian `hessian` [in, in].

    damp: fraction of mean(diag H) added to the diagonal. block_size: columns per lazy batch update.
    act_order: visit columns by decreasing diag H, with static (pre-computed) group scales (default; False:
    natural order, each group's scales from its error-updated weights).
    scale_search: choose group scales by the weighted search (default) or by min/max (reference).
    signed: with the search, give symmetric groups signed scales (SearchGrid.signed).
    Non-int formats and keep are quantized by RTN (GPTQ with fp element rounding is not implemented).
    """
    return gptq_many(weight, [option], hessian, damp=damp, block_size=block_size, act_order=act_order,
                     scale_search=scale_search, signed=signed)[0]


@register_quantizer("gptq-minmax", needs_hessian=True, settings_of="gptq")
def gptq_minmax(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None,
                **settings) -> QuantizedWeight:
    """The reference GPTQ: min/max group scales, columns in natural order unless act_order is given (bitalloc's
    "gptq" before the weighted search and act-order)."""
    return gptq(weight, option, hessian, **{"act_order": False, "damp": REFERENCE_DAMP, **settings}, scale_search=False)


@register_quantizer("gptq-signed", needs_hessian=True, orders_columns=True, settings_of="gptq")
def gptq_signed(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None,
                **settings) -> QuantizedWeight:
    """GPTQ whose symmetric INT groups take signed scales from the search (rtn-w-signed's rule)."""
    return gptq(weight, option, hessian, **settings, signed=True)


@register_quantizer("awq-gptq", unfolded="gptq", measured_by="awq", orders_columns=True, settings_of="gptq")
def awq_gptq(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor | None = None,
             **settings) -> QuantizedWeight:
    """GPTQ of a weight of the equalized model (the pipeline folds AWQ's scales in first: equalize.py)."""
    return gptq(weight, option, hessian, **settings)


@register_batched("gptq")
def gptq_many(weight: torch.Tensor, options: list[QuantOption], hessian: torch.Tensor, damp: float = DAMP,
              block_size: int = 128, act_order: bool = ACT_ORDER, scale_search: bool = True,
              signed: bool = False) -> list[QuantizedWeight]:
    """GPTQ of one weight under several options at once (the candidate table's inner loop).

    GPTQ treats every output row independently given H, so the options' copies of the weight are
    stacked row-wise and share one column loop: the same arithmetic per row, one Python loop instead
    of one per option.
    """
    int_opts = [o for o in options if o.fmt == "int"]
    done = {}
    if int_opts:
        for o, q in zip(int_opts, _gptq_int(weight, int_opts, hessian, damp, block_size, act_order,
                                                    SearchGrid(signed=signed) if scale_search else None)):
            done[o] = q
    for o in options:
        if o.fmt == "gguf":
            done[o] = _gptq_gguf(weight, o, hessian, damp)
    return [done[o] if o in done else rtn(weight, o) for o in options]


@register_batched("gptq-minmax")
def gptq_minmax_many(weight: torch.Tensor, options: list[QuantOption], hessian: torch.Tensor,
                     **settings) -> list[QuantizedWeight]:
    return gptq_many(weight, options, hessian, **{"act_order": False, "damp": REFERENCE_DAMP, **settings}, scale_search=False)


@register_batched("gptq-signed")
def gptq_signed_many(weight: torch.Tensor, options: list[QuantOption], hessian: torch.Tensor,
                     **settings) -> list[QuantizedWeight]:
    return gptq_many(weight, options, hessian, **settings, signed=True)


def _gptq_int(weight: torch.Tensor, options: list[QuantOption], hessian: torch.Tensor, damp: float,
              block_size: int, act_order: bool, grid: SearchGrid | None) -> list[QuantizedWeight]:
    """grid: the scale search's settings, or None for the reference's min/max scales."""
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {in_f} inputs")
    K = len(options)
    sizes = [in_f if o.per_channel else o.group_size for o in options]
    for g in sizes:
        if in_f % g:
            raise ValueError(f"group size {g} does not divide in_features={in_f}")
    fac = _cached_factor(hessian, damp, act_order)
    W0 = weight.detach().float().clone()  # [out, in]
    W0[:, fac.dead] = 0
    rows = [slice(j * out_f, (j + 1) * out_f) for j in range(K)]  # option j's rows in the stack
    scale = [torch.empty(out_f, in_f // g) for g in sizes]  # [out, n_groups] per option
    zero = [torch.empty(out_f, in_f // g) for g in sizes]
    static = [act_order or o.per_channel for o in options]
    # Column weights of the scale search: 1 / [H_F⁻¹]_jj, GPTQ's cost per unit² of rounding error
    # in column j (see the module docstring); visiting order, and natural order for static groups.
    h_visit = 1.0 / torch.diagonal(fac.hinv) ** 2  # [in]
    h_natural = h_visit if fac.perm is None else torch.empty_like(h_visit).index_copy_(0, fac.perm, h_visit)

    def choose(w: torch.Tensor, h: torch.Tensor, o: QuantOption) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [out, n_groups, 1] of groups w [out, n_groups, g] with column weights h."""
        if grid is not None:
            _, s, z = search_int_scales(w, h, o, grid)
            return s, z
        return int_scales(w, o)

    for j, o in enumerate(options):
        if static[j]:
            g = sizes[j]
            s, z = choose(W0.reshape(out_f, in_f // g, g), h_natural.view(1, in_f // g, g), o)  # [out, n_groups, 1]
            scale[j][:], zero[j][:] = s.squeeze(-1), z.squeeze(-1)
    ranges = [int_range(o) for o in options]
    lo = torch.cat([torch.full((out_f,), float(r[0])) for r in ranges])  # [K*out]
    hi = torch.cat([torch.full((out_f,), float(r[1])) for r in ranges])
    cur_s = torch.empty(K * out_f)  # scale / zero-point of the group each row is in now
    cur_z = torch.empty(K * out_f)
    perm = fac.perm
    natural = perm if perm is not None else torch.arange(in_f)  # [in] natural index of visited column
    # Work on the transpose, one visited column per row, so reading a column, writing its codes and
    # the rank-1 updates all touch contiguous memory.
    Wt = (W0[:, perm] if perm is not None else W0).T.repeat(1, K).contiguous()  # [in, K*out]
    Hinv = fac.hinv  # [in, in] upper
    codes_t = torch.empty(in_f, K * out_f)
    current_group = [-1] * K

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = Wt[i1:i2].clone()  # [B, K*out], updated by every earlier column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            for j, o in enumerate(options):
                g = sizes[j]
                k = int(natural[c]) // g
                if static[j]:
                    if k != current_group[j]:
                        cur_s[rows[j]], cur_z[rows[j]] = scale[j][:, k], zero[j][:, k]
                        current_group[j] = k
                elif c % g == 0:
                    # The group's weights as they stand now: columns past this block still lack the
                    # updates from this block's earlier columns (applied lazily at the block's end).
                    r = rows[j]
                    if c + g <= i2:
                        current = W1[i:i + g, r]
                    else:
                        late = Wt[i2:c + g, r] - Hinv[i1:c, i2:c + g].T @ Err1[:i, r]
                        current = torch.cat([W1[i:, r], late], dim=0)
                    s, z = choose(current.T.unsqueeze(1), h_visit[c:c + g].view(1, 1, g), o)  # [out, 1, 1]
                    scale[j][:, k], zero[j][:, k] = s.view(-1), z.view(-1)
                    cur_s[r], cur_z[r] = s.view(-1), z.view(-1)
            w = W1[i]
            q = torch.clamp(torch.round(w / cur_s) + cur_z, lo, hi)
            codes_t[c] = q
            err = (w - (q - cur_z) * cur_s) / Hinv1[i, i]  # paper eq. (3): δ = -(w - q)/[H⁻¹]_qq · H⁻¹_:,q
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # rank-1 update, no temporary
            Err1[i] = err
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # lazy batch update of the remaining columns

    codes = codes_t.T
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    codes = codes.to(torch.int32)
    result = []
    for j, o in enumerate(options):
        cj = codes[rows[j]].contiguous()
        result.append(QuantizedWeight(o, int_dequantize(cj, scale[j], zero[j]), cj, scale[j], zero[j]))
    return result


def _gptq_gguf(weight: torch.Tensor, option: QuantOption, hessian: torch.Tensor, damp: float) -> QuantizedWeight:
    """GPTQ in natural order with llama.cpp's GGUF type `option.element`, one type block of columns
    (the lazy batch) at a time; see the module docstring. Act-order is not offered: a GGUF block's
    scales are searched on the weights it holds when the loop reaches it."""
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {in_f} inputs")
    ggml_type, width = option.element, GGUF_TYPES[option.element].block
    if in_f % width:
        raise ValueError(f"{ggml_type} quantizes rows in blocks of {width}; {in_f} inputs do not fit")
    fac = _cached_factor(hessian, damp, False)
    U = fac.hinv.numpy()  # [in, in] upper Cholesky factor of H⁻¹
    importance = input_importance(hessian).numpy()  # llama-imatrix's mean x² per input column
    W = weight.detach().float().numpy().copy()  # [out, in], updated by every quantized column
    W[:, fac.dead.numpy()] = 0
    blocks, values = [], []
    for c in range(0, in_f, width):
        cols = W[:, c:c + width].copy()  # this block's columns; updated inside it column by column
        Ub = U[c:c + width, c:c + width]
        err = np.zeros_like(cols)

        def round_columns(grid: BlockGrid, codes: np.ndarray) -> np.ndarray:
            for j in range(width):
                x = cols[:, j]
                codes[:, j] = grid.nearest(x, j)
                err[:, j] = (x - grid.value(codes[:, j], j)) / Ub[j, j]
                cols[:, j + 1:] -= np.outer(err[:, j], Ub[j, j + 1:])  # paper eq. (3), within the block
            return codes

        if ggml_type in LATTICE_TYPES:
            q = gguf_quantize(cols, ggml_type, importance[c:c + width])
            err = solve_triangular(Ub, (cols - q.values).T, trans="T").T  # err · U_bb = W_b − Q_b
        else:
            q = gguf_quantize(W[:, c:c + width], ggml_type, importance[c:c + width], choose=round_columns)
        blocks.append(q.blocks)
        values.append(q.values)
        W[:, c + width:] -= err @ U[c:c + width, c + width:]  # the block's errors reach the later columns
    return QuantizedWeight(option, torch.from_numpy(np.concatenate(values, axis=1)),
                           blocks=np.ascontiguousarray(np.concatenate(blocks, axis=1)))
