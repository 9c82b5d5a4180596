"""A short QAT run on SmolLM2: wikitext-2 test ppl of a 3.5-bpw plan before (RTN) and after QAT.

    OMP_NUM_THREADS=1 python bench/qat.py [--budget 3.5bits] [--steps 40] [--seq-len 256] [--batch 2]
        [--lr 2e-5] [--learnable-scales] [--replan-at 20] [--windows 16]

Plans on the validation split (16×512 tokens, as `bitalloc plan`), evaluates on the first
windows×512 tokens of the test split, fine-tunes the planned layers under fake quantization with
the Hugging Face Trainer on *other* random windows of the validation split (never test text),
optionally re-plans at the same budget during training (ReplanCallback), converts, evaluates again.
Only the planned linear layers (and learnable scales) train; embeddings, head and norms are frozen,
so the change is the quantized layers' own. Prints a table, writes bench/out/qat.json.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

import bitalloc
from bitalloc import qat
from bitalloc.api import resolve_calibration
from bitalloc.calibration import random_windows, read_text, tokenize
from bitalloc.io import atomic_write_text, canonical_json

sys.path.insert(0, str(Path(__file__).parent))
from common import default_gguf, smollm2_arguments  # noqa: E402


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--budget", default="3.5bits")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256, help="training window length")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--learnable-scales", action="store_true")
    ap.add_argument("--replan-at", default="", help="comma-separated optimizer steps to re-plan at")
    ap.add_argument("--replan-windows", type=int, default=2, help="calibration windows (of --seq-len) per re-plan")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--float-control", action="store_true",
                    help="control run: the same fine-tuning without fake quantization, then RTN with the same plan "
                         "(separates QAT's gain from adapting to wikitext); writes qat-control.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    timings: dict[str, float] = {}

    def timed(key, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[key] = round(time.perf_counter() - t0, 1)
        print(f"{key}: {timings[key]} s", flush=True)
        return out

    loaded = timed("load_s", lambda: bitalloc.load_model(args.gguf or default_gguf()))
    model = loaded.model
    calib = resolve_calibration(args.calib, loaded, 512, args.calib_tokens, seed=0)
    # rtn: this bench compares QAT (whose fake quantization rounds to nearest) with the RTN plan it starts from
    plan = timed("plan_s", lambda: bitalloc.plan(loaded, args.budget, calib, quantizer="rtn", progress=True))
    windows = bitalloc.evaluation_windows(read_text(args.text), loaded.tokenizer, 512, args.windows)

    if not args.float_control:
        fp = timed("eval_fp_s", lambda: bitalloc.evaluate(model, windows, progress=True))
        rtn = timed("eval_rtn_s", lambda: bitalloc.evaluate(bitalloc.apply(copy.deepcopy(model), plan), windows, progress=True))
        print(f"fp32 ppl {fp.ppl:.2f}, RTN plan ppl {rtn.ppl:.2f}", flush=True)

    # Training windows: random windows of the validation text, a different seed from calibration's.
    valid_ids = tokenize(loaded.tokenizer, read_text(args.calib))
    n_train = args.steps * args.batch
    train_ids = random_windows(valid_ids, args.seq_len, n_train, seed=args.seed + 1)
    replan_ids = random_windows(valid_ids, args.seq_len, args.replan_windows, seed=args.seed + 2)
    if train_ids.shape[0] < n_train:
        raise SystemExit(f"validation text has only {train_ids.shape[0]} windows of {args.seq_len}; lower --steps/--batch")

    if args.float_control:
        qat._drop_stale_gguf_quantizer(model)  # what prepare does, so the Trainer accepts the GGUF-loaded model
        trainable = {id(model.get_submodule(a.module).weight) for a in plan.assignments}
    else:
        qat.prepare(model, plan, learnable_scales=args.learnable_scales)
        trainable = {id(w.weight) for w in qat.fake_quant_modules(model).values()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in trainable or name.endswith(".scale"))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    from transformers import Trainer, TrainingArguments

    steps = [int(s) for s in args.replan_at.split(",") if s.strip()]
    callbacks = [qat.ReplanCallback(replan_ids, args.budget, at_steps=steps)] if steps else []
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "qat-trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, logging_steps=5,
        report_to=[], save_strategy="no", use_cpu=True, seed=args.seed, data_seed=args.seed, disable_tqdm=False,
    )
    data = [{"input_ids": x, "labels": x} for x in train_ids]
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
    model.train()
    timed("train_s", trainer.train)
    model.eval()
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    if args.float_control:
        tuned = timed("eval_tuned_s", lambda: bitalloc.evaluate(model, windows, progress=True))
        rtn_tuned = timed("eval_rtn_tuned_s", lambda: bitalloc.evaluate(
            bitalloc.apply(model, plan, check_hash=False), windows, progress=True))
        print(f"\nfloat fine-tuning, {args.steps} steps x {args.batch}x{args.seq_len} tokens, lr {args.lr}: "
              f"ppl {tuned.ppl:.2f}; then RTN with the plan: ppl {rtn_tuned.ppl:.2f}")
        print("train loss (step, loss):", ", ".join(f"{s}: {l:.3f}" for s, l in losses))
        result = {"model": Path(loaded.source).name, "budget": args.budget, "steps": args.steps, "batch": args.batch,
                  "seq_len": args.seq_len, "lr": args.lr, "ppl": {"float_finetuned": round(tuned.ppl, 4),
                  "float_finetuned_then_rtn": round(rtn_tuned.ppl, 4)}, "train_loss": losses, "timings_s": timings}
        print(f"wrote {atomic_write_text(Path(args.out) / 'qat-control.json', canonical_json(result))}")
        return
    replans = [{"step": s, **r.summary(), "changed": r.changed} for s, r in (callbacks[0].replans if callbacks else [])]
    final_plan = qat.current_plan(model)

    stored = timed("convert_s", lambda: qat.convert(model))
    after = timed("eval_qat_s", lambda: bitalloc.evaluate(model, windows, progress=True))

    rows = [("fp32 (unquantized)", "-", fp.ppl), (f"plan {args.budget}, RTN", plan.summary.storage_bits_per_weight, rtn.ppl),
            (f"plan {args.budget}, after {args.steps} QAT steps", final_plan.summary.storage_bits_per_weight, after.ppl)]
    print(f"\nSmolLM2-135M, wikitext-2 test ppl ({windows.shape[0]}x512 tokens); QAT: {args.steps} steps x "
          f"{args.batch}x{args.seq_len} tokens of wiki.valid, lr {args.lr}, learnable scales {args.learnable_scales}")
    print("| model | storage bpw | ppl |\n|---|---|---|")
    for name, bpw, ppl in rows:
        print(f"| {name} | {bpw if isinstance(bpw, str) else f'{bpw:.3f}'} | {ppl:.2f} |")
    print("train loss (step, loss):", ", ".join(f"{s}: {l:.3f}" for s, l in losses))
    for r in replans:
        print(f"re-plan at step {r['step']}: {r['changed_modules']} modules changed, storage bpw "
              f"{r['storage_bits_per_weight']}, predicted dNLL {r['predicted_delta_loss']}")

    result = {
        "model": Path(loaded.source).name, "budget": args.budget, "eval": {"text": Path(args.text).name, "windows": int(windows.shape[0]), "seq_len": 512},
        "qat": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "optimizer": "adamw",
                "schedule": "linear decay, no warmup", "learnable_scales": args.learnable_scales, "trainable_params": n_trainable,
                "train_text": Path(args.calib).name, "train_windows_seed": args.seed + 1},
        "ppl": {"fp32": round(fp.ppl, 4), "rtn": round(rtn.ppl, 4), "qat": round(after.ppl, 4)},
        "plan": {"storage_bits_per_weight": plan.summary.storage_bits_per_weight,
                 "predicted_delta_loss": plan.summary.predicted_delta_loss},
        "final_plan": {"storage_bits_per_weight": final_plan.summary.storage_bits_per_weight,
                       "labels": sorted({a.label for a in final_plan.assignments})},
        "replans": replans, "train_loss": losses, "converted_modules": len(stored), "timings_s": timings,
    }
    path = atomic_write_text(Path(args.out) / "qat.json", canonical_json(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
