"""A number format is one unit: a toy family defined in this file alone, registered by the test, is
plannable, appliable, trainable (QAT), timed by the latency fallback kernel, and packed or exported where
a target can hold it, refused with a clear error where it cannot — with no edit anywhere else (issue 12,
item 4).

The toy: ternary weights {-1, 0, +1} · s with one fp16 scale s per group (BitNet b1.58's absmean
rule: s = mean |w| of the group), stored in 2 bits per weight. Label: ternary-g<size>.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest
import torch

import bitalloc
from bitalloc import qat
from bitalloc.errors import BadInputError
from bitalloc.exports import available_exports, export_plan
from bitalloc.formats import Format, QuantizedWeight, quantize_dequantize, register_format, unregister_format
from bitalloc.options import QuantOption, default_options, parse_option
from bitalloc.plan import Plan, plan_json_schema
from bitalloc.quantizers import quantize_weight
from bitalloc.targets import resolve_formats

from conftest import CALIB_TEXT, make_llama, make_tokenizer

# ---- the family: everything bitalloc needs to know about it ---------------------------------------

_LABEL = re.compile(r"ternary-g(\d+)")


def ternary(group_size: int) -> QuantOption:
    return QuantOption("ternary", 2, group_size, True, 16, 0)


def _check(o: QuantOption) -> None:
    if (o.bits, o.symmetric, o.scale_bits, o.zero_bits, o.element, o.scale_fmt, o.tensor_scale_bits) != (2, True, 16, 0, "", "fp16", 0):
        raise ValueError("ternary options are 2-bit codes with an fp16 scale per group; build them with ternary(g)")
    if not o.group_size:
        raise ValueError("ternary options have one scale per group of a positive size")


def _parse(text: str) -> QuantOption | None:
    m = _LABEL.fullmatch(text)
    return ternary(int(m[1])) if m else None


def _quantize(w: torch.Tensor, o: QuantOption) -> QuantizedWeight:
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // o.group_size, o.group_size)
    scale = g.abs().mean(dim=-1, keepdim=True).to(torch.float16).float()  # stored in fp16
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.round(g / scale), -1, 1)
    return QuantizedWeight(o, (codes * scale).reshape(w.shape), codes.reshape(w.shape).to(torch.int32), scale.squeeze(-1))


TERNARY = Format("ternary", "ternary", _check, lambda o: f"ternary-g{o.group_size}", _parse, _quantize,
                 grids={"ternary": lambda grid: [ternary(g) for g in grid.group_sizes if g]},
                 label_examples=("ternary-g64",))


@pytest.fixture
def registered():
    register_format(TERNARY)
    yield
    unregister_format("ternary")


# ---- the tests --------------------------------------------------------------------------------------


def test_options_labels_storage_and_grids(registered):
    o = parse_option("ternary-g32")
    assert o == ternary(32) and o.label == "ternary-g32" and o.scheme == "ternary" and o.family == "ternary"
    assert o.storage_bits(8, 64) == 8 * 64 * 2 + 8 * 2 * 16  # 2-bit codes + one fp16 scale per group
    assert o.bits_per_weight(64) == 2.5
    assert [x.label for x in default_options(group_sizes=(32, None), formats=["ternary"])] == ["ternary-g32"]
    assert resolve_formats("ternary,keep") == ["ternary", "keep"]
    assert "ternary" in resolve_formats(target="any")
    with pytest.raises(BadInputError, match="'ternary-g0'.*ternary options have one scale per group.*'ternary-g64'"):
        parse_option("ternary-g0")
    with pytest.raises(ValueError, match="build them with ternary"):
        QuantOption("ternary", 3, 32, True, 16, 0)


def test_quantize_returns_values_and_the_stored_codes(registered):
    w = torch.randn(16, 64)
    o = ternary(32)
    for quantizer in ("rtn", "rtn-w", "gptq"):  # the Hessian quantizers fall back to the family's own rounding
        q = quantize_weight(w, o, quantizer, hessian=torch.eye(64) if quantizer != "rtn" else None)
        assert set(q.codes.unique().tolist()) <= {-1, 0, 1}
        assert torch.equal(q.values, (q.codes.float().reshape(16, 2, 32) * q.scale.unsqueeze(-1)).reshape(16, 64))
    assert torch.equal(quantize_dequantize(w, o), q.values)  # gptq's values are the family's RTN here


def _toy_plan(tmp_path) -> Plan:
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT, encoding="utf-8")
    # rtn: the toy family has no importance-weighted scales, so under rtn-w the INT options would crowd it out
    return bitalloc.plan(make_llama(), "3bits", calib, tokenizer=make_tokenizer(), seq_len=32, calib_tokens=128,
                         options=default_options(group_sizes=(32,), formats=("ternary", "int", "keep")), quantizer="rtn")


def test_planned_saved_loaded_applied_and_trained(registered, tmp_path):
    plan = _toy_plan(tmp_path)
    toy = [a for a in plan.assignments if a.label == "ternary-g32"]
    assert toy, "the solver should pick the 2.5-bit ternary option somewhere under a 3-bit budget"
    assert plan.summary.storage_bits_per_weight <= 3.0
    # The plan file carries the new family and loads back; the schema of this process lists it.
    doc = json.loads(plan.to_json())
    jsonschema.Draft202012Validator(plan_json_schema()).validate(doc)
    assert Plan.from_json(plan.to_json()) == plan
    assert toy[0].storage_bits == ternary(32).storage_bits(*toy[0].shape)

    model = bitalloc.apply(make_llama(), plan)
    name = toy[0].module
    w = model.get_submodule(name).weight.detach()
    per_group = w.float().reshape(w.shape[0], -1, 32)
    assert all(len(g.abs().unique()) <= 2 for g in per_group.reshape(-1, 32))  # 0 and ±s
    assert torch.equal(w, quantize_dequantize(make_llama().get_submodule(name).weight.detach(), ternary(32)))

    # QAT: the fake-quant forward is the family's rounding; convert returns its codes.
    prepared = qat.prepare(make_llama(), plan)
    prepared(torch.randint(0, 256, (1, 8))).logits.sum().backward()
    assert prepared.get_submodule(name).weight.grad is not None
    stored = qat.convert(prepared)[name]
    assert torch.equal(stored.values.to(w.dtype), w) and set(stored.codes.unique().tolist()) <= {-1, 0, 1}


def test_qat_trains_with_the_family_s_own_fake_quant(tmp_path):
    """A family that declares fake_quant gets it in QAT: here the STE is scaled by 0.5, so the weight's
    gradient is half of the plain straight-through one (the default for a family without it)."""
    def grads(fmt: Format) -> torch.Tensor:
        register_format(fmt)
        try:
            plan = _toy_plan(tmp_path)
            name = next(a.module for a in plan.assignments if a.label == "ternary-g32")
            torch.manual_seed(0)
            prepared = qat.prepare(make_llama(), plan)
            prepared(torch.arange(8)[None]).logits.sum().backward()
            return prepared.get_submodule(name).weight.grad.clone()
        finally:
            unregister_format("ternary")

    def half_ste(w: torch.Tensor, o: QuantOption) -> torch.Tensor:
        return _quantize(w.detach(), o).values + 0.5 * (w - w.detach())

    plain, own = grads(TERNARY), grads(dataclasses.replace(TERNARY, fake_quant=half_ste))
    assert plain.abs().sum() > 0
    torch.testing.assert_close(own, 0.5 * plain)


def test_packers_and_exporters_hold_it_or_refuse_it(registered, tmp_path):
    plan = _toy_plan(tmp_path)
    toy = {a.module for a in plan.assignments if a.label == "ternary-g32"}
    with pytest.raises(BadInputError, match="compressed-tensors cannot store .*ternary-g32.*re-plan"):
        bitalloc.save_checkpoint(make_llama(), plan, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    for target in available_exports():
        try:
            result = export_plan(plan, target, tmp_path / target)
        except BadInputError as e:  # refused as a whole: the message names the option or the fix
            assert "ternary" in str(e) or "re-plan" in str(e), (target, str(e))
            continue
        # Exported: every toy module is reported as not held (left unquantized, or mapped to the nearest
        # type the target has), never silently written as something else.
        for module in toy:
            assert any(module in line and "ternary-g32" in line for line in result.unsupported), (target, result.unsupported)


def test_timed_by_the_dequantize_fallback_kernel(registered):
    """No real kernel holds it, so latency profiling times the generic fallback on its own codes and scales."""
    from bitalloc.latency import kernels
    from bitalloc.latency.measure import choose_kernel

    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    kernel, fn = choose_kernel(ternary(32), torch.device("cpu"), torch.float32, w, checks := [])
    assert kernel.name == "dequant_dense" and checks[-1].status == "ok"
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(fn(x), x @ kernels.reference_weight(w, ternary(32)).t(), rtol=1e-5, atol=1e-6)
