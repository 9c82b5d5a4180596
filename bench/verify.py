"""Plans verified against measured loss on SmolLM2: predicted vs measured ΔNLL before and after repair.

    python bench/verify.py [--gguf PATH] [--budgets 3.5,4] [--calib-tokens 2048] [--windows 16]
                           [--verify-windows 2] [--verify-rounds 2]

Profiles on the validation split (--calib-tokens random windows of 512), solves each budget with the
ILP, then verifies it (bitalloc/verify.py: measured on the last --verify-windows validation windows that
profiling did not use; repair rounds; the uniform guarantee). Scores the solved and the verified plan on
the first --windows × 512 tokens of the *test* split (ppl, KL and top-1 vs the unquantized model) and
reports how long verification took. Writes bench/out/verify-<budget>bits.json per budget (so a budget
that finished is kept when a later one is interrupted) and prints the table.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import torch

import bitalloc
from bitalloc.api import plan_from_table, profile, resolve_calibration
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import select_modules
from bitalloc.verify import VerifySettings

sys.path.insert(0, str(Path(__file__).parent))
from common import default_gguf, smollm2_arguments  # noqa: E402


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--budgets", default="3.5,4")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512, help="calibration (and so verification) window length")
    ap.add_argument("--grid", choices=("default", "asym"), default="default",
                    help="candidate options: bitalloc's default grid, or only its asymmetric INT options + keep (half the profiling)")
    ap.add_argument("--verify-windows", type=int, default=2)
    ap.add_argument("--verify-rounds", type=int, default=2)
    args = ap.parse_args()

    loaded = bitalloc.load_model(args.gguf or default_gguf())
    model = loaded.model
    calib = resolve_calibration(args.calib, loaded, args.seq_len, args.calib_tokens, seed=0)
    options = [o for o in bitalloc.default_options() if args.grid == "default" or o.fmt == "keep" or not o.symmetric]
    t0 = time.perf_counter()
    table = profile(loaded, calib, select_modules(model), options, cache_dir=bitalloc.api.default_cache_dir(), progress=True)
    profile_s = time.perf_counter() - t0
    print(f"profile {profile_s:.0f}s", flush=True)
    windows = bitalloc.evaluation_windows(bitalloc.calibration.read_text(args.text), loaded.tokenizer, 512, args.windows)
    settings = VerifySettings(windows=args.verify_windows, max_rounds=args.verify_rounds)
    reference = base = None

    def test_score(plan) -> dict:
        nonlocal reference, base
        if reference is None:  # after the first verification, so that its numbers are saved first
            reference = bitalloc.reference_logprobs(model, windows, progress=True)
            base = bitalloc.evaluate(reference, windows)
        quantized = bitalloc.apply(_copy(model), plan)
        return bitalloc.evaluate(quantized, windows, reference=reference).to_dict()

    lines = ["| bpw | solved: predicted / measured ΔNLL (slice) | KL (slice) | test ppl | verified: outcome | predicted "
             "(calibrated) / measured ΔNLL (slice) | KL (slice) | test ppl | test KL solved → verified | verify s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b in [float(x) for x in args.budgets.split(",")]:
        budget = f"{b}bits"
        solved = plan_from_table(table, budget, loaded, calib)
        t = time.perf_counter()
        verified = plan_from_table(table, budget, loaded, calib, verify=settings)
        verify_s = time.perf_counter() - t
        v = verified.verification
        result = {"budget": budget, "calibration": calib.settings(), "verify_settings": vars(settings),
                  "options": [o.label for o in options], "verify_seconds": verify_s, "profile_seconds": profile_s,
                  "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
                  "solved_labels": [a.label for a in solved.assignments], "verification": v.model_dump(mode="json")}
        atomic_write_text(Path(args.out) / f"verify-{b:g}bits.json", canonical_json(result))  # kept if the test scoring is cut short
        print(f"{budget}: verified in {verify_s:.0f}s: {v.outcome}; solved ΔNLL {v.solved.predicted_delta_nll:.4f} predicted / "
              f"{v.solved.delta_nll:.4f} measured, KL {v.solved.kl:.4f}; final ΔNLL {v.final.delta_nll:.4f}, KL {v.final.kl:.4f}",
              flush=True)
        solved_test = test_score(solved)
        verified_test = solved_test if verified.assignments == solved.assignments else test_score(verified)
        result = {"budget": budget, "calibration": calib.settings(), "verify_settings": vars(settings),
                  "options": [o.label for o in options],
                  "profile_seconds": profile_s, "verify_seconds": verify_s, "threads": torch.get_num_threads(),
                  "load_average": os.getloadavg()[0], "test_reference": base.to_dict(),
                  "solved": {"summary": solved.summary.model_dump(), "test": solved_test,
                             "labels": [a.label for a in solved.assignments]},
                  "verified": {"summary": verified.summary.model_dump(), "test": verified_test,
                               "labels": [a.label for a in verified.assignments], "solver": verified.solver.name,
                               "verification": v.model_dump(mode="json")},
                  "changed_modules": sum(a.label != s.label for a, s in zip(verified.assignments, solved.assignments))}
        atomic_write_text(Path(args.out) / f"verify-{b:g}bits.json", canonical_json(result))
        f = v.final
        lines.append(f"| {b:g} | {v.solved.predicted_delta_nll:.4f} / {v.solved.delta_nll:.4f} | {v.solved.kl:.4f} | "
                     f"{solved_test['ppl']:.2f} | {v.outcome} | {f.predicted_delta_nll:.4f} ({f.calibrated_delta_nll or 0:.4f}) / "
                     f"{f.delta_nll:.4f} | {f.kl:.4f} | {verified_test['ppl']:.2f} | {solved_test['kl']:.4f} → "
                     f"{verified_test['kl']:.4f} | {verify_s:.0f} |")
        print("\n".join(lines), flush=True)


def _copy(model):
    return copy.deepcopy(model)


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    main()
