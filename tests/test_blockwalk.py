"""blockwalk: replaying a model's decoder blocks one at a time gives the whole model's hidden states."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bitalloc.blockwalk import record_calls
from bitalloc.models import decoder_blocks

from conftest import FAMILIES, VOCAB


def _sliding_qwen2():
    """Block 0 attends to an 8-token window, block 1 to everything: the blocks get different masks."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")
    return Qwen2ForCausalLM(config).eval()


MODELS = {**FAMILIES, "qwen2-sliding-window": _sliding_qwen2}


@pytest.mark.parametrize("family", sorted(MODELS))
@torch.no_grad()
def test_replayed_blocks_give_the_whole_models_hidden_states(family, calib_ids):
    model = MODELS[family]() if family == "qwen2-sliding-window" else MODELS[family]().eval()
    _, blocks = decoder_blocks(model)
    ids = calib_ids[:1]
    want = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    calls, h = record_calls(model, blocks, ids)
    torch.testing.assert_close(h, want[0], rtol=0, atol=0)
    for l, block in enumerate(blocks):
        h = calls[l](block, h)
        if l + 1 < len(blocks):  # the last entry of hidden_states has the final norm applied
            torch.testing.assert_close(h, want[l + 1], rtol=0, atol=0)


def test_the_sliding_window_model_really_gives_its_blocks_different_masks(calib_ids):
    model = _sliding_qwen2()
    blocks = decoder_blocks(model)[1]
    calls, h0 = record_calls(model, blocks, calib_ids[:1])
    masks = [c.kwargs["attention_mask"] for c in calls]
    assert masks[0] is not None and masks[1] is not None and not torch.equal(masks[0], masks[1])
    # so running block 1 with block 0's arguments (as GPTQ's pass once did) gives other hidden states
    with torch.no_grad():
        h1 = calls[0](blocks[0], h0)
        assert (calls[0](blocks[1], h1) - calls[1](blocks[1], h1)).abs().max() > 1e-3


@torch.no_grad()
def test_one_pass_stage_hessians_equal_one_pass_per_module(calib_ids):
    from bitalloc.blockwalk import BlockWalk, stage_grams, stage_hessians

    model = FAMILIES["llama"]().eval()
    locals_ = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    for block, inputs in BlockWalk(model, calib_ids[:3]):
        together = stage_hessians(block, locals_, inputs)
        for name, H in zip(locals_, together):
            (alone, G), = stage_grams(block, name, inputs, [None])  # one pass per module, stopped at it
            assert G is None
            assert H.shape == alone.shape and H.abs().max() > 0
            torch.testing.assert_close(H, alone, rtol=0, atol=0)


def test_token_weighted_grams_of_the_float_model_are_fisher_tws_hessian(calib_ids):
    """Weighting each token by its output's loss gradient (statistics.output_gradient_weights) in the block walk's
    grams gives the profile's fisher-tw Hessian H_a = mean_t a_t x xᵀ, up to its scale ΣF: the Hessian token-weighted
    GPTQ works from is the error model's own. Unit weights give the unweighted grams: H bit for bit, G to rounding."""
    from bitalloc.blockwalk import BlockWalk, module_inputs, stage_grams, stage_hessians
    from bitalloc.calibration import calibration_from_tokens
    from bitalloc.profile.statistics import collect_statistics, output_gradient_weights

    model = FAMILIES["llama"]().eval()
    ids = calib_ids[:3]
    locals_ = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in locals_]
    weights = output_gradient_weights(model, names, ids)
    stats = collect_statistics(model, names, calibration_from_tokens(ids))
    for n, a in weights.items():
        assert a.shape == ids.shape and torch.all(a[:, -1] == 0)  # the last token predicts nothing
        torch.testing.assert_close(a.mean(), torch.tensor(1.0))
    ones = torch.ones(ids.shape)
    for i, (block, inputs) in enumerate(BlockWalk(model, ids)):
        if i == 2:
            break
        for local in locals_:
            (H_a, _), (H, _) = stage_grams(block, local, inputs, [weights[f"model.layers.{i}.{local}"], ones])
            s = stats[f"model.layers.{i}.{local}"]
            torch.testing.assert_close(H_a, s.grad_weighted_hessian / s.fisher.sum(), rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(H, stage_hessians(block, [local], inputs)[0], rtol=0, atol=0)
            assert not torch.allclose(H_a, H, rtol=0.05)  # the weighting changes it
        copy_ = FAMILIES["llama"]().eval()
        copy_.load_state_dict(model.state_dict())
        float_block = copy_.model.layers[i]
        hidden = [h for _, h in inputs]
        float_x = module_inputs(float_block, ["mlp.down_proj"], inputs, hidden)[0]["mlp.down_proj"]
        (H1, G1), (H0, G0) = stage_grams(block, "mlp.down_proj", inputs, [ones, None], float_x.__getitem__)
        torch.testing.assert_close(H1, H0, rtol=0, atol=0)
        torch.testing.assert_close(G1, G0, rtol=1e-6, atol=1e-7)
