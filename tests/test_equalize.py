"""Equalization (AWQ's activation-aware scales folded into norms and weights) and the `awq` quantizer.

The fold must keep the model's function, lower the layer errors it is searched for on a model with the
activation outliers it exists for, and be the same fold wherever it runs: the profile (on a copy of the
caller's model) and apply/pack (on the model they quantize) must quantize the very same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import bitalloc
from bitalloc.api import ProfileConfig, prepare_profile
from bitalloc.apply import apply
from bitalloc.calibration import calibration_from_tokens
from bitalloc.config import DEFAULT_QUANTIZER, DEFAULT_UNFOLDED_QUANTIZER, CalibrationSpec
from bitalloc.equalize import block_groups, equalizable, equalize, first_minimum, weights_before
from bitalloc.errors import BadInputError
from bitalloc.models import as_loaded, decoder_blocks, forward_hooks, is_linear, weight_matrix, weights_hash
from bitalloc.options import parse_option
from bitalloc.pack import save_checkpoint
from bitalloc.profile.statistics import input_importance
from bitalloc.quantizers import measuring_quantizer, quantize_weight, unfolded_quantizer

from conftest import make_gemma3, make_gpt2, make_llama, make_qwen2

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(11))


def with_outliers(model: torch.nn.Module) -> torch.nn.Module:
    """A few hidden channels 12x larger at every pre-norm (and in v_proj's and up_proj's rows): the activation
    outliers of trained LLMs, which equalization is for (random tiny models have none)."""
    _, blocks = decoder_blocks(model)
    with torch.no_grad():
        for block in blocks:
            for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
                if hasattr(block, norm):
                    w = getattr(block, norm).weight
                    offset = 1.0 if "Gemma" in type(getattr(block, norm)).__name__ else 0.0
                    w[[3, 17, 40]] = (w[[3, 17, 40]] + offset) * 12 - offset
            block.mlp.up_proj.weight[[5, 60, 99]] *= 12
            block.self_attn.v_proj.weight[[1, 7, 20]] *= 12
    return model


def layer_error(model: torch.nn.Module, label: str, ids: torch.Tensor) -> float:
    """Σ of tr(ΔW H ΔWᵀ) for rtn-w at `label`, H from the model's own inputs, over the block linears whose
    output the fold leaves as it is (v_proj's and up_proj's rows are divided by o's and down's scales: their
    errors reach the model through those, in other units)."""
    names = [n for n, m in model.named_modules() if is_linear(m) and ".layers." in n
             and not n.endswith(("v_proj", "up_proj"))]
    H = {}

    def grab(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            H[name] = H.get(name, 0) + x.T @ x
        return hook

    with torch.no_grad(), forward_hooks(((model.get_submodule(n), grab(n)) for n in names), pre=True):
        for w in ids:
            model(w[None])
    total = 0.0
    for n in names:
        w = weight_matrix(model.get_submodule(n)).detach().double()
        h = H[n] / len(ids)
        q = quantize_weight(w.float(), parse_option(label), "rtn-w", hessian=torch.diagonal(h).float()).values.double()
        d = q - w
        total += float(((d @ h) * d).sum())
    return total


@pytest.mark.parametrize("make", [make_llama, make_qwen2, make_gemma3])
def test_equalize_keeps_the_function_and_moves_weights(make):
    model = with_outliers(make())
    before = copy.deepcopy(model)
    equalize(model, IDS)
    with torch.no_grad():
        want, got = before(IDS).logits, model(IDS).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    _, blocks = decoder_blocks(model)
    _, old_blocks = decoder_blocks(before)
    scaled = {}  # each kind of group was scaled in some block (the outliers make α > 0 pay; α = 0 may win elsewhere)
    for block, old in zip(blocks, old_blocks):
        for group in block_groups(block):
            moved = not torch.equal(block.get_submodule(group.consumers[0]).weight, old.get_submodule(group.consumers[0]).weight)
            assert moved == (not torch.equal(block.get_submodule(group.producer).weight, old.get_submodule(group.producer).weight))
            scaled[group.producer] = scaled.get(group.producer, False) or moved
    assert len(scaled) == 4 and all(scaled.values()), scaled


def test_equalize_groups_follow_grouped_query_attention():
    """Gemma 3's tiny shape: 4 query heads on one KV head, head_dim 32: o_proj's 128 inputs take v_proj's 32
    scales, each repeated once per query head."""
    model = with_outliers(make_gemma3())
    block = decoder_blocks(model)[1][0]
    groups = {g.producer: g for g in block_groups(block)}
    assert groups["self_attn.v_proj"].heads == 4 and groups["self_attn.v_proj"].head_dim == 32
    assert groups["pre_feedforward_layernorm"].consumers == ("mlp.gate_proj", "mlp.up_proj")
    v_before = block.self_attn.v_proj.weight.detach().clone()
    o_before = block.self_attn.o_proj.weight.detach().clone()
    equalize(model, IDS)
    # v's rows were divided by s (and its columns multiplied by the q/k/v group's scales: one factor per column)
    s = v_before[:, 0] / block.self_attn.v_proj.weight[:, 0]
    s_o = block.self_attn.o_proj.weight[0] / o_before[0]  # o's columns multiplied by s, once per query head
    assert s.std() > 0.05 * s.mean()  # really scaled
    ratio = s_o / s.repeat(4)
    torch.testing.assert_close(ratio, ratio[:1].expand(128), rtol=1e-5, atol=0)


def test_equalize_lowers_the_layer_errors_it_is_searched_for():
    model = with_outliers(make_llama())
    before = {label: layer_error(model, label, IDS) for label in ("int3-g32-asym", "int4-g32-asym")}
    equalize(model, IDS)
    after = {label: layer_error(model, label, IDS) for label in before}
    for label in before:
        assert after[label] < 0.85 * before[label], (label, before[label], after[label])


def test_the_alpha_search_rides_out_a_bump_and_stops_once_the_error_keeps_rising():
    # A tiny model's curve (test_equalize_lowers_the_layer_errors_it_is_searched_for's first MLP group): up at
    # α = 0.1 and 0.2 before its minimum at 0.3, then climbing.
    curve = [2.0, 3.171, 2.027, 1.542, 2.762, 3.483, 2.987, 6.047, 7.735, 10.047, 19.097]
    measured = []
    assert first_minimum(lambda i: measured.append(i) or curve[i], len(curve)) == 3
    assert measured == [0, 1, 2, 3, 4, 5, 6]  # three past the best, then stop
    assert first_minimum(lambda i: curve[i], len(curve), patience=1) == 0  # stopping at the first rise misses it
    flat = [1.0, 0.5, 0.5, 0.5, 0.7, 0.9]
    assert first_minimum(lambda i: flat[i], len(flat)) == 1  # ties keep the smaller α, as a full sweep does
    falling = [5.0, 4.0, 3.0, 2.0, 1.0]
    assert first_minimum(lambda i: falling[i], len(falling)) == 4


def test_a_model_without_llama_family_blocks_is_left_as_it_is_and_awq_is_rtn_w_there():
    gpt2 = make_gpt2()
    before = weights_hash(gpt2)
    assert not equalizable(gpt2) and equalizable(make_llama())
    equalize(gpt2, IDS)
    assert weights_hash(gpt2) == before and weights_before(gpt2) == before
    calib = calibration_from_tokens(IDS)
    names, grid = ["transformer.h.0.mlp.c_fc"], [parse_option("int3-g32-asym")]
    awq = bitalloc.api.profile(as_loaded(gpt2), calib, names, grid, quantizer="awq")
    rtn_w = bitalloc.api.profile(as_loaded(make_gpt2()), calib, names, grid, quantizer="rtn-w")
    assert awq.quantizer == "awq" and rtn_w.quantizer == "rtn-w" and set(awq.errors) == set(rtn_w.errors)
    for model in awq.errors:
        assert awq.errors[model].tolist() == rtn_w.errors[model].tolist() and awq.errors[model].sum() > 0


def test_what_cannot_be_equalized_is_refused(model_dir):
    config = ProfileConfig(CalibrationSpec(str(model_dir / "calib.txt"), seq_len=32, tokens=64), quantizer="awq",
                           stream=True)
    with pytest.raises(BadInputError, match=r"quantizer awq folds scales into the whole model.*stream"):
        prepare_profile(str(model_dir), config)
    # the table step alone on a model as it is would measure other weights than apply quantizes
    loaded = as_loaded(make_llama())
    calib = calibration_from_tokens(IDS)
    with pytest.raises(BadInputError, match=r"quantizer awq measures the equalized model"):
        bitalloc.api.profile(loaded, calib, ["model.layers.0.mlp.up_proj"], [parse_option("int4-g32-sym")], quantizer="awq")
    assert bitalloc.api.profile(bitalloc.api.equalized(loaded, calib, copy_model=True), calib, ["model.layers.0.mlp.up_proj"],
                                [parse_option("int4-g32-sym")], quantizer="awq").quantizer == "awq"


def test_awq_profile_and_apply_fold_the_same_model():
    """The table is measured on the profile's equalized copy; apply equalizes the caller's model itself from the
    same windows and gets bit-identical weights, norms included. The caller's model is left as it was."""
    model = with_outliers(make_llama())
    original = weights_hash(model)
    config = ProfileConfig(CalibrationSpec(IDS), options=(parse_option("int3-g32-asym"), parse_option("int4-g32-asym")),
                           quantizer="awq")
    table, loaded, calib = prepare_profile(model, config)
    assert weights_hash(model) == original and loaded.content_hash == original
    plan = bitalloc.solve(table, bitalloc.api.context_of(loaded, calib), bitalloc.SolveConfig(budget="4bits"))
    assert plan.quantizer == "awq" and plan.model.content_hash == original
    applied = apply(copy.deepcopy(model), plan, calibration=IDS)
    folded = loaded.model
    importance = input_importance(folded, [a.module for a in plan.assignments], IDS)
    for a in plan.assignments:
        want = quantize_weight(weight_matrix(folded.get_submodule(a.module)).detach(), a.option, "awq",
                               hessian=importance[a.module]).values
        assert torch.equal(weight_matrix(applied.get_submodule(a.module)), want), a.module
    for name, t in folded.state_dict().items():
        if "norm" in name:
            assert torch.equal(applied.state_dict()[name], t), name
    # The profiled copy is already folded: apply checks it against the weights it was folded from and does not
    # fold it again; other windows would fold other scales, and are refused.
    again = apply(copy.deepcopy(folded), plan, calibration=IDS)
    assert all(torch.equal(t, applied.state_dict()[n]) for n, t in again.state_dict().items())
    with pytest.raises(BadInputError, match="already has equalization scales folded in from other calibration windows"):
        equalize(copy.deepcopy(folded), IDS[:1])


def test_awq_checkpoint_holds_the_folded_norms_and_reloads_as_the_simulation(tmp_path):
    from transformers import AutoModelForCausalLM

    model = with_outliers(make_llama())
    plan = bitalloc.plan(model, "16bits", IDS, options=[parse_option("int4-g32-sym")], cache_dir=False,
                         quantizer="awq", constraints=bitalloc.Constraints(pins=((r"proj", "int4-g32-sym"),)))
    save_checkpoint(model, plan, tmp_path / "awq", calibration=IDS)
    stored = load_file(tmp_path / "awq" / "model.safetensors")
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(stored[norm], model.state_dict()[norm])  # folded, not copied from the caller's model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "awq").eval()
    simulated = apply(copy.deepcopy(model), plan, calibration=IDS)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, simulated(IDS).logits)


def test_exports_of_an_awq_plan_say_the_tool_quantizes_unfolded_weights(tmp_path):
    from bitalloc.exports import export_plan

    plan = bitalloc.plan(make_llama(), "4.5bits", IDS, cache_dir=False, quantizer="awq")
    result = export_plan(plan, "gptqmodel", tmp_path / "awq")
    assert any("equalization scales folded" in line and "re-plan with quantizer rtn-w" in line
               for line in result.unsupported)
    plain = export_plan(bitalloc.Plan.from_json(plan.to_json().replace('"quantizer": "awq"', '"quantizer": "rtn-w"')),
                        "gptqmodel", tmp_path / "rtn-w")
    assert not any("equalization" in line for line in plain.unsupported)


def test_a_cached_profile_folds_cached_scales_without_searching_again(tmp_path, monkeypatch):
    import bitalloc.equalize as eq

    model = with_outliers(make_llama())
    config = ProfileConfig(CalibrationSpec(IDS), options=(parse_option("int3-g32-asym"), parse_option("int4-g32-asym")),
                           quantizer="awq")
    first, loaded_1, _ = prepare_profile(model, config, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("equalize-*.safetensors"))) == 1
    monkeypatch.setattr(eq, "search_scales", lambda *a, **k: pytest.fail("the cached scales were searched again"))
    again, loaded_2, _ = prepare_profile(model, config, cache_dir=tmp_path)
    assert weights_before(loaded_2.model) == weights_before(loaded_1.model) == weights_hash(model)
    for (name, a), b in zip(loaded_1.model.state_dict().items(), loaded_2.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert first.errors["fisher-tw"].tolist() == again.errors["fisher-tw"].tolist()


def test_awq_gptq_plans_from_awq_errors_and_applies_gptq_on_the_folded_model():
    """awq-gptq's table holds awq's errors (its registered stand-in: a GPTQ table of the equalized model cost 1.7×
    the profiling and picked plans that scored no better; docs/results.md), so it plans as awq does; applying its plan folds
    the same scales and then runs GPTQ: the weights of the plan applied with gptq to the profile's folded copy."""
    model = with_outliers(make_llama())
    options = (parse_option("int3-g32-asym"), parse_option("int4-g32-asym"))
    table, loaded, calib = prepare_profile(model, ProfileConfig(CalibrationSpec(IDS), options=options,
                                                                quantizer="awq-gptq"))
    assert weights_before(loaded.model) == weights_hash(model)
    assert measuring_quantizer("awq-gptq") == "awq" and measuring_quantizer("gptq") == "gptq"
    awq_table, awq_loaded, _ = prepare_profile(model, ProfileConfig(CalibrationSpec(IDS), options=options,
                                                                     quantizer="awq"))
    assert table.quantizer == "awq-gptq" and awq_table.quantizer == "awq"
    for name, errors in table.errors.items():
        assert errors.tolist() == awq_table.errors[name].tolist(), name
    gptq_table = bitalloc.api.profile(loaded, calib, list(table.groups), list(options), quantizer="gptq")
    assert table.errors["fisher-tw"].tolist() != gptq_table.errors["fisher-tw"].tolist()
    plan = bitalloc.solve(table, bitalloc.api.context_of(loaded, calib), bitalloc.SolveConfig(budget="4.1bits"))
    awq_plan = bitalloc.solve(awq_table, bitalloc.api.context_of(awq_loaded, calib), bitalloc.SolveConfig(budget="4.1bits"))
    assert plan.quantizer == "awq-gptq" and awq_plan.quantizer == "awq"
    assert plan.assignments == awq_plan.assignments and {a.option.bits for a in plan.assignments} == {3, 4}
    applied = apply(copy.deepcopy(model), plan, calibration=IDS)
    expected = apply(copy.deepcopy(loaded.model), plan, calibration=IDS, quantizer="gptq")
    for name, t in expected.state_dict().items():
        assert torch.equal(applied.state_dict()[name], t), name
    assert not torch.equal(applied.state_dict()["model.layers.0.input_layernorm.weight"],
                           model.state_dict()["model.layers.0.input_layernorm.weight"])
    with_rtn_w = apply(copy.deepcopy(model), awq_plan, calibration=IDS)  # awq: the same fold, then rtn-w
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(with_rtn_w.state_dict()[q_proj], applied.state_dict()[q_proj])
    # where nothing can be folded (qat.replan, the exports' note) each equalizing quantizer names its plain twin;
    # config's default there (stream, ray) is awq's, kept without importing torch
    assert unfolded_quantizer("awq-gptq") == "gptq"
    assert unfolded_quantizer("awq") == DEFAULT_UNFOLDED_QUANTIZER and unfolded_quantizer("gptq") == "gptq"


def test_the_default_quantizer_is_awq_gptq_on_every_calibration(tmp_path):
    """awq-gptq on every calibration: text the user supplies, token ids, the built-in set and self (on the built-in set
    it lowered ppl and KL at 3.2 to 4.44 bits on SmolLM2 and at 3.5 on Gemma 3); GGUF grids imatrix, streams rtn-w.
    Which calibration it is still sets GPTQ's column order and how much text its Hessians take (apply)."""
    from bitalloc.config import default_quantizer, supplied_calibration

    text = tmp_path / "calib.txt"
    text.write_text("some text", encoding="utf-8")
    int_grid = (parse_option("int4-g32-asym"),)
    assert [ProfileConfig(CalibrationSpec(source), options=int_grid).quantizer
            for source in (None, "self", text, str(text), IDS)] == ["awq-gptq"] * 5
    assert supplied_calibration(calibration_from_tokens(IDS))
    assert not supplied_calibration(calibration_from_tokens(IDS, source="builtin:austen"))
    assert ProfileConfig(CalibrationSpec(text), options=int_grid, stream=True).quantizer == "rtn-w"
    assert ProfileConfig(CalibrationSpec(text), options=(parse_option("Q4_K"),)).quantizer == "imatrix"
    assert default_quantizer(int_grid) == DEFAULT_QUANTIZER == "awq-gptq"
    assert ProfileConfig(CalibrationSpec(IDS), options=int_grid, quantizer="awq").quantizer == "awq"  # named: kept


def test_apply_folds_the_scales_its_profile_left_in_the_cache(tmp_path, monkeypatch):
    """A plan made through the cache is applied (and packed) from the cached scales, without the search, to the
    same weights as a search gives; without a cache apply searches."""
    import bitalloc.equalize as eq

    model = with_outliers(make_llama())
    options = [parse_option("int3-g32-asym"), parse_option("int4-g32-asym")]
    plan = bitalloc.plan(model, "4.1bits", IDS, options=options, cache_dir=tmp_path)
    searched = apply(copy.deepcopy(model), plan, calibration=IDS)
    monkeypatch.setattr(eq, "search_scales", lambda *a, **k: pytest.fail("the cached scales were searched again"))
    cached = apply(copy.deepcopy(model), plan, calibration=IDS, cache_dir=tmp_path)
    for name, t in searched.state_dict().items():
        assert torch.equal(cached.state_dict()[name], t), name
    save_checkpoint(model, plan, tmp_path / "ckpt", calibration=IDS, cache_dir=tmp_path)
    assert torch.equal(load_file(tmp_path / "ckpt" / "model.safetensors")["model.layers.1.input_layernorm.weight"],
                       searched.state_dict()["model.layers.1.input_layernorm.weight"])
    with pytest.raises(pytest.fail.Exception, match="searched again"):
        apply(copy.deepcopy(model), plan, calibration=IDS)
