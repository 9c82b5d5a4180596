"""Signed scales for symmetric INT: how much importance-weighted error a negative scale saves.

    python bench/signed_scales.py [--gguf PATH] [--bos] [--windows 8] [--stride 1] [--out bench/out/signed_scales-NAME.json]

A symmetric INT group stores codes in [−2^(b−1), 2^(b−1) − 1] under one fp16 scale. With a positive scale
the extra negative code only helps groups whose largest-magnitude weight is negative; llama.cpp's Q4_0 /
Q5_0 / Q8_0 (`make_qx_quants`), NNCF and Intel Neural Compressor also let the scale be negative, so the
other half of the groups map their largest weight to −2^(b−1) too: one more level on the long side, a step
smaller by (2^(b−1))/(2^(b−1) − 1). The stored layout is unchanged (codes, one fp16 scale per group); only
the sign of the scale is new.

The quantizer rtn-w-signed does this (scale_search.SearchGrid.signed): each group is searched once, oriented
so that its largest-magnitude weight is negative. For every planned linear and every symmetric INT option of
the default grid, the bench sums Σ_j h_j (w_j − q_j)² (h = diag H from the calibration windows, the error the
candidate table ranks options by) of
  - rtn-w (positive scales),
  - rtn-w-signed (one oriented search per group, the same cost),
  - both signs searched: per group the better of the positive-scale search on w and on −w with the values
    negated back (quantizing −w under scale s is quantizing w under −s), the headroom at twice the cost;
and, for reference, rtn-w's asymmetric option of the same bits and group. Prints one row per option with
the totals over all modules and the share of groups where the negative scale wins the two-sign search.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bitalloc.calibration import leading_bos, make_calibration, read_text
from bitalloc.formats.int import grouped
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import load_model, select_modules, weight_matrix
from bitalloc.options import default_options
from bitalloc.profile.statistics import input_importance
from bitalloc.progress import steps
from bitalloc.quantizers.rtn_weighted import quantize_weighted
from bitalloc.quantizers.scale_search import SearchGrid

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, default_gguf, smollm2_arguments  # noqa: E402


POSITIVE, SIGNED = SearchGrid(signed=False), SearchGrid(signed=True)  # rtn-w, rtn-w-signed


def weighted_group_errors(w: torch.Tensor, values: torch.Tensor, h: torch.Tensor, group: int | None) -> torch.Tensor:
    """Σ_j h_j (values − w)² per group [out, n_groups]."""
    return grouped((values - w).square() * h, group).sum(-1)


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--windows", type=int, default=8, help="calibration windows of 512 tokens for diag H")
    ap.add_argument("--bos", action="store_true", help="windows start with the tokenizer's BOS (Gemma)")
    ap.add_argument("--stride", type=int, default=1, help="every STRIDE-th planned module only (a quicker sample)")
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    name = Path(gguf).stem
    loaded = load_model(gguf)
    torch.set_num_threads(2)
    calibration = make_calibration(loaded.tokenizer, read_text(args.calib), seq_len=512, tokens=512 * args.windows,
                                   source=Path(args.calib).name, bos=leading_bos(loaded.tokenizer) if args.bos else None)
    names = select_modules(loaded.model)[::args.stride]
    h_of = input_importance(loaded.model, names, calibration.tokens, progress=True)
    symmetric = [o for o in default_options() if o.fmt == "int" and o.symmetric]
    asym_of = {(o.bits, o.group_size): o for o in default_options() if o.fmt == "int" and not o.symmetric}
    totals = {o.label: {"rtn-w": 0.0, "oriented": 0.0, "signed": 0.0, "asym": 0.0, "groups": 0, "negative_wins": 0}
              for o in symmetric}
    started = time.perf_counter()
    for n in steps(names, "modules", show=True, unit="module"):
        w = weight_matrix(loaded.model.get_submodule(n)).detach().float()
        h = h_of[n].float()
        for o in (o for o in symmetric if o.fits(w.shape[1])):
            t = totals[o.label]
            g = o.group_size
            positive = weighted_group_errors(w, quantize_weighted(w, o, h, POSITIVE).values, h, g)
            negative = weighted_group_errors(w, -quantize_weighted(-w, o, h, POSITIVE).values, h, g)
            asym = asym_of[(o.bits, o.group_size)]
            t["rtn-w"] += positive.sum().item()
            t["oriented"] += weighted_group_errors(w, quantize_weighted(w, o, h, SIGNED).values, h, g).sum().item()
            t["signed"] += torch.minimum(positive, negative).sum().item()
            t["asym"] += weighted_group_errors(w, quantize_weighted(w, asym, h).values, h, g).sum().item()
            t["groups"] += positive.numel()
            t["negative_wins"] += int((negative < positive).sum())
    rows = [{"option": label, **t, "signed_over_rtn_w": t["signed"] / t["rtn-w"], "oriented_over_rtn_w": t["oriented"] / t["rtn-w"],
             "asym_over_rtn_w": t["asym"] / t["rtn-w"], "negative_share": t["negative_wins"] / t["groups"]}
            for label, t in totals.items() if t["groups"]]
    lines = [f"{name}: Σ over {len(names)} modules of Σ h (w − q)², diag H from {args.windows} × 512 tokens of "
             f"{Path(args.calib).name}", "",
             "| option | rtn-w (positive scale) | rtn-w-signed / rtn-w | both signs | both / rtn-w "
             "| groups where negative wins | asym of same bits, group | asym / rtn-w |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['option']} | {r['rtn-w']:.4g} | {r['oriented_over_rtn_w']:.3f} | {r['signed']:.4g} | {r['signed_over_rtn_w']:.3f} | "
              f"{r['negative_share']:.1%} | {r['asym']:.4g} | {r['asym_over_rtn_w']:.3f} |" for r in rows]
    print("\n".join(lines))
    out = Path(args.out) if args.out.endswith(".json") else Path(args.out) / f"signed_scales-{name}.json"
    atomic_write_text(out, canonical_json({"model": name, "calibration": calibration.settings(), "rows": rows,
                                           "seconds": round(time.perf_counter() - started, 1), "text": "\n".join(lines)}))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
