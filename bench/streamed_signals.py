"""How well does the streamed trace (empirical Fisher) rank modules like the whole-model Hutchinson trace?

    OMP_NUM_THREADS=1 nice python bench/streamed_signals.py [--tiny] [--smollm2] [--probes 16]

For each model, on the same calibration windows:
  hutchinson        profile/hessian_trace.py on the whole model, two independent runs (seeds 0 and 1,
                    `--probes` probes each); the reference is their mean, and the Spearman ρ between
                    the two runs is the noise ceiling: no stand-in can agree with Hutchinson better
                    than Hutchinson agrees with itself
  empirical-fisher  profile/fisher_trace.py from the block-streamed walk (what `--stream` records)
and prints the Spearman rank correlation per module (trace, trace per parameter), pooled over the
64-row blocks, and the median ratio empirical-Fisher / Hutchinson (the scale).
Models: the tests' four tiny random families (--tiny), the trained tiny Qwen2 of bench/train_tiny.py
when present (/work/family2/tiny-qwen2), SmolLM2-135M (--smollm2; ΔNLL of single-module RTN ablations
measured by bench/sensitivity.py, read from bench/out/sensitivity.json, is ranked by the HAWQ-V2
prediction ½·tr/n·‖ΔW‖² with either trace).
Writes bench/out/streamed_signals.json + .md (merging with what an earlier run with other flags wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import default_gguf  # noqa: E402
from bitalloc.calibration import Calibration, calibration_from_tokens  # noqa: E402
from bitalloc.checkpoint import open_streamed  # noqa: E402
from bitalloc.io import atomic_write_text, canonical_json  # noqa: E402
from bitalloc.models import select_modules  # noqa: E402
from bitalloc.profile.fisher_trace import fisher_trace_estimate  # noqa: E402
from bitalloc.profile.hessian_trace import hutchinson_traces  # noqa: E402
from bitalloc.profile.streamed import streamed_statistics  # noqa: E402

OUT = Path(__file__).parent / "out"
TRAINED_TINY = Path("/work/family2/tiny-qwen2")
VALID = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2" / "wiki.valid.tokens"
GROUP_ROWS = 64


def tiny_models() -> dict:
    """The tests' tiny families (tests/conftest.py), seeded: hidden 64, 2 blocks, vocab 256."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=256, bos_token_id=1, eos_token_id=2)
    llama = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, **common)
    return {
        "tiny-llama": lambda: LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, pad_token_id=0, **llama)),
        "tiny-qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **llama)),
        "tiny-opt": lambda: OPTForCausalLM(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                                     word_embed_proj_dim=64, max_position_embeddings=128, pad_token_id=0,
                                                     **common)),
        "tiny-gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)),
    }


def compare(model: torch.nn.Module, checkpoint: str, calibration: Calibration, probes: int) -> dict:
    """Hutchinson (two seeds) on `model` and the streamed empirical-Fisher trace of `checkpoint`, per module."""
    names = select_modules(model)
    runs, seconds = [], {}
    for seed in (0, 1):
        t = time.perf_counter()
        runs.append(hutchinson_traces(model, names, calibration, tol=0, abs_tol=0, min_probes=probes, max_probes=probes,
                                      group_rows=GROUP_ROWS, seed=seed, windows=None))
        seconds[f"hutchinson_seed{seed}"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    stats = streamed_statistics(open_streamed(checkpoint), names, calibration, fisher_trace=True)
    seconds["empirical_fisher_streamed"] = round(time.perf_counter() - t, 1)
    rows = []
    for n in names:
        a, b = runs[0][n], runs[1][n]
        ef = fisher_trace_estimate(stats[n].fisher_trace, a.numel, GROUP_ROWS)
        rows.append({"module": n, "numel": a.numel, "hutchinson": (a.trace + b.trace) / 2,
                     "hutchinson_seed0": a.trace, "hutchinson_seed1": b.trace,
                     "hutchinson_rel_stderr": max(a.rel_stderr, b.rel_stderr) / np.sqrt(2),
                     "empirical_fisher": ef.trace,
                     "rows_hutchinson": ((a.group_trace + b.group_trace) / 2).tolist(),
                     "rows_empirical_fisher": ef.group_trace.tolist()})
    return {"windows": list(calibration.tokens.shape), "probes_per_seed": probes, "seconds": seconds,
            "summary": summarize(rows), "modules": rows}


def _rho(x, y) -> float:
    return float(spearmanr(x, y).statistic)


def summarize(rows: list[dict]) -> dict:
    h = np.array([r["hutchinson"] for r in rows])
    ef = np.array([r["empirical_fisher"] for r in rows])
    n = np.array([r["numel"] for r in rows])
    rh = np.concatenate([r["rows_hutchinson"] for r in rows])
    ref = np.concatenate([r["rows_empirical_fisher"] for r in rows])
    ratio = ef / h
    return {
        "modules": len(rows),
        "spearman_trace": _rho(h, ef),
        "spearman_trace_per_param": _rho(h / n, ef / n),
        "spearman_row_blocks": _rho(rh, ref),
        "noise_ceiling_spearman_trace": _rho([r["hutchinson_seed0"] for r in rows], [r["hutchinson_seed1"] for r in rows]),
        "median_ratio_ef_over_hutchinson": float(np.median(ratio[h > 0])) if (h > 0).any() else float("nan"),
        "negative_hutchinson_traces": int((h < 0).sum()),
        "largest_hutchinson_rel_stderr": float(max(r["hutchinson_rel_stderr"] for r in rows)),
    }


def _placeholder_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")))


def tiny(probes: int) -> dict:
    results = {}
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1234))  # the tests' calibration
    for name, make in tiny_models().items():
        torch.manual_seed(0)
        model = make().eval()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            _placeholder_tokenizer().save_pretrained(tmp)  # open_streamed reads one; the ids are given
            results[name] = compare(model, tmp, calibration_from_tokens(ids), probes)
        print(f"{name}: {results[name]['summary']}", flush=True)
    if TRAINED_TINY.is_dir():
        results["trained-tiny-qwen2"] = real_model(str(TRAINED_TINY), probes, seq_len=256, tokens=2048)
    return results


def real_model(source: str, probes: int, seq_len: int, tokens: int) -> dict:
    from bitalloc.api import resolve_calibration
    from bitalloc.models import load_model

    loaded = load_model(source)
    calib = resolve_calibration(str(VALID), loaded, seq_len, tokens, seed=0)
    result = compare(loaded.model, source, calib, probes)
    result["calibration"] = {"file": VALID.name, "seq_len": seq_len, "tokens": tokens}
    print(f"{Path(source).name}: {result['summary']} {result['seconds']}", flush=True)
    return result


def measured_ranking(result: dict) -> dict:
    """Spearman ρ of HAWQ-V2's ½·tr/n·‖ΔW‖² with each trace against ΔNLL measured by bench/sensitivity.py."""
    path = OUT / "sensitivity.json"
    if not path.is_file():
        return {}
    sens = json.loads(path.read_text())
    by_name = {r["module"]: r for r in result["modules"]}
    out = {}
    for opt in sorted({r["option"] for r in sens["rows"]}):
        rows = [r for r in sens["rows"] if r["option"] == opt and r["module"] in by_name]
        # sensitivity.json's "trace" row is ½·(its trace/n)·‖ΔW‖²: recover ‖ΔW‖², then use each trace here
        dw2 = np.array([2 * r["trace"] / r["trace/param"] for r in rows])
        measured = [r["measured"] for r in rows]
        per_param = {k: np.array([by_name[r["module"]][k] / by_name[r["module"]]["numel"] for r in rows])
                     for k in ("hutchinson", "empirical_fisher")}
        out[opt] = {"pairs": len(rows), **{f"spearman_{k}": _rho(0.5 * v * dw2, measured) for k, v in per_param.items()},
                    "spearman_fisher_error_model": _rho([r["fisher"] for r in rows], measured)}
    return out


def smollm2(probes: int, seq_len: int, tokens: int) -> dict:
    result = real_model(default_gguf(), probes, seq_len=seq_len, tokens=tokens)
    result["measured_ranking"] = measured_ranking(result)
    print(f"measured ΔNLL ranking: {result['measured_ranking']}", flush=True)
    return result


def markdown(results: dict) -> str:
    lines = ["# Streamed trace (empirical Fisher) vs whole-model Hutchinson trace", "",
             "`python bench/streamed_signals.py` — Spearman ρ across modules; the noise ceiling is ρ between two "
             "independent Hutchinson runs (seeds 0, 1).", "",
             "The tiny-* models are the tests' random-init models: far from a minimum, their loss Hessian is "
             "indefinite (many negative traces), while the empirical Fisher is never negative, so their rows test "
             "the plumbing, not the approximation. The trained rows are the ones that say how well the streamed "
             "trace ranks modules.", "",
             "| model | modules | windows × tokens | probes/seed | ρ trace | ρ trace/param | ρ 64-row blocks | "
             "noise ceiling ρ | median EF / Hutchinson | Hutchinson < 0 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["summary"]
        lines.append(f"| {name} | {s['modules']} | {r['windows'][0]} × {r['windows'][1]} | {r['probes_per_seed']} | "
                     f"{s['spearman_trace']:.3f} | {s['spearman_trace_per_param']:.3f} | {s['spearman_row_blocks']:.3f} | "
                     f"{s['noise_ceiling_spearman_trace']:.3f} | {s['median_ratio_ef_over_hutchinson']:.3g} | "
                     f"{s['negative_hutchinson_traces']} |")
    for name, r in results.items():
        if r.get("measured_ranking"):
            lines += ["", f"## {name}: ranking measured single-module ΔNLL (bench/out/sensitivity.json)", "",
                      "| option | pairs | ρ HAWQ with Hutchinson | ρ HAWQ with empirical Fisher | ρ fisher error model |",
                      "|---|---|---|---|---|"]
            for opt, m in r["measured_ranking"].items():
                lines.append(f"| {opt} | {m['pairs']} | {m['spearman_hutchinson']:.3f} | "
                             f"{m['spearman_empirical_fisher']:.3f} | {m['spearman_fisher_error_model']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny test models (+ the trained tiny Qwen2 if present)")
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--probes", type=int, default=16, help="Hutchinson probes per seed")
    ap.add_argument("--seq-len", type=int, default=256, help="SmolLM2 calibration window")
    ap.add_argument("--tokens", type=int, default=2048, help="SmolLM2 calibration tokens")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = OUT / "streamed_signals.json"
    results = json.loads(path.read_text())["models"] if path.is_file() else {}
    if args.tiny:
        results.update(tiny(args.probes))
    if args.smollm2:
        results["SmolLM2-135M"] = smollm2(args.probes, args.seq_len, args.tokens)
    doc = {"models": results, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
           "load_average": os.getloadavg()}
    atomic_write_text(path, canonical_json(doc) + "\n")
    atomic_write_text(OUT / "streamed_signals.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
