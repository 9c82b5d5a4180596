"""The whole pipeline on tiny models of several families: plan -> apply -> evaluate."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import bitalloc
from bitalloc.table import ERROR_MODELS
from bitalloc.api import resolve_calibration
from bitalloc.calibration import make_calibration
from bitalloc.equalize import equalize
from bitalloc.errors import BadInputError, BudgetInfeasibleError, PlanMismatchError
from bitalloc.formats import quantize_dequantize
from bitalloc.models import LoadedModel, select_modules, weight_matrix
from bitalloc.options import QuantOption, default_options
from bitalloc.plan import Plan
from bitalloc.profile.statistics import input_importance
from bitalloc.quantizers import quantize_weight

from conftest import CALIB_TEXT, FAMILIES, make_gpt2, make_llama, make_qwen2

# Where each family keeps its repeated blocks, and how many linear layers one block has.
BLOCKS = {"llama": ("model.layers", 7), "qwen2": ("model.layers", 7), "opt": ("model.decoder.layers", 6),
          "gpt2": ("transformer.h", 4), "gemma3": ("model.layers", 7)}
EMBED = {"llama": "model.embed_tokens", "qwen2": "model.embed_tokens", "opt": "model.decoder.embed_tokens",
         "gpt2": "transformer.wte", "gemma3": "model.embed_tokens"}


def expected_modules(family: str, model: nn.Module) -> list[str]:
    prefix, per_block = BLOCKS[family]
    names = [n for n, m in model.named_modules()
             if n.startswith(prefix + ".") and isinstance(m, (nn.Linear, Conv1D))]
    assert len(names) == 2 * per_block  # two blocks in every tiny model
    return names


def exact_optimum(table, error_model: str, max_bits: float) -> float:
    """Exact multiple-choice knapsack by dynamic programming over storage (bits share a large gcd)."""
    bits, err = table.storage_bits, table.errors[error_model]
    ok = np.isfinite(bits)
    g = 0
    for v in bits[ok].astype(np.int64):
        g = math.gcd(g, int(v))
    cap = int(max_bits // g)
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    for r in range(bits.shape[0]):
        new = np.full(cap + 1, np.inf)
        for k in np.flatnonzero(ok[r]):
            w = int(bits[r, k]) // g
            if w <= cap:
                new[w:] = np.minimum(new[w:], best[: cap + 1 - w] + err[r, k])
        best = new
    return float(best.min())


# ---- planning ---------------------------------------------------------------------------------


def test_plan_fits_budget_and_summary_is_exact(family_model, calib_ids):
    family, model = family_model
    plan = bitalloc.plan(model, "4bits", calib_ids, cache_dir=False)
    s = plan.summary
    total = sum(a.storage_bits for a in plan.assignments)
    assert s.planned_weights == sum(a.shape[0] * a.shape[1] for a in plan.assignments)
    assert total <= 4 * s.planned_weights
    assert s.storage_bits_per_weight <= 4.0
    assert s.storage_bits_per_weight == round(total / s.planned_weights, 6)
    assert s.nominal_bits_per_weight == round(
        sum(a.option.bits * a.shape[0] * a.shape[1] for a in plan.assignments) / s.planned_weights, 6)
    assert s.nominal_bits_per_weight < s.storage_bits_per_weight  # scales cost something
    # the budget is used: a 4-bit budget never ends up below 3.5 bits/weight
    assert s.storage_bits_per_weight > 3.5
    assert s.predicted_delta_loss == pytest.approx(sum(a.predicted_delta_loss for a in plan.assignments), rel=1e-5)
    assert plan.model.architecture == type(model).__name__
    assert plan.model.content_hash == bitalloc.models.weights_hash(model)
    assert plan.calibration["windows"] == 4 and plan.calibration["seq_len"] == 32


def test_plan_is_deterministic(family_model, calib_ids):
    family, model = family_model
    a = bitalloc.plan(model, "4bits", calib_ids, cache_dir=False).to_json()
    b = bitalloc.plan(model, "4bits", calib_ids, cache_dir=False).to_json()
    c = bitalloc.plan(FAMILIES[family](), "4bits", calib_ids.clone(), cache_dir=False).to_json()
    assert a == b == c


def test_planned_modules_are_decoder_linears(family_model, calib_ids):
    family, model = family_model
    plan = bitalloc.plan(model, "5bits", calib_ids, cache_dir=False)
    names = [a.module for a in plan.assignments]
    assert names == expected_modules(family, model)
    assert "lm_head" not in names and EMBED[family] not in names
    for a in plan.assignments:
        assert tuple(a.shape) == tuple(weight_matrix(model.get_submodule(a.module)).shape)
        assert a.tied_to == []


def test_gpt2_conv1d_shapes_are_out_in(calib_ids):
    model = make_gpt2()
    plan = bitalloc.plan(model, "4bits", calib_ids, cache_dir=False)
    shapes = {a.module: tuple(a.shape) for a in plan.assignments}
    # Conv1D stores [in, out]; the plan must speak [out, in]
    assert shapes["transformer.h.0.attn.c_attn"] == (192, 64)
    assert shapes["transformer.h.0.mlp.c_fc"] == (256, 64)
    assert shapes["transformer.h.0.mlp.c_proj"] == (64, 256)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 192)


def test_include_lm_head_tied_llama(calib_ids):
    model = make_llama()
    plan = bitalloc.plan(model, "5bits", calib_ids, cache_dir=False, include_lm_head=True)
    by_name = {a.module: a for a in plan.assignments}
    assert list(by_name) == expected_modules("llama", model) + ["lm_head"]
    assert by_name["lm_head"].tied_to == ["model.embed_tokens"]
    assert tuple(by_name["lm_head"].shape) == (256, 64)
    # tied: asking for the embedding as well does not plan the shared tensor twice
    both = bitalloc.plan(model, "5bits", calib_ids, cache_dir=False, include_lm_head=True, include_embeddings=True)
    assert [a.module for a in both.assignments] == list(by_name)


def test_include_lm_head_untied_qwen2(calib_ids):
    model = make_qwen2()
    plan = bitalloc.plan(model, "5bits", calib_ids, cache_dir=False, include_lm_head=True)
    names = [a.module for a in plan.assignments]
    assert names == expected_modules("qwen2", model) + ["lm_head"]
    assert all(a.tied_to == [] for a in plan.assignments)
    head = plan.assignments[-1]
    assert tuple(head.shape) == (256, 64) and head.predicted_delta_loss > 0




def test_include_embeddings_untied_qwen2(calib_ids):
    model = make_qwen2()
    plan = bitalloc.plan(model, "5bits", calib_ids, cache_dir=False, include_lm_head=True, include_embeddings=True)
    names = [a.module for a in plan.assignments]
    assert names == ["model.embed_tokens"] + expected_modules("qwen2", model) + ["lm_head"]
    emb = plan.assignments[0]
    assert tuple(emb.shape) == (256, 64) and emb.predicted_delta_loss > 0


def test_include_embeddings_tied_llama(calib_ids):
    model = make_llama()
    plan = bitalloc.plan(model, "5bits", calib_ids, cache_dir=False, include_embeddings=True)
    by_name = {a.module: a for a in plan.assignments}
    assert list(by_name) == ["model.embed_tokens"] + expected_modules("llama", model)
    assert by_name["model.embed_tokens"].tied_to == ["lm_head"]


def test_text_calibration_seed_changes_settings(tokenizer, text_files):
    calib_path, _ = text_files
    model = make_llama()
    kw = dict(tokenizer=tokenizer, seq_len=16, calib_tokens=64, cache_dir=False)
    p0 = bitalloc.plan(model, "4bits", calib_path, seed=0, **kw)
    p1 = bitalloc.plan(model, "4bits", calib_path, seed=1, **kw)
    digest = "sha256:" + hashlib.sha256(CALIB_TEXT.encode("utf-8")).hexdigest()
    for p, seed in ((p0, 0), (p1, 1)):
        assert p.calibration == {
            "source": "calib.txt", "text_sha256": digest, "seq_len": 16, "windows": 4, "tokens": 64,
            "sampling": "random non-overlapping windows", "seed": seed,
        }
        assert p.seed == seed
    # another seed picks other windows, so the measured sensitivities differ
    w0 = make_calibration(tokenizer, CALIB_TEXT, seq_len=16, tokens=64, seed=0).tokens
    w1 = make_calibration(tokenizer, CALIB_TEXT, seq_len=16, tokens=64, seed=1).tokens
    assert w0.shape == w1.shape == (4, 16) and not torch.equal(w0, w1)
    assert [a.predicted_delta_loss for a in p0.assignments] != [a.predicted_delta_loss for a in p1.assignments]
    # the same seed again: identical plan
    assert bitalloc.plan(model, "4bits", calib_path, seed=0, **kw).to_json() == p0.to_json()


def test_text_calibration_needs_tokenizer(text_files):
    with pytest.raises(BadInputError, match="tokenizer"):
        bitalloc.plan(make_llama(), "4bits", text_files[0], cache_dir=False, seq_len=16, calib_tokens=64)


def test_unreadable_calibration_is_bad_input():
    # None is the built-in set (issue 16); something that is no text, ids or Calibration is refused
    with pytest.raises(BadInputError, match="calibration must be a text file path"):
        bitalloc.plan(make_llama(), "4bits", 42, cache_dir=False)


@pytest.mark.parametrize("kwargs, match", [(dict(solver="nosuch"), "unknown solver"),
                                           (dict(error_model="vibes"), "unknown error model")])
def test_bad_solver_or_error_model(calib_ids, kwargs, match):
    with pytest.raises(BadInputError, match=match):
        bitalloc.plan(make_llama(), "4bits", calib_ids, cache_dir=False, **kwargs)


def test_higher_budget_never_predicts_more_loss(family_model, calib_ids, tmp_path):
    family, model = family_model
    losses, bpw = [], []
    for b in (3, 4, 5, 6):
        plan = bitalloc.plan(model, f"{b}bits", calib_ids, cache_dir=tmp_path)
        losses.append(plan.summary.predicted_delta_loss)
        bpw.append(plan.summary.storage_bits_per_weight)
        assert plan.summary.storage_bits_per_weight <= b
    assert all(a >= b for a, b in zip(losses, losses[1:])), losses
    assert losses[0] > 10 * losses[-1]  # 3 -> 6 bits is a big difference, not noise
    assert all(a < b for a, b in zip(bpw, bpw[1:])), bpw


def test_plan_is_optimal_for_its_table(family_model, calib_ids):
    family, model = family_model
    loaded = LoadedModel(model)
    calib = resolve_calibration(calib_ids, loaded, 0, 0, 0)
    table = bitalloc.profile(loaded, calib, select_modules(model), default_options())
    gaps = {}
    for b in (4, 6):
        for error_model in ERROR_MODELS:
            # untied: exact_optimum enumerates every module on its own
            plan = bitalloc.plan_from_table(table, f"{b}bits", loaded, calib, constraints=bitalloc.Constraints(ties=()),
                                            error_model=error_model)
            assert plan.error_model == error_model
            best = exact_optimum(table, error_model, b * table.num_weights)
            rows = [table.groups.index(a.module) for a in plan.assignments]
            ks = [table.option_index(a.option) for a in plan.assignments]
            got = float(table.errors[error_model][rows, ks].sum())
            assert plan.summary.predicted_delta_loss == pytest.approx(got, rel=1e-5)
            if got > best * (1 + 1e-6):
                gaps[b, error_model] = round(got / best - 1, 4)
    assert gaps == {}


def test_unconstrained_budget_picks_least_error_option_everywhere(calib_ids):
    model = make_llama()
    loaded = LoadedModel(model)
    calib = resolve_calibration(calib_ids, loaded, 0, 0, 0)
    table = bitalloc.profile(loaded, calib, select_modules(model), default_options())
    plan = bitalloc.plan_from_table(table, "16bits", loaded, calib)
    best = float(np.nansum(np.nanmin(table.errors[plan.error_model], axis=1)))
    assert plan.solver.objective == pytest.approx(best, rel=1e-5)


def test_infeasible_budget_names_feasible_range(calib_ids):
    model = make_llama()
    with pytest.raises(BudgetInfeasibleError) as info:
        bitalloc.plan(model, "1bits", calib_ids, cache_dir=False)
    msg = str(info.value)
    # compute the feasible range ourselves from the option grid and the planned shapes
    shapes = [tuple(weight_matrix(model.get_submodule(n)).shape) for n in expected_modules("llama", model)]
    n = sum(o * i for o, i in shapes)
    opts = default_options()
    lo = sum(min(o.storage_bits(out, inn) for o in opts if o.fits(inn)) for out, inn in shapes)
    hi = sum(max(o.storage_bits(out, inn) for o in opts if o.fits(inn)) for out, inn in shapes)
    assert hi == 16 * n
    assert f"{lo / n:.4g}bits" in msg and f"{hi / n:.4g}bits" in msg, msg
    assert "1bits" in msg
    assert isinstance(info.value, BadInputError)
    # just above the smallest feasible budget works, just below fails
    ok = bitalloc.plan(model, f"{lo / n * (1 + 1e-9)}bits", calib_ids, cache_dir=False)
    assert sum(a.storage_bits for a in ok.assignments) == lo
    with pytest.raises(BudgetInfeasibleError):
        bitalloc.plan(model, f"{(lo - 1) / n}bits", calib_ids, cache_dir=False)


def test_budget_above_fp16_keeps_everything_cheap_enough(calib_ids):
    # 100% of fp16 size: feasible, and never more than fp16 storage
    plan = bitalloc.plan(make_llama(), "100%", calib_ids, cache_dir=False)
    assert plan.summary.storage_bytes <= plan.summary.fp16_bytes
    assert plan.budget.kind == "percent" and plan.budget.max_storage_bits == 16 * plan.summary.planned_weights


def test_byte_budget(calib_ids):
    plan = bitalloc.plan(make_llama(), "0.04MB", calib_ids, cache_dir=False)
    assert plan.summary.storage_bytes <= 40_000
    assert plan.budget.max_storage_bits == 320_000


# ---- apply ------------------------------------------------------------------------------------


def test_apply_quantizes_exactly_the_planned_weights(family_model, calib_ids):
    family, model = family_model
    # awq: equalization folded in, then scales searched under diag H (the default on the built-in set)
    plan = bitalloc.plan(model, "3bits", calib_ids, cache_dir=False, quantizer="awq")
    original = copy.deepcopy(model)
    folded = copy.deepcopy(model)
    equalize(folded, calib_ids)  # what apply quantizes: scales folded into norms and rows (GPT-2, OPT: none)
    out = bitalloc.apply(model, plan)  # with the windows the plan was made on
    assert out is model
    planned = {a.module: a.option for a in plan.assignments}
    importance = input_importance(folded, list(planned), calib_ids)
    for name, opt in planned.items():
        before = weight_matrix(folded.get_submodule(name)).detach()
        after = weight_matrix(model.get_submodule(name)).detach()
        expected = quantize_weight(before, opt, "rtn-w", hessian=importance[name]).values
        assert torch.equal(after, expected.to(after.dtype)), name
        assert not torch.equal(after, before), name  # 3 bits on average: nothing stays exact
        if opt.fmt == "int":
            # at most 2^bits levels per group
            gs = opt.group_size or after.shape[1]
            levels = max(len(torch.unique(r)) for r in after.reshape(-1, gs))
            assert levels <= 2**opt.bits
    planned_params = {f"{n}.weight" for n in planned}
    orig_state = original.state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, orig_state[k])}
    folded_only = {k for k, v in folded.state_dict().items() if not torch.equal(v, orig_state[k])} - planned_params
    assert changed == planned_params | folded_only
    # the unplanned tensors equalization divides: norms, and the biases of the rows it divides (Qwen2's v_proj)
    assert all("norm" in k or k.endswith(".bias") for k in folded_only)
    assert bool(folded_only) == (family in ("llama", "qwen2", "gemma3")), sorted(folded_only)[:4]


def test_apply_with_lm_head_changes_tied_embedding(calib_ids):
    model = make_llama()
    plan = bitalloc.plan(model, "4bits", calib_ids, cache_dir=False, include_lm_head=True, quantizer="rtn")
    emb_before = model.model.embed_tokens.weight.detach().clone()
    head_opt = plan.options_by_module()["lm_head"]
    bitalloc.apply(model, plan)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, quantize_dequantize(emb_before, head_opt))


def test_apply_refuses_plan_for_other_weights(calib_ids):
    plan = bitalloc.plan(make_llama(seed=0), "3bits", calib_ids, cache_dir=False, quantizer="rtn")
    other = make_llama(seed=1)
    before = copy.deepcopy(other)
    with pytest.raises(PlanMismatchError, match="re-plan") as info:
        bitalloc.apply(other, plan)
    assert plan.model.content_hash[:19] in str(info.value)
    # refused means untouched
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), before.state_dict().values()))
    bitalloc.apply(other, plan, check_hash=False)
    name = plan.assignments[0].module
    expect = quantize_dequantize(weight_matrix(before.get_submodule(name)).detach(), plan.assignments[0].option)
    assert torch.equal(weight_matrix(other.get_submodule(name)), expect)


def test_apply_refuses_plan_for_other_architecture(calib_ids):
    plan = bitalloc.plan(make_gpt2(), "4bits", calib_ids, cache_dir=False)
    with pytest.raises(PlanMismatchError, match="does not have"):
        bitalloc.apply(make_llama(), plan, check_hash=False)


def test_apply_refuses_wrong_shape(calib_ids):
    from transformers import LlamaConfig, LlamaForCausalLM

    plan = bitalloc.plan(make_llama(), "4bits", calib_ids, cache_dir=False)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(PlanMismatchError, match="shape"):
        bitalloc.apply(wider, plan, check_hash=False)


# ---- evaluate ---------------------------------------------------------------------------------


@pytest.fixture
def eval_windows():
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, 256, (3 * 24 + 5,), generator=g)
    return bitalloc.evaluation_windows(ids, seq_len=24, windows=None)


def test_evaluation_windows_are_sequential(eval_windows):
    assert eval_windows.shape == (3, 24)
    g = torch.Generator().manual_seed(99)
    ids = torch.randint(0, 256, (3 * 24 + 5,), generator=g)
    assert torch.equal(eval_windows.reshape(-1), ids[:72])
    assert bitalloc.evaluation_windows(ids, seq_len=24, windows=2).shape == (2, 24)
    with pytest.raises(BadInputError, match="fewer than one window"):
        bitalloc.evaluation_windows(ids[:10], seq_len=24)


def test_evaluate_against_itself(eval_windows):
    model = make_llama()
    r = bitalloc.evaluate(model, eval_windows, reference=model)
    assert r.kl == 0.0 and r.top1 == 1.0
    assert r.windows == 3 and r.seq_len == 24 and r.scored_tokens == 3 * 23
    # ppl and nll against a direct computation
    with torch.no_grad():
        logits = model(input_ids=eval_windows).logits
    nll = float(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), eval_windows[:, 1:].reshape(-1)))
    assert r.nll == pytest.approx(nll, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(nll), rel=1e-5)
    assert 100 < r.ppl < 1000  # an untrained model over 256 tokens is near-uniform
    plain = bitalloc.evaluate(model, eval_windows)
    assert plain.kl is None and plain.top1 is None and plain.nll == r.nll
    # precomputed log-probs stand in for the model without running it again
    cached = bitalloc.evaluate(bitalloc.reference_logprobs(model, eval_windows), eval_windows)
    assert cached.nll == plain.nll and cached.scored_tokens == plain.scored_tokens


def test_evaluate_after_2bit_plan(eval_windows, calib_ids):
    reference = make_llama()
    two_bit = [QuantOption.int_(2, g, s) for g in (32, 64, None) for s in (False, True)]
    plan = bitalloc.plan(reference, "16bits", calib_ids, cache_dir=False, options=two_bit)
    assert {a.option.bits for a in plan.assignments} == {2}
    quantized = bitalloc.apply(copy.deepcopy(reference), plan)
    r = bitalloc.evaluate(quantized, eval_windows, reference=reference)
    assert r.kl > 1e-4
    assert 0.0 <= r.top1 <= 1.0
    assert r.nll != bitalloc.evaluate(reference, eval_windows).nll  # the quantized model scores differently
    # against precomputed reference log-probs: the same numbers
    ref_lp = bitalloc.reference_logprobs(reference, eval_windows)
    r2 = bitalloc.evaluate(quantized, eval_windows, reference=ref_lp)
    assert r2 == r
    # KL computed directly
    with torch.no_grad():
        p = torch.log_softmax(reference(input_ids=eval_windows).logits[:, :-1].float(), -1)
        q = torch.log_softmax(quantized(input_ids=eval_windows).logits[:, :-1].float(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert r.kl == pytest.approx(kl, rel=1e-4)
    # a higher-bit plan of the same model is closer to the reference
    eight = bitalloc.apply(copy.deepcopy(reference), bitalloc.plan(
        reference, "16bits", calib_ids, cache_dir=False, options=[QuantOption.int_(8, 32, False)]))
    assert bitalloc.evaluate(eight, eval_windows, reference=reference).kl < r.kl / 10


def test_lagrangian_solver_through_the_api_records_its_bound(calib_ids):
    model = make_llama()
    ilp = bitalloc.plan(model, "4bits", calib_ids, cache_dir=False)
    lag = bitalloc.plan(model, "4bits", calib_ids, cache_dir=False, solver="lagrangian")
    assert lag.solver.name == "lagrangian" and lag.summary.storage_bits_per_weight <= 4.0
    assert lag.solver.bound <= ilp.solver.objective * (1 + 1e-5) <= lag.solver.objective * (1 + 1e-5)
    assert ilp.solver.bound == ilp.solver.objective  # proven optimal


# ---- mixed number formats -------------------------------------------------------------------------


def test_mixed_format_plan_applies_each_format(calib_ids):
    """INT, FP8, MXFP4, NVFP4 and keep offered together: the plan mixes them within the budget and
    apply() writes exactly each option's quantize-dequantize values, whichever format a module has."""
    from bitalloc.options import parse_option
    from bitalloc.plan import summarize

    labels = ["int4-g32-asym", "int8-ch-sym", "fp8e4m3-ch", "fp8e4m3-tensor", "mxfp4", "mxfp6e2m3", "nvfp4", "fp16"]
    options = [parse_option(x) for x in labels]
    model = make_llama()
    plan = bitalloc.plan(model, "6bits", calib_ids, options=options, cache_dir=False, quantizer="rtn",
                         constraints=bitalloc.Constraints(ties=()))  # untied: each module picks its own format
    assert sorted(plan.options) == sorted(labels)
    assert len({a.label for a in plan.assignments}) >= 2  # 6 bits lies between the options: the solver mixes
    assert any(a.option.fmt == "fp" for a in plan.assignments)  # and takes FP/MX/NVFP4 where they pay
    assert sum(a.storage_bits for a in plan.assignments) <= 6 * plan.summary.planned_weights
    # every format through the plan -> apply path: give module i option i mod 8
    assignments = [
        a.model_copy(update=dict(option=options[i % len(options)], label=labels[i % len(labels)],
                                 storage_bits=options[i % len(options)].storage_bits(*a.shape)))
        for i, a in enumerate(plan.assignments)
    ]
    cycled = Plan.from_json(plan.model_copy(update=dict(assignments=assignments, summary=summarize(assignments))).to_json())
    original = copy.deepcopy(model)
    bitalloc.apply(model, cycled)
    for a in cycled.assignments:
        before = weight_matrix(original.get_submodule(a.module)).detach()
        after = weight_matrix(model.get_submodule(a.module)).detach()
        assert torch.equal(after, quantize_dequantize(before, a.option)), a.label
        assert not torch.equal(after, before) or a.label == "fp16", a.label
        if a.label == "mxfp4":  # at most 8 magnitudes (E2M1) times one power of two per block of 32
            assert max(len(torch.unique(b.abs())) for b in after.reshape(-1, 32)) <= 8
        if a.label == "nvfp4":
            assert max(len(torch.unique(b.abs())) for b in after.reshape(-1, 16)) <= 8
    assert {a.label for a in cycled.assignments} == set(labels)
    # a budget only the 4-bit block formats meet (INT4 g32 asym is 4.625): all MXFP4/NVFP4 and a little more
    low = bitalloc.plan(make_llama(), "4.4bits", calib_ids, options=options, cache_dir=False,
                        constraints=bitalloc.Constraints(ties=()))
    assert low.summary.storage_bits_per_weight <= 4.4
    assert sum(a.label in ("mxfp4", "nvfp4") for a in low.assignments) >= len(low.assignments) // 2
    # the predicted loss falls as the budget grows, across formats
    assert low.summary.predicted_delta_loss > plan.summary.predicted_delta_loss
