"""bench/plan_variants.py: a variant string becomes the constraints and settings the bench solves with, and a
typo stops it before anything is profiled."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from plan_variants import parse_variant, parse_variants  # noqa: E402

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
    ("4.0,fisher-twx", "unknown error model 'fisher-twx'; choose one of fisher, local, fisher-tw"),
    ("16,fisher-tw,pin=int4-g65-asymm", "cannot parse option 'int4-g65-asymm'"),
])
def test_a_malformed_variant_is_refused_with_what_is_wrong(variant, named):
    with pytest.raises(SystemExit, match=named):
        parse_variant(variant)


def test_every_variant_is_read_not_only_the_first():
    assert parse_variants("4.0,fisher-tw;3.5,local,untied") == ["4.0,fisher-tw", "3.5,local,untied"]
    with pytest.raises(SystemExit, match="unknown flag 'untie'"):
        parse_variants("4.0,fisher-tw;3.5,fisher-tw,untie")


@pytest.mark.parametrize("bench", ["plan_variants", "ppl_vs_kl", "gptq_ratio"])
def test_each_bench_refuses_a_bad_variant_before_it_profiles(bench, monkeypatch):
    module = importlib.import_module(bench)
    monkeypatch.setattr(module, "load_table", lambda args: pytest.fail("the table was made before the variants were read"))
    monkeypatch.setattr(sys, "argv", [bench, "--f32", "unused.gguf", "--variants", "4.0,fisher-tw;4.0,fisher-tx"])
    with pytest.raises(SystemExit, match="unknown error model 'fisher-tx'"):
        module.main()
