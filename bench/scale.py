"""Planning at the scale of the models users quantize: synthetic candidate tables with real shapes,
solved by every solver, and the memory a streamed profile of those shapes would need.

    OMP_NUM_THREADS=1 nice python bench/scale.py [--budget 4.0] [--ilp-time-limit 300] [--skip-untied]

Models (module names as transformers has them, so the default fused ties apply as in a real plan):
  llama-3.1-70b  80 blocks × 7 projections: hidden 8192, intermediate 28672, GQA k/v 1024 (560 groups)
  moe-48x64      Qwen3-30B-A3B widths with 64 experts: 48 blocks × (q [4096, 2048], k/v [512, 2048],
                 o [2048, 4096] + 64 experts × gate/up [768, 2048], down [2048, 768]) (9408 groups)
Options: the default grid (INT 2/3/4/5/6/8 bits × groups 32/64/128/row × asym/sym, + fp16 keep: 49).
Errors (seeded, deterministic): HAWQ-style ½ · h · n · mse, with n the module's weights, h a per-weight
curvature drawn log-normal around a per-projection and per-depth profile (first/last blocks and
v/down most sensitive), and mse = σ² · (range factor of the group size)² / (12 (2^b − 1)²) (the
uniform-quantizer noise of a Gaussian weight row; symmetric loses one level), times a log-normal
residual (σ 0.15) per cell; fp16 keep costs 0. Decreasing in bits, scaled by size.
Latency (synthetic decode step, batch 1): bytes read / 3 TB/s × a kernel factor (4/8-bit and fp16 1.0,
2-bit 1.3, 3/5/6-bit 1.6; group 32/64/128 ×1.15/1.08/1.03); an expert counts 8/64 of the time (top-8
routing). Scenarios per model: fused ties + storage budget; + a latency limit halfway between the fastest
plan and the storage-only optimum; MoE also without ties (--tie none).
Each solver: wall time, objective, gap to the ILP optimum (or to the best objective found when the ILP
stopped early), its own bound where it has one. The Pareto sweep solves five budgets (3–5 bits/weight).
Memory model: the block-streamed profile's peak parts per block for these shapes, beside the SmolLM2
figures measured by bench/memory.py (bench/out/memory.json) and the same model evaluated for SmolLM2.
Writes bench/out/scale.md + scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitalloc.constraints import Constraints, constraint_masks  # noqa: E402
from bitalloc.io import atomic_write_text, canonical_json  # noqa: E402
from bitalloc.options import QuantOption, default_options  # noqa: E402
from bitalloc.solvers import Problem, SolverError, solve  # noqa: E402
from bitalloc.table import CandidateTable  # noqa: E402
from solvers.pareto import pareto_sweep  # noqa: E402

OUT = Path(__file__).parent / "out"
BANDWIDTH_B_PER_S = 3e12
EXPERT_ACTIVE = 8 / 64


@dataclass(frozen=True)
class Shape:
    """A decoder stack: widths of one block; experts = 0 for a dense MLP."""

    name: str
    blocks: int
    hidden: int
    q_out: int
    kv_out: int
    intermediate: int
    experts: int = 0
    vocab: int = 128256
    tied: bool = False

    def modules(self) -> list[tuple[str, tuple[int, int]]]:
        """(name, (out, in)) of every planned projection, in model order."""
        h, att = self.hidden, "self_attn"
        out = []
        for b in range(self.blocks):
            p = f"model.layers.{b}"
            out += [(f"{p}.{att}.q_proj", (self.q_out, h)), (f"{p}.{att}.k_proj", (self.kv_out, h)),
                    (f"{p}.{att}.v_proj", (self.kv_out, h)), (f"{p}.{att}.o_proj", (h, self.q_out))]
            mlp = [f"{p}.mlp.experts.{e}" for e in range(self.experts)] if self.experts else [f"{p}.mlp"]
            for m in mlp:
                out += [(f"{m}.gate_proj", (self.intermediate, h)), (f"{m}.up_proj", (self.intermediate, h)),
                        (f"{m}.down_proj", (h, self.intermediate))]
        return out


LLAMA_70B = Shape("llama-3.1-70b", blocks=80, hidden=8192, q_out=8192, kv_out=1024, intermediate=28672)
MOE = Shape("moe-48x64", blocks=48, hidden=2048, q_out=4096, kv_out=512, intermediate=768, experts=64, vocab=151936)
SMOLLM2 = Shape("SmolLM2-135M", blocks=30, hidden=576, q_out=576, kv_out=192, intermediate=1536, vocab=49152, tied=True)

# relative per-weight curvature of each projection kind (v and down carry most of the loss in
# the SmolLM2 profile's Fisher; q/k least)
KIND_CURVATURE = {"q_proj": 0.4, "k_proj": 0.4, "v_proj": 2.0, "o_proj": 1.0, "gate_proj": 0.7, "up_proj": 0.7,
                  "down_proj": 1.5}


def _range_factor(group: int) -> float:
    """E[max − min] / σ of `group` Gaussian weights, ≈ 2√(2 ln g) (a row of g weights for per-channel)."""
    return 2 * math.sqrt(2 * math.log(group))


def synthetic_table(shape: Shape, options: list[QuantOption], seed: int) -> CandidateTable:
    """The candidate table of `shape` with deterministic, plausible errors (see the module docstring)."""
    rng = np.random.default_rng(seed)
    mods = shape.modules()
    names = [n for n, _ in mods]
    shapes = [s for _, s in mods]
    bits = np.array([[o.storage_bits(out, inp) if o.fits(inp) else np.nan for o in options] for out, inp in shapes],
                    dtype=np.float64)
    depth = np.array([int(re.search(r"layers\.(\d+)\.", n).group(1)) / max(shape.blocks - 1, 1) for n in names])
    kind = np.array([KIND_CURVATURE[n.rsplit(".", 1)[1]] for n in names])
    # U-shaped over depth: the first and last blocks matter most (as in SmolLM2's and Llama's profiles)
    curvature = 5e-11 * kind * (1 + 3 * (1 - depth) ** 8 + 2 * depth**8) * rng.lognormal(0, 0.5, len(names))
    numel = np.array([o * i for o, i in shapes], dtype=np.float64)
    mse = np.zeros((len(names), len(options)))
    for k, o in enumerate(options):
        if o.fmt == "keep":
            continue
        for g, (_, inp) in enumerate(shapes):
            levels = 2**o.bits - 1 - (1 if o.symmetric else 0)
            mse[g, k] = (_range_factor(o.group_size or inp) / levels) ** 2 / 12  # σ = 1
    errors = 0.5 * curvature[:, None] * numel[:, None] * mse * rng.lognormal(0, 0.15, mse.shape)
    errors = np.where(np.isfinite(bits), errors, np.nan)
    return CandidateTable(groups=names, shapes=shapes, options=list(options), storage_bits=bits,
                          errors={"fisher": errors, "local": errors})


def latency_matrix(table: CandidateTable) -> np.ndarray:
    """Seconds per (group, option) of a synthetic batch-1 decode step (see the module docstring)."""
    factor = []
    for o in table.options:
        f = 1.0 if o.fmt == "keep" or o.bits in (4, 8) else 1.3 if o.bits == 2 else 1.6
        f *= {32: 1.15, 64: 1.08, 128: 1.03}.get(o.group_size or 0, 1.0)
        factor.append(f)
    active = np.array([EXPERT_ACTIVE if ".experts." in n else 1.0 for n in table.groups])
    return np.nan_to_num(table.storage_bits / 8 / BANDWIDTH_B_PER_S) * np.array(factor)[None, :] * active[:, None]


def make_problem(table: CandidateTable, budget_bpw: float, ties: tuple[str, ...], latency: np.ndarray | None = None,
                 max_latency: float | None = None) -> Problem:
    """As api._solve builds it: constraint masks (ties) on the table, a storage budget in bits."""
    masks = constraint_masks(table, Constraints(ties=ties))
    return Problem(cost=np.nan_to_num(table.errors["fisher"]), storage_bits=np.where(masks.allowed, table.storage_bits, np.nan),
                   max_storage_bits=budget_bpw * table.num_weights, group_names=tuple(table.groups),
                   latency=latency, max_latency=max_latency, ties=masks.ties)


def run(problem: Problem, solver: str, label: str | None = None, **settings) -> dict:
    start = time.perf_counter()
    try:
        sol = solve(problem, solver, **settings)
    except SolverError as e:
        return {"solver": label or solver, "settings": settings, "refused": str(e).splitlines()[0],
                "seconds": round(time.perf_counter() - start, 3)}
    lat = problem.total_latency(sol.choice)
    return {"solver": label or solver, "settings": settings, "seconds": round(time.perf_counter() - start, 3),
            "objective": sol.objective, "bound": sol.bound, "status": sol.status, "storage_bits": sol.storage_bits,
            "latency_s": lat}


def scenario(name: str, problem: Problem, weights: int, args) -> dict:
    rows = [run(problem, "ilp", backend="highs", time_limit_s=args.ilp_time_limit),
            run(problem, "lagrangian")]
    dp = run(problem, "dp")
    if "refused" in dp and not problem.has_latency_limit:  # exact DP too large: coarser budget steps, with a bound
        # dp's limits: groups × steps ≤ 2e8 back-pointers and groups × options × steps ≤ 2e9 updates (tied sets merged)
        groups = problem.cost.shape[0] - sum(len(t) - 1 for t in problem.ties)
        steps = min(2e8 / groups, 2e9 / (groups * problem.cost.shape[1]))
        room = problem.max_storage_bits - problem.min_bits()
        dp = run(problem, "dp", label="dp (coarse)", resolution_bits=int(2 ** math.ceil(math.log2(max(room / steps, 1)))))
    rows.append(dp)
    rows.append(run(problem, "evolutionary", trials=args.evo_trials, warm_start="lagrangian", seed=0))
    ilp = rows[0]
    finite = [r["objective"] for r in rows if "objective" in r]
    best = min(finite)
    ref = ilp["objective"] if ilp.get("status") == "optimal" else best
    for r in rows:
        r["bits_per_weight"] = r["storage_bits"] / weights if "storage_bits" in r else None
        if "objective" in r:
            r["gap"] = (r["objective"] - ref) / ref
    if not problem.has_latency_limit:
        budgets = [b * weights for b in (3.0, 3.5, 4.0, 4.5, 5.0)]
        free = problem.cost.shape[0] - sum(len(t) - 1 for t in problem.ties)
        for solver in ("lagrangian", "ilp") if free <= args.pareto_ilp_max else ("lagrangian",):
            start = time.perf_counter()
            kw = {"backend": "highs", "time_limit_s": args.ilp_time_limit} if solver == "ilp" else {}
            points = pareto_sweep(problem, budgets, solver, **kw)
            rows.append({"solver": f"pareto sweep ({solver}, 5 budgets)", "seconds": round(time.perf_counter() - start, 3),
                         "frontier_points": int(sum(p.on_frontier for p in points)),
                         "objectives": [p.solution.objective for p in points]})
    return {"scenario": name, "groups": int(problem.cost.shape[0]), "ties": len(problem.ties),
            "free_decisions": int(problem.cost.shape[0] - sum(len(t) - 1 for t in problem.ties)),
            "max_latency_s": problem.max_latency, "reference": "ilp optimum" if ref == ilp.get("objective") and
            ilp.get("status") == "optimal" else "best found", "rows": rows}


# ---- streamed-profile memory model -------------------------------------------------------------------


def stream_memory(shape: Shape, windows: int, seq_len: int, head_chunk: int = 128) -> dict:
    """Bytes the block-streamed walk (profile/streamed.py) holds at once, by part, for one block of `shape`.

    fp32 throughout (the skeleton's dtype). Boundaries: h_l and h_{l+1} (forward), h_l, g_{l+1} and
    g_l (backward) — whole [windows, T, hidden] tensors, on disk in between. H: one [in, in] per
    planned module (q/k/v and gate/up each keep their own copy). Activations: one window's autograd
    graph through the block, ≈ 12 [T, max(hidden, intermediate)] tensors + eager attention scores and
    probabilities [heads, T, T] (heads = q_out/128). Head pass: the head's matrix (the embedding is not
    loaded there) and five [chunk, vocab] tensors (logits, log-softmax, their gradients, the loss's).
    """
    f = 4
    mods = [s for n, s in shape.modules() if n.startswith("model.layers.0.")]
    block_weights = sum(o * i for o, i in mods) * f
    boundary = windows * seq_len * shape.hidden * f
    hessians = sum(i * i for _, i in mods) * f
    heads = shape.q_out // 128
    width = max(shape.hidden, shape.intermediate if not shape.experts else shape.intermediate * 8)  # top-8 experts
    activations = (12 * seq_len * width + 2 * heads * seq_len * seq_len) * f
    outside = shape.vocab * shape.hidden * f  # one vocabulary matrix: the walk never loads embedding and head together
    head = outside + 5 * head_chunk * shape.vocab * f + 3 * boundary  # logits, log-softmax, their gradients, CE
    backward = block_weights + 3 * boundary + hessians + activations
    return {"block_weights": block_weights, "boundary": boundary, "block_hessians": hessians,
            "block_activations_one_window": activations, "outside_weights": outside,
            "peak_forward": block_weights + 2 * boundary, "peak_backward": backward, "peak_head": head,
            "peak_walk": max(backward, head),
            "whole_model_weights": block_weights * shape.blocks + outside * (1 if shape.tied else 2),
            "windows": windows, "seq_len": seq_len}


def memory_model(windows: int, seq_len: int) -> dict:
    return {"windows": windows, "seq_len": seq_len,
            "models": {s.name: stream_memory(s, windows, seq_len) for s in (LLAMA_70B, MOE, SMOLLM2)}}


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.0f} MB"


def markdown(results: list[dict], memory: dict, measured: dict | None, meta: dict) -> str:
    lines = ["# Planning at scale (bench/scale.py)", "",
             f"Synthetic tables with real shapes, default option grid ({meta['options']} options), budget "
             f"{meta['budget']} bits/weight; machine load average {meta['load_average']:.2f} on {meta['cpus']} CPUs "
             "(shared: times are indicative).", ""]
    for s in results:
        lines += [f"## {s['scenario']}", "",
                  f"{s['groups']} groups, {s['ties']} tie sets ({s['free_decisions']} free decisions)"
                  + (f", latency limit {s['max_latency_s'] * 1e3:.3f} ms" if s["max_latency_s"] else "")
                  + f"; gap vs the {s['reference']}.", "",
                  "| solver | seconds | status | objective | gap | bits/weight | latency ms | bound |", "|---|---:|---|---:|---:|---:|---:|---:|"]
        for r in s["rows"]:
            if "refused" in r:
                lines.append(f"| {r['solver']} | {r['seconds']:.2f} | refused: {r['refused'][:80]} | | | | | |")
            elif "frontier_points" in r:
                lines.append(f"| {r['solver']} | {r['seconds']:.2f} | {r['frontier_points']} of 5 on the frontier | "
                             + " / ".join(f"{o:.4g}" for o in r["objectives"]) + " | | | | |")
            else:
                bound = "-" if r["bound"] is None else f"{r['bound']:.6g}"
                lat = "-" if r["latency_s"] is None else f"{r['latency_s'] * 1e3:.3f}"
                lines.append(f"| {r['solver']} | {r['seconds']:.2f} | {r['status']} | {r['objective']:.6g} | "
                             f"{r['gap']:.2e} | {r['bits_per_weight']:.4f} | {lat} | {bound} |")
        lines.append("")
    lines += ["## Streamed-profile memory model (per block, fp32)", "",
              f"{memory['windows']} windows × {memory['seq_len']} tokens; see `stream_memory` for what each part counts.", "",
              "| model | block weights | one boundary | block H | activations (1 window) | vocabulary matrix | "
              "peak backward | peak head | whole-model weights |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in memory["models"].items():
        lines.append(f"| {name} | {_gb(m['block_weights'])} | {_gb(m['boundary'])} | {_gb(m['block_hessians'])} | "
                     f"{_gb(m['block_activations_one_window'])} | {_gb(m['outside_weights'])} | {_gb(m['peak_backward'])} | "
                     f"{_gb(m['peak_head'])} | {_gb(m['whole_model_weights'])} |")
    if measured:
        lines += ["", "Measured on SmolLM2-135M (bench/memory.py, bench/out/memory.json): "
                  + "; ".join(f"{k}: {v}" for k, v in measured.items())]
    return "\n".join(lines) + "\n"


def measured_smollm2() -> dict | None:
    """SmolLM2 figures of bench/memory.py: peak RSS per mode (memory.json) and the streamed breakdown
    (memory-stream-after.json: resident memory per step and the walk's increments over it)."""
    out = {}
    for path in (OUT / "memory.json", OUT / "memory-whole.json", OUT / "memory-stream-after.json"):
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        cal = f"{doc['calibration']['tokens']} tokens × {doc['calibration']['seq_len']}"
        for mode, r in doc["runs"].items():
            out[f"{mode} peak RSS ({cal}, {path.name})"] = f"{r['peak_rss_mb']:.0f} MB"
            b = r.get("breakdown", {})
            if b.get("loads"):  # the streamed run's walk
                out[f"streamed resident after each step ({path.name})"] = ", ".join(
                    f"{s['step']} {s['rss_mb']:.0f} MB" for s in b["steps"])
                heads = [x for x in b["loads"] if x["load"].startswith("outside")]
                bwd = [x for x in b["loads"] if not x["load"].startswith("outside") and x["pass"] == 2]
                out[f"streamed walk increments ({path.name})"] = (
                    f"head pass +{heads[1]['peak_mb'] - heads[1]['rss_before_mb']:.0f} MB, largest backward block "
                    f"(+ table rows) +{max(x['peak_mb'] - x['rss_before_mb'] for x in bwd):.0f} MB; model for "
                    f"{r['windows']} × {r['seq_len']}: " + ", ".join(
                        f"{k} {_gb(v)}" for k, v in stream_memory(SMOLLM2, r["windows"], r["seq_len"]).items()
                        if k in ("peak_head", "peak_backward")))
    return out or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=4.0, help="storage bits per weight")
    ap.add_argument("--ilp-time-limit", type=float, default=120.0)
    ap.add_argument("--pareto-ilp-max", type=int, default=2000, help="largest free-decision count swept with the ILP")
    ap.add_argument("--evo-trials", type=int, default=40)
    ap.add_argument("--skip-untied", action="store_true", help="skip the MoE without ties (the largest ILP)")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows of the memory model")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite scale.md from scale.json and the current bench/memory.py results (no solving)")
    args = ap.parse_args()
    if args.markdown_only:  # the memory model is recomputed: it is cheap and may have changed
        doc = json.loads((OUT / "scale.json").read_text())
        doc["memory"] = memory_model(doc["memory"]["windows"], doc["memory"]["seq_len"])
        text = markdown(doc["scenarios"], doc["memory"], measured_smollm2(), doc["meta"])
        atomic_write_text(OUT / "scale.md", text)
        atomic_write_text(OUT / "scale.json", canonical_json(doc) + "\n")
        print(text)
        return
    options = default_options()
    results = []
    for seed, shape in enumerate((LLAMA_70B, MOE)):
        table = synthetic_table(shape, options, seed)
        weights = table.num_weights
        tied = make_problem(table, args.budget, ("fused",))
        cases = [("fused ties", tied)]
        lat = latency_matrix(table)
        timed = make_problem(table, args.budget, ("fused",), lat)
        storage_only = timed.total_latency(solve(timed, "lagrangian").choice)
        limit = timed.min_latency() + 0.5 * (storage_only - timed.min_latency())  # binding: halfway to the fastest plan
        cases.append((f"fused ties + latency ≤ {limit * 1e3:.3f} ms (storage-only plan: {storage_only * 1e3:.3f} ms)",
                      make_problem(table, args.budget, ("fused",), lat, limit)))
        if shape.experts and not args.skip_untied:
            cases.append(("no ties", make_problem(table, args.budget, ())))
        for label, problem in cases:
            s = scenario(f"{shape.name}: {label}", problem, weights, args)
            results.append(s)
            for r in s["rows"]:
                print(f"{s['scenario'][:60]:60s} {r['solver']:34s} {r['seconds']:8.2f}s "
                      + (f"gap {r['gap']:.2e}" if "gap" in r else r.get("refused", "")[:60]), flush=True)
    memory = memory_model(args.windows, args.seq_len)
    meta = {"options": len(options), "budget": args.budget, "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    text = markdown(results, memory, measured_smollm2(), meta)
    print(text)
    atomic_write_text(OUT / "scale.md", text)
    atomic_write_text(OUT / "scale.json", canonical_json({"meta": meta, "scenarios": results, "memory": memory}) + "\n")


if __name__ == "__main__":
    main()
