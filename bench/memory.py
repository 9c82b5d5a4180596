"""Peak memory of profiling SmolLM2 (statistics + candidate table): whole model vs block-streamed.

Each mode runs in a fresh subprocess (so one cannot inherit the other's heap) and reports:
  peak_rss_mb          ru_maxrss of the whole child run (load + calibration + profile)
  profile_peak_rss_mb  VmHWM of the profiling step alone (reset via /proc/self/clear_refs after loading)
  load_peak_rss_mb     VmHWM when loading finished (tokenizer/config/metadata, + all weights when whole)
and the wall time of each step. The tables of both runs are compared (max relative difference over
finite entries, and whether shapes, groups and storage bits agree exactly).

    OMP_NUM_THREADS=1 BITALLOC_CACHE_DIR=/tmp/stream-cache nice -n 10 python bench/memory.py --calib-tokens 4096
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import smollm2_arguments  # noqa: E402

MODES = ("whole", "stream")


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> bool:
    try:  # "5" resets the peak resident set size (Documentation/filesystems/proc.rst)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(mode: str, gguf: str, calib: str, calib_tokens: int, seq_len: int, out: str) -> None:
    """One profiling run; writes its table (npz) and measurements (json) next to `out`."""
    from bitalloc import api
    from bitalloc.checkpoint import open_streamed
    from bitalloc.models import load_model, select_modules
    from bitalloc.options import default_options

    t0 = time.perf_counter()
    loaded = open_streamed(gguf) if mode == "stream" else load_model(gguf)
    _ = loaded.content_hash  # part of the cache key either way
    calibration = api.resolve_calibration(calib, loaded, seq_len, calib_tokens, seed=0)
    names = select_modules(loaded.model)
    t_load = time.perf_counter() - t0
    load_hwm = _vm_hwm_mb()
    reset = _reset_hwm()
    t1 = time.perf_counter()
    table = api.profile(loaded, calibration, names, default_options(), cache_dir=None, progress=False)
    t_profile = time.perf_counter() - t1
    result = {
        "mode": mode, "load_s": round(t_load, 1), "profile_s": round(t_profile, 1),
        "load_peak_rss_mb": round(load_hwm, 1),
        "profile_peak_rss_mb": round(_vm_hwm_mb(), 1) if reset else None,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "content_hash": loaded.content_hash, "modules": len(names), "windows": int(calibration.tokens.shape[0]),
        "seq_len": int(calibration.tokens.shape[1]),
    }
    np.savez(out + ".npz", storage_bits=table.storage_bits, shapes=np.asarray(table.shapes),
             **{f"err_{m}": v for m, v in table.errors.items()})
    Path(out + ".json").write_text(json.dumps({**result, "groups": table.groups}))


def compare(a: dict, b: dict) -> dict:
    same_layout = a["groups"] == b["groups"] and np.array_equal(a["shapes"], b["shapes"]) and \
        np.array_equal(a["storage_bits"], b["storage_bits"], equal_nan=True)
    worst = {}
    for key in a:
        if key.startswith("err_"):
            x, y = a[key], b[key]
            ok = np.isfinite(x)
            denom = np.maximum(np.abs(x[ok]), np.finfo(np.float64).tiny)
            worst[key[4:]] = float(np.max(np.abs(x[ok] - y[ok]) / denom))
    return {"same_groups_shapes_bits": bool(same_layout), "max_rel_diff": worst}


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--child", choices=MODES, help=argparse_hidden())
    ap.add_argument("--child-out", help=argparse_hidden())
    args = ap.parse_args()
    gguf = args.gguf or str(Path("/work/main/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if args.child:
        child(args.child, gguf, args.calib, args.calib_tokens, args.seq_len, args.child_out)
        return
    runs, tables = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = str(Path(tmp) / mode)
            cmd = [sys.executable, __file__, "--child", mode, "--child-out", out, "--gguf", gguf, "--calib", args.calib,
                   "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            runs[mode] = {**json.loads(Path(out + ".json").read_text()), "wall_s": round(time.perf_counter() - start, 1)}
            with np.load(out + ".npz") as z:
                tables[mode] = {k: z[k] for k in z.files} | {"groups": runs[mode].pop("groups")}
            print(f"{mode}: {runs[mode]}", flush=True)
    agreement = compare(tables["whole"], tables["stream"])
    agreement["same_content_hash"] = runs["whole"]["content_hash"] == runs["stream"]["content_hash"]
    print(f"\n{'mode':<8}{'peak RSS MB':>13}{'profile-step peak MB':>22}{'after-load peak MB':>20}{'load s':>8}{'profile s':>11}{'wall s':>8}")
    for mode in MODES:
        r = runs[mode]
        print(f"{mode:<8}{r['peak_rss_mb']:>13.0f}{(r['profile_peak_rss_mb'] or float('nan')):>22.0f}"
              f"{r['load_peak_rss_mb']:>20.0f}{r['load_s']:>8.1f}{r['profile_s']:>11.1f}{r['wall_s']:>8.1f}")
    print(f"tables agree: {agreement}")
    result = {"model": gguf, "calibration": {"file": Path(args.calib).name, "tokens": args.calib_tokens,
                                             "seq_len": args.seq_len},
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": runs, "agreement": agreement}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from bitalloc.io import atomic_write_text, canonical_json

    atomic_write_text(out_dir / "memory.json", canonical_json(result) + "\n")
    print(f"wrote {out_dir / 'memory.json'}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
