"""What is left of GPTQ's layer error for a free correction to take: a refitted RMSNorm weight, or a bias.

    python bench/gptq_corrections.py [--gguf G] [--blocks 3,15,27] [--options int3-g64-asym,int4-ch-asym]
    python bench/gptq_corrections.py --gguf models/gemma3/gemma-3-270m-q4_k_m.gguf --blocks 2,9,16

Two corrections cost no stored bits (or almost none) and are known to help round-to-nearest: refitting the RMSNorm
weight in front of q/k/v (and of gate/up) by least squares after the weights are quantized ("norm tweaking"), and a
bias that takes out the mean of each output's error ("bias correction"). Both are closed-form given the layer inputs.
This measures how much of GPTQ's error, Σ over held-out tokens of |ΔW x|², each would remove: GPTQ (the product's
settings) on the unquantized model's inputs from the first --fit calibration windows, each correction fitted on the
same windows, the error measured on the remaining ones. A ratio of 0.99 means the correction removes 1 % of it.
--quantizer rtn: the same after round-to-nearest (min/max scales), where both corrections are known to pay.

The norm's refit: with Ŵ the quantized rows of all the layers that read one normed input x̂ (stacked), find the
diagonal d minimising tr((W − Ŵ diag d) H (W − Ŵ diag d)ᵀ), i.e. (ŴᵀŴ ∘ H) d = diag(Ŵᵀ W H), and fold d into the norm.
The bias: b = ΔW μ, with μ the mean input of the fit windows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bitalloc.calibration import leading_bos, read_text, tokenize, with_bos
from bitalloc.io import atomic_write_text
from bitalloc.models import decoder_blocks, load_model, weight_matrix
from bitalloc.options import parse_option
from bitalloc.progress import steps
from bitalloc.quantizers.gptq import gptq
from bitalloc.quantizers.rtn import rtn

from common import default_gguf, smollm2_arguments

# the layers of a Llama-shaped block that read one normed input, and the others
SHARED_INPUT = {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "mlp": ("mlp.gate_proj", "mlp.up_proj")}
OWN_INPUT = ("self_attn.o_proj", "mlp.down_proj")


def block_inputs(model, ids: torch.Tensor, blocks: list[int], names: list[str]) -> dict[tuple[int, str], list[torch.Tensor]]:
    """Each named layer's inputs [tokens, in] (float64), one tensor per window."""
    _, layers = decoder_blocks(model)
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = [layers[b].get_submodule(n).register_forward_hook(
        lambda m, i, o, key=(b, n): inputs.setdefault(key, []).append(i[0].reshape(-1, i[0].shape[-1]).double()))
        for b in blocks for n in names]
    try:
        with torch.no_grad():
            for window in ids:
                model(window[None])
    finally:
        for h in hooks:
            h.remove()
    return inputs


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ over tokens of |ΔW x|² per token: tr(ΔW H ΔWᵀ) with H = mean x xᵀ."""
    return torch.trace(delta @ hessian @ delta.T).item()


def norm_refit_ratio(weights: torch.Tensor, quantized: torch.Tensor, h_fit: torch.Tensor, h_test: torch.Tensor) -> float:
    """Held-out error with the best diagonal input scaling (a refitted norm weight) over the error without it."""
    gram = (quantized.T @ quantized) * h_fit
    # a faint pull toward d = 1: a column quantized to all zeros (or never active) leaves its d undetermined
    ridge = 1e-6 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    d = torch.linalg.solve(gram + ridge, torch.diagonal(quantized.T @ weights @ h_fit) + ridge.diagonal())
    return output_error(weights - quantized * d, h_test) / output_error(weights - quantized, h_test)


def bias_ratio(delta: torch.Tensor, mu_fit: torch.Tensor, mu_test: torch.Tensor, h_test: torch.Tensor) -> float:
    """Held-out error once a bias ΔW μ_fit is subtracted, over the error without it."""
    bias = delta @ mu_fit
    before = output_error(delta, h_test)
    return (before - 2 * (bias @ (delta @ mu_test)).item() + (bias @ bias).item()) / before


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--blocks", default="3,15,27")
    ap.add_argument("--options", default="int3-g64-asym,int4-ch-asym")
    ap.add_argument("--windows", type=int, default=24, help="calibration windows of 512 tokens")
    ap.add_argument("--fit", type=int, default=16, help="of them, the windows GPTQ and the corrections are fitted on")
    ap.add_argument("--quantizer", choices=("gptq", "rtn"), default="gptq",
                    help="rtn: the same corrections after round-to-nearest, for contrast")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.gguf or default_gguf())
    ids = tokenize(loaded.tokenizer, read_text(args.calib))
    starts = torch.randint(0, ids.numel() - 512, (args.windows,))
    # BOS over each first token where the tokenizer adds one (Gemma), as the product's calibration windows
    windows = with_bos(torch.stack([ids[s:s + 512] for s in starts]), leading_bos(loaded.tokenizer))
    blocks = [int(b) for b in args.blocks.split(",")]
    options = [parse_option(o) for o in args.options.split(",")]
    names = [n for group in SHARED_INPUT.values() for n in group] + list(OWN_INPUT)
    # the layers of a group read one input: record it at the first and let the others use it
    reads = {n: group[0] for group in SHARED_INPUT.values() for n in group} | {n: n for n in OWN_INPUT}
    inputs = block_inputs(loaded.model, windows, blocks, sorted(set(reads.values())))
    _, layers = decoder_blocks(loaded.model)

    rows = []
    for b in steps(blocks, "blocks", show=True, unit="block"):
        # each layer's weight and its fit/held-out statistics: H = mean x xᵀ and the mean input μ
        moments = {}
        for n in set(reads.values()):
            fit, test = torch.cat(inputs[(b, n)][:args.fit]), torch.cat(inputs[(b, n)][args.fit:])
            moments[n] = (fit.T @ fit / len(fit), test.T @ test / len(test), fit.mean(0), test.mean(0))
        stats = {n: (weight_matrix(layers[b].get_submodule(n)).double(), *moments[reads[n]]) for n in names}
        for o in options:
            quantized = {}
            for n, (w, h_fit, h_test, mu_fit, mu_test) in stats.items():
                q = gptq(w.float(), o, h_fit.float()) if args.quantizer == "gptq" else rtn(w.float(), o)
                quantized[n] = q.values.double()
                rows.append({"block": b, "option": o.label, "layers": n, "correction": "bias",
                             "ratio": bias_ratio(w - quantized[n], mu_fit, mu_test, h_test)})
            for members in SHARED_INPUT.values():
                w = torch.cat([stats[n][0] for n in members])
                q = torch.cat([quantized[n] for n in members])
                _, h_fit, h_test, _, _ = stats[members[0]]
                rows.append({"block": b, "option": o.label, "layers": "+".join(n.split(".")[-1] for n in members),
                             "correction": "norm refit", "ratio": norm_refit_ratio(w, q, h_fit, h_test)})

    print(f"{'block':>5}  {'option':<15} {'layers':<22} {'correction':<11} held-out error after / before")
    for r in rows:
        print(f"{r['block']:>5}  {r['option']:<15} {r['layers']:<22} {r['correction']:<11} {r['ratio']:.4f}")
    for kind in ("norm refit", "bias"):
        ratios = [r["ratio"] for r in rows if r["correction"] == kind]
        print(f"{kind}: removes {1 - max(ratios):.2%} to {1 - min(ratios):.2%} of {args.quantizer}'s held-out error")
    out = {"quantizer": args.quantizer, "blocks": blocks, "options": args.options, "windows": args.windows, "fit": args.fit, "rows": rows}
    model = Path(args.gguf).stem if args.gguf else "SmolLM2-135M-Instruct"
    atomic_write_text(Path(args.out) / f"gptq_corrections-{model}-{args.quantizer}.json", json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
