"""Budgets as users write them, and what they mean in total storage bits."""

from __future__ import annotations

import pytest

from bitalloc.budget import Budget, parse_budget
from bitalloc.errors import BadInputError, BitallocError


@pytest.mark.parametrize(
    "text, kind, value",
    [
        ("3.2bits", "bits", 3.2),
        ("4bits", "bits", 4.0),
        ("4 bits", "bits", 4.0),
        ("2.5bpw", "bits", 2.5),
        ("1bit", "bits", 1.0),
        ("1.5GB", "bytes", 1.5e9),
        ("1.5gb", "bytes", 1.5e9),
        ("800MB", "bytes", 800e6),
        ("2GiB", "bytes", 2.0**31),
        ("512MiB", "bytes", 512 * 2.0**20),
        ("100kB", "bytes", 1e5),
        ("30%", "percent", 30.0),
        ("100%", "percent", 100.0),
        ("  3.2bits ", "bits", 3.2),
        ("1e3MB", "bytes", 1e9),
    ],
)
def test_parse_budget(text, kind, value):
    b = parse_budget(text)
    assert b.kind == kind
    assert b.value == pytest.approx(value, rel=1e-12)
    assert b.text == text.strip()


def test_parse_budget_passes_budget_through():
    b = Budget("bits", 3.0, "3bits")
    assert parse_budget(b) is b


def test_max_storage_bits():
    n = 1_000_000
    assert parse_budget("3.2bits").max_storage_bits(n) == pytest.approx(3.2e6, rel=1e-12)
    assert parse_budget("1.5GB").max_storage_bits(n) == 1.2e10  # independent of n
    assert parse_budget("1.5GB").max_storage_bits(7) == 1.2e10
    assert parse_budget("800MB").max_storage_bits(n) == 6.4e9
    assert parse_budget("2GiB").max_storage_bits(n) == 2.0**34
    assert parse_budget("30%").max_storage_bits(n) == pytest.approx(0.3 * 16 * n, rel=1e-12)  # 4.8 bits/weight
    assert parse_budget("100%").max_storage_bits(n) == 16 * n
    # equal budgets in different units mean the same number of bits
    assert parse_budget("25%").max_storage_bits(n) == pytest.approx(parse_budget("4bits").max_storage_bits(n))
    assert parse_budget("0.5MB").max_storage_bits(n) == parse_budget("4bits").max_storage_bits(n)


def test_describe_in_own_unit():
    n = 1000
    assert parse_budget("4bits").describe(3250, n) == "3.25bits"
    assert parse_budget("1MB").describe(8e6, n) == "1MB"
    assert parse_budget("30%").describe(4000, n) == "25%"


@pytest.mark.parametrize("text", ["", "   ", "abc", "bits", "3.2", "3.2parsecs", "3.2 parsecs", "-3bits", "0bits",
                                  "0%", "-1GB", "3..2bits", "1/2bits", "nanbits", "infbits"])
def test_bad_budgets_raise_bad_input_with_example(text):
    with pytest.raises(BadInputError) as info:
        parse_budget(text)
    msg = str(info.value)
    assert "3.2bits" in msg  # tells the user how to write one
    assert repr(text) in msg or repr(text.strip()) in msg  # names what was wrong
    assert isinstance(info.value, BitallocError) and info.value.exit_code == 2


@pytest.mark.parametrize("text", ["150%", "100.5%"])
def test_percent_over_100_rejected(text):
    with pytest.raises(BadInputError, match="100%") as info:
        parse_budget(text)
    assert repr(text) in str(info.value)


def test_unknown_unit_is_named():
    with pytest.raises(BadInputError, match="'parsecs'"):
        parse_budget("3.2parsecs")


def test_whole_model_scope_subtracts_the_unplanned_tensors_at_16_bits():
    n, unplanned = 1000, 200
    # bytes: the whole model's bytes minus the unplanned tensors' 16 bits each
    assert parse_budget("1000B", "model").max_storage_bits(n, unplanned) == 8000 - 16 * 200
    # bits per weight: over every weight of the model
    assert parse_budget("4bits", "model").max_storage_bits(n, unplanned) == 4 * 1200 - 16 * 200
    # percent of the whole model's fp16 size
    assert parse_budget("50%", "model").max_storage_bits(n, unplanned) == 0.5 * 16 * 1200 - 16 * 200
    b = parse_budget("1000B", "model")
    assert b.describe(b.max_storage_bits(n, unplanned), n, unplanned) == "0.001MB"  # back in the budget's own terms
    assert parse_budget("1000B").max_storage_bits(n, unplanned) == 8000  # the default scope: planned weights only
    assert parse_budget(parse_budget("4bits"), "model").scope == "model"
    with pytest.raises(BadInputError, match="unknown budget scope 'layers'"):
        parse_budget("4bits", "layers")
    with pytest.raises(BadInputError, match="which this profile predates"):
        b.max_storage_bits(n, None)


def test_whole_model_scope_takes_what_the_target_stores_outside_the_plan():
    from bitalloc.budget import Outside, default_scope, gguf_typed
    from bitalloc.options import QuantOption, parse_option

    n = 1000
    # a GGUF file: 300 unplanned weights stored in 5000 bits, header included
    file = Outside(300, 5000, "the file's header, metadata and unplanned tensors")
    assert parse_budget("1000B", "model").max_storage_bits(n, file) == 8000 - 5000
    assert parse_budget("4bits", "model").max_storage_bits(n, file) == 4 * 1300 - 5000
    assert parse_budget("4bits", "model").max_storage_bits(n, 200) == \
        parse_budget("4bits", "model").max_storage_bits(n, Outside.at_16_bits(200))
    assert parse_budget("4bits").max_storage_bits(n, file) == 4000  # planned scope ignores it
    # without --budget-scope: a size of a llama.cpp file is the file; everything else the planned weights
    gguf = [QuantOption.gguf("Q4_K"), QuantOption.keep()]
    assert gguf_typed(gguf, "m.gguf") and not gguf_typed(gguf, "hf-dir") and not gguf_typed(
        [QuantOption.gguf("Q4_K"), parse_option("int4-g64-sym")], "m.gguf")
    assert default_scope("bytes", True) == "model"
    assert default_scope("bits", True) == default_scope("bytes", False) == "planned"
