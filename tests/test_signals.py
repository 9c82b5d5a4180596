"""Profiler signals against brute force: Hessian trace, salience, activation spikes, inter-layer corrections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from transformers import LlamaConfig, LlamaForCausalLM

from bitalloc.calibration import calibration_from_tokens
from bitalloc.models import select_modules, weight_matrix
from bitalloc.options import QuantOption
from bitalloc.profile.hessian_trace import hutchinson_traces
from bitalloc.profile.interactions import candidate_pairs, dataflow_graph, measure_interactions, mean_nll, quantized
from bitalloc.profile.salience import element_salience, gini_coefficient, salience, top_share
from bitalloc.profile.spikes import collect_spikes
from bitalloc.profile.statistics import collect_statistics

from conftest import make_gpt2, make_llama


def micro_llama(seed: int = 0) -> LlamaForCausalLM:
    """Hidden 16: small enough for the exact Hessian of every weight; a wide init so traces are far from 0."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def exact_trace(model: nn.Module, name: str, ids: torch.Tensor) -> float:
    """tr ∇²_W of the window-mean of per-window mean NLL, from the full Hessian (float64)."""
    model = model.double()
    w0 = model.get_submodule(name).weight.detach()

    def loss(w):
        total = 0
        for win in ids:
            logits = functional_call(model, {name + ".weight": w}, (win[None],)).logits
            total = total + nn.functional.cross_entropy(logits[0, :-1], win[1:])
        return total / len(ids)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        H = torch.autograd.functional.hessian(loss, w0)
    n = w0.numel()
    model.float()
    return float(H.reshape(n, n).diagonal().sum())


def test_hutchinson_trace_within_its_standard_error_of_exact():
    model = micro_llama()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    names = select_modules(model)
    est = hutchinson_traces(model, names, calibration_from_tokens(ids), tol=0.0, min_probes=300, max_probes=300,
                            group_rows=8, seed=3)
    z = []
    for n in names:
        e = est[n]
        assert e.probes == 300
        assert np.isfinite(e.stderr) and e.stderr > 0
        # row-block traces add up to the whole trace
        assert e.group_trace.shape == (-(-weight_matrix(model.get_submodule(n)).shape[0] // 8),)
        assert float(e.group_trace.sum()) == pytest.approx(e.trace, rel=1e-9, abs=1e-12)
        exact = exact_trace(model, n, ids)
        z.append((e.trace - exact) / e.stderr)
        assert abs(e.trace - exact) <= 4 * e.stderr, (n, e.trace, exact, e.stderr)
    # unbiased: the z-scores centre on 0 (14 weights; a biased estimator would drift to one side)
    assert abs(float(np.mean(z))) < 1.5
    assert any(abs(exact_trace(model, n, ids)) > 1.0 for n in names)  # the check is not vacuous


def test_hutchinson_stopping_rule_and_resume():
    model = micro_llama()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    names = select_modules(model)[4:7]  # the MLP: traces well away from zero
    calib = calibration_from_tokens(ids)
    est = hutchinson_traces(model, names, calib, tol=0.25, abs_tol=0.0, min_probes=4, max_probes=400, seed=0)
    for e in est.values():
        assert 4 <= e.probes < 400 and e.probes % 2 == 0  # stops after a whole round of the 2 windows
        assert e.stopped_by == "relative" and e.rel_stderr <= 0.25
    probes = max(e.probes for e in est.values())
    # stopping one round earlier would not have met the tolerance for the last weight to stop
    shorter = hutchinson_traces(model, names, calib, tol=0.0, abs_tol=0.0, min_probes=probes - 2,
                                max_probes=probes - 2, seed=0)
    assert all(e.stopped_by == "max_probes" for e in shorter.values())
    assert probes == 4 or any(e.rel_stderr > 0.25 for e in shorter.values())
    # resuming from the shorter state gives exactly the uninterrupted estimate of the last weight to stop
    # (weights that had stopped earlier on their own keep the shorter run's extra probes)
    resumed = hutchinson_traces(model, names, calib, tol=0.25, abs_tol=0.0, min_probes=4, max_probes=400, seed=0,
                                state=shorter)
    last = max(names, key=lambda n: est[n].probes)
    assert resumed[last].probes == probes and resumed[last].total == pytest.approx(est[last].total, rel=1e-12)


def test_hutchinson_weights_stop_on_their_own_and_skip_later_probes():
    model = micro_llama()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    names = select_modules(model)[4:7]
    calib = calibration_from_tokens(ids)
    est = hutchinson_traces(model, names, calib, tol=0.25, abs_tol=0.0, min_probes=4, max_probes=400, seed=0)
    counts = sorted(e.probes for e in est.values())
    # a weight that stopped early kept its estimate: probing it for as long as the slowest one gives more probes
    longer = hutchinson_traces(model, names, calib, tol=0.0, abs_tol=0.0, min_probes=counts[-1],
                               max_probes=counts[-1], seed=0)
    for n in names:
        if est[n].probes < counts[-1]:
            assert longer[n].probes == counts[-1] and longer[n].total != est[n].total
        # a weight's samples do not depend on which others still probe: a run stopped at its count reproduces it
        prefix = hutchinson_traces(model, names, calib, tol=0.0, abs_tol=0.0, min_probes=est[n].probes,
                                   max_probes=est[n].probes, seed=0)
        assert prefix[n].total == pytest.approx(est[n].total, rel=1e-12)


def test_hutchinson_absolute_tolerance_stops_a_zero_trace_layer():
    """Layer 0's o_proj zeroed (and not probed): its q/k/v cannot reach the loss whatever the probed weights
    are, so every sample of their trace is exactly 0. Their relative standard error is undefined (0/0):
    without the absolute rule they burn every probe. (Were o_proj probed too, the mixed terms v_q·H_qo·v_o
    would make their samples noisy around 0 — the ~0-trace case on real models.)"""
    model = micro_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    calib = calibration_from_tokens(ids)
    names = [n for n in select_modules(model) if n != "model.layers.0.self_attn.o_proj"]
    zero = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    only_rel = hutchinson_traces(model, names, calib, tol=0.5, abs_tol=0.0, min_probes=4, max_probes=40, seed=0)
    for n in zero:
        assert only_rel[n].trace == 0.0 and only_rel[n].rel_stderr == np.inf
        assert only_rel[n].stopped_by == "max_probes" and only_rel[n].probes == 40
    both = hutchinson_traces(model, names, calib, tol=0.5, abs_tol=0.01, min_probes=4, max_probes=40, seed=0)
    for n in zero:
        assert both[n].stopped_by == "absolute" and both[n].probes == 4  # the first check after min_probes
    others = [n for n in names if n not in zero]
    assert any(abs(both[n].trace) > 1.0 for n in others)  # the scale the absolute rule is relative to
    for n in others:
        e = both[n]
        assert e.stopped_by in ("relative", "absolute", "max_probes")
        if e.stopped_by == "relative":
            assert e.rel_stderr <= 0.5
        if e.stopped_by == "absolute":
            assert e.stderr <= 0.01 * max(abs(both[m].trace) for m in names)


def test_hutchinson_leaves_model_as_found():
    model = micro_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(1))
    hutchinson_traces(model, select_modules(model), calibration_from_tokens(ids), max_probes=2, min_probes=2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_trace_of_conv1d_weights_runs_over_output_rows(calib_ids):
    model = make_gpt2()
    names = ["transformer.h.0.attn.c_attn"]  # Conv1D: stored [in=64, out=192]
    est = hutchinson_traces(model, names, calibration_from_tokens(calib_ids[:1, :16]), max_probes=2, min_probes=2,
                            group_rows=64)
    assert est[names[0]].group_trace.shape == (3,) and est[names[0]].numel == 64 * 192


# ---- salience --------------------------------------------------------------------------------------


def test_salience_matches_numpy():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(40, 24))
    X = rng.normal(size=(500, 24)) * np.linspace(0.1, 5, 24)
    X[:, 3] *= 30  # an outlier input channel: salience should cluster there
    H = X.T @ X / X.shape[0]
    damp = 0.01
    Hinv = np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(24))
    hess = W**2 / np.diag(Hinv)[None, :] ** 2
    act = np.abs(W) * np.sqrt((X**2).mean(0))[None, :]
    s = salience(torch.tensor(W), torch.tensor(H), group_rows=16, group_cols=8, damp=damp)
    for kind, ref in (("hessian", hess), ("activation", act)):
        np.testing.assert_allclose(s.column[kind], ref.sum(0), rtol=1e-8)
        assert s.groups[kind].shape == (3, 3)
        np.testing.assert_allclose(s.groups[kind][0, 1], ref[:16, 8:16].sum(), rtol=1e-8)
        np.testing.assert_allclose(s.groups[kind][2, 2], ref[32:, 16:].sum(), rtol=1e-8)  # partial row block
        np.testing.assert_allclose(s.groups[kind].sum(), ref.sum(), rtol=1e-8)
        col = ref.sum(0)
        assert s.top1pct_share[kind] == pytest.approx(col.max() / col.sum())  # 1% of 24 columns -> 1 column
        assert int(np.argmax(s.column[kind])) == 3
        # Gini from its definition: mean absolute difference over twice the mean
        g = np.abs(col[:, None] - col[None, :]).mean() / (2 * col.mean())
        assert s.gini[kind] == pytest.approx(g, rel=1e-9)
    torch.testing.assert_close(element_salience(torch.tensor(W), torch.tensor(H))["hessian"], torch.tensor(hess))


def test_clustering_measures_at_the_extremes():
    assert gini_coefficient(np.ones(100)) == pytest.approx(0.0)
    assert gini_coefficient(np.r_[np.zeros(99), 1.0]) == pytest.approx(0.99)
    assert top_share(np.r_[np.zeros(199), 5.0], 0.01) == pytest.approx(1.0)
    assert top_share(np.ones(200), 0.01) == pytest.approx(0.01)


def test_salience_from_calibration_statistics(calib_ids):
    model = make_llama()
    name = "model.layers.1.mlp.down_proj"
    st = collect_statistics(model, [name], calibration_from_tokens(calib_ids))[name]
    s = salience(weight_matrix(model.get_submodule(name)), st.hessian)
    assert s.column["hessian"].shape == (128,) and s.groups["hessian"].shape == (1, 1)
    assert all(0 < s.gini[k] < 1 and 0 < s.top1pct_share[k] < 1 for k in s.gini)


# ---- activation spikes ------------------------------------------------------------------------------


SPIKE_TOKEN, SPIKE_CHANNEL = 7, 5


def plant_spike(model: LlamaForCausalLM) -> None:
    """Token SPIKE_TOKEN's embedding becomes e_c, and no other token has channel c; layer 0's input norm
    scales channel c by 100. So layer 0's q/k/v input is ≈ 800 at (that token, channel c), exactly 0 in
    channel c elsewhere, and O(1) in the other channels."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, SPIKE_CHANNEL] = 0
        emb[SPIKE_TOKEN] = 0
        emb[SPIKE_TOKEN, SPIKE_CHANNEL] = 1.0
        model.model.layers[0].input_layernorm.weight[SPIKE_CHANNEL] = 100.0


def test_planted_spike_is_found_at_its_layer_channel_and_tokens(calib_ids):
    ids = calib_ids.clone()
    ids[0, 3] = ids[2, 10] = SPIKE_TOKEN
    ids[ids == SPIKE_TOKEN] = SPIKE_TOKEN  # (other occurrences in the random ids stay spikes too)
    clean = collect_spikes(make_llama(), select_modules(make_llama()), calibration_from_tokens(ids))
    assert not any(s.input.flagged or s.output.flagged for s in clean.values())

    model = make_llama()
    plant_spike(model)
    names = select_modules(model)
    spikes = collect_spikes(model, names, calibration_from_tokens(ids), top_k=4)
    where = {(int(w), int(p)) for w, p in zip(*torch.nonzero(ids == SPIKE_TOKEN, as_tuple=True))}
    worst = max(names, key=lambda n: spikes[n].input.ratio)
    assert worst.startswith("model.layers.0.self_attn.")  # q/k/v share the spiked input
    for proj in "qkv":
        s = spikes[f"model.layers.0.self_attn.{proj}_proj"].input
        assert s.flagged and s.ratio > 100
        assert int(s.top_channels[0]) == SPIKE_CHANNEL
        assert s.max_abs == pytest.approx(800, rel=0.01)
        top = {(int(w), int(p)) for w, p, c in s.top_tokens[: len(where)]}
        assert top == where and all(int(c) == SPIKE_CHANNEL for c in s.top_tokens[: len(where), 2])
        assert s.kurtosis > 50  # a few huge values among ~Gaussian ones
    assert not spikes["model.layers.0.mlp.gate_proj"].input.flagged  # post-attention norm rescales it
    assert clean["model.layers.0.self_attn.q_proj"].input.kurtosis < 10


def test_spike_statistics_match_direct_computation(calib_ids):
    model = make_llama()
    name = "model.layers.1.mlp.down_proj"
    xs, ys = [], []

    def keep(mod, args, out):
        xs.append(args[0][0])
        ys.append(out[0])

    h = model.get_submodule(name).register_forward_hook(keep)
    with torch.no_grad():
        for w in calib_ids:
            model(input_ids=w[None])
    h.remove()
    spikes = collect_spikes(model, [name], calibration_from_tokens(calib_ids), top_k=3)[name]
    for site, acts in ((spikes.input, xs), (spikes.output, ys)):
        X = torch.stack(acts).double()  # [windows, seq, channels]
        flat = X.reshape(-1, X.shape[-1])
        assert site.tokens == flat.shape[0]
        np.testing.assert_allclose(site.channel_max, flat.abs().amax(0).numpy(), rtol=1e-12)
        rms = flat.pow(2).mean(0).sqrt().numpy()
        np.testing.assert_allclose(site.channel_rms, rms, rtol=1e-6)  # squares formed in float32
        assert site.ratio == pytest.approx(float(flat.abs().max()) / float(np.median(rms)))
        v = flat.reshape(-1)
        kurt = float(((v - v.mean()) ** 4).mean() / v.var(unbiased=False) ** 2)
        assert site.kurtosis == pytest.approx(kurt, rel=1e-6)
        w, p, c = site.top_tokens[0]
        assert float(X[w, p].abs().max()) == pytest.approx(float(flat.abs().max()))
        assert int(X[w, p].abs().argmax()) == c


# ---- inter-layer dependencies ------------------------------------------------------------------------


def test_dataflow_graph_pairs_llama():
    model = make_llama()
    names = select_modules(model)
    g = dataflow_graph(model, names, torch.arange(8))
    rel = {(a, b): d["relation"] for a, b, d in g.edges(data=True)}
    p0, p1 = "model.layers.0.", "model.layers.1."
    assert rel[(p0 + "self_attn.q_proj", p0 + "self_attn.k_proj")] == "sibling"
    assert rel[(p0 + "mlp.gate_proj", p0 + "mlp.up_proj")] == "sibling"
    assert rel[(p0 + "self_attn.v_proj", p0 + "self_attn.o_proj")] == "sequential"
    assert rel[(p0 + "mlp.up_proj", p0 + "mlp.down_proj")] == "sequential"
    assert rel[(p0 + "mlp.down_proj", p1 + "self_attn.q_proj")] == "sequential"  # adjacent blocks
    assert (p0 + "self_attn.q_proj", p1 + "self_attn.q_proj") not in rel  # not touching: not a candidate
    assert len(rel) == 2 * 14 - 3  # per block: 3+1 siblings, 3+2+2 sequential, +3 into the next block
    pairs = candidate_pairs(g, blocks={1})
    assert {g.nodes[a]["block"] for a, _, _ in pairs} == {1} and len(pairs) == 11


def test_interaction_correction_is_joint_minus_singles(calib_ids):
    model = make_llama()
    names = select_modules(model)
    pairs = candidate_pairs(dataflow_graph(model, names, calib_ids[0]), blocks={0})[:4]
    opt = QuantOption.int_(2, 32, False)
    windows = calib_ids[:2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = measure_interactions(model, pairs, opt, windows)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights restored
    base = mean_nll(model, windows)
    for r in result:
        with quantized(model, {r.a: opt}):
            a = mean_nll(model, windows) - base
        with quantized(model, {r.b: opt}):
            b = mean_nll(model, windows) - base
        with quantized(model, {r.a: opt, r.b: opt}):
            joint = mean_nll(model, windows) - base
        assert r.single_a == pytest.approx(a, abs=1e-9) and r.single_b == pytest.approx(b, abs=1e-9)
        assert r.joint == pytest.approx(joint, abs=1e-9)
        assert r.correction == pytest.approx(joint - (a + b), abs=1e-9)
    assert any(abs(r.correction) > 1e-6 for r in result)
