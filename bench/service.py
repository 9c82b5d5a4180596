"""Plans per second from `bitalloc serve` with one cached profile, at several concurrency levels.

Starts a real server (subprocess, loopback port), makes one profile (SmolLM2-135M by default;
it stays in the store folder, so a second run skips profiling), then fires N plan requests per
concurrency level. Every request has a budget no earlier request had, so each one runs the
solver (a repeated request would only read the stored plan; that path is measured separately
as "repeat"). Prints a table and writes bench/out/service.json.

    nice -n 10 python bench/service.py --requests 40 --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext2"
DEFAULT_MODEL = ROOT.parent / "main" / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, roots: list[Path], token: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "BITALLOC_TOKEN": token, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bitalloc.cli", "serve", "--port", str(port), "--store", str(store), "--workers", "1"]
    for r in roots:
        cmd += ["--allow-root", str(r)]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited; see {log}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not answer /healthz in 180 s")


def make_profile(client: httpx.Client, body: dict) -> tuple[str, float, bool]:
    t0 = time.perf_counter()
    r = client.post("/v1/profiles", json=body)
    r.raise_for_status()
    out = r.json()
    if out["state"] == "done":
        return out["profile_id"], time.perf_counter() - t0, True
    job_id, last = out["job"]["id"], None
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["stage"] != last:
            print(f"  profile job: {job['state']} {job['progress']:.2f} {job['stage']}", flush=True)
            last = job["stage"]
        if job["state"] == "done":
            return out["profile_id"], time.perf_counter() - t0, False
        if job["state"] == "failed":
            raise SystemExit(f"profile job failed: {job['error']}")
        time.sleep(1)


async def fire(url: str, token: str, profile_id: str, budgets: list[str], concurrency: int,
               solver: str) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) for these plan requests, `concurrency` in flight."""
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency)) as ac:

        async def one(budget: str) -> None:
            async with sem:
                t0 = time.perf_counter()
                r = await ac.post("/v1/plans", json={"profile_id": profile_id, "budget": budget,
                                                         "solver": solver})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or r.json()["plan"]["budget"] != budget:
                    raise RuntimeError(f"plan request for {budget} failed: {r.status_code} {r.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in budgets))
        return time.perf_counter() - t0, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory or .gguf (absolute path)")
    ap.add_argument("--calib", default=str(DATA / "wiki.valid.tokens"))
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--requests", type=int, default=40, help="plan requests per concurrency level")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--solver", default="ilp", help="solver of every plan request (ilp: exact, HiGHS; lagrangian: fast)")
    ap.add_argument("--store", default="/tmp/bitalloc-bench-service-store", help="kept between runs (cached profile)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "service.json"))
    args = ap.parse_args()

    model, calib = Path(args.model).resolve(), Path(args.calib).resolve()
    store = Path(args.store)
    store.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    proc, url = start_server(store, sorted({model.parent, calib.parent}), token, store / "server.log")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as client:
            body = {"model": str(model), "calibration": {"path": str(calib), "seq_len": args.seq_len,
                                                          "tokens": args.calib_tokens}}
            profile_id, profile_s, cached = make_profile(client, body)
            info = client.get(f"/v1/profiles/{profile_id}").json()
            print(f"profile {profile_id}: {info['modules']} modules x {len(info['options'])} options, "
                  f"{'already stored' if cached else 'made'} in {profile_s:.1f} s", flush=True)
            # first plan: opens the stored profile (table + model skeleton) in the server process
            t0 = time.perf_counter()
            warm = client.post("/v1/plans", json={"profile_id": profile_id, "budget": "4.1234bits",
                                                     "solver": args.solver})
            warm.raise_for_status()
            first_plan_s = time.perf_counter() - t0
            rows = []
            serial = 0
            for level in [int(c) for c in args.concurrency.split(",")]:
                # a fresh run id in the budget keeps budgets unseen even with a kept store
                budgets = []
                for _ in range(args.requests):
                    serial += 1
                    budgets.append(f"{3.0 + serial * 1e-4 + (time.time_ns() % 10**6) * 1e-11:.11f}bits")
                for mode in ("new", "repeat"):
                    wall, lat = asyncio.run(fire(url, token, profile_id, budgets, level, args.solver))
                    rows.append({"mode": mode, "concurrency": level, "requests": len(budgets), "wall_s": round(wall, 3),
                                 "plans_per_s": round(len(budgets) / wall, 2),
                                 "p50_ms": round(1000 * float(np.percentile(lat, 50)), 1),
                                 "p95_ms": round(1000 * float(np.percentile(lat, 95)), 1)})
                    r = rows[-1]
                    print(f"  {mode:6s} c={level:<3d} {r['plans_per_s']:8.2f} plans/s  p50 {r['p50_ms']:8.1f} ms  "
                          f"p95 {r['p95_ms']:8.1f} ms", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)

    print()
    print("| mode | concurrency | requests | plans/s | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['plans_per_s']} | {r['p50_ms']} | {r['p95_ms']} |")
    result = {
        "model": str(model), "calibration": {"path": str(calib), "seq_len": args.seq_len, "tokens": args.calib_tokens},
        "profile_id": profile_id, "table": {"modules": info["modules"], "options": len(info["options"])},
        "profile_seconds": round(profile_s, 1), "profile_was_stored": cached, "first_plan_seconds": round(first_plan_s, 3),
        "solver": args.solver, "rows": rows,
        "machine": {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "platform": platform.platform()},
        "note": "new = each request a budget not seen before (runs the solver); repeat = the same budgets again "
                "(the stored plan is returned)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from bitalloc.io import atomic_write_text, canonical_json

    atomic_write_text(args.out, canonical_json(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
