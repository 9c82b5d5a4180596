"""Equalization's α search: the early-stopping sweep (equalize.first_minimum) against the full sweep.

    python bench/equalize_search.py [--gguf MODEL.gguf ...] [--calib-tokens 2048]

For every equalization group of each model, block by block as `equalize` walks them (each group folded with the
full sweep's α, so later blocks see what the product's fold gives), the reference error of all 11 α of
equalize.ALPHAS is measured, timed per α. The table gives how often first_minimum picks the full sweep's α, how
many α it measures, and the CPU time of those against the full sweep's. Calibration: the built-in set (what the
headline command profiles on), `--calib-tokens` tokens in windows of 512.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bitalloc.api import resolve_calibration
from bitalloc.blockwalk import BlockWalk, stage_hessians
from bitalloc.equalize import ALPHAS, REFERENCE, alpha_cost, block_groups, first_minimum, fold
from bitalloc.io import atomic_write_text
from bitalloc.models import load_model
from bitalloc.options import parse_option

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, default_gguf  # noqa: E402


def sweep(source: str, calib_tokens: int) -> list[dict]:
    """One row per group: the 11 costs, the CPU seconds of each, and first_minimum's pick."""
    loaded = load_model(source)
    windows = resolve_calibration(None, loaded, 512, calib_tokens, 0).tokens
    references = [parse_option(label) for label in REFERENCE]
    rows = []
    with torch.no_grad():
        for i, (block, inputs) in enumerate(BlockWalk(loaded.model, windows)):
            groups = block_groups(block)
            for group, H in zip(groups, stage_hessians(block, [g.consumers[0] for g in groups], inputs)):
                cost, scales = alpha_cost(block, group, H, references)
                costs, seconds = [], []
                for k in range(len(ALPHAS)):
                    start = time.process_time()
                    costs.append(cost(k))
                    seconds.append(time.process_time() - start)
                full = min(range(len(ALPHAS)), key=lambda k: (costs[k], k))
                measured: list[int] = []
                picked = first_minimum(lambda k: measured.append(k) or costs[k], len(ALPHAS))
                rows.append({"block": i, "group": group.producer, "costs": costs, "seconds": seconds, "full": full,
                             "picked": picked, "measured": measured})
                fold(block, group, scales(full))
                print(f"block {i:2d} {group.producer:<26} α full {ALPHAS[full]:.1f}  picked {ALPHAS[picked]:.1f}  "
                      f"{len(measured)} of {len(ALPHAS)} measured", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", action="append", default=None, help="model .gguf (repeatable; default: SmolLM2)")
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "equalize_search.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    results, lines = {}, ["| model | groups | same α as the full sweep | α measured (mean) | CPU s: full sweep | "
                          "CPU s: first_minimum | ratio |", "|---|---|---|---|---|---|---|"]
    for source in args.gguf or [default_gguf()]:
        rows = sweep(source, args.calib_tokens)
        full_s = sum(sum(r["seconds"]) for r in rows)
        picked_s = sum(r["seconds"][k] for r in rows for k in r["measured"])
        same = sum(r["picked"] == r["full"] for r in rows)
        mean = sum(len(r["measured"]) for r in rows) / len(rows)
        name = Path(source).name
        results[name] = {"rows": rows, "same": same, "groups": len(rows), "mean_measured": mean,
                         "full_cpu_s": full_s, "first_minimum_cpu_s": picked_s}
        lines.append(f"| {name} | {len(rows)} | {same} | {mean:.2f} of {len(ALPHAS)} | {full_s:.1f} | {picked_s:.1f} | "
                     f"{picked_s / full_s:.2f} |")
    print("\n".join(lines))
    atomic_write_text(Path(args.out), json.dumps({"calib_tokens": args.calib_tokens, "table": lines,
                                                  "models": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
