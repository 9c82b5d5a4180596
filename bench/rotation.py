"""Does an orthogonal rotation of the residual stream, folded into the weights, help weight-only quantization?

    python bench/rotation.py --options int3-g64-asym --quantizers rtn-w,gptq,awq-gptq --out bench/out/rotation

QuaRot (Ashkboos et al., 2024) and SpinQuant (Liu et al., 2024) rotate the residual stream of a pre-norm decoder by an
orthogonal Q: each RMSNorm's gain is folded into the linears that read it (the norm becomes a plain x / rms(x), which
commutes with Q), the embedding and every linear writing to the stream (o_proj, down_proj) are multiplied by Q on
their output side, and every linear reading it (q/k/v, gate/up, lm_head) by Q on their input side. The model computes
the same function (the F32 KL is printed) with the same architecture (tied embeddings become untied: the final
norm's gain is folded into lm_head alone), so no runtime needs anything new, and every weight matrix is a different one to quantize: outlier
input channels are spread over all channels. Q is a randomized Hadamard matrix (Sylvester and Paley order-12 factors:
576 = 12 · 12 · 4 for SmolLM2), with --rotation random a random orthogonal one, and with --rotation fold-only the
identity (the gains folded, nothing rotated).

Each row quantizes every decoder linear at one option with one quantizer, on the model as it is and on the rotated
one, and scores it on the test windows against the F32 model (ppl, KL, and each window's scores for bench/paired.py,
with the row name as its variant). GPTQ's rows take Hessians from 16× the calibration text and fit halfway to the
float model's output unless --hessian-multiple / --float-target say otherwise, weighing every token alike (the
product's settings when the rows in bench/out/rotation* were made; it now also weighs each token by its loss gradient
on supplied text, config.TOKEN_WEIGHTED_ON_TEXT), and --models rotated skips the model as it is. Rows are appended
to OUT/rotation.jsonl as they finish; a rerun skips them.

Only pre-norm blocks whose norms sit in front of the linears can be rotated this way (Llama, Qwen2, Mistral). Gemma 3
also normalizes each block's output before adding it to the stream (post_attention_layernorm,
post_feedforward_layernorm), and a gain applied after that normalization does not commute with Q: refused.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bitalloc.calibration import make_calibration, read_text
from bitalloc.config import FLOAT_TARGET_WIDENED, HESSIAN_TEXT_MULTIPLE
from bitalloc.evaluate import evaluate, evaluation_windows
from bitalloc.models import load_model, select_modules, weight_matrix
from bitalloc.options import parse_option
from bitalloc.quantizers import importance_only, needs_hessian
from bitalloc.quantizers.materialize import quantize_model

sys.path.insert(0, str(Path(__file__).parent))
from common import append_row, default_gguf, read_rows, smollm2_arguments  # noqa: E402
from plan_variants import score_by_window, scoring_reference  # noqa: E402


def paley12() -> torch.Tensor:
    """A Hadamard matrix of order 12 (Paley's construction from the quadratic residues mod 11)."""
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    jacobsthal = torch.tensor([[0 if i == j else (1 if (j - i) % q in residues else -1) for j in range(q)]
                               for i in range(q)], dtype=torch.float64)
    skew = torch.zeros(12, 12, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1, -1, jacobsthal
    return skew + torch.eye(12, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order n = 12^a · 2^b (Kronecker products of Paley's 12 and Sylvester's 2)."""
    h, rest = torch.ones(1, 1, dtype=torch.float64), n
    for order, factor in ((12, paley12()), (2, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))):
        while rest % order == 0:
            h, rest = torch.kron(h, factor), rest // order
    if rest != 1:
        raise SystemExit(f"no Hadamard matrix of order {n} here (12^a · 2^b only); use --rotation random")
    return h / math.sqrt(n)


def rotation_matrix(n: int, kind: str, seed: int) -> torch.Tensor:
    """A seeded orthogonal n × n matrix in float64: a Hadamard matrix with random signs on its rows, Haar-random,
    or (fold-only) the identity."""
    if kind == "fold-only":
        return torch.eye(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r))
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n)


@torch.no_grad()
def rotate(model: nn.Module, q: torch.Tensor) -> nn.Module:
    """Fold the norms' gains into their readers and rotate the residual stream by q, in place (see the docstring)."""
    inner = model.model
    if any(hasattr(block, "post_feedforward_layernorm") for block in inner.layers):
        raise SystemExit("this model normalizes each block's output before the residual add (Gemma 3's sandwich "
                         "norms); its stream cannot be rotated by folding: use a Llama, Qwen2 or Mistral model")

    def set_weight(module: nn.Module, value: torch.Tensor) -> None:
        module.weight.copy_(value.to(module.weight.dtype))

    def fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
        for linear in readers:
            set_weight(linear, linear.weight.double() * norm.weight.double()[None, :])
        norm.weight.fill_(1.0)

    head = model.lm_head
    if head.weight is inner.embed_tokens.weight:  # untie: the final norm's gain goes into lm_head alone
        model.lm_head = nn.Linear(head.in_features, head.out_features, bias=False)
        model.lm_head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    fold(inner.norm, [model.lm_head])
    set_weight(inner.embed_tokens, inner.embed_tokens.weight.double() @ q)
    set_weight(model.lm_head, model.lm_head.weight.double() @ q)
    for block in inner.layers:
        attn, mlp = block.self_attn, block.mlp
        fold(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            set_weight(reader, reader.weight.double() @ q)
        for writer in (attn.o_proj, mlp.down_proj):
            set_weight(writer, q.T @ writer.weight.double())
            if writer.bias is not None:
                writer.bias.copy_((writer.bias.double() @ q).to(writer.bias.dtype))
    return model


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--options", default="int3-g64-asym,int4-g64-asym", help="comma-separated option labels")
    ap.add_argument("--quantizers", default="rtn-w,gptq,awq-gptq", help="comma-separated quantizers")
    ap.add_argument("--rotation", choices=("hadamard", "random", "fold-only"), default="hadamard",
                    help="fold-only: fold the norms' gains and rotate by the identity (what the fold alone does)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rotation's signs (or of the random matrix)")
    ap.add_argument("--windows", type=int, default=16, help="512-token test windows")
    ap.add_argument("--hessian-multiple", type=int, default=HESSIAN_TEXT_MULTIPLE,
                    help="GPTQ's Hessians from this many times the calibration text (1: the profile's windows alone)")
    ap.add_argument("--float-target", type=float, default=FLOAT_TARGET_WIDENED,
                    help="how far GPTQ fits each layer toward the float model's output (0: GPTQ's own target)")
    ap.add_argument("--models", default="as-is,rotated", help="which of the two models each row quantizes")
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    loaded = load_model(gguf)
    model, tok = loaded.model.eval(), loaded.tokenizer
    calib = make_calibration(tok, read_text(args.calib), seq_len=512, tokens=8192, source=Path(args.calib).name)
    windows = evaluation_windows(read_text(args.text), tok, 512, args.windows)
    reference = scoring_reference(model, windows)
    hidden = model.get_input_embeddings().weight.shape[1]
    rotated = rotate(copy.deepcopy(model), rotation_matrix(hidden, args.rotation, args.seed))
    print(f"rotated ({args.rotation}, seed {args.seed}) vs F32 on 2 windows: KL "
          f"{evaluate(rotated, windows[:2], reference=reference[:2] if isinstance(reference, list) else reference).kl:.1e}",
          flush=True)
    names = select_modules(model)
    out = Path(args.out) / "rotation.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_rows(out)
    # rows with the default --hessian-multiple and --float-target keep a bare name; others say theirs
    usual = (args.hessian_multiple, args.float_target) == (HESSIAN_TEXT_MULTIPLE, FLOAT_TARGET_WIDENED)
    bases = {"as-is": ("as it is", model), "rotated": (args.rotation, rotated)}
    if unknown := set(args.models.split(",")) - set(bases):
        raise SystemExit(f"--models: unknown {', '.join(sorted(unknown))}; choose from as-is, rotated")
    shapes = [weight_matrix(model.get_submodule(n)).shape for n in names]
    print("| option | quantizer | model | ppl | KL | seconds |\n|---|---|---|---|---|---|", flush=True)
    for label in args.options.split(","):
        for quantizer in args.quantizers.split(","):
            sequential = needs_hessian(quantizer) and not importance_only(quantizer)
            settings = {"hessian_tokens": args.hessian_multiple * calib.tokens.numel(),
                        "float_target": args.float_target} if sequential else {}
            tag = "" if not sequential or usual else f" ({args.hessian_multiple}x, target {args.float_target})"
            for base_name, base in (bases[key] for key in args.models.split(",")):
                name = f"{label},{quantizer}{tag},{base_name}"
                if name in done:
                    row = done[name]
                else:
                    start = time.time()
                    quantized = copy.deepcopy(base)
                    quantize_model(quantized, {n: parse_option(label) for n in names}, quantizer, calib, **settings)
                    result, per_window = score_by_window(quantized, windows, reference)
                    bits = sum(parse_option(label).storage_bits(*shape) for shape in shapes)
                    row = {"row": name, "variant": name, "model": Path(gguf).stem, "option": label,
                           "quantizer": quantizer, "rotation": None if base is model else args.rotation,
                           "rotation_seed": args.seed, **settings, "bpw": bits / sum(s.numel() for s in shapes),
                           "ppl": result.ppl, "kl": result.kl, **per_window,
                           "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads()}
                    append_row(out, done, row)
                print(f"| {label} | {quantizer}{tag} | {base_name} | {row['ppl']:.2f} | {row['kl']:.4f} "
                      f"| {row['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
