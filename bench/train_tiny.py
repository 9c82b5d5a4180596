"""Train a tiny Qwen2-architecture causal LM from scratch on CPU: a second model family for bench/peers.py.

    python bench/train_tiny.py --out /work/family2/tiny-qwen2     # ~15 min on one thread of a busy 2-core machine
    python bench/convert_tiny.py /work/family2/tiny-qwen2 /work/family2/tiny-qwen2-f32.gguf   # llama.cpp's converter
    python bench/peers.py --gguf /work/family2/tiny-qwen2-f32.gguf --out bench/out/peers-tiny-qwen2

SmolLM2 is a Llama; this model is a Qwen2 (biases on q/k/v, its own GGUF architecture and llama.cpp
quantization rules), trained on WikiText-2 *validation* (`wiki.valid.tokens`, the calibration text;
the test split is never seen) with SmolLM2's tokenizer, read from the SmolLM2 GGUF. Every width is a
multiple of 256, so each row of every decoder linear holds whole K-quant (and IQ4_XS) blocks. The
embedding is tied with the output head. Seeded (weights, data order). With the defaults: 15.7M parameters,
12.6M of them the embedding; 420 steps of 2 × 512 tokens (1.6 epochs) took 15.6 min, and the model scores
WikiText-2 test ppl 1121 against 2035 for the unigram model.

Saves a Hugging Face checkpoint (config.json, model.safetensors, tokenizer) and prints its perplexity
on WikiText-2 test (16 windows × 512, the bench's windows) beside a unigram model fitted on the same
training tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bitalloc.calibration import read_text, tokenize
from bitalloc.evaluate import evaluate, evaluation_windows

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT  # noqa: E402

SMOLLM2_GGUF = ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def unigram_ppl(train_ids: torch.Tensor, windows: torch.Tensor, vocab: int) -> float:
    """Perplexity of add-one-smoothed unigram frequencies of the training tokens, scored as evaluate() scores."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    scored = windows[:, 1:].reshape(-1)
    return math.exp(-logp[scored].mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the Hugging Face checkpoint (outside the repository)")
    ap.add_argument("--tokenizer-gguf", default=str(SMOLLM2_GGUF), help="GGUF whose tokenizer the model uses")
    ap.add_argument("--train", default=str(DATA / "wiki.valid.tokens"), help="training text")
    ap.add_argument("--text", default=str(DATA / "wiki.test.raw"), help="evaluation text")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="windows per step")
    ap.add_argument("--steps", type=int, default=420)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is kind to a shared machine)")
    args = ap.parse_args()
    for w in (args.hidden, args.intermediate):
        if w % 256:
            sys.exit(f"error: width {w} is not a multiple of 256; llama.cpp's K-quants need whole 256-blocks per row")

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    gguf = Path(args.tokenizer_gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    train_ids = tokenize(tokenizer, read_text(args.train))
    windows = evaluation_windows(read_text(args.text), tokenizer, 512, 16)
    vocab = len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Qwen2: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, heads "
          f"{args.heads}/{args.kv_heads}, vocab {vocab}, {n_params / 1e6:.2f}M parameters (embedding tied); "
          f"{train_ids.numel()} training tokens", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:  # linear warmup, cosine to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(args.seed)
    starts_max = train_ids.numel() - args.seq_len - 1
    model.train()
    t0 = time.time()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for step in bar:
        starts = torch.randint(0, starts_max, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s:s + args.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_at(step):.1e}")
    train_s = time.time() - t0
    model.eval()

    result = evaluate(model, windows, progress=True)
    uni = unigram_ppl(train_ids, windows, vocab)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    summary = {"train_seconds": round(train_s, 1), "steps": args.steps, "tokens_seen": args.steps * args.batch * args.seq_len,
               "train_tokens": int(train_ids.numel()), "test_ppl": result.ppl, "unigram_ppl": uni,
               "eval": "WikiText-2 test, 16 windows x 512", "args": vars(args), "parameters": n_params}
    (out / "training.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"trained {args.steps} steps ({summary['tokens_seen']} tokens) in {train_s / 60:.1f} min; "
          f"WikiText-2 test ppl {result.ppl:.2f} (16 × 512), unigram {uni:.2f}; saved to {out}")


if __name__ == "__main__":
    main()
