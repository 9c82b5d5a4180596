"""Perplexity and KL rank a plan and a uniform row differently: noise, or a real difference?

    python bench/ppl_vs_kl.py --quantizer rtn-w --windows 64 \
        --variants "4.25,fisher-tw;16,fisher-tw,pin=int4-g64-sym;4.5,fisher-tw;16,fisher-tw,pin=int4-g32-sym"

Same model, table and variants as bench/plan_variants.py (its arguments; run bench/peers.py first). The F32
model and every variant score the test windows one at a time, keeping per window the NLL of the text, KL(F32 ‖
model) and the entropy of the model's predictions (all per scored token). Printed per row: ppl, KL, mean
entropy, ΔNLL against F32 minus KL (what the text's own tokens add to the damage KL sees: negative when the
quantized model happens to assign the text more probability than F32's own expectation predicts), and for each
consecutive pair of variants (a plan, then the uniform row it is compared with) the paired ΔNLL mean ± standard
error over windows, so a perplexity ranking can be told from noise. Extra rows divide F32's logits by a
temperature (--temperatures): the unquantized model made flatter by hand, with no quantization error at all.
Rows go to --out/ppl_vs_kl.json.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

from bitalloc.apply import apply
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.progress import steps

sys.path.insert(0, str(Path(__file__).parent))
from plan_variants import load_table, parse_variants, solve_variant, variant_arguments  # noqa: E402


@torch.no_grad()
def logits_of(model, window: torch.Tensor) -> torch.Tensor:
    return model(input_ids=window[None]).logits[0, :-1].float()  # positions 0..T-2 predict tokens 1..T-1


def window_stats(logits: torch.Tensor, window: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """(log-probabilities [T-1, vocab], {nll, kl, entropy} summed over the window's scored tokens)."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    stats = {"nll": float(-logp.gather(1, window[1:, None]).sum()), "entropy": float(-(p * logp).sum())}
    stats["kl"] = 0.0 if reference is None else float((reference.exp() * (reference - logp)).sum())
    return logp, stats


def mean_and_error(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def main() -> None:
    ap = variant_arguments(__doc__)
    ap.add_argument("--temperatures", default="1.05,1.1,1.2", help="extra rows: F32's logits divided by each")
    args = ap.parse_args()
    variants = parse_variants(args.variants)
    model_name, loaded, profiled, table, calib, windows = load_table(args)
    models = {"F32": loaded.model}
    for variant in variants:
        models[variant] = apply(copy.deepcopy(profiled.model), solve_variant(variant, table, profiled, calib),
                                calibration=calib.tokens)
    temperatures = [float(t) for t in args.temperatures.split(",") if t]
    # row name -> [{nll, kl, entropy} per window]
    per_window = {name: [] for name in [*models, *(f"F32 logits / {t:g}" for t in temperatures)]}
    for w in steps(windows, "windows", show=True, unit="win"):
        logits = logits_of(loaded.model, w)
        reference, stats = window_stats(logits, w, None)
        per_window["F32"].append(stats)
        for t in temperatures:  # the unquantized model made flatter by hand: what entropy alone does to NLL
            per_window[f"F32 logits / {t:g}"].append(window_stats(logits / t, w, reference)[1])
        for variant in variants:
            per_window[variant].append(window_stats(logits_of(models[variant], w), w, reference)[1])
    tokens_per_window = windows.shape[1] - 1
    n = tokens_per_window * windows.shape[0]
    f32_nll = [s["nll"] / tokens_per_window for s in per_window["F32"]]
    rows = []
    for name, stats in per_window.items():
        nll = sum(s["nll"] for s in stats) / n
        kl = sum(s["kl"] for s in stats) / n
        delta = [s["nll"] / tokens_per_window - f for s, f in zip(stats, f32_nll)]
        rows.append({"row": name, "ppl": math.exp(nll), "kl": kl, "entropy": sum(s["entropy"] for s in stats) / n,
                     "dnll_vs_f32": mean_and_error(delta), "dnll_minus_kl": sum(delta) / len(delta) - kl})
    pairs = []
    for first, second in zip(variants[::2], variants[1::2]):
        diff = [(a["nll"] - b["nll"]) / tokens_per_window for a, b in zip(per_window[first], per_window[second])]
        pairs.append({"first": first, "second": second, "dnll": mean_and_error(diff)})
    lines = [f"{model_name}: {windows.shape[0]} × {windows.shape[1]} test windows, {args.quantizer} table", "",
             "| row | ppl | KL | entropy | ΔNLL vs F32 (± SE) | ΔNLL − KL |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['entropy']:.4f} | {r['dnll_vs_f32'][0]:+.4f} ± "
              f"{r['dnll_vs_f32'][1]:.4f} | {r['dnll_minus_kl']:+.4f} |" for r in rows]
    lines += ["", "| first | second | paired ΔNLL first − second (± SE over windows) |", "|---|---|---|"]
    lines += [f"| {p['first']} | {p['second']} | {p['dnll'][0]:+.4f} ± {p['dnll'][1]:.4f} |" for p in pairs]
    print("\n".join(lines))
    out = Path(args.out) / "ppl_vs_kl.json"
    atomic_write_text(out, canonical_json({"model": model_name, "quantizer": args.quantizer, "windows": int(windows.shape[0]),
                                           "rows": rows, "pairs": pairs, "text": "\n".join(lines)}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
