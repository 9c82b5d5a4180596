"""GPTQ's error over awq's, option by option and weight by weight: what a table of awq's errors misses about GPTQ.

    python bench/gptq_ratio.py [--gguf G --f32 G --bos] [--every 3] --out bench/out/gptq-ratio
    python bench/gptq_ratio.py ... --variants "4.3125,fisher-tw" [--dry]

awq-gptq's candidate table holds awq's errors (rtn-w on the equalized model; quantizers.measuring_quantizer), and
its plans are applied with GPTQ. On the same equalized model and calibration statistics as that table, this
computes the table's numbers (candidates.option_errors) for rtn-w and for GPTQ (act-order, as a profile on supplied
text runs it) at every option of every weight in every --every-th block, and prints GPTQ / awq in the `local`
error (Σ diag ΔW H ΔWᵀ): per option, the median and quartiles over weights; how far an option's ratio strays from its
weight's ratio at --ref; and per module kind. If the ratio were one number per option family, a table of awq's errors
would rank plans as GPTQ's own table does.

--variants: each variant (bench/plan_variants.py's syntax) is also solved from awq's table with every weight's row
scaled by that weight's ratio at --ref (every weight measured; each error model's column by the `local` ratio),
applied with awq-gptq and scored on the test windows as plan_variants.py scores (rows appended to
OUT/plan_variants.jsonl). --dry: solve only and print the plans' types, beside the unscaled table's.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from bitalloc.apply import apply
from bitalloc.candidates import ERROR_MODELS, option_errors
from bitalloc.evaluate import evaluate
from bitalloc.io import atomic_write_text
from bitalloc.models import weight_matrix
from bitalloc.options import parse_option
from bitalloc.profile.interactions import block_index
from bitalloc.profile.statistics import collect_statistics
from bitalloc.progress import steps

sys.path.insert(0, str(Path(__file__).parent))
from plan_variants import load_table, parse_variants, scoring_reference, solve_variant, variant_arguments  # noqa: E402

LOCAL = ERROR_MODELS.index("local")  # Σ diag ΔW H ΔWᵀ in option_errors' tuples


def ratios(model, stats, names, options_of) -> dict[str, dict[str, float]]:
    """{weight: {option label: GPTQ's local error / rtn-w's}} for the INT options options_of(weight) gives that fit."""
    out = {}
    for name in steps(names, "GPTQ against rtn-w", show=True, unit="module"):
        w = weight_matrix(model.get_submodule(name))
        options = [o for o in options_of(name) if o.fits(w.shape[1]) and o.fmt == "int"]
        awq = option_errors(w, options, stats[name], "rtn-w")
        gptq = option_errors(w, options, stats[name], "gptq")
        out[name] = {o.label: g[LOCAL] / a[LOCAL] for o, a, g in zip(options, awq, gptq) if a[LOCAL] > 0}
    return out


def print_summary(by_weight: dict[str, dict[str, float]], ref: str) -> dict:
    per_option = defaultdict(list)
    strays = []
    for name, row in by_weight.items():
        for label, r in row.items():
            per_option[label].append(r)
            if ref in row and not parse_option(label).per_channel:
                strays.append(r / row[ref])
    print(f"{'option':<16} {'weights':>7} {'median':>7} {'q25':>6} {'q75':>6}")
    summary = {}
    for label, values in sorted(per_option.items(), key=lambda kv: np.median(kv[1])):
        q25, q50, q75 = np.quantile(values, [0.25, 0.5, 0.75])
        summary[label] = {"weights": len(values), "median": q50, "q25": q25, "q75": q75}
        print(f"{label:<16} {len(values):>7} {q50:>7.3f} {q25:>6.3f} {q75:>6.3f}")
    q10, q50, q90 = np.quantile(strays, [0.1, 0.5, 0.9])
    print(f"\na grouped option's ratio over its weight's at {ref}: 10th {q10:.3f}, median {q50:.3f}, 90th {q90:.3f}")
    kinds = defaultdict(list)
    for name, row in by_weight.items():
        if ref in row:
            kinds[name.rsplit(".", 1)[-1]].append(row[ref])
    print(f"\nat {ref}, per module kind: median (min - max)")
    for kind, values in kinds.items():
        print(f"  {kind:<10} {np.median(values):.3f} ({min(values):.3f} - {max(values):.3f})")
    return {"per_option": summary, "stray_q10_q50_q90": [q10, q50, q90],
            "per_kind": {k: {"median": float(np.median(v)), "min": min(v), "max": max(v)} for k, v in kinds.items()}}


def main() -> None:
    ap = variant_arguments(__doc__, variants_required=False)
    ap.set_defaults(quantizer="awq")
    ap.add_argument("--every", type=int, default=3, help="measure every option in every EVERY-th block (from block 1)")
    ap.add_argument("--ref", default="int4-g64-asym", help="the option whose ratio stands for its weight's")
    ap.add_argument("--dry", action="store_true", help="with --variants: solve and print the plans, apply nothing")
    args = ap.parse_args()
    if args.quantizer != "awq":
        sys.exit("error: this bench compares GPTQ with awq's table; leave --quantizer at awq")
    variants = parse_variants(args.variants) if args.variants else []
    stem, loaded, profiled, table, calib, windows = load_table(args)
    model = profiled.model  # equalized: the model awq's table was measured on
    blocks = {g: block_index(model, g) for g in table.groups}
    names = [g for g in table.groups if blocks[g] is not None]
    stats = collect_statistics(model, names, calib, progress=True)
    sampled = [n for n in names if blocks[n] % args.every == 1]
    ref = parse_option(args.ref)
    start = time.time()
    by_weight = ratios(model, stats, names, lambda n: table.options if n in sampled else [ref])
    seconds = time.time() - start
    summary = print_summary({n: by_weight[n] for n in sampled}, args.ref)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.json", json.dumps({"model": stem, "every": args.every, "ref": args.ref,
                                                        "seconds": round(seconds, 1), **summary,
                                                        "by_weight": by_weight}, indent=1) + "\n")
    if not args.variants:
        return
    scale = np.array([by_weight.get(g, {}).get(args.ref, 1.0) for g in table.groups])[:, None]
    scaled = copy.copy(table)
    scaled.errors = {m: e * scale for m, e in table.errors.items()}
    reference = None if args.dry else scoring_reference(loaded.model, windows)
    for variant in variants:
        for label, candidates in [("awq", table)] * args.dry + [("scaled", scaled)]:
            plan = solve_variant(variant, candidates, profiled, calib, "awq-gptq")
            types = dict(sorted(Counter(a.label for a in plan.assignments).items()))
            print(f"{label:<7} {variant}: {plan.summary.storage_bits_per_weight:.4f} bpw {types}", flush=True)
            if args.dry:
                continue
            start = time.time()
            result = evaluate(apply(copy.deepcopy(model), plan, calibration=calib, quantizer="awq-gptq"), windows,
                              reference=reference)
            row = {"model": stem, "table": "awq, rows scaled by GPTQ's ratio", "ref": args.ref, "variant": variant,
                   "apply_quantizer": "awq-gptq", "bpw": plan.summary.storage_bits_per_weight, "ppl": result.ppl,
                   "kl": result.kl, "types": types, "seconds": round(time.time() - start, 1)}
            with open(out / "plan_variants.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{variant:<24} {row['bpw']:.4f} bpw  ppl {result.ppl:.3f}  KL {result.kl:.4f}", flush=True)


if __name__ == "__main__":
    main()
