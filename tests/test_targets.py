"""Hardware targets and the --formats / --target resolution."""

from __future__ import annotations

import pytest

from bitalloc.config import ProfileConfig, RaySpec
from bitalloc.errors import BadInputError
from bitalloc.options import FORMAT_FAMILIES, QuantOption, default_options
from bitalloc.targets import resolve_formats, targets


def test_every_target_names_known_families_and_keeps_int_and_keep():
    TARGETS = targets()
    for name, families in TARGETS.items():
        assert set(families) <= set(FORMAT_FAMILIES), name
        # llama.cpp runs its own GGUF types, not bitalloc's INT grid; every hardware target runs INT.
        assert ("int" in families) != (name == "llama.cpp") and "keep" in families, name
        default_options(formats=families)  # builds
    assert set(TARGETS["any"]) == set(FORMAT_FAMILIES)
    assert set(TARGETS["h100"]) == {"int", "fp8", "keep"}
    assert {"mxfp4", "mxfp6", "mxfp8", "nvfp4", "fp8"} <= set(TARGETS["b200"])
    assert set(TARGETS["cpu"]) == {"int", "keep"}
    assert set(TARGETS["llama.cpp"]) == {"gguf", "keep"}


def test_resolve_formats():
    assert resolve_formats() == ["int", "keep"]
    assert resolve_formats(target="h100") == ["int", "fp8", "keep"]
    assert resolve_formats("int,fp8,mxfp4,nvfp4,keep") == ["int", "fp8", "mxfp4", "nvfp4", "keep"]
    assert resolve_formats(" fp8 , keep,fp8 ") == ["fp8", "keep"]
    assert resolve_formats(["mxfp4", "nvfp4"], target="b200") == ["mxfp4", "nvfp4"]
    assert resolve_formats("int,fp8", target="h100") == ["int", "fp8"]
    # llama.cpp's i-quants: allowed on the target, offered only when named
    assert resolve_formats(target="llama.cpp") == ["gguf", "keep"]
    assert resolve_formats("gguf,gguf-iq,keep", target="llama.cpp") == ["gguf", "gguf-iq", "keep"]


@pytest.mark.parametrize("formats, target, needles", [
    ("int,fp9", None, ["'fp9'", "choose from int, fp8, fp6, fp4, mxfp4, mxfp6, mxfp8, nvfp4, gguf, gguf-iq, keep"]),
    ("", None, ["no format families", "int,fp8,keep"]),
    (None, "tpu", ["'tpu'", "cpu, a100, h100, h200, b200, llama.cpp, any"]),
    ("int,nvfp4,mxfp4", "h100", ["nvfp4, mxfp4 not supported on target 'h100'", "allows int, fp8, keep"]),
    ("gguf-iq,int", "llama.cpp", ["int not supported on target 'llama.cpp'", "allows gguf, keep, gguf-iq"]),
])
def test_resolve_formats_errors(formats, target, needles):
    with pytest.raises(BadInputError) as info:
        resolve_formats(formats, target)
    for needle in needles:
        assert needle in str(info.value)


def test_a_grid_of_gguf_types_defaults_to_llama_cpps_importance_weighted_quantizers():
    """llama.cpp users quantize with an imatrix; every profile has its diag H. Other grids get awq-gptq (GPTQ on the
    equalized model, planned from awq's errors), or rtn-w where nothing can be folded (stream, ray), and a named
    quantizer always wins."""
    gguf = [QuantOption.gguf("Q4_K"), QuantOption.gguf("Q8_0"), QuantOption.keep()]
    assert ProfileConfig(options=gguf).quantizer == "imatrix"
    assert ProfileConfig(options=default_options(formats=resolve_formats(target="llama.cpp"))).quantizer == "imatrix"
    assert ProfileConfig(options=gguf, quantizer="rtn").quantizer == "rtn"
    assert ProfileConfig().quantizer == "awq-gptq"  # the INT grid
    assert ProfileConfig(options=[QuantOption.keep()]).quantizer == "awq-gptq"
    assert ProfileConfig(stream=True).quantizer == "rtn-w" and ProfileConfig(ray=RaySpec()).quantizer == "rtn-w"
    assert ProfileConfig(stream=True, quantizer="rtn").quantizer == "rtn"
    # imatrix quantizes GGUF types only, so a grid that mixes in INT gets awq-gptq
    assert ProfileConfig(options=gguf + [QuantOption.int_(4, 64)]).quantizer == "awq-gptq"


def test_every_table_is_solved_under_fisher_tw_unless_told_otherwise():
    """fisher-tw's llama.cpp-type plans beat llama.cpp's imatrix mixes at every size on both benched families,
    and its INT plans beat uniform INT where fisher's lose to it (config.default_error_model)."""
    from bitalloc.config import default_error_model

    assert default_error_model([QuantOption.gguf("Q4_K"), QuantOption.keep()]) == "fisher-tw"
    assert default_error_model(default_options()) == "fisher-tw"
    assert default_error_model([QuantOption.gguf("Q4_K"), QuantOption.int_(4, 64)]) == "fisher-tw"
