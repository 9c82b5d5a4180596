"""Peak memory of profiling SmolLM2 (statistics + candidate table): whole model vs block-streamed.

Each mode runs in a fresh subprocess (so one cannot inherit the other's heap) and reports:
  peak_rss_mb          ru_maxrss of the whole child run (load + calibration + profile)
  profile_peak_rss_mb  VmHWM of the profiling step alone (reset via /proc/self/clear_refs after loading)
  load_peak_rss_mb     VmHWM when loading finished (tokenizer/config/metadata, + all weights when whole)
and the wall time of each step. The tables of both runs are compared (max relative difference over
finite entries, and whether shapes, groups and storage bits agree exactly).

The streamed run also records where its memory goes (`breakdown`, VmRSS = resident now, VmHWM = peak):
  start / imports / open_streamed (config, tokenizer, meta skeleton, GGUF index) / content hash
  (every tensor read once) / calibration: the fixed cost before any block is loaded, and then, for
  every load of the walk (prefix and head: embedding + norm + head; block l forward; block l backward
  + its table rows), the resident memory when the load began and the peak during it. The fixed cost
  is what stays resident when no block is loaded.

    OMP_NUM_THREADS=1 BITALLOC_CACHE_DIR=/tmp/stream-cache nice -n 10 python bench/memory.py --calib-tokens 4096
    python bench/memory.py --calib-tokens 1024 --modes stream --out /tmp/x   # the streamed breakdown alone
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("whole", "stream")


def _vm_mb(field: str = "VmHWM") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _vm_hwm_mb() -> float:
    return _vm_mb("VmHWM")


class Breakdown:
    """Resident memory at named steps, and per load of the streamed walk (streamed._loaded wrapped)."""

    def __init__(self):
        self.steps: list[dict] = []
        self.loads: list[dict] = []

    def mark(self, step: str) -> None:
        self.steps.append({"step": step, "rss_mb": round(_vm_mb("VmRSS"), 1), "peak_mb": round(_vm_mb("VmHWM"), 1)})
        _reset_hwm()

    def wrap_loads(self) -> None:
        from contextlib import contextmanager

        from bitalloc.profile import streamed

        inner = streamed._loaded
        seen: dict[str, int] = {}

        @contextmanager
        def loaded(loaded_model, modules):
            names = [n for n, _ in modules]
            label = names[0] if len(names) == 1 else "outside (" + ", ".join(names) + ")"
            seen[label] = seen.get(label, 0) + 1
            start = _vm_mb("VmRSS")
            _reset_hwm()
            with inner(loaded_model, modules):
                yield
            self.loads.append({"load": label, "pass": seen[label], "rss_before_mb": round(start, 1),
                               "peak_mb": round(_vm_mb("VmHWM"), 1), "rss_after_mb": round(_vm_mb("VmRSS"), 1)})

        streamed._loaded = loaded

    def summary(self) -> dict:
        blocks = [x for x in self.loads if not x["load"].startswith("outside")]
        outside = [x for x in self.loads if x["load"].startswith("outside")]
        fwd = [x for x in blocks if x["pass"] == 1]
        bwd = [x for x in blocks if x["pass"] == 2]
        fixed = self.steps[-1]["rss_mb"]
        return {
            "fixed_cost_mb": {s["step"]: s["rss_mb"] for s in self.steps},
            "resident_before_walk_mb": fixed,
            "forward_block_peak_mb": max(x["peak_mb"] for x in fwd) if fwd else None,
            "backward_block_peak_mb": max(x["peak_mb"] for x in bwd) if bwd else None,
            "outside_peaks_mb": [x["peak_mb"] for x in outside],
            "resident_between_blocks_mb": [min(x["rss_before_mb"] for x in fwd), max(x["rss_after_mb"] for x in bwd)]
            if fwd and bwd else None,
        }


def _reset_hwm() -> bool:
    try:  # "5" resets the peak resident set size (Documentation/filesystems/proc.rst)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(mode: str, gguf: str, calib: str, calib_tokens: int, seq_len: int, out: str) -> None:
    """One profiling run; writes its table (npz) and measurements (json) next to `out`."""
    parts = Breakdown()
    parts.mark("start (python)")
    import numpy as np

    from bitalloc import api
    from bitalloc.checkpoint import open_streamed
    from bitalloc.models import load_model, select_modules
    from bitalloc.options import default_options

    parts.mark("imports (bitalloc, torch, numpy)")
    t0 = time.perf_counter()
    loaded = open_streamed(gguf) if mode == "stream" else load_model(gguf)
    parts.mark("open_streamed (config, tokenizer, skeleton, GGUF index)" if mode == "stream" else "load_model")
    _ = loaded.content_hash  # part of the cache key either way
    parts.mark("content hash")
    calibration = api.resolve_calibration(calib, loaded, seq_len, calib_tokens, seed=0)
    parts.mark("calibration")
    if mode == "stream":
        parts.wrap_loads()
    names = select_modules(loaded.model)
    t_load = time.perf_counter() - t0
    load_hwm = max(s["peak_mb"] for s in parts.steps)
    reset = _reset_hwm()
    t1 = time.perf_counter()
    table = api.profile(loaded, calibration, names, default_options(), cache_dir=None, progress=False)
    t_profile = time.perf_counter() - t1
    result = {
        "mode": mode, "load_s": round(t_load, 1), "profile_s": round(t_profile, 1),
        "load_peak_rss_mb": round(load_hwm, 1),
        "profile_peak_rss_mb": round(_vm_hwm_mb(), 1) if reset else None,
        # the resets above lower ru_maxrss too (it reads the same high-water mark): take the largest peak seen
        "peak_rss_mb": round(max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _vm_hwm_mb(), load_hwm]
                                 + [x["peak_mb"] for x in parts.loads]), 1),
        "content_hash": loaded.content_hash, "modules": len(names), "windows": int(calibration.tokens.shape[0]),
        "seq_len": int(calibration.tokens.shape[1]),
        "breakdown": {"steps": parts.steps, "loads": parts.loads, **(parts.summary() if parts.loads else {})},
    }
    np.savez(out + ".npz", storage_bits=table.storage_bits, shapes=np.asarray(table.shapes),
             **{f"err_{m}": v for m, v in table.errors.items()})
    Path(out + ".json").write_text(json.dumps({**result, "groups": table.groups}))


def compare(a: dict, b: dict) -> dict:
    import numpy as np

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


def child_main() -> None:
    """The child's arguments without bench.common, which imports torch: its first step is measured before torch."""
    import argparse

    ap = argparse.ArgumentParser()
    for flag in ("--child", "--child-out", "--gguf", "--calib"):
        ap.add_argument(flag, required=True)
    ap.add_argument("--calib-tokens", type=int, required=True)
    ap.add_argument("--seq-len", type=int, required=True)
    a = ap.parse_args()
    child(a.child, a.gguf, a.calib, a.calib_tokens, a.seq_len, a.child_out)


def main() -> None:
    if "--child" in sys.argv:
        child_main()
        return
    import numpy as np

    from bench.common import default_gguf, smollm2_arguments

    ap = smollm2_arguments(__doc__)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--modes", default=",".join(MODES), help="whole,stream or one of them")
    ap.add_argument("--name", default="memory", help="result file: OUT/NAME.json")
    ap.add_argument("--child", choices=MODES, help=argparse_hidden())
    ap.add_argument("--child-out", help=argparse_hidden())
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    if args.child:
        child(args.child, gguf, args.calib, args.calib_tokens, args.seq_len, args.child_out)
        return
    runs, tables = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        modes = [m for m in MODES if m in args.modes.split(",")]
        for mode in modes:
            out = str(Path(tmp) / mode)
            cmd = [sys.executable, __file__, "--child", mode, "--child-out", out, "--gguf", gguf, "--calib", args.calib,
                   "--calib-tokens", str(args.calib_tokens), "--seq-len", str(args.seq_len)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            runs[mode] = {**json.loads(Path(out + ".json").read_text()), "wall_s": round(time.perf_counter() - start, 1)}
            with np.load(out + ".npz") as z:
                tables[mode] = {k: z[k] for k in z.files} | {"groups": runs[mode].pop("groups")}
            print(f"{mode}: {runs[mode]}", flush=True)
    agreement = None
    if len(modes) == 2:
        agreement = compare(tables["whole"], tables["stream"])
        agreement["same_content_hash"] = runs["whole"]["content_hash"] == runs["stream"]["content_hash"]
    print(f"\n{'mode':<8}{'peak RSS MB':>13}{'profile-step peak MB':>22}{'after-load peak MB':>20}{'load s':>8}{'profile s':>11}{'wall s':>8}")
    for mode in modes:
        r = runs[mode]
        print(f"{mode:<8}{r['peak_rss_mb']:>13.0f}{(r['profile_peak_rss_mb'] or float('nan')):>22.0f}"
              f"{r['load_peak_rss_mb']:>20.0f}{r['load_s']:>8.1f}{r['profile_s']:>11.1f}{r['wall_s']:>8.1f}")
    print(f"tables agree: {agreement}")
    if "stream" in runs:
        b = runs["stream"]["breakdown"]
        print("streamed, resident MB after each step: " + ", ".join(f"{s['step']} {s['rss_mb']:.0f}" for s in b["steps"]))
        print(f"streamed walk: forward block peak {b['forward_block_peak_mb']} MB, backward block (+ table rows) peak "
              f"{b['backward_block_peak_mb']} MB, embedding/head loads peak {b['outside_peaks_mb']} MB, resident "
              f"between blocks {b['resident_between_blocks_mb']} MB")
    result = {"model": gguf, "calibration": {"file": Path(args.calib).name, "tokens": args.calib_tokens,
                                             "seq_len": args.seq_len},
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": runs, "agreement": agreement,
              "load_average": os.getloadavg()}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from bitalloc.io import atomic_write_text, canonical_json

    atomic_write_text(out_dir / f"{args.name}.json", canonical_json(result) + "\n")
    print(f"wrote {out_dir / args.name}.json")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
