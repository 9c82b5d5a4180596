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


# ---- FP, MX and NVFP4 options --------------------------------------------------------------------

from bitalloc.options import FORMAT_FAMILIES  # noqa: E402

ALL_FAMILIES = default_options(formats=FORMAT_FAMILIES)


@pytest.mark.parametrize(
    "option, out_features, in_features, expected_bits",
    [
        # MX: 32 elements share one 8-bit E8M0 scale
        (QuantOption.mx("e2m1"), 10, 576, 10 * 576 * 4 + 10 * 18 * 8),
        (QuantOption.mx("e2m3"), 3, 64, 3 * 64 * 6 + 3 * 2 * 8),
        (QuantOption.mx("e4m3"), 3, 64, 3 * 64 * 8 + 3 * 2 * 8),
        # NVFP4: 16 elements share one E4M3 scale, plus one fp32 scale for the tensor
        (QuantOption.nvfp4(), 10, 576, 10 * 576 * 4 + 10 * 36 * 8 + 32),
        # fp8 per channel / group: fp16 scales; per tensor: one fp32 scale
        (QuantOption.fp("e4m3", None), 10, 576, 10 * 576 * 8 + 10 * 16),
        (QuantOption.fp("e5m2", 128), 2, 1536, 2 * 1536 * 8 + 2 * 12 * 16),
        (QuantOption.fp("e4m3", 0), 10, 576, 10 * 576 * 8 + 32),
        (QuantOption.fp("e2m1", 32), 4, 64, 4 * 64 * 4 + 4 * 2 * 16),
        (QuantOption.fp("e3m2", None), 4, 64, 4 * 64 * 6 + 4 * 16),
    ],
    ids=lambda v: v.label if isinstance(v, QuantOption) else str(v),
)
def test_fp_storage_bits_exact(option, out_features, in_features, expected_bits):
    assert option.storage_bits(out_features, in_features) == expected_bits
    assert isinstance(option.storage_bits(out_features, in_features), int)


def test_fp_bits_per_weight():
    n_out, n_in = 576, 1536
    n = n_out * n_in
    assert QuantOption.mx("e2m1").bits_per_weight(n_in) == 4.25
    assert QuantOption.mx("e2m3").bits_per_weight(n_in) == QuantOption.mx("e3m2").bits_per_weight(n_in) == 6.25
    assert QuantOption.mx("e4m3").bits_per_weight(n_in) == QuantOption.mx("e5m2").bits_per_weight(n_in) == 8.25
    assert QuantOption.nvfp4().bits_per_weight(n_in, n_out) == pytest.approx(4.5 + 32 / n, rel=1e-15)
    assert QuantOption.fp("e4m3", None).bits_per_weight(n_in) == pytest.approx(8 + 16 / n_in, rel=1e-15)
    assert QuantOption.fp("e4m3", 0).bits_per_weight(n_in, n_out) == pytest.approx(8 + 32 / n, rel=1e-15)
    assert QuantOption.fp("e2m1", 32).bits_per_weight(n_in) == 4.5
    # per-tensor overheads shrink with the matrix; per-row ones do not
    assert QuantOption.nvfp4().storage_bits(2 * n_out, n_in) == 2 * QuantOption.nvfp4().storage_bits(n_out, n_in) - 32


def test_fp_fits():
    assert QuantOption.mx("e2m1").fits(576) and not QuantOption.mx("e2m1").fits(48)
    assert QuantOption.nvfp4().fits(48) and not QuantOption.nvfp4().fits(40)
    assert QuantOption.fp("e4m3", 0).fits(577) and QuantOption.fp("e4m3", None).fits(577)
    assert not QuantOption.fp("e4m3", 128).fits(576)
    with pytest.raises(ValueError, match="48"):
        QuantOption.mx("e2m1").storage_bits(4, 48)


def test_fp_constructors_fill_the_documented_fields():
    assert QuantOption.fp("e4m3", None) == QuantOption("fp", 8, None, True, 16, 0, "e4m3", "fp16", 0)
    assert QuantOption.fp("e5m2", 0) == QuantOption("fp", 8, 0, True, 32, 0, "e5m2", "fp32", 0)
    assert QuantOption.fp("e2m3", 64) == QuantOption("fp", 6, 64, True, 16, 0, "e2m3", "fp16", 0)
    assert QuantOption.mx("e2m1") == QuantOption("fp", 4, 32, True, 8, 0, "e2m1", "e8m0", 0)
    assert QuantOption.nvfp4() == QuantOption("fp", 4, 16, True, 8, 0, "e2m1", "e4m3", 32)
    assert [o.scheme for o in (QuantOption.fp("e4m3", 32), QuantOption.mx("e4m3"), QuantOption.nvfp4(),
                               QuantOption.int_(4, 32), QuantOption.keep())] == ["fp", "mx", "nvfp4", "int", "keep"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(fmt="fp", bits=4, element="e4m3", symmetric=True, scale_bits=16), "8 bits wide"),
    (dict(fmt="fp", bits=8, element="e9m9", symmetric=True, scale_bits=16), "unknown fp element"),
    (dict(fmt="fp", bits=8, element="e4m3", symmetric=False, scale_bits=16), "symmetric"),
    (dict(fmt="fp", bits=8, element="e4m3", symmetric=True, scale_bits=16, zero_bits=8), "zero-point"),
    (dict(fmt="fp", bits=8, element="e4m3", symmetric=True, scale_bits=8, scale_fmt="fp16"), "scale_bits=8"),
    (dict(fmt="fp", bits=8, element="e4m3", symmetric=True, group_size=64, scale_bits=8, scale_fmt="e8m0"), "blocks of 32"),
    (dict(fmt="fp", bits=8, element="e4m3", symmetric=True, group_size=16, scale_bits=8, scale_fmt="e4m3",
          tensor_scale_bits=32), "NVFP4"),
    (dict(fmt="fp", bits=4, element="e2m1", symmetric=True, group_size=16, scale_bits=8, scale_fmt="e4m3"), "NVFP4"),
    (dict(fmt="fp", bits=8, element="e4m3", symmetric=True, group_size=32, scale_bits=32, scale_fmt="fp32"), "per tensor"),
    (dict(fmt="fp", bits=8, element="e4m3", symmetric=True, group_size=0, scale_bits=16), "per channel or per group"),
    (dict(fmt="int", bits=4, group_size=0), "group_size must be positive"),
    (dict(fmt="int", bits=4, element="e4m3"), "no element"),
    (dict(fmt="keep", bits=16, group_size=None, scale_bits=0, scale_fmt="e8m0"), "no element"),
])
def test_inconsistent_fp_options_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        QuantOption(**kwargs)


def test_default_options_formats():
    assert default_options(formats=("int", "keep")) == default_options()  # the default is unchanged
    labels = [o.label for o in ALL_FAMILIES]
    assert len(labels) == len(set(labels)) == len(ALL_FAMILIES)
    by_family = {f: [o.label for o in default_options(formats=[f])] for f in FORMAT_FAMILIES}
    assert by_family["mxfp4"] == ["mxfp4"]
    assert by_family["mxfp6"] == ["mxfp6e2m3", "mxfp6e3m2"]
    assert by_family["mxfp8"] == ["mxfp8e4m3", "mxfp8e5m2"]
    assert by_family["nvfp4"] == ["nvfp4"]
    assert by_family["keep"] == ["fp16"]
    assert by_family["fp8"] == [f"fp8{e}-{g}" for e in ("e4m3", "e5m2") for g in ("tensor", "g32", "g64", "g128", "ch")]
    assert by_family["fp6"] == [f"fp6{e}-{g}" for e in ("e2m3", "e3m2") for g in ("g32", "g64", "g128", "ch")]
    assert by_family["fp4"] == ["fp4e2m1-g32", "fp4e2m1-g64", "fp4e2m1-g128", "fp4e2m1-ch"]
    assert by_family["gguf"] == ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
                                 "Q6_K", "Q8_0"]
    assert by_family["gguf-iq"] == ["IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ3_S", "IQ3_XXS"]
    assert len(ALL_FAMILIES) == 48 + 10 + 8 + 4 + 1 + 2 + 2 + 1 + 12 + 5 + 1
    assert [o.label for o in default_options(formats=["fp8"], group_sizes=[None])] == ["fp8e4m3-tensor", "fp8e4m3-ch",
                                                                                       "fp8e5m2-tensor", "fp8e5m2-ch"]
    assert QuantOption.keep() not in default_options(formats=FORMAT_FAMILIES, include_keep=False)
    with pytest.raises(BadInputError, match="fp7.*choose from int, fp8"):
        default_options(formats=["int", "fp7"])


def test_parse_option_round_trip_over_all_families():
    for opt in ALL_FAMILIES:
        assert parse_option(opt.label) == opt, opt.label
        assert any(opt in default_options(formats=[grid]) for grid in FORMAT_FAMILIES if grid.startswith(opt.family))
        assert QuantOption.from_dict(opt.to_dict()) == opt
    assert parse_option("fp8e4m3-ch") == QuantOption.fp("e4m3", None)
    assert parse_option("fp8e4m3-g128") == QuantOption.fp("e4m3", 128)
    assert parse_option("fp8e4m3-tensor") == QuantOption.fp("e4m3", 0)
    assert parse_option("fp4e2m1-g32") == QuantOption.fp("e2m1", 32)
    assert parse_option("mxfp4") == parse_option("mxfp4e2m1") == QuantOption.mx("e2m1")
    assert parse_option("mxfp6e3m2") == QuantOption.mx("e3m2")
    assert parse_option("mxfp8e5m2") == QuantOption.mx("e5m2")
    assert parse_option("nvfp4") == QuantOption.nvfp4()


@pytest.mark.parametrize("label, needle", [
    ("fp8e2m1-ch", "e2m1 is 4 bits wide"), ("fp4e4m3-g32", "e4m3 is 8 bits wide"), ("fp8e9m9-ch", "unknown fp element"),
    ("fp8e4m3-g0", "per tensor is '-tensor'"), ("fp8e4m3", ""), ("fp8-ch", ""), ("mxfp6", "mxfp6e2m3"),
    ("mxfp8", "mxfp8e4m3"), ("mxfp4e4m3", "8 bits wide"), ("nvfp8", ""), ("mxfp4-g32", ""), ("fp8e4m3-sym", ""),
])
def test_parse_fp_label_errors_name_problem_and_examples(label, needle):
    with pytest.raises(BadInputError) as info:
        parse_option(label)
    msg = str(info.value)
    assert needle in msg and repr(label) in msg
    for example in ("'int4-g64-asym'", "'fp8e4m3-ch'", "'mxfp4'", "'nvfp4'"):
        assert example in msg


@pytest.mark.parametrize("first", ["int", "fp", "mx", "nvfp4", "gguf", "keep"])
def test_any_family_module_can_be_imported_first_without_torch(first):
    """Family modules import each other (mx, nvfp4 use fp's elements): whichever comes first, the
    registry ends up whole and in one order, and reading labels does not import torch."""
    import subprocess
    import sys

    code = (f"import sys, bitalloc.formats.{first}\n"
            "from bitalloc.options import FORMAT_FAMILIES, parse_option\n"
            "assert parse_option('nvfp4').family == 'nvfp4' and 'torch' not in sys.modules\n"
            "print(','.join(FORMAT_FAMILIES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "int,fp8,fp6,fp4,mxfp4,mxfp6,mxfp8,nvfp4,gguf,gguf-iq,keep"
