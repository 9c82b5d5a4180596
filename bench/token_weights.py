"""How concentrated GPTQ's token weights are: the effective number of tokens behind each token-weighted Hessian.

    python bench/token_weights.py [--gguf G] [--calib builtin|TEXT] [--windows 16]

GPTQ weighted by each token's loss gradient (`token_weighted`, the default on text you supply) sums a_t x_t x_tᵀ
with a_t = |∂L/∂y_t|² (profile.statistics.output_gradient_weights) instead of x_t x_tᵀ. Where a few tokens carry most
of Σ a_t, the weighted Hessian is estimated from those few: Kish's effective sample size (Σ a)² / Σ a² says how
many. This prints, per kind of layer (the median over blocks), that size as a share of the tokens, the share of Σ a
held by the top 1 % of tokens, and the share held by each window's first token (the attention sink), on the
calibration windows the product's profile would read (seed 0, 512-token windows, BOS first where the tokenizer adds
one).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from bitalloc.calibration import builtin_text, make_calibration, read_text
from bitalloc.io import atomic_write_text
from bitalloc.models import load_model, select_modules
from bitalloc.profile.statistics import output_gradient_weights

from common import default_gguf, smollm2_arguments


def concentration(weights: torch.Tensor) -> dict[str, float]:
    """Of one module's token weights [windows, seq_len] (a window's last token has weight 0 and is left out):
    Kish's effective sample size over the token count, the top 1 %'s share of the sum, the first tokens' share."""
    scored = weights[:, :-1].double()
    a = scored.flatten()
    total = a.sum()
    top = a.sort(descending=True).values[: max(1, a.numel() // 100)]
    return {"ess_share": float(total ** 2 / (a * a).sum() / a.numel()),
            "top1_share": float(top.sum() / total),
            "first_token_share": float(scored[:, 0].sum() / total)}


def by_kind(per_module: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The median of each measure over the modules of one kind (the name after the block index, e.g. self_attn.v_proj)."""
    kinds: dict[str, list[dict[str, float]]] = {}
    for name, measures in per_module.items():
        kinds.setdefault(re.split(r"\.\d+\.", name, maxsplit=1)[-1], []).append(measures)
    return {kind: {key: float(torch.tensor([m[key] for m in rows]).median()) for key in rows[0]}
            for kind, rows in kinds.items()}


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--windows", type=int, default=16, help="calibration windows of 512 tokens (the profile's 16)")
    args = ap.parse_args()
    loaded = load_model(args.gguf or default_gguf())
    text = builtin_text() if args.calib == "builtin" else read_text(args.calib)
    calib = make_calibration(loaded.tokenizer, text, tokens=512 * args.windows, seed=0, source=Path(args.calib).name)
    names = select_modules(loaded.model)
    weights = output_gradient_weights(loaded.model.eval(), names, calib.tokens, progress=True)
    kinds = by_kind({n: concentration(w) for n, w in weights.items()})
    print(f"\ntoken weights on {args.calib}, {calib.tokens.numel()} tokens (median over blocks)")
    print(f"{'layer':22s} {'ESS / tokens':>13s} {'top 1 % share':>14s} {'first-token share':>18s}")
    for kind, m in kinds.items():
        print(f"{kind:22s} {m['ess_share']:13.4f} {m['top1_share']:14.3f} {m['first_token_share']:18.3f}")
    out = Path(args.out) / f"token_weights-{Path(args.gguf or 'smollm2').stem}-{Path(args.calib).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps({"calibration": args.calib, "tokens": calib.tokens.numel(), "by_kind": kinds},
                                      indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
