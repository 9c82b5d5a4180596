"""Cold start: wall time of `bitalloc --help`, `import bitalloc` and re-planning from a profile folder,
old code against new, each in a fresh interpreter.

    python bench/cold_start.py [--baseline 01a3014] [--profile DIR]... [--gguf FILE]... [--repeats 3]
                               [--out bench/out/cold_start.json]

The old figures run the baseline commit's bitalloc/ + solvers/ (extracted with `git archive` into a
temporary folder and put first on PYTHONPATH); the new ones run the installed (editable) tree.
A tiny Llama's profile folder is made for the re-plan rows (hidden 64, 2 blocks, fisher + table);
pass --profile for more (e.g. SmolLM2's: `bitalloc profile MODEL --calib wiki.valid.tokens
--calib-tokens 2048 --signals fisher,table --out /tmp/entry-prof`). --gguf adds a row loading that file
(models.load_model: transformers' GGUF loader, tokenizer and weights). Each cell is the median of
--repeats runs; the table also says whether torch was imported, and whether old and new wrote the
same plan bytes. The machine is shared: its load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import sys, json\n{body}\n"
         "print('HEAVY=' + json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]), file=sys.stderr)\n")


def cli_body(*args: str) -> str:
    return (f"sys.argv = ['bitalloc', *{list(args)!r}]\nfrom bitalloc.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n")


def extract_baseline(rev: str, into: Path) -> Path:
    """bitalloc/ and solvers/ of `rev`, laid out as installed (solvers/ -> bitalloc/solvers/)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "bitalloc", "solvers"],
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    tar = into / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")
    (into / "solvers").rename(into / "bitalloc" / "solvers")
    return into


def run(body: str, pythonpath: Path | None, env: dict) -> tuple[float, float, list[str]]:
    """(wall seconds, CPU seconds, heavy modules imported) of one fresh interpreter running `body`.

    CPU = user + system time of the child: on a shared machine wall time mostly measures the queue
    for a core, CPU time what the start itself costs.
    """
    env = dict(env)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True, env=env,
                       cwd=tempfile.gettempdir())
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"failed ({'baseline' if pythonpath else 'new'}): {body!r}\n{r.stderr[-2000:]}")
    heavy = json.loads(next(s for s in r.stderr.splitlines() if s.startswith("HEAVY=")).removeprefix("HEAVY="))
    return seconds, cpu, heavy


def tiny_profile(folder: Path) -> Path:
    """A tiny Llama's profile folder (fisher + table), as tests/conftest.py builds the model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc.api import profile_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=True)).eval()
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1234))
    profile_model(model, ids, folder, signals=("fisher", "table"))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="01a3014", help="git revision of the old code (default: before issue 12's first slice)")
    ap.add_argument("--profile", action="append", default=[], help="more profile folders to re-plan from (repeatable)")
    ap.add_argument("--gguf", action="append", default=[], help="GGUF files to time load_model on (repeatable)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "cold_start.json"))
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old_path = extract_baseline(args.baseline, tmp / "old")
        profiles = [("tiny Llama", tiny_profile(tmp / "tiny-prof"))] + [(Path(p).name, Path(p)) for p in args.profile]
        # (label, body per side, plan file per side or None)
        cases = [("bitalloc --help", lambda side: cli_body("--help"), None),
                 ("import bitalloc", lambda side: "import bitalloc", None)]
        for name, folder in profiles:
            plan_file = (lambda side, name=name: tmp / f"{name}-{side}.json")
            cases.append((f"plan --profile DIR --budget 4bits ({name})",
                          lambda side, folder=folder, plan_file=plan_file: cli_body(
                              "plan", "--profile", str(folder), "--budget", "4bits", "--out", str(plan_file(side))),
                          plan_file))
        for gguf in args.gguf:
            cases.append((f"load_model ({Path(gguf).name})",
                          lambda side, gguf=str(Path(gguf).resolve()): f"from bitalloc.models import load_model\nload_model({gguf!r})",
                          None))
        rows = []
        for label, body, plan_file in cases:
            cell = {"case": label}
            for side, path in (("old", old_path), ("new", None)):
                runs = [run(body(side), path, env) for _ in range(args.repeats)]
                cell[f"{side}_s"] = round(statistics.median(s for s, _, _ in runs), 3)
                cell[f"{side}_cpu_s"] = round(statistics.median(c for _, c, _ in runs), 3)
                cell[f"{side}_imports_torch"] = "torch" in runs[-1][2]
            if plan_file is not None:
                cell["same_plan_bytes"] = plan_file("old").read_bytes() == plan_file("new").read_bytes()
            rows.append(cell)

    load = os.getloadavg()
    print(f"cold start, median of {args.repeats} fresh interpreters; old = {args.baseline}, new = working tree; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print("| case | old wall s | new wall s | old CPU s | new CPU s | old imports torch | new imports torch | same plan bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = {True: "yes", False: "NO", None: "-"}[r.get("same_plan_bytes")]
        print(f"| {r['case']} | {r['old_s']:.2f} | {r['new_s']:.2f} | {r['old_cpu_s']:.2f} | {r['new_cpu_s']:.2f} | "
              f"{r['old_imports_torch']} | {r['new_imports_torch']} | {same} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from bitalloc.io import atomic_write_text, canonical_json

    atomic_write_text(out, canonical_json({"baseline": args.baseline, "repeats": args.repeats, "load_average": list(load),
                                           "rows": rows}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
