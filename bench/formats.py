"""Number formats on SmolLM2: plans over INT-only candidates vs INT + FP8 + MXFP4 + NVFP4 candidates.

    python bench/formats.py [--gguf PATH] [--budgets 4.25,4.5,5,6,8.25] [--windows 16] [--quantizer rtn]
    python bench/formats.py --gguf "$(bash bench/fetch_gemma3.sh)" --bos --out bench/out/formats-gemma3   # second family

Calibrates on the validation split, evaluates on the test split (as bench/quality.py). Profiles
once with the mixed candidate set; the INT-only table is its INT + keep columns, so both plans
are scored by the same statistics. For each budget: the plan over (a) INT2–8 + keep and (b) INT2–8
+ FP8 (E4M3/E5M2, per tensor/channel/group) + MXFP4 + NVFP4 + keep; plus uniform MXFP4, NVFP4,
FP8-per-channel and a few uniform INT configurations for reference. One quantizer (--quantizer; default
bitalloc's for the mixed grid, rtn-w) makes the table and quantizes every row. Prints a table, writes
bench/out/formats.json and bench/out/formats.png.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

import bitalloc
from bitalloc.api import plan_from_table, profile, resolve_calibration
from bitalloc.calibration import leading_bos
from bitalloc.candidates import CandidateTable
from bitalloc.config import default_error_model
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import select_modules
from bitalloc.options import default_options, parse_option

sys.path.insert(0, str(Path(__file__).parent))
from common import add_quantizer_argument, bench_quantizer, default_gguf, importances, smollm2_arguments, with_options  # noqa: E402

MIXED = ("int", "fp8", "mxfp4", "nvfp4", "keep")
CANDIDATE_SETS = {"int+keep": ("int", "keep"), "int+fp8+mxfp4+nvfp4+keep": MIXED}
UNIFORM = ("mxfp4", "nvfp4", "fp8e4m3-ch", "fp8e4m3-tensor", "int4-g32-sym", "int4-g64-asym", "int8-ch-sym")


def subtable(table: CandidateTable, families: tuple[str, ...]) -> CandidateTable:
    """The columns of `table` whose options belong to `families`."""
    keep = [k for k, o in enumerate(table.options) if o.family in families]
    return CandidateTable(groups=table.groups, shapes=table.shapes, options=[table.options[k] for k in keep],
                          storage_bits=table.storage_bits[:, keep],
                          errors={m: e[:, keep] for m, e in table.errors.items()})


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--budgets", default="4.25,4.5,5,6,8.25")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    add_quantizer_argument(ap)
    ap.add_argument("--uniform", default=",".join(UNIFORM), help="uniform rows (option labels)")
    ap.add_argument("--bos", action="store_true", help="score windows that start with the tokenizer's BOS (Gemma; peers.py --bos)")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    out_dir = Path(args.out)

    loaded = bitalloc.load_model(args.gguf or default_gguf())
    model = loaded.model
    calib = resolve_calibration(args.calib, loaded, args.seq_len, args.calib_tokens, seed=0)
    names = select_modules(model)
    options = default_options(formats=MIXED)
    quantizer = bench_quantizer(args.quantizer, options)
    t0 = time.perf_counter()
    full = profile(loaded, calib, names, options, cache_dir=bitalloc.api.default_cache_dir(), progress=True,
                   quantizer=quantizer)
    profile_s = time.perf_counter() - t0
    importance = importances(model, names, calib, quantizer)
    error_model = default_error_model(options)  # the one plan_from_table solves under
    bos = leading_bos(loaded.tokenizer) if args.bos else None
    windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, args.seq_len, args.windows,
                                          bos=bos)
    model_name = Path(loaded.source).stem
    reference = bitalloc.reference_logprobs(model, windows, progress=True)
    base = bitalloc.evaluate(reference, windows)
    print(f"reference ppl {base.ppl:.3f} on {windows.shape[0]}x{windows.shape[1]} tokens; profile "
          f"({len(full.options)} options x {len(names)} modules) {profile_s:.1f}s", flush=True)

    def measure(assign: dict) -> bitalloc.EvalResult:
        return with_options(model, assign, lambda m: bitalloc.evaluate(m, windows, reference=reference), quantizer, importance)

    rows = []
    n_weights = full.num_weights
    for label in args.uniform.split(","):
        opt = parse_option(label)
        k = full.option_index(opt)
        bpw = float(full.storage_bits[:, k].sum()) / n_weights
        r = measure({n: opt for n in names})
        rows.append({"kind": "uniform", "candidates": label, "budget": None, "bpw": bpw,
                     "predicted_delta_nll": float(np.nansum(full.errors[error_model][:, k])),
                     "formats": {opt.family: len(names)}, "labels": {label: len(names)}, **r.to_dict()})
        print(f"uniform {label:16s} {bpw:.4f} bpw  {r.describe()}", flush=True)

    for set_name, families in CANDIDATE_SETS.items():
        table = subtable(full, families)
        for b in budgets:
            p = plan_from_table(table, f"{b}bits", loaded, calib)
            assign = p.options_by_module()
            r = measure(assign)
            weights = Counter()
            for a in p.assignments:
                weights[a.option.family] += a.shape[0] * a.shape[1]
            rows.append({"kind": "plan", "candidates": set_name, "budget": b, "bpw": p.summary.storage_bits_per_weight,
                         "predicted_delta_nll": p.summary.predicted_delta_loss,
                         "formats": dict(Counter(o.family for o in assign.values())),
                         "format_weight_share": {f: w / n_weights for f, w in weights.items()},
                         "labels": dict(Counter(o.label for o in assign.values())), **r.to_dict()})
            print(f"plan {set_name:26s} {b:5.2f}bits -> {p.summary.storage_bits_per_weight:.4f} bpw  "
                  f"{format_counts(rows[-1]['formats'])}  {r.describe()}", flush=True)

    report = summarize(rows, base, model_name)
    print(report)
    result = {"reference": base.to_dict(), "bos": bos, "rows": rows, "budgets": budgets, "profile_seconds": profile_s,
              "candidate_sets": {k: list(v) for k, v in CANDIDATE_SETS.items()},
              "calibration": calib.settings(), "quantizer": quantizer, "error_model": error_model, "model": loaded.source,
              "content_hash": loaded.content_hash}
    atomic_write_text(out_dir / "formats.json", canonical_json(result))
    plot(rows, base, out_dir / "formats.png", model_name)


def format_counts(counts: dict) -> str:
    """'int:150 mxfp4:50 ...' — modules per format family, most used first."""
    return " ".join(f"{f}:{n}" for f, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(rows: list[dict], base, model_name: str) -> str:
    lines = [f"{model_name}, wikitext-2 test, {base.windows}×{base.seq_len} tokens, reference ppl {base.ppl:.2f}", "",
             "| budget (bpw) | candidates | storage bpw | ppl | KL / top-1 | formats used (modules per family) | distinct options |",
             "|---|---|---|---|---|---|---|"]
    order = list(CANDIDATE_SETS)
    for r in sorted(rows, key=lambda r: (r["kind"] != "plan", r["budget"] or 0,
                                         order.index(r["candidates"]) if r["kind"] == "plan" else r["bpw"])):
        budget = f"{r['budget']:g}" if r["budget"] is not None else "uniform"
        lines.append(f"| {budget} | {r['candidates']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {r['kl']:.3f} / {r['top1']:.1%} | "
                     f"{format_counts(r['formats'])} | {len(r['labels'])} |")
    return "\n".join(lines)


def plot(rows: list[dict], base, path: Path, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for (name, _), style in zip(CANDIDATE_SETS.items(), ("o-", "s--")):
        pts = sorted((r for r in rows if r["kind"] == "plan" and r["candidates"] == name), key=lambda r: r["bpw"])
        ax.plot([r["bpw"] for r in pts], [r["ppl"] for r in pts], style, label=f"bitalloc plan over {name}")
    for r in (r for r in rows if r["kind"] == "uniform"):
        ax.scatter([r["bpw"]], [r["ppl"]], marker="x", color="gray")
        ax.annotate(r["candidates"], (r["bpw"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(base.ppl, color="black", lw=0.8, ls=":", label=f"unquantized ({base.ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("storage bits per planned weight (all scales included)")
    ax.set_ylabel(f"wikitext-2 test ppl ({base.windows}×{base.seq_len})")
    ax.set_title(f"{model_name}: INT-only vs mixed INT/FP8/MXFP4/NVFP4 plans (x: uniform formats)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
