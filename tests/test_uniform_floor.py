"""min_bits="uniform": no module below the bits of the best-predicted uniform plan that fits the budget."""

from __future__ import annotations

import numpy as np
import pytest

from bitalloc import BadInputError
from bitalloc.api import PlanContext, solve_table
from bitalloc.candidates import CandidateTable
from bitalloc.cli import _min_bits
from bitalloc.constraints import Constraints, constraint_masks
from bitalloc.options import QuantOption

OPTIONS = [QuantOption.int_(b, 64) for b in (2, 3, 4, 5)]
SHAPE = (64, 256)
# a and b lose little at 3 bits, c and d gain much at 5: the additive model trades a/b's bits for c/d's
ERRORS = np.array([[0.10, 0.02, 0.01, 0.009],
                   [0.10, 0.02, 0.01, 0.009],
                   [10.0, 1.00, 0.50, 0.010],
                   [10.0, 1.00, 0.50, 0.010]])
CONTEXT = PlanContext(model={"source": "toy", "architecture": "LlamaForCausalLM", "content_hash": "sha256:" + "0" * 64,
                             "output_embedding": None, "input_embedding": None, "tied_embeddings": False}, calibration={})


def table() -> CandidateTable:
    bits = np.array([[o.storage_bits(*SHAPE) for o in OPTIONS]] * 4, dtype=float)
    return CandidateTable(["a", "b", "c", "d"], [SHAPE] * 4, OPTIONS, bits, {"fisher": ERRORS, "local": ERRORS})


def bits_per_weight(option: QuantOption) -> float:
    return option.storage_bits(*SHAPE) / (SHAPE[0] * SHAPE[1])


def solve(budget_bits: float, min_bits=None):
    return solve_table(table(), f"{budget_bits}bits", CONTEXT, error_model="fisher",
                       constraints=Constraints(min_bits=min_bits, ties=()))


def test_without_the_floor_the_solver_trades_low_bits_for_high_ones():
    plan = solve(bits_per_weight(OPTIONS[2]))  # exactly uniform int4's size
    assert [a.option.bits for a in plan.assignments] == [3, 3, 5, 5]


def test_the_floor_is_the_best_fitting_uniform_options_bits():
    plan = solve(bits_per_weight(OPTIONS[2]), "uniform")
    assert [a.option.bits for a in plan.assignments] == [4, 4, 4, 4]
    assert plan.solver.details["min_bits_uniform"] == "4 (int4-g64-asym)"
    assert plan.constraints["min_bits"] == "uniform"
    # between uniform int3's and int4's sizes only int3 fits uniformly: the floor is 3, and c and d take the rest
    between = solve((bits_per_weight(OPTIONS[1]) + bits_per_weight(OPTIONS[2])) / 2, "uniform")
    assert between.solver.details["min_bits_uniform"] == "3 (int3-g64-asym)"
    assert [a.option.bits for a in between.assignments] == [3, 3, 4, 4]


def test_a_floor_is_refused_where_no_budget_resolves_it():
    with pytest.raises(BadInputError, match="resolved by a budget"):
        constraint_masks(table(), Constraints(min_bits="uniform"))
    with pytest.raises(BadInputError, match="'uniform'"):
        _min_bits("four")
    assert _min_bits("3") == 3 and _min_bits("uniform") == "uniform" and _min_bits(None) is None
