"""Each group's lower convex hull in (bits, cost), vectorized over groups, and the LP greedy on it.

The linear relaxation of the multiple-choice knapsack is solved exactly by a greedy on hull
segments (Sinha & Zemel 1979; Dyer 1984): start every group at its fewest-bits hull point, then
take upgrade segments in order of cost decrease per extra bit until the budget runs out, one
segment fractionally. Its value is the best Lagrangian dual bound max_λ L(λ), and its integral
part is the Lagrangian choice at that λ.

Speed: the hull is Andrew's monotone chain run on all groups at once, one option column at a
time, over blocks of groups small enough for the CPU cache, with each block transposed to
[K, groups] so every step is a pass over contiguous vectors (numpy's `where`, take_along_axis
and short-axis accumulates cost ten times more per element). Only int8 option columns are kept
per hull point; bits and costs are read back from the table. Segment ratios are always computed
by one expression, so they strictly decrease along a hull and taking segments in ratio order
takes a prefix of every hull. 10^6 groups × 16 options take about a second.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

_BLOCK = 16384  # groups per block: a block's [n] vectors (128 KB) stay in the CPU's L2 cache
_CODES = 1 << 16  # a ratio's bin: the top 16 bits of its float32 pattern (monotone; 128 bins per octave)


@dataclass(frozen=True)
class Frontier:
    """Hull point i of group g, i < count[g], in increasing bits and decreasing cost, sits at
    position spos[i, g] of the group's options sorted by bits (`order`: one [K] order for all
    groups, or [G, K]) in the [G, K] tables `bits` and `cost` (held by reference, not copied).

    codes[i, g] bins the ratio of segment i-1 -> i (0 for none) by the top 16 bits of its
    float32 pattern: float32 rounding is monotone, so bins never invert two ratios, and codes
    never increase along a hull. weight[code] sums the segments' extra bits per bin.
    pareto[j, g]: the option at sorted position j is Pareto-efficient (cheaper than all with fewer bits).
    """

    count: np.ndarray  # [G] hull points per group (>= 1)
    spos: np.ndarray  # [K, G] int8
    order: np.ndarray  # [K] or [G, K]
    pareto: np.ndarray  # [K, G] bool
    codes: np.ndarray  # [K, G] uint16
    weight: np.ndarray  # [2^16]
    bits: np.ndarray  # [G, K]
    cost: np.ndarray  # [G, K]

    def column(self, j: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Option column at sorted position j[k] of group g[k]."""
        return self.order[j] if self.order.ndim == 1 else self.order[g, j]

    def columns(self, pos: np.ndarray) -> np.ndarray:
        """Option column of every group at its hull point pos[g]."""
        g = np.arange(pos.size)
        return self.column(self.spos[pos, g].astype(np.int64), g).astype(np.int64)

    def point(self, i: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bits, cost) of hull point i[k] of group g[k]."""
        c = self.column(self.spos[i, g].astype(np.int64), g)
        return self.bits[g, c], self.cost[g, c]

    def segment(self, i: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(extra bits, cost decrease, ratio) of segment i-1 -> i of group g."""
        b0, c0 = self.point(i - 1, g)
        b1, c1 = self.point(i, g)
        return b1 - b0, c0 - c1, _ratio(c0, c1, b0, b1)


def _ratio(c_from, c_to, b_from, b_to):
    # The one expression for a segment's ratio, so hull tests and the greedy agree to the last bit.
    return (c_from - c_to) / (b_to - b_from)


def frontier(cost: np.ndarray, bits: np.ndarray) -> Frontier:
    """cost, bits: [G, K] with +inf in disallowed cells (every group has at least one finite cell)."""
    G, K = cost.shape
    if K > 127:
        raise ValueError(f"the hull keeps sorted positions as int8: at most 127 options, got {K}")
    order = _column_order(bits)
    count = np.empty(G, dtype=np.int64)
    spos = np.empty((K, G), dtype=np.int8)
    pareto = np.empty((K, G), dtype=bool)
    codes = np.zeros((K, G), dtype=np.uint16)
    weight = np.zeros(_CODES)
    for lo in range(0, G, _BLOCK):
        hi = min(G, lo + _BLOCK)
        if order.ndim == 1:
            BT, CT = np.ascontiguousarray(bits[lo:hi, order].T), np.ascontiguousarray(cost[lo:hi, order].T)
        else:
            o = order[lo:hi]
            BT = np.ascontiguousarray(np.take_along_axis(bits[lo:hi], o, 1).T)
            CT = np.ascontiguousarray(np.take_along_axis(cost[lo:hi], o, 1).T)
        h, SB, SC, spos[:, lo:hi], pareto[:, lo:hi] = _chain(BT, CT)
        count[lo:hi] = h
        real = h[None, :] > np.arange(1, K)[:, None]
        with np.errstate(all="ignore"):  # rows past a hull's end hold junk, masked by `real`
            ratio = _ratio(SC[:-1], SC[1:], SB[:-1], SB[1:])
            # beyond float32's range a ratio becomes inf: still monotone
            code = (ratio.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) * real
        codes[1:, lo:hi] = code
        weight += np.bincount(code.ravel(), weights=((SB[1:] - SB[:-1]) * real).ravel(), minlength=_CODES)
    return Frontier(count, spos, order, pareto, codes, weight, bits, cost)


def _column_order(bits: np.ndarray) -> np.ndarray:
    """One column order if it sorts every row strictly by bits (disallowed cells anywhere), else
    a per-row order (equal bits: the chain keeps the cheaper)."""
    G, K = bits.shape
    sample = bits[:: max(1, G // 1024)]
    finite = np.isfinite(sample)
    rel = np.where(finite, sample, np.nan) / np.where(finite, sample, np.inf).min(axis=1, keepdims=True).clip(min=1.0)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column disallowed in every sampled row
        typical = np.nanmedian(rel, axis=0)
    order = np.argsort(np.where(np.isfinite(typical), typical, np.inf), kind="stable")
    for lo in range(0, G, _BLOCK):
        B = bits[lo:lo + _BLOCK, order]
        with np.errstate(invalid="ignore"):
            if (B[:, 1:] > B[:, :-1]).all():
                continue
        # disallowed cells may sit anywhere: compare each finite cell with the finite ones before it
        seen = np.maximum.accumulate(np.where(np.isfinite(B), B, -np.inf), axis=1)
        if not (~np.isfinite(B[:, 1:]) | (B[:, 1:] > seen[:, :-1])).all():
            return np.argsort(bits, axis=1, kind="stable")
    return order


def _chain(BT: np.ndarray, CT: np.ndarray):
    """Monotone chain over the columns (sorted by bits) of n groups at once: [K, n] in, padded
    hull stacks out (bits, cost, sorted position) and the Pareto mask. A column is a candidate
    only if strictly cheaper than the stack top (the cheapest so far: the Pareto filter);
    before it is pushed, the top is popped while the ratio into the top is not strictly above
    the ratio from the top to the candidate (the top would lie on or above the chord), or has
    the same bits. Row K of the stacks is a scratch slot that non-candidates write to, so every
    step is a whole-vector operation."""
    K, n = BT.shape
    ar = np.arange(n)
    h = np.zeros(n, dtype=np.int64)  # stack sizes
    SB, SC = np.zeros((K + 1, n)), np.zeros((K + 1, n))
    SP = np.zeros((K + 1, n), dtype=np.int8)
    pareto = np.zeros((K, n), dtype=bool)
    sb, sc, sp = SB.ravel(), SC.ravel(), SP.ravel()
    top_b, top_c, top_r = np.full(n, -np.inf), np.full(n, np.inf), np.zeros(n)
    for j in range(K):
        bj, cj = BT[j], CT[j]
        cand = np.less(cj, top_c, out=pareto[j])
        if not cand.any():
            continue
        with np.errstate(all="ignore"):
            r = _ratio(top_c, cj, top_b, bj)
        pop = cand & (((h >= 2) & ~(top_r > r)) | ((h >= 1) & (bj <= top_b)))
        k = np.flatnonzero(pop)
        while k.size:
            h[k] -= 1
            hk = h[k]
            at = np.maximum(hk - 1, 0) * n + k
            below = np.maximum(hk - 2, 0) * n + k
            live = hk >= 1
            top_b[k] = np.where(live, sb[at], -np.inf)
            top_c[k] = np.where(live, sc[at], np.inf)
            with np.errstate(all="ignore"):
                # the ratio into the new top, recomputed exactly as when it was pushed
                top_r[k] = _ratio(sc[below], top_c[k], sb[below], top_b[k])
                r[k] = _ratio(top_c[k], cj[k], top_b[k], bj[k])
            again = ((hk >= 2) & ~(top_r[k] > r[k])) | (live & (bj[k] <= top_b[k]))
            k = k[again]
        at = (h + (K - h) * ~cand) * n + ar
        sb[at], sc[at], sp[at] = bj, cj, j
        np.copyto(top_b, bj, where=cand)
        np.copyto(top_c, cj, where=cand)
        np.copyto(top_r, r, where=cand)
        h += cand
    return h, SB[:K], SC[:K], SP[:K], pareto


@dataclass(frozen=True)
class Greedy:
    pos: np.ndarray  # [G] hull point index of each group after the segments taken
    lp_value: float  # linear-relaxation optimum: a lower bound on the integer optimum
    fractional: bool  # False: the relaxation's optimum is integral, hence the integer optimum
    left: float  # budget bits the integral part leaves unused
    price: float = 0.0  # λ: cost decrease per bit of the segment taken fractionally (0 when integral)


def lp_greedy(front: Frontier, budget: float) -> Greedy:
    """Take hull segments by decreasing ratio while they fit; value of the linear relaxation.

    The bits-weighted histogram of ratio bins finds the crossing bin at once: every bin above
    it is taken whole, and only its own segments are sorted (by exact ratio). No bisection.
    """
    K, G = front.spos.shape
    rows = np.arange(G)
    zero = np.zeros(G, dtype=np.int64)
    start_bits, _ = front.point(zero, rows)
    left = budget - float(start_bits.sum())
    cum = np.cumsum(front.weight[::-1])  # steepest bin first
    if cum[-1] <= left:  # every segment fits: each group at its cheapest point, integral
        pos = front.count - 1
        return Greedy(pos, float(front.point(pos, rows)[1].sum()), False, left - float(cum[-1]))
    cross = int(np.searchsorted(cum, left, side="right"))  # first bin (from the top) that does not fit whole
    cross_code = _CODES - 1 - cross
    spent = float(cum[cross - 1]) if cross > 0 else 0.0
    # Codes never increase along a hull (0 past its end), so every group takes a prefix.
    pos = (front.codes[1:] > cross_code).sum(axis=0)
    i, g = [], []
    for layer in range(1, K):
        at = np.flatnonzero(front.codes[layer] == cross_code)
        at = at[front.count[at] > layer]  # code 0 also marks "no segment"
        i.append(np.full(at.size, layer))
        g.append(at)
    i, g = np.concatenate(i), np.concatenate(g)
    dbits, dcost, ratio = front.segment(i, g)
    order = np.lexsort((g, i, -ratio))  # steepest first; ties by point, then group
    fill = np.cumsum(dbits[order])
    n_fit = int(np.searchsorted(fill, left - spent, side="right"))
    took = order[:n_fit]
    np.maximum.at(pos, g[took], i[took])
    spent += float(fill[n_fit - 1]) if n_fit else 0.0
    brk = order[n_fit]  # the segment the relaxation takes fractionally
    lp_value = float(front.point(pos, rows)[1].sum()) - (left - spent) / dbits[brk] * dcost[brk]
    return Greedy(pos, lp_value, True, left - spent, float(ratio[brk]))


def hull_fill(front: Frontier, pos: np.ndarray, left: float, max_rounds: int = 10_000) -> np.ndarray:
    """Spend `left` bits on each group's next hull segment that still fits, by decreasing ratio
    bin (ties: group order; a radix sort of 16-bit bins, not a float sort). Each round takes
    at least one; only the groups that moved have their next step read again. Returns the new
    positions."""
    pos = pos.copy()
    g = np.flatnonzero(pos + 1 < front.count)  # stays sorted: entries are replaced in place
    step = front.segment(pos[g] + 1, g)[0]
    for _ in range(max_rounds):
        fits = step <= left
        g, step = g[fits], step[fits]
        if g.size == 0:
            break
        order = np.argsort(np.uint16(_CODES - 1) - front.codes[pos[g] + 1, g], kind="stable")
        spend = np.cumsum(step[order])
        k = int(np.searchsorted(spend, left, side="right"))
        moved = order[:k]
        pos[g[moved]] += 1
        left -= float(spend[k - 1])
        more = pos[g[moved]] + 1 < front.count[g[moved]]
        step[moved[~more]] = np.inf  # no segment left: never fits again
        step[moved[more]] = front.segment(pos[g[moved[more]]] + 1, g[moved[more]])[0]
    return pos


def improvable(front: Frontier, pos: np.ndarray, left: float) -> np.ndarray:
    """Groups with some cheaper option within `left` extra bits: the cheapest-in-bits improvement
    of a group is its next Pareto-efficient option."""
    K, G = front.spos.shape
    g = np.arange(G)
    here = front.spos[pos, g].astype(np.int64)
    nxt = np.full(G, K)
    for j in range(K - 1, 0, -1):
        nxt[front.pareto[j] & (here < j)] = j
    has = np.flatnonzero(nxt < K)
    gap = front.bits[has, front.column(nxt[has], has)] - front.bits[has, front.column(here[has], has)]
    return has[gap <= left]
