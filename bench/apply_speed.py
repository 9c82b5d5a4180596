"""How long applying a plan takes per quantizer on SmolLM2, and whether the applied weights are the table's.

rtn-w needs diag H of each layer's inputs. It now takes it from one forward pass of the unquantized
model over the plan's calibration windows (statistics.input_importance), which is also where the
candidate table took it from; before, it ran block by block on already-quantized inputs like GPTQ
(quantizers/sequential.py). This bench times both on the same uniform assignment and calibration
windows, with rtn and gptq beside them, and reports how far each rtn-w result is from the weights
whose errors the candidate table predicts (max |Δ| over all modules: 0 means exactly those).

GPTQ fitting toward the float model (float_target, halfway as on calibration you supply) runs the float model's
copy of each block beside it. Its inputs to the block's layers are kept from one pass of that copy
(sequential.FloatSide) where they fit in sequential.FLOAT_INPUTS_CACHE_BYTES; gptq-float-per-stage sets that to 0,
so each stage runs the copy again up to its layers, as before, and reports its distance to gptq-float's weights.

    python bench/apply_speed.py [--gguf PATH] [--calib FILE] [--option int4-g64-asym] [--tokens 8192]
                                [--runs rtn,rtn-w,rtn-w-sequential,gptq,gptq-float,gptq-float-per-stage] [--threads 1]
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import default_gguf, smollm2_arguments  # noqa: E402

from bitalloc.calibration import make_calibration, read_text  # noqa: E402
from bitalloc.models import load_model, select_modules, weight_matrix  # noqa: E402
from bitalloc.options import parse_option  # noqa: E402
from bitalloc.profile.statistics import collect_statistics  # noqa: E402
from bitalloc.quantizers import quantize_weight  # noqa: E402
from bitalloc.quantizers.materialize import quantize_model  # noqa: E402
from bitalloc.quantizers import sequential  # noqa: E402
from bitalloc.quantizers.sequential import quantize_sequential  # noqa: E402


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--option", default="int4-g64-asym")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--runs", default="rtn,rtn-w,rtn-w-sequential,gptq")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds comparable on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(args.gguf or default_gguf())
    model = loaded.model.eval()
    names = select_modules(model)
    option = parse_option(args.option)
    assign = {n: option for n in names}
    calib = make_calibration(loaded.tokenizer, read_text(args.calib), seq_len=args.seq_len, tokens=args.tokens, seed=0)
    stats = collect_statistics(model, names, calib)
    table_values = {n: quantize_weight(weight_matrix(model.get_submodule(n)).detach(), option, "rtn-w",
                                       hessian=stats[n].hessian).values for n in names}
    del stats

    rows = []
    runs = {
        "rtn": ("rtn", lambda m: quantize_model(m, assign, "rtn")),
        "rtn-w": ("rtn-w (one forward pass, now)", lambda m: quantize_model(m, assign, "rtn-w", calib.tokens)),
        "rtn-w-sequential": ("rtn-w (block by block, before)",
                             lambda m: quantize_sequential(m, assign, "rtn-w", calib.tokens)),
        "gptq": ("gptq (block by block)", lambda m: quantize_model(m, assign, "gptq", calib.tokens)),
        "gptq-float": ("gptq, halfway to the float model (float inputs kept from one pass, now)",
                       lambda m: quantize_model(m, assign, "gptq", calib.tokens, float_target=0.5)),
        "gptq-float-per-stage": ("gptq, halfway to the float model (a float pass per stage, before)",
                                 lambda m: _per_stage(lambda: quantize_model(m, assign, "gptq", calib.tokens, float_target=0.5))),
    }
    kept_values = None
    for key in args.runs.split(","):
        label, run = runs[key]
        m = copy.deepcopy(model)
        got, wall, cpu = timed(lambda: run(m))
        # rtn-w against the table's weights; the per-stage float passes against the kept ones (where both ran)
        against = table_values if "rtn-w" in label else kept_values if key == "gptq-float-per-stage" else None
        off = max(float((got[n].values - against[n]).abs().max()) for n in names) if against else None
        if key == "gptq-float":
            kept_values = {n: q.values for n, q in got.items()}
        rows.append({"quantizer": label, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "max_abs_vs_table": off,
                     "load_average": round(os.getloadavg()[0], 1)})
        print(rows[-1], flush=True)
        del m, got
        write(rows, args, option, calib, len(names))  # after every row: a run cut short keeps what it measured


def _per_stage(run):
    """run() with nothing of the float block kept between its stages."""
    kept, sequential.FLOAT_INPUTS_CACHE_BYTES = sequential.FLOAT_INPUTS_CACHE_BYTES, 0
    try:
        return run()
    finally:
        sequential.FLOAT_INPUTS_CACHE_BYTES = kept


def write(rows: list[dict], args, option, calib, modules: int) -> None:
    lines = [f"SmolLM2-135M, {modules} modules all {option.label}, {calib.n_windows}×{args.seq_len} calibration "
             f"tokens ({Path(args.calib).name}), {args.threads} torch thread(s); load average after each row in the "
             "table (CPU s is the steadier figure on a shared machine)", "",
             "| quantizer | wall s | CPU s | load | max abs diff to the table's weights (per stage: to the kept run's) |", "|---|---|---|---|---|"]
    for r in rows:
        diff = "—" if r["max_abs_vs_table"] is None else f"{r['max_abs_vs_table']:.3g}"
        lines.append(f"| {r['quantizer']} | {r['wall_s']} | {r['cpu_s']} | {r['load_average']} | {diff} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "apply_speed.md").write_text(text + "\n")
    (out / "apply_speed.json").write_text(json.dumps({"rows": rows, "option": option.label, "threads": args.threads,
                                                      "windows": calib.n_windows, "seq_len": args.seq_len}, indent=1))


if __name__ == "__main__":
    main()
