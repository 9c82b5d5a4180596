"""QAT: fake-quant wrappers follow the plan, train (STE / LSQ), convert to the grid, re-plan in a Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc import qat
from bitalloc.errors import BadInputError, PlanMismatchError
from bitalloc.formats.int import int_range
from bitalloc.models import Conv1D, select_modules
from bitalloc.options import QuantOption, default_options

from conftest import VOCAB, make_gpt2, make_llama

MAKERS = {"llama": make_llama, "gpt2": make_gpt2}
# int + the fp families, so the mixed plan below exercises every fake-quant path
OPTIONS = default_options(bits=(2, 3, 4, 8), group_sizes=(32, 64, None), formats=("int", "fp8", "mxfp4", "nvfp4", "keep"))


def mixed_plan(model, ids, budget="5bits", **kw):
    """A plan with INT sym/asym, grouped and per-channel, an fp8, an nvfp4 and an mxfp4 module (+ fp16)."""
    names = select_modules(model)
    pins = ((names[0], "int4-ch-sym"), (names[1], "int3-g32-sym"), (names[2], "nvfp4"), (names[3], "mxfp4"),
            (names[4], "fp8e4m3-ch"), (names[5], "int2-g64-asym"))
    if len(names) > 8:  # llama (14 modules): one fp16 module too; gpt2 (8) stays all-quantized
        pins += ((names[6], "fp16"),)
    # rtn: QAT's fake quantization rounds to nearest, so an RTN plan is what it reproduces bit for bit
    return bitalloc.plan(model, budget, ids, options=OPTIONS, cache_dir=False, quantizer="rtn",
                         constraints=bitalloc.Constraints(pins=tuple((f"^{n}$".replace(".", r"\."), o) for n, o in pins),
                                                          ties=()), **kw)  # q/k/v deliberately differ


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def nll(model, ids):
    out = model(input_ids=ids).logits
    return nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]).float(), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("family", sorted(MAKERS))
@pytest.mark.parametrize("learnable", [False, True])
def test_prepared_model_equals_rtn_apply_at_init(family, learnable, calib_ids):
    model = MAKERS[family]()
    plan = mixed_plan(model, calib_ids)
    labels = {a.label for a in plan.assignments}
    assert {"int4-ch-sym", "int3-g32-sym", "nvfp4", "mxfp4", "fp8e4m3-ch", "int2-g64-asym"} <= labels
    applied = bitalloc.apply(copy.deepcopy(model), plan)
    prepared = qat.prepare(copy.deepcopy(model), plan, learnable_scales=learnable)

    wrappers = qat.fake_quant_modules(prepared)
    # every planned linear is wrapped, fp16 ones included (they train on fp16-rounded weights)
    assert set(wrappers) == {a.module for a in plan.assignments}
    for name, w in wrappers.items():
        assert w.option == plan.options_by_module()[name]
        # each wrapper's weight is bit-identical to what apply stores
        applied_w = applied.get_submodule(name).weight
        assert torch.equal(w.fake_weight().detach(), applied_w.t() if w.transposed else applied_w)
        assert w.learnable_scale == (learnable and w.option.fmt == "int")
    assert torch.equal(logits(prepared, calib_ids), logits(applied, calib_ids))


def test_pure_int_plan_is_bit_exact(calib_ids):
    model = make_gpt2()
    plan = bitalloc.plan(model, "3bits", calib_ids, cache_dir=False, options=default_options(include_keep=False),
                         quantizer="rtn")
    applied = bitalloc.apply(copy.deepcopy(model), plan)
    for learnable in (False, True):
        prepared = qat.prepare(copy.deepcopy(model), plan, learnable_scales=learnable)
        assert torch.equal(logits(prepared, calib_ids), logits(applied, calib_ids))


def test_ste_gradients_reach_weights_and_learnable_scales(calib_ids):
    model = qat.prepare(make_llama(), mixed_plan(make_llama(), calib_ids), learnable_scales=True)
    nll(model, calib_ids).backward()
    for name, w in qat.fake_quant_modules(model).items():
        g = w.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
        if w.option.fmt == "int":
            assert w.scale.grad is not None and w.scale.grad.abs().sum() > 0, name
            assert w.scale.grad.shape == w.scale.shape
        else:
            assert not hasattr(w, "scale")


def test_lsq_scale_gradient_matches_the_paper():
    """dŵ/ds = round(v) - v inside the range, the clamped code outside (LSQ eq. 3), times 1/sqrt(N·Q_P)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 4, bias=False)
    option = QuantOption.int_(3, 32, symmetric=True)
    w = qat.FakeQuantLinear(lin, option, learnable_scale=True)
    with torch.no_grad():
        w.scale.mul_(0.5)  # push some weights out of range, so both cases occur
        w.scale.copy_(w.scale.half().float())
    G = torch.randn(4, 64)
    (w.fake_weight() * G).sum().backward()

    s = w.scale.detach()  # [4, 2]
    v = lin.weight.detach().reshape(4, 2, 32) / s[..., None]
    lo, hi = int_range(option)
    inside = (torch.round(v) >= lo) & (torch.round(v) <= hi)
    d = torch.where(inside, torch.round(v) - v, torch.round(v).clamp(lo, hi))
    expected = (G.reshape(4, 2, 32) * d).sum(-1) / (32 * hi) ** 0.5
    assert (~inside).any() and inside.any()
    torch.testing.assert_close(w.scale.grad, expected, rtol=1e-5, atol=1e-7)
    # weights: straight through inside the range, zero where clamped
    torch.testing.assert_close(lin.weight.grad, torch.where(inside, G.reshape(4, 2, 32), 0.0).reshape(4, 64))


def train(model, ids, steps, lr):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nll(model, ids).backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("learnable", [False, True])
def test_training_under_a_low_bit_plan_lowers_the_fake_quant_loss(learnable, calib_ids):
    model = make_llama()
    plan = bitalloc.plan(model, "2.5bits", calib_ids, cache_dir=False)
    assert plan.summary.storage_bits_per_weight <= 2.5
    qat.prepare(model, plan, learnable_scales=learnable)
    with torch.no_grad():
        before = float(nll(model, calib_ids))
    train(model, calib_ids, steps=30, lr=3e-3)
    with torch.no_grad():
        after = float(nll(model, calib_ids))
    # random tokens on a random model start near ln(256) = 5.55; a fixed batch can be fitted
    assert before > 5.0
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("family", sorted(MAKERS))
@pytest.mark.parametrize("learnable", [False, True])
def test_convert_puts_trained_weights_on_the_grid(family, learnable, calib_ids):
    model = MAKERS[family]()
    plan = mixed_plan(model, calib_ids)
    qat.prepare(model, plan, learnable_scales=learnable)
    train(model, calib_ids, steps=5, lr=1e-2)
    trained_fq = logits(model, calib_ids)
    float_weights = {n: w.weight_matrix().detach().clone() for n, w in qat.fake_quant_modules(model).items()}

    stored = qat.convert(model)

    assert set(stored) == {a.module for a in plan.assignments}
    assert not qat.fake_quant_modules(model)
    for name, q in stored.items():
        module = model.get_submodule(name)
        assert type(module) in (nn.Linear, Conv1D)
        weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
        assert torch.equal(weight.detach(), q.values)
        if q.option.fmt == "int":
            lo, hi = int_range(q.option)
            assert q.codes.min() >= lo and q.codes.max() <= hi
            groups = q.scale.shape[1]
            rebuilt = (q.codes.float().reshape(len(q.codes), groups, -1) - q.zero[..., None]) * q.scale[..., None]
            assert torch.equal(rebuilt.reshape(q.values.shape), q.values)
            assert torch.equal(q.scale, q.scale.half().float())  # fp16-storable scales
    # the converted model runs exactly what was trained: fp16 modules were trained fp16-rounded too
    converted = logits(model, calib_ids)
    assert torch.equal(converted, trained_fq)
    if not learnable:
        # RTN scales: the converted model is `apply` of the trained float weights
        again = copy.deepcopy(model)
        for name, w in float_weights.items():
            bitalloc.models.set_weight_matrix(again.get_submodule(name), w)
        bitalloc.apply(again, plan, check_hash=False)
        assert torch.equal(logits(again, calib_ids), converted)
    if learnable:
        # learned scales moved away from RTN's for at least some groups
        rtn = {n: bitalloc.quantizers.quantize_weight(w, plan.options_by_module()[n]) for n, w in float_weights.items()}
        assert any(not torch.equal(stored[n].scale, rtn[n].scale) for n in rtn if rtn[n].scale is not None)


def test_re_prepare_keeps_unchanged_wrappers(calib_ids):
    model = make_llama()
    p3 = bitalloc.plan(model, "3bits", calib_ids, cache_dir=False)
    p5 = bitalloc.plan(model, "5bits", calib_ids, cache_dir=False)
    qat.prepare(model, p3, learnable_scales=True)
    first = qat.fake_quant_modules(model)
    weights = {n: w.weight for n, w in first.items()}
    qat.prepare(model, p5, learnable_scales=True)
    second = qat.fake_quant_modules(model)
    o3, o5 = p3.options_by_module(), p5.options_by_module()
    assert any(o3[n] != o5[n] for n in o3)
    for name, w in second.items():
        assert w.option == o5[name]
        assert (w is first.get(name)) == (o3[name] == o5[name])
        assert w.weight is weights[name]  # the trainable parameter survives a re-plan
    assert qat.current_plan(model) is p5


def test_trainer_replan_callback_replans_and_logs(tmp_path, calib_ids):
    from transformers import Trainer, TrainingArguments

    model = make_llama()
    names = select_modules(model)
    # start uniform (every module int3-g64-asym); the free re-plan at the same budget mixes options
    uniform = bitalloc.plan(model, "3.5bits", calib_ids, cache_dir=False,
                            constraints=bitalloc.Constraints(pins=((".*", "int3-g64-asym"),)))
    assert {a.label for a in uniform.assignments} == {"int3-g64-asym"}
    qat.prepare(model, uniform, learnable_scales=True)

    g = torch.Generator().manual_seed(7)
    train_ids = torch.randint(0, VOCAB, (8, 32), generator=g)
    data = [{"input_ids": x, "labels": x} for x in train_ids]
    cb = qat.ReplanCallback(calib_ids[:2], "3.5bits", at_steps=[2])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0, data_seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    trainer.train()

    assert [step for step, _ in cb.replans] == [2]
    new = cb.replans[0][1]
    assert qat.current_plan(model) is new.plan
    assert new.plan.summary.storage_bits_per_weight <= 3.5
    changed = [n for n in names if new.plan.options_by_module()[n].label != "int3-g64-asym"]
    assert changed and new.changed == changed
    # the model now runs the new plan
    for n, w in qat.fake_quant_modules(model).items():
        assert w.option == new.plan.options_by_module()[n]
    entries = [e for e in trainer.state.log_history if "replan/changed_modules" in e]
    assert len(entries) == 1
    e = entries[0]
    assert e["step"] == 2
    assert e["replan/changed_modules"] == len(changed)
    assert e["replan/storage_bits_per_weight"] == new.plan.summary.storage_bits_per_weight
    assert e["replan/predicted_delta_loss"] == new.plan.summary.predicted_delta_loss
    # training went on after the re-plan, and the rebuilt wrappers' scales are being trained
    assert trainer.state.global_step == 4
    assert [x["step"] for x in trainer.state.log_history if "loss" in x] == [1, 2, 3, 4]
    optimized = {id(p) for grp in trainer.optimizer.param_groups for p in grp["params"]}
    rebuilt = [w for n, w in qat.fake_quant_modules(model).items() if n in changed and w.learnable_scale]
    assert rebuilt and all(id(w.scale) in optimized for w in rebuilt)
    # the model still trains and converts after the re-plan
    assert set(qat.convert(model)) == set(names)


def test_gguf_loaded_model_becomes_trainable(tmp_path, calib_ids):
    """transformers keeps the GGUF quantizer on a model it dequantized at load; Trainer refuses it until prepare."""
    from transformers import Trainer, TrainingArguments
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    model = make_llama()
    plan = bitalloc.plan(model, "4bits", calib_ids, cache_dir=False)
    quantizer = GgufHfQuantizer(GgufConfig(gguf_file="model.gguf"))
    model.hf_quantizer, model.is_quantized, model.config.quantization_config = quantizer, True, quantizer.quantization_config
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=model, args=args, train_dataset=[{"input_ids": calib_ids[0], "labels": calib_ids[0]}])
    qat.prepare(model, plan)
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    Trainer(model=model, args=args, train_dataset=[{"input_ids": calib_ids[0], "labels": calib_ids[0]}])


def test_bad_inputs(calib_ids):
    llama, gpt2 = make_llama(), make_gpt2()
    plan = bitalloc.plan(llama, "4bits", calib_ids, cache_dir=False)
    with pytest.raises(BadInputError, match="bitalloc.Plan"):
        qat.prepare(llama, "plan.json")
    with pytest.raises(PlanMismatchError, match="does not have"):
        qat.prepare(gpt2, plan)
    with pytest.raises(BadInputError, match="prepare"):
        qat.convert(make_llama())
    with pytest.raises(BadInputError, match="prepare"):
        qat.replan(make_llama(), calib_ids, "4bits")
    tied = bitalloc.plan(llama, "4bits", calib_ids, cache_dir=False, include_lm_head=True,
                         constraints=bitalloc.Constraints(pins=(("lm_head", "int8-ch-sym"),)))
    with pytest.raises(BadInputError, match="lm_head.*tied"):
        qat.prepare(make_llama(), tied)
    int8 = make_llama()
    int8.model.layers[0].mlp.down_proj.weight = nn.Parameter(torch.zeros(64, 128, dtype=torch.int8), requires_grad=False)
    with pytest.raises(BadInputError, match="down_proj holds torch.int8 weights"):
        qat.prepare(int8, plan)
    with pytest.raises(BadInputError, match="at_steps"):
        qat.ReplanCallback(calib_ids, "4bits", at_steps=[])
    with pytest.raises(BadInputError, match="at_steps"):
        qat.ReplanCallback(calib_ids, "4bits", at_steps=[0, 3])
    with pytest.raises(BadInputError, match="windows, seq_len"):
        qat.ReplanCallback(calib_ids.float(), "4bits", at_steps=[1])
    # a failed re-prepare leaves the prepared model as it was
    qat.prepare(llama, plan)
    before = qat.fake_quant_modules(llama)
    other = bitalloc.plan(make_gpt2(), "4bits", calib_ids, cache_dir=False)
    with pytest.raises(PlanMismatchError):
        qat.prepare(llama, other)
    assert qat.fake_quant_modules(llama) == before
    assert qat.current_plan(llama) is plan
