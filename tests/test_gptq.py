"""GPTQ: the single-layer quantizer, sequential whole-model GPTQ, and quantizer-aware planning."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.api import plan
from bitalloc.apply import apply
from bitalloc.errors import BadInputError
from bitalloc.formats.int import int_dequantize, int_range
from bitalloc.models import decoder_blocks, select_modules, weight_matrix
from bitalloc.options import QuantOption
from bitalloc.plan import Plan
from bitalloc.quantizers import quantize_weight, quantize_weight_options
from bitalloc.quantizers.gptq import hessian_factor
from bitalloc.profile.statistics import collect_statistics
from bitalloc.quantizers.scale_search import search_int_scales
from bitalloc.quantizers.materialize import quantize_model
from bitalloc.blockwalk import module_inputs, record_calls
from bitalloc.quantizers.sequential import _stages

from conftest import FAMILIES, VOCAB
from test_cli import cli_env  # noqa: F401  (fixture)


def correlated_layer(out_f=32, in_f=128, n=1024, seed=0):
    """A weight and the Hessian of strongly correlated inputs (where GPTQ's error feedback pays off)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5
    X = torch.randn(n, in_f, generator=g) @ mix + 0.2 * torch.randn(n, in_f, generator=g)  # [n, in]
    return torch.randn(out_f, in_f, generator=g), X.T @ X / n


def layer_error(values, W, H) -> float:
    dW = values - W
    return float(torch.trace(dW @ H @ dW.T))  # tr(ΔW H ΔWᵀ)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [32, None])
def test_gptq_beats_rtn_on_layer_error(bits, group):
    W, H = correlated_layer()
    opt = QuantOption.int_(bits, group, False)
    rtn = layer_error(quantize_weight(W, opt, "rtn").values, W, H)
    gptq = layer_error(quantize_weight(W, opt, "gptq", hessian=H).values, W, H)
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("opt", [QuantOption.int_(3, 32, False), QuantOption.int_(4, 64, True), QuantOption.int_(2, None, False)])
def test_codes_scales_reproduce_values_exactly(opt, act_order):
    W, H = correlated_layer()
    q = quantize_weight(W, opt, "gptq", hessian=H, act_order=act_order)
    lo, hi = int_range(opt)
    n_groups = 1 if opt.group_size is None else W.shape[1] // opt.group_size
    assert q.codes.dtype == torch.int32 and q.codes.shape == W.shape
    assert q.scale.shape == q.zero.shape == (W.shape[0], n_groups)
    assert int(q.codes.min()) >= lo and int(q.codes.max()) <= hi
    assert torch.equal(int_dequantize(q.codes, q.scale, q.zero), q.values)
    assert torch.equal(q.scale.to(torch.float16).float(), q.scale)  # fp16-representable, as packers store them
    assert torch.equal(q.zero, q.zero.round())
    if opt.symmetric:
        assert not q.zero.any()


@pytest.mark.parametrize("opt", [QuantOption.int_(3, 32, False), QuantOption.int_(4, None, True)])
def test_identity_hessian_is_rtn(opt):
    # H = I: the inverse Hessian is diagonal, so no error is fed forward and every group's weights
    # are the original ones when its scale is taken: min/max GPTQ rounds exactly like RTN, and GPTQ
    # with the weighted scale search (equal column weights) exactly like rtn-w with H = I.
    W, _ = correlated_layer()
    eye = torch.eye(W.shape[1])
    for gptq_name, rtn_name in (("gptq-minmax", "rtn"), ("gptq", "rtn-w")):
        r = quantize_weight(W, opt, rtn_name, hessian=eye)
        g = quantize_weight(W, opt, gptq_name, hessian=eye)
        assert torch.equal(g.codes, r.codes) and torch.equal(g.scale, r.scale) and torch.equal(g.zero, r.zero)
    assert not torch.equal(quantize_weight(W, opt, "gptq", hessian=eye).scale, quantize_weight(W, opt, "rtn").scale)


def test_act_order_keeps_natural_group_layout_and_helps():
    W, H = correlated_layer(seed=3)
    # Inputs of very different scale: act-order quantizes the large ones first.
    s = torch.logspace(-1, 1, W.shape[1])[torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(0))]
    H = H * s[:, None] * s[None, :]
    opt = QuantOption.int_(3, 32, False)
    plain = quantize_weight(W, opt, "gptq", hessian=H, act_order=False)
    ordered = quantize_weight(W, opt, "gptq", hessian=H, act_order=True)
    # gptq visits columns in act-order by default; gptq-minmax, the reference GPTQ, in natural order
    assert torch.equal(quantize_weight(W, opt, "gptq", hessian=H).codes, ordered.codes)
    assert torch.equal(quantize_weight(W, opt, "gptq-minmax", hessian=H).codes,
                       quantize_weight(W, opt, "gptq-minmax", hessian=H, act_order=False).codes)
    assert not torch.equal(quantize_weight(W, opt, "gptq-minmax", hessian=H).codes,
                           quantize_weight(W, opt, "gptq-minmax", hessian=H, act_order=True).codes)
    # static groups: the scales are chosen from the original weight, in natural group order — by
    # min/max (RTN's) for gptq-minmax, by the search under GPTQ's column weights 1/U_jj² for gptq
    minmax = quantize_weight(W, opt, "gptq-minmax", hessian=H, act_order=True)
    assert torch.equal(minmax.scale, quantize_weight(W, opt, "rtn").scale)
    fac = hessian_factor(H, act_order=True)
    h = torch.empty(W.shape[1]).index_copy_(0, fac.perm, 1.0 / torch.diagonal(fac.hinv) ** 2)
    _, s_searched, _ = search_int_scales(W.reshape(W.shape[0], -1, 32), h.view(1, -1, 32), opt)
    assert torch.equal(ordered.scale, s_searched.squeeze(-1))
    assert not torch.equal(ordered.codes, plain.codes)
    rtn = layer_error(quantize_weight(W, opt, "rtn").values, W, H)
    assert layer_error(ordered.values, W, H) < 0.8 * rtn


def test_dead_inputs_get_zero_weight():
    W, H = correlated_layer()
    H[5, :] = 0
    H[:, 5] = 0
    q = quantize_weight(W, QuantOption.int_(4, 32, False), "gptq", hessian=H)
    assert torch.all(q.values[:, 5] == 0)  # an input that is always 0 needs no weight (reference behaviour)
    assert torch.isfinite(q.values).all()


def test_batched_options_equal_one_by_one():
    W, H = correlated_layer()
    opts = [QuantOption.int_(2, 32, False), QuantOption.int_(4, None, True), QuantOption.keep(),
            QuantOption.int_(8, 64, True)]
    batched = list(quantize_weight_options(W, opts, "gptq", hessian=H))
    for o, b in zip(opts, batched):
        single = quantize_weight(W, o, "gptq", hessian=H)
        assert b.option == o and torch.equal(b.values, single.values)
    assert torch.equal(batched[2].values, W.half().float())  # keep: stored as fp16


def test_gptq_needs_a_hessian():
    W, _ = correlated_layer()
    with pytest.raises(BadInputError, match="Hessian"):
        quantize_weight(W, QuantOption.int_(4, 64, False), "gptq")


def test_non_int_formats_fall_back_to_rtn():
    W, H = correlated_layer()
    opt = QuantOption.fp("e4m3", 32)
    assert torch.equal(quantize_weight(W, opt, "gptq", hessian=H).values, quantize_weight(W, opt, "rtn").values)


# ---- whole models ------------------------------------------------------------------------------


def applied(loaded, plan_, **kw) -> torch.Tensor:
    """The planned weights of a copy of loaded.model after bitalloc.apply(plan_, **kw), flattened into one tensor."""
    model = apply(copy.deepcopy(loaded.model), plan_, **kw)
    return torch.cat([weight_matrix(model.get_submodule(a.module)).flatten() for a in plan_.assignments])


def _ids(seed, shape):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_stages_follow_the_blocks_dataflow(llama, gpt2):
    calib = _ids(0, (1, 16))
    expect = {
        "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
        "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    }
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        block = model.model.layers[0] if name == "llama" else model.transformer.h[0]
        planned = {n: QuantOption.int_(4, 32, False) for s in expect[name] for n in s}
        calls, h0 = record_calls(model, decoder_blocks(model)[1], calib[:1])
        stages = _stages(block, planned, [(calls[0], h0)])
        assert [sorted(s) for s in stages] == [sorted(s) for s in expect[name]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sequential_gptq_lowers_output_error(family):
    ref = FAMILIES[family]()
    calib, test = _ids(1, (16, 32)), _ids(2, (4, 32))
    names = select_modules(ref)
    planned = names[1:]  # leave one module out: it must stay untouched
    options = {n: QuantOption.int_(3, 32, False) for n in planned}
    with torch.no_grad():
        want = ref(input_ids=test).logits
    errors = {}
    for q in ("rtn", "gptq"):
        model = copy.deepcopy(ref)
        result = quantize_model(model, options, q, calibration=calib)
        assert sorted(result) == sorted(planned)
        before, after = dict(ref.named_parameters()), dict(model.named_parameters())
        changed = {n.rsplit(".", 1)[0] for n in before if not torch.equal(before[n], after[n])}
        assert changed == set(planned)
        for n in planned:
            assert torch.equal(weight_matrix(model.get_submodule(n)), result[n].values)
        with torch.no_grad():
            errors[q] = float(((model(input_ids=test).logits - want) ** 2).mean())
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_sequential_gptq_quantizes_the_output_head(qwen2):
    calib = _ids(1, (4, 32))
    head = {"lm_head": QuantOption.int_(3, 32, False)}
    model = copy.deepcopy(qwen2)
    q = quantize_model(model, head, "gptq", calibration=calib)
    rtn = quantize_weight(qwen2.lm_head.weight, head["lm_head"], "rtn")
    assert torch.equal(model.lm_head.weight, q["lm_head"].values)
    assert not torch.equal(q["lm_head"].codes, rtn.codes)  # not silently RTN
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, qwen2.model.layers[0].mlp.down_proj.weight)


def test_quantize_model_gptq_without_calibration_is_a_clear_error(llama):
    with pytest.raises(BadInputError, match="calibration"):
        quantize_model(llama, {"model.layers.0.mlp.up_proj": QuantOption.int_(4, 32, False)}, "gptq")


# ---- planning ------------------------------------------------------------------------------------


def test_plan_records_quantizer_and_uses_its_errors(llama, calib_ids):
    options = [QuantOption.int_(b, 32, False) for b in (2, 3, 4)] + [QuantOption.keep()]
    plans = {q: plan(llama, "3.5bits", calib_ids, options=options, cache_dir=False, quantizer=q) for q in ("rtn", "gptq")}
    assert plans["gptq"].quantizer == "gptq" and plans["rtn"].quantizer == "rtn"
    assert '"quantizer":"gptq"' in plans["gptq"].to_json().replace(" ", "")
    assert "quantizer" not in plans["rtn"].to_json()  # RTN plans are written as before the field existed
    assert Plan.from_json(plans["gptq"].to_json()) == plans["gptq"]
    err = {q: {a.module: a.predicted_delta_loss for a in p.assignments} for q, p in plans.items()}
    table = {q: bitalloc.api.prepare(llama, calib_ids, options=options, cache_dir=False, quantizer=q)[0] for q in plans}
    low = table["rtn"].option_index(options[0])
    rtn_err, gptq_err = table["rtn"].errors["local"][:, low], table["gptq"].errors["local"][:, low]
    assert np.all(gptq_err < rtn_err)  # 2-bit: GPTQ's layer error is lower for every module
    assert plans["gptq"].summary.predicted_delta_loss < plans["rtn"].summary.predicted_delta_loss
    assert err["gptq"] != err["rtn"]


def test_old_plans_without_quantizer_load_as_rtn(llama, calib_ids):
    p = plan(llama, "5bits", calib_ids, options=[QuantOption.int_(4, 32, False), QuantOption.keep()], cache_dir=False,
             quantizer="rtn")
    text = p.to_json()
    assert "quantizer" not in text
    assert Plan.from_json(text).quantizer == "rtn"


def test_apply_uses_the_plans_quantizer(llama, calib_ids):
    options = [QuantOption.int_(b, 32, False) for b in (2, 3, 4)]
    p = plan(llama, "3bits", calib_ids, options=options, cache_dir=False, quantizer="gptq")
    with pytest.raises(BadInputError, match="calibration"):  # a saved plan does not carry its windows
        apply(copy.deepcopy(llama), Plan.from_json(p.to_json()))
    by_plan = apply(copy.deepcopy(llama), p, calibration=calib_ids)
    # the plan made in this process remembers the windows it was made on
    assert torch.equal(p.calibration_windows.tokens, calib_ids) and Plan.from_json(p.to_json()) == p
    remembered = apply(copy.deepcopy(llama), p)
    explicit = copy.deepcopy(llama)
    # bare ids count as supplied text: each token weighted by its loss gradient, as apply does by default there
    quantize_model(explicit, p.options_by_module(), "gptq", calibration=calib_ids, token_weighted=True)
    rtn = apply(copy.deepcopy(llama), p, quantizer="rtn")
    name = p.assignments[0].module
    assert torch.equal(weight_matrix(by_plan.get_submodule(name)), weight_matrix(explicit.get_submodule(name)))
    assert torch.equal(weight_matrix(remembered.get_submodule(name)), weight_matrix(explicit.get_submodule(name)))
    assert not torch.equal(weight_matrix(by_plan.get_submodule(name)), weight_matrix(rtn.get_submodule(name)))


def test_gptq_column_order_follows_the_calibration_text_in_the_table_and_at_apply(llama, calib_ids):
    """Act-order on text the user supplies, natural order on the built-in set (or self): measured, act-order lost
    there at every size on both families (config.quantizer_settings). The profile's table and apply agree."""
    from bitalloc.calibration import calibration_from_tokens
    from bitalloc.config import quantizer_settings

    assert quantizer_settings("gptq", True) == {"act_order": True}
    assert quantizer_settings("awq-gptq", False) == quantizer_settings("gptq-signed", False) == {"act_order": False}
    assert quantizer_settings("gptq-minmax", True) == quantizer_settings("rtn-w", True) == {}  # no column order to pick
    options = [QuantOption.int_(b, 32, False) for b in (2, 3, 4)]
    # the same windows under two provenances: only GPTQ's column order differs
    calibrations = {"supplied": calib_ids, "builtin": calibration_from_tokens(calib_ids, source="builtin:austen")}
    tables = {k: bitalloc.api.prepare(llama, c, options=options, cache_dir=False, quantizer="gptq")[0]
              for k, c in calibrations.items()}
    stats = collect_statistics(llama, tables["builtin"].groups, calibration_from_tokens(calib_ids))
    for i, name in enumerate(tables["builtin"].groups[:3]):
        w = weight_matrix(llama.get_submodule(name)).detach().float()
        for act_order, table in ((False, tables["builtin"]), (True, tables["supplied"])):
            H = stats[name].hessian
            layer = [float(torch.trace((q.values - w) @ H @ (q.values - w).T))
                     for q in quantize_weight_options(w, options, "gptq", hessian=H, act_order=act_order)]
            np.testing.assert_allclose(table.errors["local"][i], layer, rtol=1e-5)
    assert not np.array_equal(tables["builtin"].errors["local"], tables["supplied"].errors["local"])
    for k, calibration in calibrations.items():
        p = plan(llama, "3bits", calibration, options=options, cache_dir=False, quantizer="gptq")
        name = p.assignments[0].module
        applied = weight_matrix(apply(copy.deepcopy(llama), p).get_submodule(name))
        for act_order in (True, False):
            explicit = weight_matrix(apply(copy.deepcopy(llama), p, act_order=act_order).get_submodule(name))
            assert torch.equal(applied, explicit) == (act_order == (k == "supplied")), (k, act_order)


def test_gptq_damps_by_DAMP_and_the_reference_by_one_percent():
    """GPTQ's default damping is DAMP (5 % of mean diag H: measured, it lowered KL on both families); gptq-minmax,
    the reference GPTQ, keeps the reference's 1 %."""
    from bitalloc.quantizers.gptq import DAMP, REFERENCE_DAMP

    assert (DAMP, REFERENCE_DAMP) == (0.05, 0.01)
    W, H = correlated_layer(seed=3)
    opt = QuantOption.int_(3, 32, False)
    default = quantize_weight(W, opt, "gptq", hessian=H).values
    assert torch.equal(default, quantize_weight(W, opt, "gptq", hessian=H, damp=0.05).values)
    assert not torch.equal(default, quantize_weight(W, opt, "gptq", hessian=H, damp=0.01).values)
    reference = quantize_weight(W, opt, "gptq-minmax", hessian=H).values
    assert torch.equal(reference, quantize_weight(W, opt, "gptq", hessian=H, damp=0.01, act_order=False,
                                                  scale_search=False).values)
    assert not torch.equal(reference, quantize_weight(W, opt, "gptq", hessian=H, act_order=False, scale_search=False).values)


def test_widened_calibration_is_the_seeded_pick_of_more_of_the_same_text(tokenizer):
    from bitalloc.calibration import calibration_from_tokens, make_calibration, widened
    from conftest import CALIB_TEXT

    small = make_calibration(tokenizer, CALIB_TEXT, seq_len=16, tokens=64, seed=3)
    wide = make_calibration(tokenizer, CALIB_TEXT, seq_len=16, tokens=256, seed=3)
    grown = widened(small, 256)
    assert grown.n_windows == 16 and torch.equal(grown.tokens, wide.tokens)
    assert grown.held_out_index == wide.held_out_index and torch.equal(grown.held_out, wide.held_out)
    assert all(any(torch.equal(row, other) for other in wide.tokens) for row in small.tokens)  # the profile's are in it
    every = widened(small, 10**6)  # the text holds fewer: all of its windows
    assert every.n_windows == small.n_windows + small.held_out.shape[0] > 16 and every.held_out.shape[0] == 0
    assert widened(calibration_from_tokens(small.tokens, held_out=small.held_out), 256) is None  # no text behind ids


def test_gptq_takes_its_hessians_from_sixteen_times_the_supplied_text_at_apply(model_dir, text_files):
    """On text the user supplies, a GPTQ plan is applied with Hessians from HESSIAN_TEXT_MULTIPLE (16) x its
    calibration tokens of that text, FLOAT_TARGET_WIDENED toward the float model and each token weighted by its loss
    gradient (TOKEN_WEIGHTED_ON_TEXT): in process, rebuilt from the text for a saved plan, and passed explicitly, the
    same weights; the built-in set widens its Hessians alike but keeps natural column order, fits FLOAT_TARGET toward
    the float model and weighs every token alike (test_a_builtin_plan_takes_its_hessians_from_more_of_the_set)."""
    from bitalloc.apply import plan_quantizer_settings
    from bitalloc.calibration import calibration_for_plan, make_calibration, read_text
    from bitalloc.models import load_model

    calib_path = text_files[0]
    loaded = load_model(str(model_dir))
    options = [QuantOption.int_(b, 32, False) for b in (2, 3, 4)]
    p = plan(loaded, "3bits", str(calib_path), seq_len=16, calib_tokens=32, seed=3, options=options, cache_dir=False,
             quantizer="gptq")
    assert plan_quantizer_settings(p, "gptq", {}) == {"act_order": True, "hessian_tokens": 512, "float_target": 0.5,
                                                   "token_weighted": True}
    builtin = p.model_copy(update={"calibration": {**p.calibration, "source": "builtin:austen"}})
    assert plan_quantizer_settings(builtin, "gptq", {}) == {"act_order": False, "hessian_tokens": 512, "float_target": 0.25}
    sampled = p.model_copy(update={"calibration": {**p.calibration, "source": "self"}})  # no more of its text to read
    assert plan_quantizer_settings(sampled, "gptq", {}) == {"act_order": False, "float_target": 0.25}
    assert plan_quantizer_settings(p, "rtn-w", {}) == {}

    in_process = applied(loaded, p)
    wide = make_calibration(loaded.tokenizer, read_text(calib_path), seq_len=16, tokens=512, seed=3)
    assert torch.equal(in_process, applied(loaded, p, calibration=wide.tokens))  # ids as given: used as they are
    saved = Plan.model_validate_json(p.model_dump_json())
    rebuilt = calibration_for_plan(saved.calibration, loaded.tokenizer, loaded.model, calib_path)
    assert torch.equal(in_process, applied(loaded, saved, calibration=rebuilt))  # what eval/export --plan --calib do
    assert not torch.equal(in_process, applied(loaded, p, hessian_tokens=32))  # the profile's windows alone
    assert not torch.equal(in_process, applied(loaded, p, float_target=0.0))  # GPTQ's own target
    assert not torch.equal(in_process, applied(loaded, p, float_target=0.25))  # the built-in set's strength
    assert not torch.equal(in_process, applied(loaded, p, token_weighted=False))  # every token alike
    for bad in (8, 0, "256"):  # fewer tokens than one window, or not a number
        with pytest.raises(BadInputError, match="hessian_tokens"):
            applied(loaded, p, hessian_tokens=bad)


def test_a_builtin_plan_takes_its_hessians_from_more_of_the_set(model_dir):
    """A GPTQ plan calibrated on the built-in set is applied with Hessians from HESSIAN_TEXT_MULTIPLE x its tokens
    of the set, the same windows in process and rebuilt for a saved plan (no text to pass), and not the profile's
    windows alone."""
    from bitalloc.calibration import builtin_text, make_calibration
    from bitalloc.models import load_model

    loaded = load_model(str(model_dir))
    options = [QuantOption.int_(b, 32, False) for b in (2, 3, 4)]
    p = plan(loaded, "3bits", None, seq_len=16, calib_tokens=32, seed=3, options=options, cache_dir=False,
             quantizer="gptq")
    assert p.calibration["source"] == "builtin:austen"

    in_process = applied(loaded, p)
    wide = make_calibration(loaded.tokenizer, builtin_text(), seq_len=16, tokens=512, seed=3)
    assert torch.equal(in_process, applied(loaded, p, calibration=wide.tokens))  # 16 x 32 tokens of the set
    saved = Plan.model_validate_json(p.model_dump_json())
    assert torch.equal(in_process, applied(loaded, saved, tokenizer=loaded.tokenizer))  # rebuilt from the shipped text
    assert not torch.equal(in_process, applied(loaded, p, hessian_tokens=32))  # the profile's windows alone


def test_unknown_quantizer_is_a_clear_error(llama, calib_ids):
    with pytest.raises(BadInputError, match="unknown quantizer"):
        plan(llama, "4bits", calib_ids, cache_dir=False, quantizer="hqq")


# ---- command line ----------------------------------------------------------------------------------


def test_cli_plan_with_gptq_and_eval_needs_calib(model_dir, cli_env, tmp_path):
    from test_cli import PLAN_ARGS, assert_bad_input, run_cli

    out = tmp_path / "gptq.json"
    r = run_cli(cli_env, "plan", model_dir, "--budget", "4bits", "--calib", model_dir / "calib.txt", *PLAN_ARGS,
                "--quantizer", "gptq", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Plan.load(out).quantizer == "gptq"
    evaluate = ("eval", model_dir, "--text", model_dir / "eval.txt", "--plan", out, "--seq-len", "16", "--windows", "2", "--json")
    assert_bad_input(run_cli(cli_env, *evaluate), "--calib")
    scores = {}
    for extra in ((), ("--quantizer", "rtn")):
        r = run_cli(cli_env, *evaluate, "--calib", model_dir / "calib.txt", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        scores[extra] = json.loads([line for line in r.stdout.splitlines() if line.strip()][-1])
    assert scores[()]["kl"] > 0 and scores[()]["kl"] != scores[("--quantizer", "rtn")]["kl"]  # gptq applied, not rtn


# ---- rtn-mse ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt", [QuantOption.int_(3, 32, False), QuantOption.int_(4, None, True), QuantOption.int_(2, 64, True)])
def test_rtn_mse_clipping_never_worse_than_rtn_per_group(opt):
    W, _ = correlated_layer(seed=5)
    W[0, 3] = 12.0  # an outlier: clipping its group pays
    r, m = quantize_weight(W, opt, "rtn"), quantize_weight(W, opt, "rtn-mse")
    g = W.shape[1] if opt.group_size is None else opt.group_size
    group_err = lambda v: ((v - W) ** 2).reshape(W.shape[0], -1, g).sum(-1)  # noqa: E731
    assert torch.all(group_err(m.values) <= group_err(r.values))
    assert float(group_err(m.values).sum()) < 0.97 * float(group_err(r.values).sum())
    lo, hi = int_range(opt)
    assert torch.equal(int_dequantize(m.codes, m.scale, m.zero), m.values)
    assert int(m.codes.min()) >= lo and int(m.codes.max()) <= hi
    assert torch.equal(m.scale.to(torch.float16).float(), m.scale)
    assert torch.all(m.scale <= r.scale)  # clipping only ever shrinks the range


def test_float_target_weight_is_the_least_squares_fit_to_the_float_layer():
    """Ŵ = W (G + λI)(H + λI)⁻¹ minimizes Σ‖Ŵx̃ − Wx‖² + λ‖Ŵ − W‖²: it equals W where the quantized inputs are the
    float ones, beats W (and every nearby weight) on inputs that drifted, and strength moves it part of the way."""
    from bitalloc.quantizers.sequential import float_target_weight

    g = torch.Generator().manual_seed(7)
    W = torch.randn(8, 16, generator=g)
    X = torch.randn(512, 16, generator=g)  # float inputs [tokens, in]
    Xq = X @ (torch.eye(16) + 0.1 * torch.randn(16, 16, generator=g)) + 0.05 * torch.randn(512, 16, generator=g)
    H, G = Xq.T @ Xq / 512, X.T @ Xq / 512
    damp = 0.05
    lam = damp * float(torch.diagonal(H).mean())

    def objective(V):
        return float(((Xq @ V.T - X @ W.T) ** 2).sum(1).mean() + lam * ((V - W) ** 2).sum())

    best = float_target_weight(W, H, G, damp)
    assert torch.allclose(float_target_weight(W, X.T @ X / 512, X.T @ X / 512, damp), W, atol=1e-5)
    assert objective(best) < 0.5 * objective(W)
    for _ in range(5):  # the optimum: no random nudge lowers it
        assert objective(best + 1e-3 * torch.randn(W.shape, generator=g)) > objective(best)
    quarter = float_target_weight(W, H, G, damp, strength=0.25)
    assert torch.allclose(quarter, W + 0.25 * (best - W), atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float_target_lowers_sequential_gptq_output_error(family):
    """GPTQ fitting each layer toward the float model's output (float_target) leaves less error at the logits than
    GPTQ fitting each layer to its own weight on the quantized inputs; float_target=0 is plain GPTQ, bit for bit."""
    ref = FAMILIES[family]()
    calib, test = _ids(1, (32, 32)), _ids(2, (8, 32))
    options = {n: QuantOption.int_(3, 32, False) for n in select_modules(ref)}
    with torch.no_grad():
        want = ref(input_ids=test).logits
    errors, weights = {}, {}
    for strength in (0.0, 0.25, None):
        model = copy.deepcopy(ref)
        settings = {} if strength is None else {"float_target": strength}
        weights[strength] = {n: q.values for n, q in quantize_model(model, options, "gptq", calibration=calib, **settings).items()}
        with torch.no_grad():
            errors[strength] = float(((model(input_ids=test).logits - want) ** 2).mean())
    assert all(torch.equal(weights[0.0][n], weights[None][n]) for n in options)
    assert errors[0.25] < 0.9 * errors[0.0], errors


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float_inputs_kept_from_one_pass_give_the_same_weights_as_a_pass_per_stage(family, monkeypatch):
    """The float block's inputs to a block's modules, kept from one whole pass (sequential.FloatSide), are the numbers
    a pass per stage stopped at the module gives: the quantized weights agree bit for bit either way."""
    from bitalloc.quantizers import sequential

    ref = FAMILIES[family]()
    options = {n: QuantOption.int_(3, 32, False) for n in select_modules(ref)}
    passes = []
    monkeypatch.setattr(sequential, "module_inputs", lambda *a: passes.append(1) or module_inputs(*a))
    weights = {}
    for cache_bytes in (sequential.FLOAT_INPUTS_CACHE_BYTES, 0):
        monkeypatch.setattr(sequential, "FLOAT_INPUTS_CACHE_BYTES", cache_bytes)
        passes.clear()
        quantized = quantize_model(copy.deepcopy(ref), options, "gptq", calibration=_ids(1, (8, 32)), float_target=0.5)
        weights[cache_bytes] = {n: q.values for n, q in quantized.items()}
        assert bool(passes) == (cache_bytes > 0)  # kept from one pass only where it fits
    kept, per_stage = weights.values()
    assert kept.keys() == per_stage.keys() == options.keys()
    assert all(torch.equal(kept[n], per_stage[n]) for n in options)


def test_float_target_and_hessian_tokens_are_refused_where_nothing_runs_block_by_block(llama, calib_ids):
    options = {n: QuantOption.int_(4, 32, False) for n in select_modules(llama)}
    for quantizer, settings in (("rtn-w", {"float_target": 0.25}), ("rtn", {"float_target": 0.25}),
                                ("rtn-w", {"hessian_tokens": 64}), ("awq", {"token_weighted": True})):
        with pytest.raises(BadInputError, match=f"{next(iter(settings))} applies to quantizers that run block by block"):
            quantize_model(copy.deepcopy(llama), options, quantizer, calibration=calib_ids, **settings)
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(BadInputError, match="float_target must be a number from 0 to 1"):
            quantize_model(copy.deepcopy(llama), options, "gptq", calibration=calib_ids, float_target=bad)
