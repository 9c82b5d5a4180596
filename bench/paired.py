"""Is one plan really better than another on the test text, or only on these windows?

    python bench/paired.py bench/out/paired-gemma3/plan_variants.jsonl --base "16,fisher-tw,pin=int4-g64-asym"

Reads bench/plan_variants.py rows that carry each test window's mean NLL and KL (`window_nll`, `window_kl`) and
compares every row with the --base row window by window: the mean difference and its paired standard error over
windows (the windows are the unit that varies; tokens within one are correlated). |difference| > 2 standard
errors is marked `*`. --first N repeats the comparison on the first N windows (16: the bench's usual test).
Rows must share the model and the windows; the last row of each variant is used.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over windows and its standard error (nan for fewer than two windows)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
    return float(d.mean()), se


def marked(mean: float, se: float, digits: int) -> str:
    flag = "*" if abs(mean) > 2 * se else " "
    return f"{mean:+.{digits}f} ± {se:.{digits}f}{flag}"


def scored_rows(rows: list[dict], base: str) -> tuple[dict[str, dict], dict]:
    """The last row of each variant that carries per-window scores, and the base variant's."""
    by_variant = {r["variant"]: r for r in rows if "window_nll" in r}
    if base not in by_variant:
        raise SystemExit(f"error: no row with variant {base!r} and per-window scores; have: {', '.join(by_variant)}")
    return by_variant, by_variant[base]


def comparison_rows(rows: list[dict], base: str, first: int | None) -> list[list[str]]:
    by_variant, ref = scored_rows(rows, base)
    n = len(ref["window_nll"]) if first is None else first
    out = []
    for variant, r in by_variant.items():
        if len(r["window_nll"]) < n or r["model"] != ref["model"]:
            continue
        nll, kl = r["window_nll"][:n], r["window_kl"][:n]
        out.append([variant, f"{r['bpw']:.4f}", f"{math.exp(np.mean(nll)):.3f}", f"{np.mean(kl):.4f}",
                    marked(*paired_difference(nll, ref["window_nll"][:n]), 4),
                    marked(*paired_difference(kl, ref["window_kl"][:n]), 4)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", help="a plan_variants.jsonl")
    ap.add_argument("--base", required=True, help="the variant every row is compared with")
    ap.add_argument("--first", type=int, action="append", default=[], help="also compare on the first N windows")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    for first in [None, *args.first]:
        table = comparison_rows(rows, args.base, first)
        windows = first or len(scored_rows(rows, args.base)[1]["window_nll"])
        print(f"\n{windows} windows, against {args.base}")
        header = ["variant", "bpw", "ppl", "KL", "ΔNLL (paired SE)", "ΔKL (paired SE)"]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
        for line in [header, *table]:
            print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))


if __name__ == "__main__":
    main()
