"""Golden plans: the tiny models' plans, saved from the code before the config redesign (issue 12),
must come out byte for byte the same.

Every setting is pinned here (quantizer, solver, error model, option grid, calibration windows, no
ties), so a change of a *default* elsewhere does not move these files; only a change of what a given
setting computes does. Regenerate (after a deliberate, explained change) with
`BITALLOC_WRITE_GOLDEN=1 python -m pytest -q tests/test_golden_plans.py`.

Changes so far: issue 16 added summary.ties / unplanned_weights / unplanned_bytes / model_bytes and
budget.scope; every other byte (assignments, solver record, objective) was checked equal to the
pre-redesign files before they were rewritten. Issue 13 made "gptq" search its group scales; the old
GPTQ is "gptq-minmax", whose plans equal the saved gptq files except the recorded quantizer name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bitalloc
from bitalloc.constraints import Constraints
from bitalloc.options import default_options

from conftest import CALIB_TEXT, make_llama, make_qwen2, make_tokenizer

GOLDEN = Path(__file__).parent / "golden"
BUDGETS = ("3bits", "4.5bits")
# gptq-minmax is the GPTQ these files were saved with (min/max group scales); "gptq" itself now
# searches its group scales (issue 13), which changes its plans on purpose.
CASES = [(family, quantizer, budget) for family in ("llama", "qwen2") for quantizer in ("rtn", "gptq-minmax")
         for budget in BUDGETS]
MAKERS = {"llama": make_llama, "qwen2": make_qwen2}


def _golden_plan(family: str, quantizer: str, budget: str, tmp_path: Path) -> bitalloc.Plan:
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT, encoding="utf-8")
    return bitalloc.plan(
        MAKERS[family](), budget, calib, tokenizer=make_tokenizer(), quantizer=quantizer, solver="ilp",
        error_model="fisher", seq_len=32, calib_tokens=128, seed=0, cache_dir=False,
        options=default_options(bits=(2, 3, 4, 8), group_sizes=(32, None), symmetric=(False, True),
                                include_keep=True, formats=("int", "keep")),
        include_lm_head=False, include_embeddings=False, constraints=Constraints(ties=()),
    )


@pytest.mark.parametrize("family,quantizer,budget", CASES)
def test_plan_is_byte_identical_to_golden(family, quantizer, budget, tmp_path):
    plan = _golden_plan(family, quantizer, budget, tmp_path)
    path = GOLDEN / f"{family}-{quantizer.removesuffix('-minmax')}-{budget}.json"
    text = plan.to_json()
    if os.environ.get("BITALLOC_WRITE_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert plan.quantizer == quantizer
    assert text == path.read_text(encoding="utf-8"), f"{path.name} changed; explain why or restore the old plan"
