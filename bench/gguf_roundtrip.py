"""llama.cpp round trip on SmolLM2: plan in GGUF types -> .gguf written by bitalloc -> size and ppl.

    python bench/gguf_roundtrip.py [--gguf PATH] [--budgets 4.5] [--types Q4_0,...] [--windows 8]

For each budget (bits per planned weight): plan with --target llama.cpp's types and the imatrix
quantizer (llama.cpp's algorithms, importance = the profile's mean x² per input column), write the
GGUF with `write_gguf`, and report: the file size vs the size predicted before quantizing, bits per
weight over the planned tensors, wikitext-2 test ppl of the written file read back by transformers
(what `bitalloc eval FILE.gguf` does) vs the simulated plan (`bitalloc eval --plan`), and, where
BITALLOC_LLAMA_CPP_BIN names a llama.cpp build, llama-perplexity of the file. --types limits the
candidate types (the candidate table costs seconds per type and module on one core).
Writes bench/out/gguf_roundtrip.json and .md.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bitalloc import api
from bitalloc.apply import apply
from bitalloc.calibration import read_text
from bitalloc.evaluate import evaluate, evaluation_windows
from bitalloc.gguf_file import write_gguf
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import load_model
from bitalloc.options import QuantOption

sys.path.insert(0, str(Path(__file__).parent))
from common import default_gguf, smollm2_arguments  # noqa: E402


def llama_perplexity(gguf: Path, text: str, ctx: int, chunks: int) -> float | None:
    bin_dir = os.environ.get("BITALLOC_LLAMA_CPP_BIN")
    exe = Path(bin_dir or "") / "llama-perplexity"
    if not bin_dir or not exe.is_file():
        return None
    r = subprocess.run([str(exe), "-m", str(gguf), "-f", text, "-c", str(ctx), "--chunks", str(chunks), "-t", "2",
                        "--no-repack"], capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--budgets", default="4.5")
    ap.add_argument("--types", default="Q8_0,Q5_0,Q4_0,IQ4_NL,Q6_K,Q5_K,Q4_K,IQ4_XS")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    args = ap.parse_args()
    source = args.gguf or default_gguf()
    out = Path(args.out)
    options = [QuantOption.gguf(t) for t in args.types.split(",")] + [QuantOption.keep()]
    start = time.perf_counter()
    table, loaded, calib = api.prepare(source, args.calib, options=options, calib_tokens=args.calib_tokens,
                                       seq_len=args.seq_len, quantizer="imatrix", progress=True)
    print(f"candidate table: {time.perf_counter() - start:.0f} s", flush=True)
    body = read_text(args.text)
    windows = evaluation_windows(body, loaded.tokenizer, args.seq_len, args.windows)
    base = evaluate(loaded.model, windows)
    rows = []
    for b in args.budgets.split(","):
        plan = api.plan_from_table(table, f"{b}bits", loaded, calib)
        plan.save(out / f"gguf_roundtrip-{b}bits.plan.json")
        path = out / f"smollm2-bitalloc-{b}bits.gguf"
        layout = write_gguf(copy.deepcopy(loaded.model), plan, source, path, calibration=calib.tokens)
        planned_bits = sum(layout.planned[a.module].nbytes * 8 for a in plan.assignments)
        weights = sum(a.shape[0] * a.shape[1] for a in plan.assignments)
        written = evaluate(load_model(str(path)).model, windows)
        simulated = evaluate(apply(copy.deepcopy(loaded.model), plan, calibration=calib.tokens), windows)
        types: dict[str, int] = {}
        for a in plan.assignments:
            types[layout.planned[a.module].ggml_type] = types.get(layout.planned[a.module].ggml_type, 0) + 1
        rows.append({"budget_bits": float(b), "file_bytes": path.stat().st_size, "predicted_file_bytes": layout.file_bytes,
                     "planned_bits_per_weight": planned_bits / weights,
                     "plan_storage_bits_per_weight": plan.summary.storage_bits_per_weight,
                     "types": dict(sorted(types.items())), "ppl_written_transformers": written.ppl,
                     "ppl_plan_simulated": simulated.ppl,
                     "ppl_llama_perplexity": llama_perplexity(path, args.text, args.seq_len, args.windows)})
        print(json.dumps(rows[-1]), flush=True)
        path.unlink()  # the .gguf is large; the plan and the numbers are kept
    result = {"bitalloc_version": api.bitalloc_version(), "source": source, "source_ppl": base.ppl,
              "windows": args.windows, "seq_len": args.seq_len, "calib_tokens": args.calib_tokens,
              "types_offered": args.types.split(",") + ["fp16"], "quantizer": "imatrix", "rows": rows}
    atomic_write_text(out / "gguf_roundtrip.json", canonical_json(result))
    lines = ["| budget bpw | file bytes | predicted | planned bpw | ppl written (transformers) | ppl simulated | "
             "ppl llama-perplexity | types |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget_bits']} | {r['file_bytes']:,} | {r['predicted_file_bytes']:,} | "
                     f"{r['planned_bits_per_weight']:.4f} | {r['ppl_written_transformers']:.3f} | "
                     f"{r['ppl_plan_simulated']:.3f} | {r['ppl_llama_perplexity'] or 'n/a'} | "
                     f"{', '.join(f'{n}×{t}' for t, n in r['types'].items())} |")
    md = f"source {Path(source).name}: ppl {base.ppl:.3f} ({args.windows} windows of {args.seq_len})\n\n" + "\n".join(lines) + "\n"
    atomic_write_text(out / "gguf_roundtrip.md", md)
    print(md)


if __name__ == "__main__":
    main()
