"""RTN vs GPTQ on SmolLM2, each plan made for the quantizer it is applied with.

    python bench/quantizers.py [--gguf PATH] [--budgets 3.5,4,4.5] [--calib-tokens 8192] [--windows 16]
    python bench/quantizers.py --quantizers rtn,rtn-w,gptq-minmax,gptq --uniform int4-g64-asym,int3-g64-asym,int4-ch-sym \
        --budgets 3.5,4 --calib-tokens 2048 --out-name quantizers-weighted.json

With --quantizers: for each quantizer q, every --uniform option applied to all planned modules with q,
then q's candidate table (timed, CPU and wall) and q's plan at each budget applied with q.

Calibrates on wiki.valid.tokens (random windows), evaluates on the first windows of wiki.test.raw
(never the same text). The layer statistics (H, output Fisher) are collected once from the
unquantized model; from them two candidate tables are built, one with RTN's ΔW and one with GPTQ's
(timed). For each budget: the RTN-table plan applied with RTN, the GPTQ-table plan applied with
sequential GPTQ, and the RTN-table plan applied with GPTQ (same quantizer, other allocation).
Prints a table and writes bench/out/quantizers.json (rewritten after every row).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import bitalloc
from bitalloc.api import plan_from_table, resolve_calibration
from bitalloc.apply import apply
from bitalloc.candidates import build_candidate_table
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import select_modules
from bitalloc.options import parse_option
from bitalloc.profile.statistics import collect_statistics

sys.path.insert(0, str(Path(__file__).parent))
from common import default_gguf, smollm2_arguments  # noqa: E402


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--budgets", default="3.5,4,4.5")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--grid", choices=("default", "asym"), default="default",
                    help="candidate options: bitalloc's default grid, or only its asymmetric INT options + keep (half the GPTQ table time)")
    ap.add_argument("--rows", default="rtn,gptq,cross",
                    help="which rows: rtn (rtn plan, rtn apply), gptq (gptq plan, gptq apply), cross (rtn plan, gptq apply)")
    ap.add_argument("--out-name", default="quantizers.json", help="JSON file name in --out")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only combine the rows of earlier runs (same model, calibration and reference) into --out-name")
    ap.add_argument("--cross", default=None, help="budgets at which the RTN plan is also applied with GPTQ (default: all)")
    ap.add_argument("--quantizers", default=None,
                    help="comma list (e.g. rtn,rtn-w,gptq-minmax,gptq): uniform rows and plan-and-apply rows per quantizer "
                         "instead of --rows")
    ap.add_argument("--uniform", default="int4-g64-asym,int3-g64-asym,int4-ch-sym",
                    help="options applied to every planned module (with --quantizers)")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",") if b]
    out_path = Path(args.out) / args.out_name
    if args.merge:
        return merge([Path(m) for m in args.merge], out_path)
    wanted = set(args.rows.split(","))
    if args.quantizers:
        return by_quantizer(args, budgets, out_path)

    loaded = bitalloc.load_model(args.gguf or default_gguf())
    model = loaded.model
    calib = resolve_calibration(args.calib, loaded, args.seq_len, args.calib_tokens, seed=0)
    names = select_modules(model)
    options = bitalloc.default_options(symmetric=(False,) if args.grid == "asym" else (False, True))
    t0, c0 = time.perf_counter(), time.process_time()
    stats = collect_statistics(model, names, calib, progress=True)
    timings = {"statistics_s": time.perf_counter() - t0, "statistics_cpu_s": time.process_time() - c0}
    tables = {}

    def build(q: str) -> None:
        # CPU time as well as wall time: on a shared machine the wall time says little.
        t0, c0 = time.perf_counter(), time.process_time()
        tables[q] = build_candidate_table(model, names, stats, options, progress=True, quantizer=q)
        timings[f"table_{q}_s"] = time.perf_counter() - t0
        timings[f"table_{q}_cpu_s"] = time.process_time() - c0
        print(f"{q} candidate table: {len(names)} modules x {len(options)} options in {timings[f'table_{q}_s']:.1f}s "
              f"wall, {timings[f'table_{q}_cpu_s']:.1f}s CPU", flush=True)

    if wanted & {"rtn", "cross"}:
        build("rtn")
    windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, args.seq_len, args.windows)
    reference = bitalloc.reference_logprobs(model, windows, progress=True)
    base = bitalloc.evaluate(reference, windows)
    print(f"reference ppl {base.ppl:.3f} on {windows.shape[0]}x{windows.shape[1]} tokens", flush=True)

    rows: list[dict] = []
    result = {"model": loaded.source, "content_hash": loaded.content_hash, "calibration": calib.settings(),
              "reference": base.to_dict(), "budgets": budgets, "timings": timings, "rows": rows,
              "options": [o.label for o in options]}

    def run(b: float, planned_for: str, applied_with: str) -> None:
        p = plan_from_table(tables[planned_for], f"{b}bits", loaded, calib)
        t0, c0 = time.perf_counter(), time.process_time()
        quantized = apply(copy.deepcopy(model), p, quantizer=applied_with, calibration=calib.tokens, progress=True)
        apply_s, apply_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        r = bitalloc.evaluate(quantized, windows, reference=reference)
        del quantized
        bits = Counter()
        for a in p.assignments:
            bits[a.option.bits if a.option.fmt != "keep" else 16] += a.shape[0] * a.shape[1]
        n = p.summary.planned_weights
        rows.append({"budget": b, "planned_for": planned_for, "applied_with": applied_with,
                     "bpw": p.summary.storage_bits_per_weight, "predicted_delta_nll": p.summary.predicted_delta_loss,
                     "measured_delta_nll": r.nll - base.nll, "apply_s": apply_s, "apply_cpu_s": apply_cpu_s,
                     "weight_share_by_bits": {str(k): round(v / n, 4) for k, v in sorted(bits.items())}, **r.to_dict()})
        print(f"{b:g}bits plan[{planned_for}] applied with {applied_with}: {p.summary.storage_bits_per_weight:.4f} bpw, "
              f"predicted ΔNLL {p.summary.predicted_delta_loss:.4f}, measured ΔNLL {r.nll - base.nll:.4f}, "
              f"{r.describe()}, apply {apply_s:.1f}s wall / {apply_cpu_s:.1f}s CPU", flush=True)
        atomic_write_text(out_path, canonical_json(result))

    # Cheapest first, so a cut-short run still has whole rows: RTN, then the GPTQ table and GPTQ
    # plans, then GPTQ applied to the RTN plans.
    for b in budgets if "rtn" in wanted else []:
        run(b, "rtn", "rtn")
    if "gptq" in wanted:
        build("gptq")
    stats.clear()  # free the Hessians before the GPTQ applies
    atomic_write_text(out_path, canonical_json(result))
    for b in budgets if "gptq" in wanted else []:
        run(b, "gptq", "gptq")
    for b in (budgets if args.cross is None else [float(x) for x in args.cross.split(",")]) if "cross" in wanted else []:
        run(b, "rtn", "gptq")
    print(summarize(rows, budgets, base, timings))


def merge(paths: list[Path], out_path: Path) -> None:
    """One result from runs of different --rows: they must share model, calibration and reference."""
    docs = [json.loads(p.read_text()) for p in paths]
    first = docs[0]
    for d in docs[1:]:
        for key in ("content_hash", "calibration", "reference", "options"):
            if d[key] != first[key]:
                raise SystemExit(f"cannot merge: the runs differ in {key}")
    merged = {**first, "rows": [r for d in docs for r in d["rows"]],
              "timings": {k: v for d in docs for k, v in d["timings"].items() if k.startswith("table_")} |
              {"statistics_s": first["timings"]["statistics_s"], "statistics_cpu_s": first["timings"]["statistics_cpu_s"]},
              "merged_from": [p.name for p in paths]}
    atomic_write_text(out_path, canonical_json(merged))
    base = bitalloc.EvalResult(**merged["reference"])
    print(summarize(merged["rows"], merged["budgets"], base, merged["timings"]))


def summarize(rows: list[dict], budgets: list[float], base, timings: dict) -> str:
    kinds = (("rtn", "rtn"), ("gptq", "gptq"), ("rtn", "gptq"))
    head = "| budget | " + " | ".join(f"plan[{p}] → {a}: bpw, ppl / KL / top-1" for p, a in kinds) + " |"
    lines = [f"SmolLM2-135M, wikitext-2 test, {base.windows}×{base.seq_len} tokens, reference ppl {base.ppl:.2f}; "
             "candidate tables (CPU s): " + ", ".join(f"{q} {timings[f'table_{q}_cpu_s']:.0f}" for q in ("rtn", "gptq")
                                                  if f"table_{q}_cpu_s" in timings), "",
             head, "|---|" + "---|" * len(kinds)]
    for b in budgets:
        cells = [f"{b:g}"]
        for p, a in kinds:
            r = next((x for x in rows if x["budget"] == b and x["planned_for"] == p and x["applied_with"] == a), None)
            cells.append(f"{r['bpw']:.3f}: {r['ppl']:.2f} / {r['kl']:.3f} / {r['top1']:.1%}" if r else "not run")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_quantizer(args, budgets: list[float], out_path: Path) -> None:
    """Uniform options and plans, each quantizer planning for itself and applied with itself."""
    from bitalloc.quantizers.materialize import quantize_model

    quantizers = args.quantizers.split(",")
    uniform = [parse_option(u) for u in args.uniform.split(",") if u]
    loaded = bitalloc.load_model(args.gguf or default_gguf())
    model = loaded.model
    calib = resolve_calibration(args.calib, loaded, args.seq_len, args.calib_tokens, seed=0)
    names = select_modules(model)
    options = bitalloc.default_options(symmetric=(False,) if args.grid == "asym" else (False, True))
    windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, args.seq_len, args.windows)
    reference = bitalloc.reference_logprobs(model, windows, progress=True)
    base = bitalloc.evaluate(reference, windows)
    print(f"reference ppl {base.ppl:.3f} on {windows.shape[0]}x{windows.shape[1]} tokens", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    stats = collect_statistics(model, names, calib, progress=True)
    timings = {"statistics_s": time.perf_counter() - t0, "statistics_cpu_s": time.process_time() - c0}
    rows: list[dict] = []
    result = {"model": loaded.source, "content_hash": loaded.content_hash, "calibration": calib.settings(),
              "reference": base.to_dict(), "budgets": budgets, "timings": timings, "rows": rows,
              "options": [o.label for o in options], "quantizers": quantizers, "uniform": [o.label for o in uniform],
              "threads": torch.get_num_threads()}

    def score(quantized, row: dict) -> None:
        r = bitalloc.evaluate(quantized, windows, reference=reference)
        row.update(measured_delta_nll=r.nll - base.nll, **r.to_dict())
        rows.append(row)
        atomic_write_text(out_path, canonical_json(result))
        print(f"{row}", flush=True)

    # Uniform rows first (one quantization each), then per quantizer its candidate table and plans,
    # so a run cut short still has whole rows.
    for q in quantizers:
        for o in uniform:
            t0, c0 = time.perf_counter(), time.process_time()
            quantized = copy.deepcopy(model)
            quantize_model(quantized, {n: o for n in names}, q, calibration=calib.tokens)
            score(quantized, {"kind": "uniform", "option": o.label, "quantizer": q, "apply_s": time.perf_counter() - t0,
                              "apply_cpu_s": time.process_time() - c0,
                              "bpw": o.bits_per_weight(model.get_submodule(names[0]).weight.shape[1])})
            del quantized
    for q in quantizers if budgets else []:
        # CPU time as well as wall time: on a shared machine the wall time says little.
        t0, c0 = time.perf_counter(), time.process_time()
        table = build_candidate_table(model, names, stats, options, progress=True, quantizer=q)
        timings[f"table_{q}_s"], timings[f"table_{q}_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        atomic_write_text(out_path, canonical_json(result))
        print(f"{q} candidate table: {timings[f'table_{q}_cpu_s']:.1f}s CPU, {timings[f'table_{q}_s']:.1f}s wall", flush=True)
        for b in budgets:
            p = plan_from_table(table, f"{b}bits", loaded, calib)
            t0, c0 = time.perf_counter(), time.process_time()
            quantized = apply(copy.deepcopy(model), p, quantizer=q, calibration=calib.tokens)
            score(quantized, {"kind": "plan", "budget": b, "quantizer": q, "bpw": p.summary.storage_bits_per_weight,
                              "predicted_delta_nll": p.summary.predicted_delta_loss, "apply_s": time.perf_counter() - t0,
                              "apply_cpu_s": time.process_time() - c0})
            del quantized
    print(summarize_quantizers(result))


def summarize_quantizers(result: dict) -> str:
    """Markdown tables: ppl / KL per uniform option and per budget, one column per quantizer."""
    rows, qs, base = result["rows"], result["quantizers"], result["reference"]
    t = result["timings"]
    prof = {q: t["statistics_cpu_s"] + t[f"table_{q}_cpu_s"] for q in qs if f"table_{q}_cpu_s" in t}
    lines = [f"reference ppl {base['ppl']:.2f} ({base['windows']}x{base['seq_len']} tokens of wiki.test.raw); "
             f"profile CPU s (statistics + table): " + ", ".join(f"{q} {v:.0f}" for q, v in prof.items()), "",
             "| rows | " + " | ".join(f"{q}: ppl / KL" for q in qs) + " |", "|---|" + "---|" * len(qs)]

    def cell(pred) -> str:
        r = next((x for x in rows if pred(x)), None)
        return f"{r['ppl']:.2f} / {r['kl']:.3f}" if r else "not run"

    for o in result["uniform"]:
        lines.append(f"| uniform {o} | " + " | ".join(cell(lambda x, q=q: x["kind"] == "uniform" and x["option"] == o
                                                             and x["quantizer"] == q) for q in qs) + " |")
    for b in result["budgets"]:
        lines.append(f"| plan {b:g} bits | " + " | ".join(cell(lambda x, q=q: x["kind"] == "plan" and x["budget"] == b
                                                              and x["quantizer"] == q) for q in qs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
