"""Solvers on synthetic candidate tables shaped like a real one: time and optimality gap.

    python bench/solvers.py [--sizes 100,1000,10000,100000,1000000] [--options 8,16] [--budget 4.0]

Instances: groups get a real module shape (storage counted exactly, scales and zero-points
included) and per-option predicted losses log E[g,k] = a_g + s_k + e[g,k], where the option
curve s_k, the spread of the group scales a_g and of the residuals e are measured on a cached
SmolLM2 candidate table (~/.cache/bitalloc, written by `bitalloc plan`); without one, the
statistics recorded in a previous bench/out/solvers.json are used. Columns are K of the real table's int/fp16 options, evenly
spaced in bits. Budget: --budget storage bits per weight.

Each solver's gap is measured against the exact ILP optimum where one was computed (HiGHS with
gap_rel 1e-9, up to 10^4 groups), else against the Lagrangian dual bound (a proven lower bound,
so the true gap is at most that). Times are wall-clock seconds of `solve()` on this machine
(its load average is recorded: the machine is shared). Prints a table, writes bench/out/solvers.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bitalloc.io import atomic_write_text, canonical_json
from bitalloc.options import QuantOption
from bitalloc.solvers import Problem, SolverError, solve

ROOT = Path(__file__).resolve().parents[1]

def real_table_stats(cache_dir: Path) -> dict | None:
    """Shapes, option curve and spreads of the largest cached candidate table (int/fp16 options only)."""
    best = None
    for path in sorted(glob.glob(str(cache_dir / "table-*.npz"))):  # the table with the most modules
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                arrays = {k: z[k] for k in ("storage_bits", "shapes", "err_fisher")}
        except Exception:
            continue
        if best is None or len(header["groups"]) > len(best[0]["groups"]):
            best = (header, arrays, Path(path).name)
    if best is None:
        return None
    header, a, source = best
    # Only what this bitalloc's QuantOption describes (tables from newer code may carry more fields).
    known = set(QuantOption.__dataclass_fields__)
    options = [{k: v for k, v in o.items() if k in known} for o in header["options"]]
    usable = [k for k, o in enumerate(options) if o["fmt"] in ("int", "keep") and np.isfinite(a["storage_bits"][:, k]).all()
              and (a["err_fisher"][:, k] > 0).all()]
    logE = np.log(a["err_fisher"][:, usable])
    ref = int(np.argmin(np.abs(np.median(a["storage_bits"][:, usable] / a["shapes"].prod(1)[:, None], axis=0) - 4.0)))
    scale = logE[:, ref]
    curve = np.median(logE - scale[:, None], axis=0)
    residual = logE - scale[:, None] - curve[None, :]
    shapes, counts = np.unique(a["shapes"], axis=0, return_counts=True)
    return {
        "source": f"cached table {source}",
        "groups": len(header["groups"]),
        "shapes": shapes.tolist(), "shape_counts": counts.tolist(),
        "scale_mean": float(scale.mean()), "scale_std": float(scale.std()), "residual_std": float(residual.std()),
        "options": [{**options[k], "curve": float(c)} for k, c in zip(usable, curve)],
    }


def instance(stats: dict, G: int, K: int, budget_bpw: float, seed: int) -> tuple[Problem, list[str]]:
    rng = np.random.default_rng(seed)
    opts = sorted(stats["options"], key=lambda o: QuantOption.from_dict({k: v for k, v in o.items() if k != "curve"})
                  .bits_per_weight(576))
    pick = np.unique(np.linspace(0, len(opts) - 1, K).round().astype(int))
    chosen = [opts[i] for i in pick]
    qopts = [QuantOption.from_dict({k: v for k, v in o.items() if k != "curve"}) for o in chosen]
    curve = np.array([o["curve"] for o in chosen])
    shapes = np.array(stats["shapes"])
    p = np.array(stats["shape_counts"], dtype=float)
    which = rng.choice(len(shapes), size=G, p=p / p.sum())
    per_shape = np.array([[q.storage_bits(int(o), int(i)) for q in qopts] for o, i in shapes], dtype=np.float64)
    bits = per_shape[which]
    scale = rng.normal(stats["scale_mean"], stats["scale_std"], (G, 1))
    cost = np.exp(scale + curve[None, :] + rng.normal(0, stats["residual_std"], (G, len(qopts))))
    weights = float(shapes.prod(1)[which].sum())
    return Problem(cost, bits, budget_bpw * weights), [q.label for q in qopts]


def run(problem: Problem, solver: str, **settings) -> dict:
    start = time.perf_counter()
    try:
        sol = solve(problem, solver, **settings)
    except SolverError as e:
        return {"solver": solver, "settings": settings, "refused": str(e), "seconds": time.perf_counter() - start}
    return {"solver": solver, "settings": settings, "seconds": time.perf_counter() - start, "objective": sol.objective,
            "bound": sol.bound, "status": sol.status, "reported_gap": sol.gap, "details": sol.details}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000,100000,1000000")
    ap.add_argument("--options", default="8,16")
    ap.add_argument("--budget", type=float, default=4.0, help="storage bits per weight")
    ap.add_argument("--ilp-max", type=int, default=10_000, help="largest instance given to the exact ILPs")
    ap.add_argument("--evo-max", type=int, default=1_000, help="largest instance given to the evolutionary search")
    ap.add_argument("--cache-dir", default=os.environ.get("BITALLOC_CACHE_DIR", str(Path.home() / ".cache" / "bitalloc")))
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = ap.parse_args()
    stats = real_table_stats(Path(args.cache_dir))
    previous = Path(args.out) / "solvers.json"
    if stats is None and previous.is_file():
        stats = json.loads(previous.read_text())["stats"]
    if stats is None:
        sys.exit("no cached candidate table: run `bitalloc plan` on SmolLM2 once (see README), or pass --cache-dir")
    print(f"instances shaped like the {stats['source']} ({stats['groups']} modules): log-loss spread over groups "
          f"{stats['scale_std']:.2f}, residual {stats['residual_std']:.2f}; budget {args.budget} bits/weight; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    rows = []
    for K in [int(k) for k in args.options.split(",")]:
        for G in [int(g) for g in args.sizes.split(",")]:
            problem, labels = instance(stats, G, K, args.budget, seed=G + K)
            results = []
            if G <= args.ilp_max:
                results.append(run(problem, "ilp", backend="highs", time_limit_s=120.0))
                results.append(run(problem, "ilp", backend="cbc", time_limit_s=120.0))
            results.append(run(problem, "lagrangian"))
            dp = run(problem, "dp")
            if "refused" in dp and G <= args.ilp_max:
                # coarser budget steps: approximate, with a proven bound
                dp = run(problem, "dp", resolution_bits=int(2 ** np.ceil(np.log2(
                    (problem.max_storage_bits - problem.min_bits()) * G / 2e8))))
            results.append(dp)
            if G <= args.evo_max:
                results.append(run(problem, "evolutionary", trials=40, warm_start="lagrangian", seed=0))
            exact = next((r for r in results if r["solver"] == "ilp" and r.get("status") == "optimal"), None)
            lag = next(r for r in results if r["solver"] == "lagrangian")
            for r in results:
                r.update(groups=G, options=K)
                if "objective" not in r:
                    continue
                if exact is not None:
                    r["gap_vs_exact"] = (r["objective"] - exact["objective"]) / exact["objective"]
                else:
                    r["gap_vs_dual_bound"] = (r["objective"] - lag["bound"]) / r["objective"]
                rows.append(r)
                print(line(r), flush=True)
            rows.extend(r for r in results if "refused" in r)
            for r in results:
                if "refused" in r:
                    print(line(r), flush=True)
    text = table(rows)
    print(text)
    atomic_write_text(Path(args.out) / "solvers.json", canonical_json(
        {"stats": stats, "budget_bits_per_weight": args.budget, "load_average": os.getloadavg()[0],
         "cpus": os.cpu_count(), "rows": rows, "table": text}))


def name(r: dict) -> str:
    s = r["solver"]
    if s == "ilp":
        s += f" ({r['settings']['backend']})"
    if s == "dp" and r["settings"].get("resolution_bits"):
        s += f" (steps of {r['settings']['resolution_bits']} bits)"
    return s


def line(r: dict) -> str:
    if "refused" in r:
        return f"{r['groups']:>8} x {r['options']:<2} {name(r):28s} refused: {r['refused'][:90]}"
    gap = r.get("gap_vs_exact", r.get("gap_vs_dual_bound"))
    return f"{r['groups']:>8} x {r['options']:<2} {name(r):28s} {r['seconds']:8.2f}s  {r['status']:8s} gap {gap:.2e}"


def table(rows: list[dict]) -> str:
    out = ["| groups | options | solver | seconds | status | gap vs exact ILP | gap vs dual bound | reported gap |",
           "|---:|---:|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if "refused" in r:
            out.append(f"| {r['groups']} | {r['options']} | {name(r)} | - | refused (too large) | - | - | - |")
            continue
        ge = r.get("gap_vs_exact")
        gb = r.get("gap_vs_dual_bound")
        rep = r.get("reported_gap")
        out.append(f"| {r['groups']} | {r['options']} | {name(r)} | {r['seconds']:.2f} | {r['status']} | "
                   f"{'-' if ge is None else f'{ge:.1e}'} | {'-' if gb is None else f'{gb:.1e}'} | "
                   f"{'-' if rep is None else f'{rep:.1e}'} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
