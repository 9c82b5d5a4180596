"""Solve one candidate table several ways and score each plan: which setting makes a plan lose?

    python bench/plan_variants.py --gguf "$(bash bench/fetch_gemma3.sh)" --out bench/out/peers-gemma3 \
        --variants "4.4559,fisher-tw;4.4559,fisher;4.4559,fisher-tw,min3;4.4559,fisher-tw,verify"

The model is bench/peers.py's F32 copy of --gguf (run peers.py first), and the table is peers.py's
`--target llama.cpp` one for it (its profile cache: GGUF types,
imatrix quantizer, wiki.valid 8192 tokens), or with --quantizer rtn / rtn-w peers.py's INT table (the default
INT grid), or --formats' grid (e.g. int,fp8,mxfp4,nvfp4,keep), so the variants differ only in how they are solved. A variant is
"BITS,ERROR_MODEL[,min<K>|min-uniform|verify[=WINDOWS]|pin=LABEL|untied]": the budget in bits per planned weight, the error
model, and optionally a floor on every module's nominal bits (min3: no 2-bit type; min-uniform: the bits of the best uniform
option that fits, `--min-bits uniform`), `verify` (the repair loop on
held-back calibration windows; verify=N: on N of them, the product's default is 2) or pin=LABEL (every module that option: a uniform row, applied and scored the
same way; give a budget it fits, e.g. 16) or untied (`--tie none`: q/k/v and gate/up may take different options, which
vLLM's fused layers cannot load). --bos scores windows that start with BOS (peers.py --bos); --no-calib-bos profiles on
windows without it; --calib builtin profiles on the set bitalloc ships (the headline command's), not on
WikiText-2 validation. Each plan is applied and scored as peers.py scores its rows (WikiText-2 test, ppl and
KL to the F32 model). Rows go to --out/plan_variants.jsonl, with the modules planned at 3 bits or fewer and
the first 12 hex digits of the quantizers' code fingerprint (`numerics`: rows before and after a quantizer change).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from bitalloc import api
from bitalloc.apply import apply, plan_quantizer_settings
from bitalloc.calibration import leading_bos, make_calibration, read_text, widened
from bitalloc.cli import _solver_settings
from bitalloc.config import VerifySettings
from bitalloc.constraints import DEFAULT_TIES, Constraints
from bitalloc.evaluate import EvalResult, evaluate, evaluation_windows, reference_logprobs
from bitalloc.errors import BadInputError
from bitalloc.models import load_model
from bitalloc.options import default_options, parse_option
from bitalloc.profile.store import numerics_fingerprint
from bitalloc.quantizers import measuring_quantizer
from bitalloc.table import ERROR_MODELS
from bitalloc.targets import resolve_formats

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, default_gguf, smollm2_arguments  # noqa: E402
from peers import grid_for  # noqa: E402


def variant_arguments(doc: str, variants_required: bool = True):
    """The arguments that pick the model, its table and the test windows (shared with bench/ppl_vs_kl.py and
    bench/gptq_ratio.py, whose variants are optional)."""
    ap = smollm2_arguments(doc)
    ap.add_argument("--work", default=str(ROOT / "bench" / "llama_cpp" / "work"), help="bench/peers.py's --work")
    ap.add_argument("--f32", default=None, help="the unquantized model file (default: --work's F32 copy of --gguf); "
                    "rows still name the model by --gguf's stem")
    ap.add_argument("--variants", required=variants_required, default="", help="';'-separated BITS,ERROR_MODEL[,min<K>|min-uniform|verify[=WINDOWS]|pin=LABEL|untied]")
    ap.add_argument("--quantizer", default="imatrix", help="imatrix: the --target llama.cpp table (GGUF types); "
                    "any other quantizer: the default INT grid's table made with it")
    ap.add_argument("--apply-quantizer", default=None, help="apply the plans with this quantizer instead of the table's "
                    "(an ablation: e.g. an awq table's plans applied with awq-gptq)")
    ap.add_argument("--apply-setting", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for the applying quantizer, repeatable (e.g. act_order=true for GPTQ's activation order, "
                    "hessian_tokens=8192 for GPTQ's Hessians from the profile's windows alone)")
    ap.add_argument("--formats", default=None, help="format families of the table's grid, e.g. int,nvfp4,keep "
                    "(default: the grid --quantizer's rows use: GGUF types for imatrix, else the default INT grid)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--bos", action="store_true", help="score windows that start with the tokenizer's BOS (peers.py --bos)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="tokens the table is profiled (and awq folded) on")
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows' pick (the product's "
                    "default 0; another seed picks other windows of the same text: GPTQ's run-to-run spread)")
    ap.add_argument("--no-calib-bos", action="store_true", help="calibrate without BOS even where the tokenizer adds one "
                    "(as bitalloc did before; an ablation of the BOS-first calibration windows)")
    ap.add_argument("--parse-special", action="store_true", help="tokenize the calibration text's special-token strings "
                    "(e.g. <unk>) as those tokens, as bitalloc did before it read text as text (an ablation)")
    return ap


def load_table(args):
    """(model name: --gguf's stem, loaded model, the model as profiled, candidate table, calibration, test windows)
    for the parsed arguments. The model as profiled is the loaded one, or for an equalizing quantizer (awq) a copy
    with its scales folded in: plans are solved (and verified) on it, and applied to copies of it (apply does not
    fold a model twice)."""
    stem = Path(args.gguf or default_gguf()).stem
    # bench/peers.py's F32 copy, or --f32: the unquantized model as a file transformers loads. For these
    # GGUF checkpoints that may be --gguf itself (transformers dequantizes it to the same F32 weights as
    # llama-quantize does: Gemma 3's F32 ppl is 27.844 either way), so INT variants need no llama.cpp build.
    f32 = Path(args.f32) if args.f32 else Path(args.work) / stem / "f32.gguf"
    if not f32.exists():
        sys.exit(f"error: {f32} not found; run bench/peers.py with the same --gguf and --work first, or pass --f32")
    loaded = load_model(str(f32))
    calibration = None if args.calib == "builtin" else args.calib  # None: the built-in set, as the headline command
    if (args.no_calib_bos or args.parse_special) and calibration is not None:
        calibration = make_calibration(loaded.tokenizer, read_text(args.calib), seq_len=512, tokens=args.calib_tokens,
                                       seed=args.calib_seed, source=Path(args.calib).name,
                                       **({"bos": None} if args.no_calib_bos else {}), special_as_text=not args.parse_special)
    options = default_options(formats=resolve_formats(args.formats)) if args.formats else grid_for(args.quantizer)
    table, profiled, calib = api.prepare(loaded.model, calibration, tokenizer=loaded.tokenizer, options=options,
                                  calib_tokens=args.calib_tokens, seed=args.calib_seed, seq_len=512, quantizer=args.quantizer, cache_dir=True, progress=True)
    bos = leading_bos(loaded.tokenizer) if args.bos else None
    windows = evaluation_windows(read_text(args.text), loaded.tokenizer, 512, args.windows, bos=bos)
    return stem, loaded, profiled, table, calib, windows


@dataclass(frozen=True)
class Variant:
    """One variant string, read: BITS,ERROR_MODEL[,min<K>|min-uniform|verify[=WINDOWS]|pin=LABEL|untied]."""
    budget: str
    error_model: str
    constraints: Constraints
    verify: VerifySettings | None


def parse_variant(variant: str) -> Variant:
    """Read one variant string; an unknown or malformed flag stops the bench before anything is profiled (a typo such as
    `untie` would otherwise give a tied plan an hour later, under a name that says untied)."""
    bits, *rest = [x.strip() for x in variant.split(",")]
    try:
        float(bits)
    except ValueError:
        raise SystemExit(f"variant {variant!r}: {bits!r} is not a budget in bits per weight (e.g. 4.0,fisher-tw)") from None
    if not rest or not rest[0]:
        raise SystemExit(f"variant {variant!r}: name the error model after the bits (e.g. {bits},fisher-tw)")
    error_model, *extra = rest
    if error_model not in ERROR_MODELS:
        raise SystemExit(f"variant {variant!r}: unknown error model {error_model!r}; choose one of {', '.join(ERROR_MODELS)}")
    floor, pins, verify = None, (), None
    for flag in extra:
        if flag == "min-uniform":
            floor = "uniform"
        elif flag.startswith("min") and flag[3:].isdigit():
            floor = int(flag[3:])
        elif flag.startswith("pin=") and flag[4:]:
            try:
                parse_option(flag[4:])
            except BadInputError as e:
                raise SystemExit(f"variant {variant!r}: {e}") from None
            pins = ((r".*", flag[4:]),)
        elif flag == "verify" or (flag.startswith("verify=") and flag[7:].isdigit()):
            # the product's VerifySettings; verify=N: the same on N held-back windows
            verify = VerifySettings(**({"windows": int(flag[7:])} if "=" in flag else {}))
        elif flag != "untied":
            raise SystemExit(f"variant {variant!r}: unknown flag {flag!r}; the flags are min<K>, min-uniform, "
                             "verify[=WINDOWS], pin=LABEL and untied")
    ties = () if "untied" in extra else DEFAULT_TIES
    return Variant(f"{bits}bits", error_model, Constraints(min_bits=floor, pins=pins, ties=ties), verify)


def parse_variants(text: str) -> list[str]:
    """--variants split at ';', each read by parse_variant now, so that a typo in the last one stops the bench before
    the table is profiled rather than after the first variants have run."""
    variants = text.split(";")
    for variant in variants:
        parse_variant(variant)
    return variants


def solve_variant(variant: str, table, loaded, calib, apply_quantizer: str | None = None):
    """The plan of one variant string (parse_variant).
    apply_quantizer: where the table is that quantizer's stand-in (an awq table, applied with awq-gptq), the plan is
    solved as that quantizer's, as `bitalloc plan --quantizer awq-gptq` makes it: the same choices, and `verify`
    then applies its candidates with it (verify.py, step 6)."""
    if apply_quantizer and apply_quantizer != table.quantizer and measuring_quantizer(apply_quantizer) == table.quantizer:
        table = copy.copy(table)
        table.quantizer = apply_quantizer
    spec = parse_variant(variant)
    return api.plan_from_table(table, spec.budget, loaded, calib, constraints=spec.constraints,
                               error_model=spec.error_model, verify=spec.verify)


# Above this the unquantized model's log-probabilities are not kept (Gemma 3's 262k vocabulary: 8.6 GB for
# 16 × 512 tokens); the model itself is the reference then, run again beside every variant.
REFERENCE_CACHE_BYTES = 4 << 30


def scoring_reference(model, windows):
    """The F32 log-probabilities of the test windows, or the F32 model where they would not fit in memory."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if windows.numel() * vocab * 4 > REFERENCE_CACHE_BYTES:
        print(f"reference: {windows.numel() * vocab * 4 / 2**30:.1f} GiB of log-probabilities; "
              "running the F32 model beside each variant instead", flush=True)
        return model
    return reference_logprobs(model, windows, progress=True)


def score_by_window(applied, windows, reference):
    """evaluate()'s result over all windows, and each window's mean NLL and KL (bench/paired.py reads them: a
    difference between two rows is compared with its paired standard error over windows)."""
    nll, kl = [], []
    for i in range(windows.shape[0]):
        one = evaluate(applied, windows[i:i + 1], reference=[reference[i]] if isinstance(reference, list) else reference)
        nll.append(round(one.nll, 6))
        kl.append(round(one.kl, 6))
    n = len(nll)  # every window scores the same number of tokens, so the means over windows are the totals'
    result = EvalResult(ppl=math.exp(sum(nll) / n), nll=sum(nll) / n, kl=sum(kl) / n,
                        top1=None, windows=n, seq_len=int(windows.shape[1]), scored_tokens=n * (windows.shape[1] - 1))
    return result, {"window_nll": nll, "window_kl": kl}


def main() -> None:
    args = variant_arguments(__doc__).parse_args()
    variants = parse_variants(args.variants)
    model_name, loaded, profiled, table, calib, windows = load_table(args)
    bos = leading_bos(loaded.tokenizer) if args.bos else None
    reference = scoring_reference(loaded.model, windows)
    apply_settings = _solver_settings(args.apply_setting)  # the CLI's KEY=VALUE reading
    out = Path(args.out) / "plan_variants.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        start = time.time()
        plan = solve_variant(variant, table, profiled, calib, args.apply_quantizer)
        # the Calibration, not its ids: GPTQ widens it as a plan made in process is applied (quantize_model)
        applied = apply(copy.deepcopy(profiled.model), plan, calibration=calib, quantizer=args.apply_quantizer,
                        **apply_settings)
        result, per_window = score_by_window(applied, windows, reference)
        used = plan_quantizer_settings(plan, args.apply_quantizer or plan.quantizer, apply_settings)
        hessian_tokens = used.get("hessian_tokens")
        row = {"model": model_name, "quantizer": args.quantizer, "apply_quantizer": args.apply_quantizer or args.quantizer,
               **({"apply_settings": apply_settings} if apply_settings else {}),
               # the tokens GPTQ's Hessians came from (the text may hold fewer than asked)
               **({"hessian_tokens": widened(calib, hessian_tokens).tokens.numel()} if hessian_tokens else {}),
               **({"float_target": used["float_target"]} if "float_target" in used else {}),
               **({"token_weighted": used["token_weighted"]} if "token_weighted" in used else {}),
               "formats": args.formats, "calibration": calib.source, "calib_tokens": int(calib.tokens.numel()),
               **({"calib_seed": calib.seed} if calib.seed else {}), "variant": variant, "bos": bos, "calibration_bos": calib.bos,
               # how special-token strings in the text were read: "text" where that changed the ids (calibration.py)
               "special_tokens": "parsed" if args.parse_special else calib.settings().get("special_tokens", "none in the text"),
               "bpw": plan.summary.storage_bits_per_weight,
               "ppl": result.ppl, "kl": result.kl, **per_window, "predicted_dnll": plan.summary.predicted_delta_loss,
               **({"min_bits_uniform": plan.solver.details["min_bits_uniform"]} if "min_bits_uniform" in plan.solver.details else {}),
               "types": dict(sorted(Counter(a.label for a in plan.assignments).items())),
               "at_most_3_bits": sorted(a.module for a in plan.assignments if a.option.bits <= 3),
               "verification": None if plan.verification is None else plan.verification.outcome,
               **({"verified": plan.verification.model_dump(mode="json")} if plan.verification else {}),
               "seconds": round(time.time() - start, 1), "threads": torch.get_num_threads(),
               "numerics": numerics_fingerprint()[:12]}
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{variant:<28} {row['bpw']:.4f} bpw  ppl {result.ppl:.3f}  KL {result.kl:.4f}  "
              f"predicted {row['predicted_dnll']:.3f}  {row['verification'] or ''}", flush=True)


if __name__ == "__main__":
    main()
