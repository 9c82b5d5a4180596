"""Plan quality on SmolLM2: wikitext-2 test ppl / KL / top-1 of bitalloc plans vs uniform quantization.

    python bench/quality.py [--gguf PATH] [--budgets 3.5,4,4.25,4.5,5] [--windows 16] [--quantizer rtn]
    python bench/quality.py --error-models fisher,local   # against the layer-local error model instead

Calibrates on the validation split, evaluates on the test split (never the same text). One quantizer
(--quantizer; default bitalloc's, rtn-w) makes the candidate table and quantizes every row, plans and
uniform ones alike. For each budget: the plan under "fisher", the plan under the token-weighted
"fisher-tw" (the default error model), and the best uniform configuration whose storage bpw fits.
At each budget the plans of every other error model are compared with the first one's on the same
tokens: mean per-token NLL difference ± its paired standard error (over tokens, and over windows, which
allows for the correlation of tokens within a window).
Prints a table, writes <out>/quality.json and <out>/quality.png.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import bitalloc
from bitalloc.api import plan_from_table, profile, resolve_calibration
from bitalloc.config import DEFAULT_ERROR_MODEL
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import select_modules

sys.path.insert(0, str(Path(__file__).parent))
from common import add_quantizer_argument, bench_quantizer, default_gguf, importances, smollm2_arguments, with_options  # noqa: E402
from gguf_roundtrip import paired, token_nll  # noqa: E402


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--budgets", default="3.5,4,4.25,4.5,5")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--error-models", default="fisher,fisher-tw")
    add_quantizer_argument(ap)
    ap.add_argument("--min-uniform-bits", type=int, default=3,
                    help="skip uniform configs below this width (INT2 RTN gives ppl > 10^4 on SmolLM2)")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    loaded = bitalloc.load_model(args.gguf or default_gguf())
    model = loaded.model
    calib = resolve_calibration(args.calib, loaded, args.seq_len, args.calib_tokens, seed=0)
    names = select_modules(model)
    options = bitalloc.default_options()
    quantizer = bench_quantizer(args.quantizer, options)
    t0 = time.perf_counter()
    table = profile(loaded, calib, names, options, cache_dir=bitalloc.api.default_cache_dir(), progress=True,
                    quantizer=quantizer)
    profile_s = time.perf_counter() - t0
    importance = importances(model, names, calib, quantizer)
    windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, args.seq_len, args.windows)
    reference = bitalloc.reference_logprobs(model, windows, progress=True)

    def measure(assign: dict) -> bitalloc.EvalResult:
        return with_options(model, assign, lambda m: bitalloc.evaluate(m, windows, reference=reference), quantizer, importance)

    rows = []
    base = bitalloc.evaluate(reference, windows)  # the unquantized model, from the log-probs already computed
    print(f"reference ppl {base.ppl:.3f} on {windows.shape[0]}x{windows.shape[1]} tokens; profile {profile_s:.1f}s", flush=True)

    # Uniform: every option that tiles every planned module, up to the largest budget.
    n_weights = table.num_weights
    for k, opt in enumerate(table.options):
        if opt.fmt != "int" or opt.bits < args.min_uniform_bits or not table.allowed[:, k].all():
            continue
        bpw = float(table.storage_bits[:, k].sum()) / n_weights
        if bpw > max(budgets) + 1e-9:
            continue
        r = measure({n: opt for n in names})
        rows.append({"kind": "uniform", "config": opt.label, "bpw": bpw, **r.to_dict()})
        print(f"uniform {quantizer} {opt.label:16s} {bpw:.4f} bpw  {r.describe()}", flush=True)

    nll_of = {}
    for em in args.error_models.split(","):
        for b in budgets:
            p = plan_from_table(table, f"{b}bits", loaded, calib, error_model=em)
            r = measure(p.options_by_module())
            nll_of[em, b] = with_options(model, p.options_by_module(), lambda m: token_nll(m, windows), quantizer, importance)
            rows.append({"kind": f"plan-{em}", "config": f"{b}bits", "bpw": p.summary.storage_bits_per_weight,
                         "predicted_delta_nll": p.summary.predicted_delta_loss, **r.to_dict()})
            print(f"plan {em:6s} {b:5.2f}bits -> {p.summary.storage_bits_per_weight:.4f} bpw  "
                  f"predicted ΔNLL {p.summary.predicted_delta_loss:.4f}  measured ΔNLL {r.nll - base.nll:.4f}  {r.describe()}", flush=True)

    pairs = paired_rows(nll_of, budgets, args.error_models.split(","))
    report = summarize(rows, budgets, base, args.error_models.split(",")) + "\n\n" + pairs_table(pairs)
    print(report)
    result = {"reference": base.to_dict(), "rows": rows, "budgets": budgets, "profile_seconds": profile_s, "pairs": pairs,
              "calibration": calib.settings(), "quantizer": quantizer, "model": loaded.source, "content_hash": loaded.content_hash}
    atomic_write_text(out_dir / "quality.json", canonical_json(result))
    plot(rows, base, out_dir / "quality.png", args.error_models.split(","), quantizer)


def paired_rows(nll_of: dict, budgets: list[float], error_models: list[str]) -> list[dict]:
    """Per budget, each later error model's plan against the first one's: ΔNLL on the same tokens."""
    rows = []
    for em in error_models[1:]:
        for b in budgets:
            a, ref = nll_of[em, b], nll_of[error_models[0], b]
            per_window = (a - ref).mean(dim=1)
            delta, se_tokens = paired(a, ref)
            rows.append({"budget": b, "error_model": em, "against": error_models[0],
                         "delta_nll": delta, "se_tokens": se_tokens,
                         "se_windows": float(per_window.std() / per_window.numel() ** 0.5)})
    return rows


def pairs_table(pairs: list[dict]) -> str:
    lines = ["Same budget, same tokens: mean NLL of the plan − that of the first error model's plan "
             "(negative: better), ± paired standard error over tokens / over windows", "",
             "| budget | error model | against | ΔNLL | ± SE (tokens) | ± SE (windows) |", "|---|---|---|---|---|---|"]
    lines += [f"| {p['budget']:g} | {p['error_model']} | {p['against']} | {p['delta_nll']:+.4f} | {p['se_tokens']:.4f} | "
              f"{p['se_windows']:.4f} |" for p in pairs]
    return "\n".join(lines)


def best_uniform(rows: list[dict], budget: float) -> dict | None:
    fits = [r for r in rows if r["kind"] == "uniform" and r["bpw"] <= budget + 1e-9]
    return min(fits, key=lambda r: r["ppl"]) if fits else None


def summarize(rows: list[dict], budgets: list[float], base, error_models: list[str]) -> str:
    judged = DEFAULT_ERROR_MODEL if DEFAULT_ERROR_MODEL in error_models else error_models[0]  # the plan users get
    head = f"| budget | best uniform ≤ budget (bpw) | uniform ppl / KL / top-1 |" + "".join(
        f" plan[{em}] bpw | plan[{em}] ppl / KL / top-1 |" for em in error_models) + f" plan[{judged}] < uniform? |"
    lines = [f"SmolLM2-135M, wikitext-2 test, {base.windows}×{base.seq_len} tokens, reference ppl {base.ppl:.2f}", "",
             head, "|" + "---|" * (4 + 2 * len(error_models))]
    for b in budgets:
        u = best_uniform(rows, b)
        cells = [f"{b:g}", f"{u['config']} ({u['bpw']:.3f})" if u else "none",
                 f"{u['ppl']:.2f} / {u['kl']:.3f} / {u['top1']:.1%}" if u else "-"]
        for em in error_models:
            p = next(r for r in rows if r["kind"] == f"plan-{em}" and r["config"] == f"{b}bits")
            cells += [f"{p['bpw']:.3f}", f"{p['ppl']:.2f} / {p['kl']:.3f} / {p['top1']:.1%}"]
        plan = next(r for r in rows if r["kind"] == f"plan-{judged}" and r["config"] == f"{b}bits")
        cells.append("yes" if u and plan["ppl"] < u["ppl"] else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], base, path: Path, error_models: list[str], quantizer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["bpw"])
    ax.scatter([r["bpw"] for r in uni], [r["ppl"] for r in uni], marker="x", color="gray", label=f"uniform {quantizer} configs")
    for em, style in zip(error_models, ("o-", "s--", "^:")):
        pts = sorted((r for r in rows if r["kind"] == f"plan-{em}"), key=lambda r: r["bpw"])
        ax.plot([r["bpw"] for r in pts], [r["ppl"] for r in pts], style, label=f"bitalloc plan ({em} error model)")
    ax.axhline(base.ppl, color="black", lw=0.8, ls=":", label=f"unquantized ({base.ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("storage bits per planned weight (scales and zero-points included)")
    ax.set_ylabel(f"wikitext-2 test ppl ({base.windows}×{base.seq_len})")
    ax.set_title(f"SmolLM2-135M: mixed-precision plans vs uniform ({quantizer})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
