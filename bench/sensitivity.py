"""Which error model predicts the real loss? Single-layer ablations on SmolLM2.

    python bench/sensitivity.py [--gguf PATH] [--layers 0,4,9,14,19,24,29] [--options int2-g64-asym,int3-g64-asym]

Quantizes one module at a time (RTN) to each option, measures the increase of mean NLL on
wikitext-2 *test* windows, and reports the Spearman rank correlation between each error model's
prediction (computed from *validation* calibration text) and the measured increase. Then checks
additivity: all modules of a block quantized together vs the sum of their single-module effects.
Prints tables, writes bench/out/sensitivity.json and bench/out/sensitivity.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr
from tqdm.auto import tqdm

import bitalloc
from bitalloc.api import profile, resolve_calibration
from bitalloc.candidates import ERROR_MODELS
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import select_modules
from bitalloc.options import parse_option

sys.path.insert(0, str(Path(__file__).parent))
from common import default_gguf, smollm2_arguments, with_options  # noqa: E402


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--layers", default="0,4,9,14,19,24,29")
    ap.add_argument("--options", default="int2-g64-asym,int3-g64-asym")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()

    loaded = bitalloc.load_model(args.gguf or default_gguf())
    model = loaded.model
    calib = resolve_calibration(args.calib, loaded, 512, 8192, seed=0)
    names = select_modules(model)
    table = profile(loaded, calib, names, bitalloc.default_options(), cache_dir=bitalloc.api.default_cache_dir(), progress=True)
    windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, args.seq_len, args.windows)
    base = bitalloc.evaluate(model, windows)

    def measured_delta(assign: dict) -> float:
        return with_options(model, assign, lambda m: bitalloc.evaluate(m, windows).nll) - base.nll

    layers = [int(x) for x in args.layers.split(",")]
    chosen = [n for n in names if any(f".{i}." in n for i in layers)]
    options = [parse_option(s) for s in args.options.split(",")]
    rows = []
    for opt in options:
        k = table.option_index(opt)
        for n in tqdm(chosen, desc=f"ablations {opt.label}", unit="module"):
            g = table.groups.index(n)
            rows.append({"module": n, "option": opt.label, "measured": measured_delta({n: opt}),
                         **{m: float(table.errors[m][g, k]) for m in ERROR_MODELS}})

    measured = np.array([r["measured"] for r in rows])
    lines = [f"SmolLM2-135M single-module RTN ablations: {len(rows)} (module, option) pairs, "
             f"ΔNLL measured on wikitext-2 test {base.windows}×{base.seq_len}, predicted from validation calibration", "",
             "| error model | Spearman ρ (all) | " + " | ".join(f"ρ ({o.label})" for o in options) + " | Pearson r (log-log) | median measured/predicted |",
             "|---|---|" + "---|" * len(options) + "---|---|"]
    summary = {}
    for m in ERROR_MODELS:
        pred = np.array([r[m] for r in rows])
        per_opt = [spearmanr([r[m] for r in rows if r["option"] == o.label], [r["measured"] for r in rows if r["option"] == o.label])[0] for o in options]
        rho = spearmanr(pred, measured)[0]
        pos = (pred > 0) & (measured > 0)
        r_log = pearsonr(np.log(pred[pos]), np.log(measured[pos]))[0]
        ratio = float(np.median(measured[pos] / pred[pos]))
        summary[m] = {"spearman": rho, "spearman_per_option": per_opt, "pearson_log": r_log, "median_ratio": ratio}
        lines.append(f"| {m} | {rho:.3f} | " + " | ".join(f"{x:.3f}" for x in per_opt) + f" | {r_log:.3f} | {ratio:.3g} |")

    # Additivity: one whole block at the first option, jointly vs the sum of single-module effects.
    lines += ["", "| block | option | Σ single measured | joint measured | Σ predicted (fisher) |", "|---|---|---|---|---|"]
    additivity = []
    opt = options[-1]
    for i in layers[:: max(1, len(layers) // 3)]:
        block = [n for n in chosen if f".{i}." in n]
        singles = sum(r["measured"] for r in rows if r["module"] in block and r["option"] == opt.label)
        pred = sum(r["fisher"] for r in rows if r["module"] in block and r["option"] == opt.label)
        joint = measured_delta({n: opt for n in block})
        additivity.append({"layer": i, "option": opt.label, "sum_single": singles, "joint": joint, "predicted": pred})
        lines.append(f"| {i} | {opt.label} | {singles:.4f} | {joint:.4f} | {pred:.4f} |")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    atomic_write_text(out / "sensitivity.json", canonical_json({"rows": rows, "summary": summary, "additivity": additivity,
                                                                 "base": base.to_dict()}))
    plot(rows, out / "sensitivity.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ERROR_MODELS), figsize=(5 * len(ERROR_MODELS), 4))
    for ax, m in zip(axes, ERROR_MODELS):
        for opt in sorted({r["option"] for r in rows}):
            sel = [r for r in rows if r["option"] == opt and r[m] > 0 and r["measured"] > 0]
            ax.scatter([r[m] for r in sel], [r["measured"] for r in sel], s=14, label=opt)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted ({m})")
        ax.set_ylabel("measured ΔNLL (nats)")
        ax.set_title(f"error model: {m}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


if __name__ == "__main__":
    main()
