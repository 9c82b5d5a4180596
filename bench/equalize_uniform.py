"""Uniform rows with and without equalization: every decoder linear at one option, `rtn-w` on the model as it
is and on the model with AWQ's scales folded in (`awq`), scored on the test windows (ppl, KL to the F32 model).

    python bench/equalize_uniform.py --gguf models/gemma3/gemma-3-270m-q4_k_m.gguf --bos --options int4-g64-asym

Calibration: --calib (WikiText-2 validation), 8192 tokens in 512-token windows; test: 16 × 512 tokens of --text.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from bitalloc.calibration import leading_bos, make_calibration, read_text
from bitalloc.equalize import equalize
from bitalloc.evaluate import evaluate, evaluation_windows
from bitalloc.models import load_model, select_modules
from bitalloc.options import parse_option
from bitalloc.quantizers.materialize import quantize_model

sys.path.insert(0, str(Path(__file__).parent))
from common import default_gguf, smollm2_arguments  # noqa: E402


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--options", default="int4-g64-asym,int3-g64-asym", help="comma-separated option labels")
    ap.add_argument("--bos", action="store_true", help="test windows start with the tokenizer's BOS (Gemma)")
    args = ap.parse_args()
    loaded = load_model(args.gguf or default_gguf())
    model, tok = loaded.model.eval(), loaded.tokenizer
    calib = make_calibration(tok, read_text(args.calib), seq_len=512, tokens=8192, source=Path(args.calib).name)
    windows = evaluation_windows(read_text(args.text), tok, 512, 16, bos=leading_bos(tok) if args.bos else None)
    names = select_modules(model)
    reference = copy.deepcopy(model)  # the F32 model runs beside each row (Gemma's log-probabilities need 8.6 GB)
    start = time.time()
    equalized = copy.deepcopy(model)
    equalize(equalized, calib.tokens, progress=True)
    print(f"equalized in {time.time() - start:.0f} s; F32 equalized vs F32 on 2 windows: "
          f"KL {evaluate(equalized, windows[:2], reference=reference).kl:.2e}", flush=True)
    print("| option | rtn-w ppl / KL | awq ppl / KL |\n|---|---|---|")
    for label in args.options.split(","):
        cells = []
        for base in (model, equalized):
            quantized = copy.deepcopy(base)
            quantize_model(quantized, {n: parse_option(label) for n in names}, "rtn-w", calib.tokens)
            result = evaluate(quantized, windows, reference=reference)
            cells.append(f"{result.ppl:.2f} / {result.kl:.3f}")
        print(f"| {label} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
