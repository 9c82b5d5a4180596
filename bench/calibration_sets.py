"""Which calibration text: WikiText-2 validation vs the built-in set vs `self` (data-free), on SmolLM2.

    OMP_NUM_THREADS=1 python bench/calibration_sets.py [--gguf PATH] [--sets wikitext,builtin,self]
        [--budgets 3.5,4.5] [--quantizer rtn] [--windows 16] [--cache-dir DIR]

For each calibration set the model is profiled once (the default option grid, --calib-tokens random
windows of --seq-len, seed 0; the candidate table is cached in --cache-dir, so the budgets reuse it)
and planned at each budget exactly as `bitalloc plan MODEL --budget Bbits [--calib ...] --quantizer Q`
plans (default ties, ilp, fisher). Every plan is then scored as `bitalloc eval MODEL --text
wiki.test.raw --plan p.json --windows 16 --seq-len 512` scores it (applied with its quantizer to a
copy of the model; ppl, KL and top-1 against the unquantized model on the first windows of the test
split), and the unquantized ppl once. Sets: wikitext = --calib (wiki.valid.tokens), builtin = no
--calib (builtin:austen), self = --calib self.
Prints a markdown table and writes bench/out/calibration_sets.json and .md (rewritten after every set).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import bitalloc
from bitalloc.api import context_of, prepare_profile, resolve_calibration, solve
from bitalloc.apply import apply
from bitalloc.config import CalibrationSpec, ProfileConfig, SolveConfig
from bitalloc.evaluate import evaluate, evaluation_windows, reference_logprobs
from bitalloc.io import atomic_write_text, canonical_json

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, default_gguf, smollm2_arguments  # noqa: E402

SETS = ("wikitext", "builtin", "self")


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--sets", default=",".join(SETS), help="calibration sets, comma list of wikitext, builtin, self")
    ap.add_argument("--budgets", default="3.5,4.5", help="bits per planned weight")
    ap.add_argument("--quantizer", default="rtn", help="quantizer the plans are made for and applied with")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--cache-dir", default=os.environ.get("BITALLOC_CACHE_DIR") or str(ROOT / ".cache-bench"),
                    help="profile cache of this bench (default $BITALLOC_CACHE_DIR, else .cache-bench/)")
    args = ap.parse_args()
    sets = args.sets.split(",")
    if unknown := [s for s in sets if s not in SETS]:
        ap.error(f"unknown set(s) {unknown}; choose from {', '.join(SETS)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    out_dir, cache = Path(args.out), Path(args.cache_dir)
    sources = {"wikitext": args.calib, "builtin": None, "self": "self"}

    loaded = bitalloc.load_model(args.gguf or default_gguf())
    model = loaded.model
    windows = evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, args.seq_len, args.windows)
    reference = reference_logprobs(model, windows, progress=True)
    base = evaluate(reference, windows)  # the unquantized model, from the log-probs already computed
    print(f"unquantized ppl {base.ppl:.3f} on {windows.shape[0]}x{windows.shape[1]} tokens of {Path(args.text).name}; "
          f"torch threads {torch.get_num_threads()}; cache {cache}", flush=True)
    fingerprint = _weights_sum(model)

    result = {"model": loaded.source, "content_hash": loaded.content_hash, "quantizer": args.quantizer,
              "eval": {"text": Path(args.text).name, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1])},
              "reference": base.to_dict(), "torch_threads": torch.get_num_threads(), "sets": [], "rows": []}
    by_set: dict[str, dict[float, dict]] = {}
    for name in sets:
        load_before = os.getloadavg()
        cached_before = set(cache.glob("table-*.npz")) if cache.is_dir() else set()
        t0 = time.perf_counter()
        calib = resolve_calibration(sources[name], loaded, args.seq_len, args.calib_tokens, seed=0)
        calib_s = time.perf_counter() - t0
        config = ProfileConfig(calibration=CalibrationSpec(source=calib, seq_len=args.seq_len, tokens=args.calib_tokens),
                               quantizer=args.quantizer)
        table, loaded, calib = prepare_profile(loaded, config, cache_dir=cache, progress=True)
        profile_s = time.perf_counter() - t0
        from_cache = not (set(cache.glob("table-*.npz")) - cached_before)
        if _weights_sum(model) != fingerprint:
            raise RuntimeError("profiling changed the model's weights")
        entry = {"set": name, "calibration": calib.settings(), "calibration_s": calib_s, "profile_s": profile_s,
                 "table_from_cache": from_cache, "load_average_before": list(load_before),
                 "load_average_after": list(os.getloadavg())}
        result["sets"].append(entry)
        print(f"[{name}] {calib.settings().get('source')}: calibration {calib_s:.1f}s, profile (incl. calibration) "
              f"{profile_s:.1f}s{' (table from cache)' if from_cache else ''}; load {load_before[0]:.1f} -> "
              f"{entry['load_average_after'][0]:.1f}", flush=True)
        context = context_of(loaded, calib)
        for b in budgets:
            plan = solve(table, context, SolveConfig(budget=f"{b}bits"))
            scored = apply(copy.deepcopy(model), plan, quantizer=args.quantizer)
            r = evaluate(scored, windows, reference=reference)
            del scored
            s = plan.summary
            labels = {a.module: a.label for a in plan.assignments}
            mix = Counter()
            for a in plan.assignments:
                mix[a.label] += a.shape[0] * a.shape[1]
            row = {"set": name, "budget_bits": b, "quantizer": plan.quantizer, "bpw": s.storage_bits_per_weight,
                   "predicted_delta_nll": s.predicted_delta_loss, "delta_nll": r.nll - base.nll, **r.to_dict(),
                   "weight_share_by_option": {k: round(v / s.planned_weights, 4) for k, v in sorted(mix.items())},
                   "labels": labels}
            if "wikitext" in by_set and b in by_set["wikitext"]:
                ref = by_set["wikitext"][b]["labels"]
                row["same_option_as_wikitext"] = sum(labels[m] == ref[m] for m in labels) / len(labels)
            by_set.setdefault(name, {})[b] = row
            result["rows"].append(row)
            print(f"[{name}] {b:g}bits -> {s.storage_bits_per_weight:.4f} bpw, predicted ΔNLL {s.predicted_delta_loss:.4g}, "
                  f"measured ΔNLL {r.nll - base.nll:.4f}; {r.describe()}", flush=True)
        _save(result, out_dir)
    print(_markdown(result))
    print(f"wrote {out_dir / 'calibration_sets.json'} and .md")


def _weights_sum(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


def _markdown(result: dict) -> str:
    ref, ev = result["reference"], result["eval"]
    lines = [f"SmolLM2-135M, plans with --quantizer {result['quantizer']}, scored on {ev['text']} "
             f"({ev['windows']}×{ev['seq_len']} tokens); unquantized ppl {ref['ppl']:.2f}", "",
             "| calibration set | profile wall s | budget | storage bpw | predicted ΔNLL | ppl | KL | top-1 | same option as WikiText plan |",
             "|---|---|---|---|---|---|---|---|---|"]
    prof = {e["set"]: e for e in result["sets"]}
    for r in result["rows"]:
        e = prof[r["set"]]
        secs = f"{e['profile_s']:.0f}" + (" (cached)" if e["table_from_cache"] else "")
        same = f"{r['same_option_as_wikitext']:.0%}" if "same_option_as_wikitext" in r else "–"
        lines.append(f"| {e['calibration'].get('source')} | {secs} | {r['budget_bits']:g} | {r['bpw']:.3f} | "
                     f"{r['predicted_delta_nll']:.3f} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.1%} | {same} |")
    return "\n".join(lines)


def _save(result: dict, out_dir: Path) -> None:
    atomic_write_text(out_dir / "calibration_sets.json", canonical_json(result))
    atomic_write_text(out_dir / "calibration_sets.md", _markdown(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
