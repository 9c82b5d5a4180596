"""Interactions on SmolLM2 measured with the whole model in memory vs one decoder block at a time.

Each mode runs `bitalloc profile --signals interactions` (api.profile_model, no cache) in a fresh
subprocess for the chosen interaction blocks and reports its wall time and peak RSS (ru_maxrss); then
the two sets of pair records are compared: same pairs, max |difference| of the singles, joints and
corrections (in nats), and the largest correction itself for scale. Writes OUT/streamed_interactions.md.

    OMP_NUM_THREADS=1 python bench/streamed_interactions.py --blocks 0,15,29 --calib-tokens 1024
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


def child(mode: str, gguf: str, calib: str, calib_tokens: int, seq_len: int, blocks: tuple[int, ...], out: str) -> None:
    from bitalloc import api

    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        prof = api.profile_model(gguf, calib, Path(work) / "profile", signals=("interactions",), seq_len=seq_len,
                                 calib_tokens=calib_tokens, stream=mode == "stream", interaction_blocks=blocks)
        wall = time.perf_counter() - start
    records = [[r.a, r.b, r.relation, r.single_a, r.single_b, r.joint, r.correction] for r in prof.interactions]
    Path(out).write_text(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                     "records": records}))


def main() -> None:
    if "--child" in sys.argv:
        a = dict(zip(sys.argv[3::2], sys.argv[4::2]))  # --child MODE --flag value ...
        child(sys.argv[sys.argv.index("--child") + 1], a["--gguf"], a["--calib"], int(a["--calib-tokens"]),
              int(a["--seq-len"]), tuple(int(b) for b in a["--blocks"].split(",")), a["--out"])
        return
    from bench.common import default_gguf, smollm2_arguments

    ap = smollm2_arguments(__doc__)
    ap.add_argument("--blocks", default="0,15,29", help="interaction blocks (pairs whose first module lies there)")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    gguf = args.gguf or default_gguf()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            out = str(Path(tmp) / f"{mode}.json")
            cmd = [sys.executable, __file__, "--child", mode, "--gguf", gguf, "--calib", args.calib, "--calib-tokens",
                   str(args.calib_tokens), "--seq-len", str(args.seq_len), "--blocks", args.blocks, "--out", out]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
            runs[mode] = json.loads(Path(out).read_text())
            print(f"{mode}: {runs[mode]['wall_s']:.1f} s, peak RSS {runs[mode]['peak_rss_mb']:.0f} MB, "
                  f"{len(runs[mode]['records'])} pairs", flush=True)
    whole, stream = runs["whole"]["records"], runs["stream"]["records"]
    same_pairs = [r[:3] for r in whole] == [r[:3] for r in stream]
    diff = max(abs(x - y) for a, b in zip(whole, stream) for x, y in zip(a[3:], b[3:]))
    largest = max(abs(r[6]) for r in whole)
    sign_agree = sum((a[6] > 0) == (b[6] > 0) for a, b in zip(whole, stream))
    lines = [
        "# Interactions, whole model vs streamed (SmolLM2-135M)",
        "",
        f"`{' '.join(['python bench/streamed_interactions.py', *sys.argv[1:]])}` "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, load average {os.getloadavg()[0]:.1f}); "
        f"blocks {args.blocks}, {args.calib_tokens // args.seq_len} × {args.seq_len} calibration tokens "
        f"({Path(args.calib).name}), interactions measured on the first 2 windows, option int3-g64-asym.",
        "",
        "| mode | wall | peak RSS | pairs |",
        "|---|---|---|---|",
        *[f"| {m} | {runs[m]['wall_s']:.1f} s | {runs[m]['peak_rss_mb']:.0f} MB | {len(runs[m]['records'])} |" for m in MODES],
        "",
        f"Same pairs in the same order: {same_pairs}. Largest |difference| of any single, joint or correction: "
        f"{diff:.3g} nats (the largest |correction| is {largest:.3g}); corrections with the same sign: "
        f"{sign_agree} of {len(whole)}.",
        "",
    ]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "streamed_interactions.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
