"""Uniform plans that fit a budget: the reference every mixed plan must beat.

verify.py measures them against the solved plan; `min_bits="uniform"` (constraints.py) floors a plan's modules at the
bits of the best of them, so that no module goes below the bit-width the budget affords everywhere."""

from __future__ import annotations

import numpy as np

from .options import QuantOption
from .table import CandidateTable


def uniform_candidates(table: CandidateTable, raw: np.ndarray, allowed: np.ndarray, max_storage_bits: float,
                       n: int) -> list[tuple[str, np.ndarray]]:
    """(label, choice) of the uniform plans that fit the budget, least predicted loss (`raw`, [modules, options])
    first, at most n: one option on every module, or, where a module's rows do not fit it, the option a runtime
    falls back to (formats.fallback: llama-quantize's Q4_K -> Q5_0 on Gemma's 640-wide rows), as that runtime's
    uniform file holds it. Without fallbacks no GGUF K-quant is uniform on SmolLM2 or Gemma 3."""
    rows = np.arange(len(table.groups))
    found = []
    for k, option in enumerate(table.options):
        choice = np.full(len(table.groups), k, dtype=np.int64)
        fallen = _fallback_index(table, option)
        if fallen is not None:
            choice = np.where(table.allowed[:, k], k, fallen)
        if not allowed[rows, choice].all() or float(table.storage_bits[rows, choice].sum()) > max_storage_bits:
            continue
        label = option.label if (choice == k).all() else f"{option.label} ({table.options[fallen].label} where rows do not fit)"
        found.append((float(raw[rows, choice].sum()), k, label, choice))
    return [(label, choice) for _, _, label, choice in sorted(found, key=lambda f: f[:2])[:n]]


def uniform_floor(table: CandidateTable, raw: np.ndarray, allowed: np.ndarray,
                  max_storage_bits: float) -> tuple[int, str] | None:
    """(nominal bits, label) of the best-predicted uniform plan that fits: its fewest bits on any module (a fallback
    type may hold more). None where no uniform plan fits."""
    best = uniform_candidates(table, raw, allowed, max_storage_bits, 1)
    if not best:
        return None
    label, choice = best[0]
    return min(table.options[k].bits for k in set(choice.tolist())), label


def _fallback_index(table: CandidateTable, option: QuantOption) -> int | None:
    """The table's index of the option `option` falls back to, None when it has none or the table lacks it."""
    from .formats import fallback

    other = fallback(option)
    return table.option_index(other) if other is not None and other in table.options else None
