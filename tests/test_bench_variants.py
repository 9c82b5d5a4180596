"""bench/plan_variants.py: a variant string becomes the constraints and settings the bench solves with, and a
typo stops it before anything is profiled."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from plan_variants import parse_variant  # noqa: E402

from bitalloc.config import VerifySettings  # noqa: E402
from bitalloc.constraints import DEFAULT_TIES  # noqa: E402


def test_a_plain_variant_keeps_the_products_defaults():
    v = parse_variant("4.0,fisher-tw")
    assert (v.budget, v.error_model, v.verify) == ("4.0bits", "fisher-tw", None)
    assert v.constraints.ties == DEFAULT_TIES and v.constraints.min_bits is None and v.constraints.pins == ()


def test_each_flag_sets_its_own_setting():
    assert parse_variant("4.0,fisher-tw,untied").constraints.ties == ()
    assert parse_variant("4.0,fisher,min3").constraints.min_bits == 3
    assert parse_variant("4.0,fisher-tw,min-uniform").constraints.min_bits == "uniform"
    assert parse_variant("16,fisher-tw,pin=int4-g64-asym").constraints.pins == ((r".*", "int4-g64-asym"),)
    assert parse_variant("4.0,fisher-tw,verify=5").verify.windows == 5
    assert parse_variant("4.0,fisher-tw,verify").verify == VerifySettings()  # the product's, 2 windows
    both = parse_variant("4.0,fisher-tw,untied,min-uniform")
    assert both.constraints.ties == () and both.constraints.min_bits == "uniform"


@pytest.mark.parametrize("variant, named", [
    ("4.0,fisher-tw,untie", "unknown flag 'untie'"),
    ("4.0,fisher-tw,verify=two", "unknown flag 'verify=two'"),
    ("4.0,fisher-tw,pin=", "unknown flag 'pin='"),
    ("4.0", "name the error model"),
    ("four,fisher-tw", "'four' is not a budget"),
])
def test_a_malformed_variant_is_refused_with_what_is_wrong(variant, named):
    with pytest.raises(SystemExit, match=named):
        parse_variant(variant)
