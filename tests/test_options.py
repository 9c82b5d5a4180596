"""Storage accounting of QuantOption: payload + per-group scale and zero-point, exactly."""

from __future__ import annotations

import pytest

from bitalloc.errors import BadInputError
from bitalloc.options import KEEP_BITS, QuantOption, default_options, parse_option


@pytest.mark.parametrize(
    "option, in_features, expected",
    [
        (QuantOption.int_(4, 64, symmetric=False), 576, 4 + (16 + 4) / 64),
        (QuantOption.int_(4, 64, symmetric=True), 576, 4.25),
        (QuantOption.int_(3, 32, symmetric=False), 576, 3 + 19 / 32),
        (QuantOption.int_(2, 128, symmetric=False), 1536, 2 + 18 / 128),
        (QuantOption.int_(8, 32, symmetric=True), 64, 8.5),
        (QuantOption.int_(4, None, symmetric=True), 576, 4 + 16 / 576),
        (QuantOption.int_(4, None, symmetric=False), 576, 4 + 20 / 576),
        (QuantOption.int_(2, None, symmetric=True), 1536, 2 + 16 / 1536),
        (QuantOption.keep(), 576, 16.0),
        (QuantOption.keep(), 1536, 16.0),
    ],
    ids=lambda v: v.label if isinstance(v, QuantOption) else str(v),
)
def test_bits_per_weight_exact(option, in_features, expected):
    assert option.bits_per_weight(in_features) == pytest.approx(expected, rel=1e-15, abs=0)


def test_asymmetric_zero_point_stored_at_weight_bit_width():
    for b in range(2, 9):
        asym, sym = QuantOption.int_(b, 64, False), QuantOption.int_(b, 64, True)
        assert (asym.scale_bits, asym.zero_bits) == (16, b)
        assert (sym.scale_bits, sym.zero_bits) == (16, 0)
    keep = QuantOption.keep()
    assert (keep.bits, keep.scale_bits, keep.zero_bits) == (KEEP_BITS, 0, 0) == (16, 0, 0)


def test_fits():
    assert not QuantOption.int_(4, 128).fits(576)  # 576 = 4.5 * 128
    assert QuantOption.int_(4, 128).fits(1536)
    assert QuantOption.int_(4, 64).fits(576)
    assert QuantOption.int_(4, 32).fits(576)
    assert not QuantOption.int_(4, 64).fits(100)
    assert QuantOption.int_(4, None).fits(577)  # per-channel fits any row length
    assert QuantOption.keep().fits(577)


def test_storage_bits_matrix():
    # [out=10, in=576], int4 g64 asym: 10*576*4 payload + 10*9 groups * (16 scale + 4 zero)
    assert QuantOption.int_(4, 64, False).storage_bits(10, 576) == 10 * 576 * 4 + 10 * 9 * 20 == 24840
    # int3 g32 sym on [7, 64]: 7*64*3 + 7*2*16
    assert QuantOption.int_(3, 32, True).storage_bits(7, 64) == 1344 + 224
    # per channel asym int8 on [3, 1536]: 3*1536*8 + 3*(16+8)
    assert QuantOption.int_(8, None, False).storage_bits(3, 1536) == 36864 + 72
    assert QuantOption.keep().storage_bits(5, 576) == 5 * 576 * 16
    # storage_bits scales linearly with the number of rows and is an int
    opt = QuantOption.int_(5, 32, False)
    assert opt.storage_bits(12, 96) == 12 * opt.storage_bits(1, 96)
    assert isinstance(opt.storage_bits(12, 96), int)


def test_storage_bits_rejects_non_dividing_group():
    with pytest.raises(ValueError, match="576"):
        QuantOption.int_(4, 128).storage_bits(8, 576)


@pytest.mark.parametrize("kwargs", [dict(fmt="fp7"), dict(bits=1), dict(bits=9), dict(group_size=0), dict(group_size=-32)])
def test_invalid_option_raises(kwargs):
    with pytest.raises(ValueError):
        QuantOption(**kwargs)


def test_default_options_grid():
    opts = default_options()
    # 6 bit widths x 4 group sizes x 2 symmetries + keep, no duplicates, sorted deterministically
    assert len(opts) == 6 * 4 * 2 + 1 == len(set(opts))
    assert QuantOption.keep() in opts
    assert {o.bits for o in opts if o.fmt == "int"} == {2, 3, 4, 5, 6, 8}
    assert {o.group_size for o in opts if o.fmt == "int"} == {32, 64, 128, None}
    assert default_options() == opts
    assert QuantOption.keep() not in default_options(include_keep=False)
    assert len(default_options(bits=(4,), group_sizes=(64,), symmetric=(True,), include_keep=False)) == 1


def test_parse_option_round_trip_over_default_options():
    for opt in default_options():
        assert parse_option(opt.label) == opt
    assert parse_option("int4-g64-asym") == QuantOption.int_(4, 64, False)
    assert parse_option("int8-ch-sym") == QuantOption.int_(8, None, True)
    assert parse_option("bf16") == parse_option("keep") == parse_option("fp16") == QuantOption.keep()


def test_labels_are_unique():
    labels = [o.label for o in default_options()]
    assert len(labels) == len(set(labels))


@pytest.mark.parametrize("label", ["int4", "int4-g64", "int4-g64-foo", "float4-g64-sym", "intx-g64-sym", "int4-gx-sym",
                                   "int9-g64-sym", "int4-g0-asym", "", "int4-g64-asym-extra"])
def test_parse_option_errors_are_bad_input(label):
    with pytest.raises(BadInputError, match="int4-g64-asym"):
        parse_option(label)


def test_dict_round_trip():
    for opt in default_options():
        assert QuantOption.from_dict(opt.to_dict()) == opt
