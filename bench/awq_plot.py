"""ppl and KL against bits per weight: `awq` INT plans, `awq-gptq` (the default) with today's settings on calibration
text you supply (GPTQ's Hessians from 16× the text, halfway toward the float model) and with its
first ones (1 % damping, Hessians from the profile's 8192 tokens, GPTQ's own target), `gptq` INT plans, `rtn-w` INT
plans (the default before) and llama.cpp's own mixes made with an importance matrix, on SmolLM2 and Gemma 3, from rows
already measured.

    python bench/awq_plot.py [--out bench/out/awq.png]

Reads the plan rows of bench/plan_variants.py (`plan_variants.jsonl`: solved plans, not the uniform `pin=` rows)
and bench/peers.py's llama.cpp rows (`peers.rows.jsonl`, "+imatrix"), all scored by the same harness (WikiText-2
test, 16 × 512 tokens, KL to the F32 model). Prints the rows it plots. A KL below the axis' floor (Gemma's Q4_K_M
mix rebuilds the checkpoint's own grid: 1.6e-6) is drawn on the floor as a triangle, its value beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT

OUT = ROOT / "bench" / "out"
KL_FLOOR = 5e-3  # the KL axis' bottom: one near-zero row would otherwise flatten every other row into a line
# model -> series -> (the quantizer its plans were applied with, the files its rows come from: plan_variants.jsonl
# or peers.rows.jsonl). awq-gptq plans from awq's table now (quantizers.measuring_quantizer): its rows are an awq
# table's plans applied with awq-gptq; the "GPTQ table" rows are awq-gptq's before, when its table held GPTQ's errors.
SOURCES = {
    "SmolLM2-135M": {
        "awq": ("awq", [OUT / "awq" / "plan_variants.jsonl", OUT / "awq-low-bits" / "awq" / "plan_variants.jsonl"]),
        "awq-gptq, 16× text, halfway (the default)": ("awq-gptq", [
            OUT / d / "plan_variants.jsonl" for d in ("gptq-float-half-16x-35", "gptq-float-half-16x",
                                                     "default-16x-half-a", "default-16x-half-b")]),
        "awq-gptq, first settings": ("awq-gptq", [OUT / "awq-table-gptq-apply" / "plan_variants.jsonl"]),
        "awq-gptq, GPTQ table (before)": ("awq-gptq", [OUT / "awq-gptq" / "plan_variants.jsonl"]),
        "gptq": ("gptq", [OUT / "plan_variants.jsonl"]),
        "rtn-w": ("rtn-w", [OUT / "plan_variants.jsonl", OUT / "awq-low-bits" / "rtn-w" / "plan_variants.jsonl"]),
        "llama.cpp + imatrix": ("", [OUT / "peers.rows.jsonl"]),
    },
    "Gemma 3 270M": {
        # awq-gemma3-text: the same sizes with calibration text read as text (its rows replace the older ones)
        "awq": ("awq", [OUT / "awq-gemma3" / "plan_variants.jsonl", OUT / "awq-gemma3-text" / "plan_variants.jsonl"]),
        "awq-gptq, 16× text, halfway (the default)": ("awq-gptq", [
            OUT / d / "plan_variants.jsonl" for d in ("gptq-float-half-16x-gemma3", *(
                f"default-16x-half-gemma3-{x}" for x in "abef"))]),
        "awq-gptq, first settings": ("awq-gptq", [OUT / "awq-table-gptq-apply-gemma3" / "plan_variants.jsonl"]),
        "awq-gptq, GPTQ table (before)": ("awq-gptq", [OUT / "awq-gptq-gemma3" / "plan_variants.jsonl"]),
        "gptq": ("gptq", [OUT / "gptq-gemma3" / "plan_variants.jsonl"]),
        "rtn-w": ("rtn-w", [OUT / "peers-gemma3-bos" / "plan_variants.jsonl"]),
        "llama.cpp + imatrix": ("", [OUT / "peers-gemma3-bos" / "peers.rows.jsonl"]),
    },
}


def points(series: str, applied: str, files: list[Path]) -> list[tuple[float, float, float]]:
    """(bpw, ppl, kl) of the series' rows, one per size (the last measured wins), sorted by bpw."""
    found: dict[float, tuple[float, float, float]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if series == "llama.cpp + imatrix":
                keep = r.get("kind") == "llama.cpp" and r.get("row", "").endswith("+imatrix")
            else:  # a plan solved under the default error model, applied with this quantizer, no pins or floors
                keep = (r.get("apply_quantizer") or r.get("quantizer")) == applied and r["variant"].endswith(",fisher-tw")
            if keep:
                found[round(r["bpw"], 3)] = (r["bpw"], r["ppl"], r["kl"])
    return [found[k] for k in sorted(found)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT / "awq.png"))
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(SOURCES), figsize=(6 * len(SOURCES), 8))
    for col, (model, sources) in enumerate(SOURCES.items()):
        for series, (applied, files) in sources.items():
            rows = points(series, applied, files)
            print(f"{model:<14} {series:<30} " + "  ".join(f"{b:.4f}: {p:.2f}/{k:.3f}" for b, p, k in rows))
            style = "s" if series.startswith("llama.cpp") else "o-"
            for row, (measure, index) in enumerate((("perplexity", 1), ("KL to F32", 2))):
                ax = axes[row][col]
                floor = KL_FLOOR if index == 2 else 0.0
                (line,) = ax.plot([r[0] for r in rows], [max(r[index], floor) for r in rows], style, label=series)
                for r in rows:
                    if r[index] < floor:
                        ax.plot(r[0], floor, "v", color=line.get_color(), markersize=9)
                        ax.annotate(f"{r[index]:.2g}", (r[0], floor), textcoords="offset points", xytext=(-30, 6))
                ax.set_title(f"{model}: {measure}")
                ax.set_xlabel("bits per weight (decoder linears)")
                ax.set_yscale("log")
                if floor:
                    ax.set_ylim(bottom=floor * 0.8)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
