"""SmolLM2's candidate table computed on a local Ray cluster with 1 and 2 workers, against the single process.

    OMP_NUM_THREADS=1 python bench/ray_profile.py [--gguf PATH] [--calib TEXT] [--windows 8] [--seq-len 512]

Per run: wall time (actors started, model loaded in each, statistics, table rows), each worker's peak
RSS (getrusage in the actor), and how the table compares with the single-process one: bit-identical
cells, and the largest relative difference (profile/distributed.SHARD_RTOL bounds it). The machine's
load average is recorded beside each run: on a shared machine wall times say little without it.
Writes bench/out/ray_profile.json and ray_profile.md.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from bitalloc import api
from bitalloc.calibration import make_calibration, read_text
from bitalloc.config import RaySpec
from bitalloc.io import atomic_write_text
from bitalloc.models import load_model, select_modules
from bitalloc.options import default_options
from bitalloc.profile.distributed import SHARD_RTOL, RayPool, ray_candidate_table

from common import default_gguf, smollm2_arguments


def compare(single, other) -> dict:
    """Cells equal bit for bit, and the largest relative difference where an option fits."""
    equal, cells, worst = 0, 0, 0.0
    for m in single.errors:
        x, y = single.errors[m], other.errors[m]
        ok = ~np.isnan(x)
        cells += int(ok.sum())
        equal += int((x[ok] == y[ok]).sum())
        worst = max(worst, float(np.max(np.abs(x[ok] - y[ok]) / np.maximum(np.abs(x[ok]), 1e-300))))
    return {"cells": cells, "bit_identical_cells": equal, "max_rel_diff": worst}


def plan_choices(table, loaded, calib, budget: str) -> list[str]:
    return [a.label for a in api.plan_from_table(table, budget, loaded, calib).assignments]


def main() -> None:
    ap = smollm2_arguments(__doc__)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--workers", default="1,2", help="worker counts to run, comma list")
    ap.add_argument("--budget", default="4bits", help="budget of the plans whose choices are compared")
    ap.add_argument("--bits", default="3,4,8", help="INT bit widths of the grid (narrow: the table's time grows with it)")
    ap.add_argument("--group-size", type=int, default=64)  # divides SmolLM2's 576 and 1536
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import ray

    loaded = load_model(args.gguf or default_gguf())
    calib = make_calibration(loaded.tokenizer, read_text(args.calib), seq_len=args.seq_len,
                             tokens=args.windows * args.seq_len, source=Path(args.calib).name)
    names = select_modules(loaded.model, False, False)
    options = default_options(bits=[int(b) for b in args.bits.split(",")], group_sizes=(args.group_size,),
                              symmetric=(False,))
    runs = []

    load = os.getloadavg()
    t0 = time.perf_counter()
    single = api.profile(loaded, calib, names, options)
    wall = time.perf_counter() - t0
    driver_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reference_plan = plan_choices(single, loaded, calib, args.budget)
    runs.append({"workers": 0, "label": "single process", "wall_s": wall, "peak_rss_mb": [driver_rss],
                 "load_before": load, "load_after": os.getloadavg()})
    print(f"single process: {wall:.1f} s, peak RSS {driver_rss:.0f} MB, load {load}", flush=True)

    counts = [int(w) for w in args.workers.split(",")]
    ray.init(address="local", num_cpus=max(counts), include_dashboard=False, logging_level="warning")
    try:
        for n in counts:
            load = os.getloadavg()
            pool = RayPool(RaySpec(workers=n), loaded)
            t0 = time.perf_counter()
            try:
                table = ray_candidate_table(pool, names, calib, options)
                wall = time.perf_counter() - t0
                rss = pool.peak_rss_mb()
            finally:
                pool.close()
            row = {"workers": n, "label": f"{n} Ray worker(s)", "wall_s": wall, "peak_rss_mb": rss,
                   "load_before": load, "load_after": os.getloadavg(), **compare(single, table)}
            row["same_plan_choices"] = plan_choices(table, loaded, calib, args.budget) == reference_plan
            runs.append(row)
            print(f"{n} worker(s): {wall:.1f} s, peak RSS per worker {[round(r) for r in rss]} MB, "
                  f"{row['bit_identical_cells']}/{row['cells']} cells bit-identical, max rel diff {row['max_rel_diff']:.2e}, "
                  f"same plan: {row['same_plan_choices']}, load {load}", flush=True)
    finally:
        ray.shutdown()

    result = {"model": loaded.source, "modules": len(names), "options": len(options), "windows": calib.n_windows,
              "seq_len": calib.seq_len, "calibration": Path(args.calib).name, "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "budget": args.budget, "shard_rtol": SHARD_RTOL, "runs": runs}
    out = Path(args.out)
    atomic_write_text(out / "ray_profile.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "ray_profile.md", markdown(result))
    print(f"wrote {out / 'ray_profile.json'} and {out / 'ray_profile.md'}")


def markdown(r: dict) -> str:
    lines = [f"# SmolLM2 candidate table on Ray ({r['modules']} modules x {r['options']} options, "
             f"{r['windows']} x {r['seq_len']} tokens of {r['calibration']})", "",
             f"{r['cpus']} CPUs shared with other work (load average = 1, 5, 15 min before/after each run); "
             f"torch threads per process {r['torch_threads']}, one CPU per Ray worker. Wall time includes starting the "
             "actors and loading the model in each.", "",
             "| run | wall s | vs single | peak RSS per process (MB) | cells bit-identical | max rel diff | same plan | load before | load after |",
             "|---|---:|---:|---|---:|---:|---|---|---|"]
    base = r["runs"][0]["wall_s"]
    for run in r["runs"]:
        same = "-" if run["workers"] == 0 else f"{run['bit_identical_cells']}/{run['cells']}"
        diff = "-" if run["workers"] == 0 else f"{run['max_rel_diff']:.1e}"
        plan = "-" if run["workers"] == 0 else ("yes" if run["same_plan_choices"] else "NO")
        lines.append(f"| {run['label']} | {run['wall_s']:.1f} | {run['wall_s'] / base:.2f}x | "
                     f"{', '.join(f'{m:.0f}' for m in run['peak_rss_mb'])} | {same} | {diff} | {plan} | "
                     f"{', '.join(f'{x:.2f}' for x in run['load_before'])} | {', '.join(f'{x:.2f}' for x in run['load_after'])} |")
    lines += ["", f"Tolerance with more than one worker: relative {r['shard_rtol']:g} per cell (float32 sums of the "
              "shards added in another order); one worker reproduces the single-process table bit for bit.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
