"""SmolLM2: does an evolutionary search on the true loss beat the exact ILP plan of the predicted loss?

    python bench/evolutionary.py [--gguf PATH] [--budget 4.0] [--trials 60] [--score-windows 4] [--quantizer rtn]

Both plans come from one candidate table (profiled on --calib-tokens of WikiText-2 validation,
cached; --quantizer makes it and quantizes every trial and row, default bitalloc's, rtn-w). The ILP
plan is optimal for the table's additive predicted ΔNLL. The evolutionary search starts from it and
scores each trial by the measured mean NLL on the first --score-windows calibration windows
(validation text, never the test text). Both plans are
then measured on WikiText-2 test (perplexity, KL and top-1 against the unquantized model, as in
bench/quality.py), and on the scoring slice itself, to show how much of a gain carries over.
Prints a table, writes bench/out/evolutionary.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import bitalloc
from bitalloc.api import plan_from_table, profile, resolve_calibration
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import select_modules
from bitalloc.objective import mean_nll

sys.path.insert(0, str(Path(__file__).parent))
from common import add_quantizer_argument, bench_quantizer, default_gguf, importances, smollm2_arguments, with_options  # noqa: E402


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--budget", type=float, default=4.0, help="storage bits per weight")
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--radius", type=int, default=2)
    ap.add_argument("--score-windows", type=int, default=4, help="calibration windows each trial is scored on")
    ap.add_argument("--windows", type=int, default=16, help="test windows")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    add_quantizer_argument(ap)
    args = ap.parse_args()

    gguf = args.gguf or default_gguf()
    loaded = bitalloc.load_model(gguf)
    model = loaded.model
    calib = resolve_calibration(args.calib, loaded, args.seq_len, args.calib_tokens, seed=0)
    names = select_modules(model)
    options = bitalloc.default_options()
    quantizer = bench_quantizer(args.quantizer, options)
    table = profile(loaded, calib, names, options, cache_dir=bitalloc.api.default_cache_dir(), progress=True,
                    quantizer=quantizer)
    importance = importances(model, names, calib, quantizer)
    windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, args.seq_len, args.windows)
    reference = bitalloc.reference_logprobs(model, windows, progress=True)
    base = bitalloc.evaluate(reference, windows)
    slice_ = calib.tokens[: args.score_windows]
    budget = f"{args.budget}bits"

    t0 = time.perf_counter()
    ilp = plan_from_table(table, budget, loaded, calib, solver="ilp", seed=args.seed)
    ilp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evo = plan_from_table(table, budget, loaded, calib, solver="evolutionary", seed=args.seed, score_windows=args.score_windows,
                          solver_settings={"trials": args.trials, "population": args.population, "radius": args.radius,
                                           "seed": args.seed, "warm_start": "ilp"})
    evo_s = time.perf_counter() - t0

    rows = []
    for name, plan, seconds in (("ilp", ilp, ilp_s), ("evolutionary", evo, evo_s)):
        assign = plan.options_by_module()
        test = with_options(model, assign, lambda m: bitalloc.evaluate(m, windows, reference=reference), quantizer, importance)
        calib_nll = with_options(model, assign, lambda m: mean_nll(m, slice_), quantizer, importance)
        changed = sum(a.label != b.label for a, b in zip(plan.assignments, ilp.assignments))
        rows.append({"solver": name, "seconds": seconds, "bpw": plan.summary.storage_bits_per_weight,
                     "predicted_delta_nll": plan.summary.predicted_delta_loss, "score_slice_nll": calib_nll,
                     "modules_changed_vs_ilp": changed, "details": plan.solver.details, **test.to_dict()})
        print(f"{name:12s} {seconds:7.1f}s  bpw {plan.summary.storage_bits_per_weight:.4f}  predicted ΔNLL "
              f"{plan.summary.predicted_delta_loss:.4f}  scoring-slice NLL {calib_nll:.4f}  test {test.describe()}  "
              f"({changed} modules differ from ilp)", flush=True)
    report = summarize(rows, base, args, slice_.shape)
    print(report)
    result = {"reference": base.to_dict(), "rows": rows, "budget": budget, "trials": args.trials,
              "population": args.population, "radius": args.radius, "score_slice": list(slice_.shape),
              "calibration": calib.settings(), "quantizer": quantizer, "model": loaded.source,
              "content_hash": loaded.content_hash, "table": report}
    atomic_write_text(Path(args.out) / "evolutionary.json", canonical_json(result))


def summarize(rows, base, args, slice_shape) -> str:
    lines = [f"SmolLM2-135M at {args.budget} bits/weight; test: WikiText-2 test {base.windows}x{base.seq_len} tokens "
             f"(unquantized ppl {base.ppl:.2f}); evolutionary: {args.trials} trials scored on "
             f"{slice_shape[0]}x{slice_shape[1]} validation tokens", "",
             "| solver | seconds | storage bpw | predicted ΔNLL | scoring-slice NLL | test ppl | test KL | test top-1 | modules ≠ ilp |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['solver']} | {r['seconds']:.1f} | {r['bpw']:.4f} | {r['predicted_delta_nll']:.4f} | "
                     f"{r['score_slice_nll']:.4f} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['top1']:.1%} | {r['modules_changed_vs_ilp']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
