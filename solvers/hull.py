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
    """Hull point i of group g, i < count[g], in increasing bits and decreasing cost, is option
    col[i, g] of the [G, K] tables `bits` and `cost` (held by reference, not copied).

    codes[i, g] bins the ratio of segment i-1 -> i (0 for none) by the top 16 bits of its
    float32 pattern: float32 rounding is monotone, so bins never invert two ratios, and codes
    never increase along a hull. weight[code] sums the segments' extra bits per bin.
    """

    count: np.ndarray  # [G] hull points per group (>= 1)
    col: np.ndarray  # [K, G] int8
    next_pareto: np.ndarray  # [K, G] int8 column of the group's next Pareto-efficient option after point i (-1: none)
    codes: np.ndarray  # [K, G] uint16
    weight: np.ndarray  # [2^16]
    bits: np.ndarray  # [G, K]
    cost: np.ndarray  # [G, K]

    def columns(self, pos: np.ndarray) -> np.ndarray:
        return self.col[pos, np.arange(pos.size)].astype(np.int64)

    def point(self, i: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bits, cost) of hull point i[k] of group g[k]."""
        c = self.col[i, g]
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
        raise ValueError(f"the hull keeps option columns as int8: at most 127 options, got {K}")
    order = _column_order(bits)
    count = np.empty(G, dtype=np.int64)
    col, nxt = np.empty((K, G), dtype=np.int8), np.empty((K, G), dtype=np.int8)
    codes = np.zeros((K, G), dtype=np.uint16)
    weight = np.zeros(_CODES)
    for lo in range(0, G, _BLOCK):
        hi = min(G, lo + _BLOCK)
        if order.ndim == 1:
            BT, CT = np.ascontiguousarray(bits[lo:hi, order].T), np.ascontiguousarray(cost[lo:hi, order].T)
            OT = np.broadcast_to(order[:, None].astype(np.int8), (K, hi - lo))
        else:
            o = order[lo:hi]
            BT = np.ascontiguousarray(np.take_along_axis(bits[lo:hi], o, 1).T)
            CT = np.ascontiguousarray(np.take_along_axis(cost[lo:hi], o, 1).T)
            OT = o.T.astype(np.int8)
        h, SB, SC, col[:, lo:hi], nxt[:, lo:hi] = _chain(BT, CT, OT)
        count[lo:hi] = h
        real = h[None, :] > np.arange(1, K)[:, None]
        with np.errstate(all="ignore"):  # rows past a hull's end hold junk, masked by `real`
            ratio = _ratio(SC[:-1], SC[1:], SB[:-1], SB[1:])
            # beyond float32's range a ratio becomes inf: still monotone
            code = (ratio.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16) * real
        codes[1:, lo:hi] = code
        weight += np.bincount(code.ravel(), weights=((SB[1:] - SB[:-1]) * real).ravel(), minlength=_CODES)
    return Frontier(count, col, nxt, codes, weight, bits, cost)


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


def _chain(BT: np.ndarray, CT: np.ndarray, OT: np.ndarray):
    """Monotone chain over the columns (sorted by bits) of n groups at once: [K, n] in, padded
    hull stacks out. A column is a candidate only if strictly cheaper than the stack top (the
    cheapest so far: the Pareto filter); before it is pushed, the top is popped while the ratio
    into the top is not strictly above the ratio from the top to the candidate (the top would
    lie on or above the chord), or has the same bits. Row K of the stacks is a scratch slot
    that non-candidates write to, so every step is a whole-vector operation."""
    K, n = BT.shape
    ar = np.arange(n)
    scratch = K * n + ar
    h = np.zeros(n, dtype=np.int64)  # stack sizes
    SB, SC = np.zeros((K + 1, n)), np.zeros((K + 1, n))
    SP, SN = np.zeros((K + 1, n), dtype=np.int8), np.full((K + 1, n), -1, dtype=np.int8)
    sb, sc, sp, sn = SB.ravel(), SC.ravel(), SP.ravel(), SN.ravel()
    top_b, top_c, top_r = np.full(n, -np.inf), np.full(n, np.inf), np.zeros(n)
    top_at = scratch.copy()  # flat slot of each stack's top (scratch while empty)
    for j in range(K):
        bj, cj = BT[j], CT[j]
        cand = cj < top_c
        if not cand.any():
            continue
        skip = ~cand
        # The stack top is the last Pareto point so far: this column is its next one.
        sn[top_at + (scratch - top_at) * skip] = OT[j]
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
            top_at[k] = np.where(live, at, scratch[k])
            with np.errstate(all="ignore"):
                # the ratio into the new top, recomputed exactly as when it was pushed
                top_r[k] = _ratio(sc[below], top_c[k], sb[below], top_b[k])
                r[k] = _ratio(top_c[k], cj[k], top_b[k], bj[k])
            again = ((hk >= 2) & ~(top_r[k] > r[k])) | (live & (bj[k] <= top_b[k]))
            k = k[again]
        at = (h + (K - h) * skip) * n + ar
        sb[at], sc[at], sp[at], sn[at] = bj, cj, OT[j], -1  # a slot may hold a popped point's next
        np.copyto(top_b, bj, where=cand)
        np.copyto(top_c, cj, where=cand)
        np.copyto(top_r, r, where=cand)
        np.copyto(top_at, at, where=cand)
        h += cand
    return h, SB[:K], SC[:K], SP[:K], SN[:K]


@dataclass(frozen=True)
class Greedy:
    pos: np.ndarray  # [G] hull point index of each group after the segments taken
    lp_value: float  # linear-relaxation optimum: a lower bound on the integer optimum
    fractional: bool  # False: the relaxation's optimum is integral, hence the integer optimum


def lp_greedy(front: Frontier, budget: float) -> Greedy:
    """Take hull segments by decreasing ratio while they fit; value of the linear relaxation.

    The bits-weighted histogram of ratio bins finds the crossing bin at once: every bin above
    it is taken whole, and only its own segments are sorted (by exact ratio). No bisection.
    """
    K, G = front.col.shape
    rows = np.arange(G)
    zero = np.zeros(G, dtype=np.int64)
    start_bits, _ = front.point(zero, rows)
    left = budget - float(start_bits.sum())
    cum = np.cumsum(front.weight[::-1])  # steepest bin first
    if cum[-1] <= left:  # every segment fits: each group at its cheapest point, integral
        pos = front.count - 1
        return Greedy(pos, float(front.point(pos, rows)[1].sum()), False)
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
    return Greedy(pos, lp_value, True)


def hull_fill(front: Frontier, pos: np.ndarray, budget: float, max_rounds: int = 10_000) -> np.ndarray:
    """Spend what the relaxation left on each group's next hull segment that still fits, best
    ratio first (each round takes at least one). Returns the new positions."""
    pos = pos.copy()
    G = pos.size
    left = budget - float(front.point(pos, np.arange(G))[0].sum())
    g = np.flatnonzero(pos + 1 < front.count)
    for _ in range(max_rounds):
        step, _, ratio = front.segment(pos[g] + 1, g)
        fits = step <= left
        g, step, ratio = g[fits], step[fits], ratio[fits]  # later rounds only have less to spend
        if g.size == 0:
            break
        order = np.argsort(-ratio, kind="stable")
        spend = np.cumsum(step[order])
        k = int(np.searchsorted(spend, left, side="right"))
        pos[g[order[:k]]] += 1
        left -= float(spend[k - 1])
        g = g[pos[g] + 1 < front.count[g]]
    return pos


def improvable(front: Frontier, pos: np.ndarray, left: float) -> np.ndarray:
    """Groups with some cheaper option within `left` extra bits: the cheapest-in-bits improvement
    of a group is its next Pareto-efficient option."""
    G = pos.size
    g = np.arange(G)
    nxt = front.next_pareto[pos, g].astype(np.int64)
    has = np.flatnonzero(nxt >= 0)
    gap = front.bits[has, nxt[has]] - front.point(pos[has], has)[0]
    return has[gap <= left]
