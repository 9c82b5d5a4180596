"""Calibration statistics (H, Fisher) and the candidate errors built from them, against brute force."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bitalloc.calibration import calibration_from_tokens
from bitalloc.candidates import build_candidate_table, option_error
from bitalloc.formats import quantize_dequantize
from bitalloc.models import select_modules, weight_matrix
from bitalloc.options import QuantOption
from bitalloc.profile.statistics import collect_statistics

from conftest import make_gpt2, make_llama, make_opt


def brute_force_stats(model: nn.Module, names: list[str], ids: torch.Tensor):
    """H = mean x xᵀ over every calibration position; F = mean over predicted tokens of (∂L/∂y)²,
    H_a = mean over predicted tokens of ‖∂L/∂y_t‖² x_t x_tᵀ, L the summed next-token NLL of the window,
    all accumulated over all windows (float64)."""
    mods = {n: model.get_submodule(n) for n in names}
    xtx = {n: 0.0 for n in names}
    g2 = {n: 0.0 for n in names}
    weighted = {n: 0.0 for n in names}
    positions = predicted = 0
    for window in ids:
        inputs, outputs = {}, {}
        hooks = []
        for n, m in mods.items():
            def hook(mod, args, out, n=n):
                inputs[n] = args[0].detach()
                out.retain_grad()
                outputs[n] = out
            hooks.append(m.register_forward_hook(hook))
        try:
            logits = model(input_ids=window[None]).logits
            loss = nn.functional.cross_entropy(logits[0, :-1], window[1:], reduction="sum")
            model.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            for h in hooks:
                h.remove()
        for n in names:
            x = inputs[n].reshape(-1, inputs[n].shape[-1]).double()
            xtx[n] = xtx[n] + x.T @ x
            g = outputs[n].grad.reshape(-1, outputs[n].shape[-1]).double()
            g2[n] = g2[n] + (g**2).sum(0)
            weighted[n] = weighted[n] + sum((g[t] ** 2).sum() * torch.outer(x[t], x[t]) for t in range(len(x)))
        positions += window.numel()
        predicted += window.numel() - 1
    return ({n: xtx[n] / positions for n in names}, {n: g2[n] / predicted for n in names},
            {n: weighted[n] / predicted for n in names})


@pytest.mark.parametrize("make", [make_llama, make_gpt2, make_opt], ids=["llama", "gpt2", "opt"])
def test_statistics_match_brute_force(make, calib_ids):
    model = make()
    names = select_modules(model)
    stats = collect_statistics(model, names, calibration_from_tokens(calib_ids))
    H, F, H_a = brute_force_stats(make(), names, calib_ids)
    assert set(stats) == set(names)
    for n in names:
        w = weight_matrix(model.get_submodule(n))
        out_f, in_f = w.shape
        s = stats[n]
        assert s.hessian.shape == (in_f, in_f) and s.fisher.shape == (out_f,)
        assert s.token_share is None
        torch.testing.assert_close(s.hessian.double(), H[n], rtol=1e-4, atol=1e-6 * float(H[n].abs().max()))
        torch.testing.assert_close(s.fisher.double(), F[n], rtol=1e-3, atol=1e-5 * float(F[n].abs().max()))
        torch.testing.assert_close(s.grad_weighted_hessian.double(), H_a[n], rtol=1e-3,
                                   atol=1e-5 * float(H_a[n].abs().max()))
        # not H times a constant: tokens' gradient sizes vary, and with their inputs
        ratio = H_a[n].diagonal() / H[n].diagonal()
        assert float(ratio.max() / ratio.min()) > 1.05
        assert float(F[n].max()) > 0 and float(torch.linalg.eigvalsh(H[n]).max()) > 0


def test_qkv_and_gate_up_share_h(calib_ids):
    model = make_llama()
    names = select_modules(model)
    stats = collect_statistics(model, names, calibration_from_tokens(calib_ids))
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        q, k, v = (stats[p + f"self_attn.{x}_proj"].hessian for x in "qkv")
        assert torch.equal(q, k) and torch.equal(q, v)
        gate, up = stats[p + "mlp.gate_proj"].hessian, stats[p + "mlp.up_proj"].hessian
        assert torch.equal(gate, up)
        # different inputs -> different H
        assert not torch.allclose(q, stats[p + "self_attn.o_proj"].hessian)
        assert not torch.allclose(q, gate)
        # but the Fisher is per output, so q and k differ
        assert not torch.allclose(stats[p + "self_attn.q_proj"].fisher[:32], stats[p + "self_attn.k_proj"].fisher)


def test_statistics_leave_model_as_found(calib_ids):
    model = make_llama()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    collect_statistics(model, select_modules(model), calibration_from_tokens(calib_ids))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_statistics_scale_with_window_count(calib_ids):
    # H and F are means: repeating the same windows twice gives the same statistics
    model = make_llama()
    names = select_modules(model)[:3]
    once = collect_statistics(model, names, calibration_from_tokens(calib_ids))
    twice = collect_statistics(model, names, calibration_from_tokens(torch.cat([calib_ids, calib_ids])))
    for n in names:
        h_tol = 1e-6 * float(once[n].hessian.abs().max())
        torch.testing.assert_close(once[n].hessian, twice[n].hessian, rtol=1e-5, atol=h_tol)
        torch.testing.assert_close(once[n].fisher, twice[n].fisher, rtol=1e-5, atol=1e-7 * float(once[n].fisher.max()))


@pytest.mark.parametrize("option", [QuantOption.int_(2, 32, False), QuantOption.int_(4, 64, True),
                                    QuantOption.int_(8, None, False), QuantOption.keep()], ids=lambda o: o.label)
def test_option_error_matches_direct_formula(option, calib_ids):
    model = make_llama()
    name = "model.layers.1.mlp.down_proj"
    stats = collect_statistics(model, [name], calibration_from_tokens(calib_ids))[name]
    w = weight_matrix(model.get_submodule(name)).detach()
    fisher, local, token_weighted = option_error(w, option, stats)
    dw = (quantize_dequantize(w, option) - w).double()
    H, F, H_a = stats.hessian.double(), stats.fisher.double(), stats.grad_weighted_hessian.double()
    M = dw @ H @ dw.T
    assert local == pytest.approx(float(torch.trace(M)), rel=1e-5)
    assert fisher == pytest.approx(0.5 * float((F * torch.diagonal(M)).sum()), rel=1e-5)
    # ½ Σ_o (F_o/ΣF) (ΔW H_a ΔWᵀ)_oo: each token weighted by its gradient, each row by its share of F
    assert token_weighted == pytest.approx(0.5 * float((F * torch.diagonal(dw @ H_a @ dw.T)).sum() / F.sum()), rel=1e-5)
    assert local > 0 and fisher > 0 and token_weighted > 0
    assert abs(token_weighted - fisher) > 1e-3 * fisher  # the weighting changes the prediction


def test_candidate_table_rows_match_option_error(calib_ids):
    model = make_gpt2()
    names = select_modules(model)
    stats = collect_statistics(model, names, calibration_from_tokens(calib_ids))
    options = [QuantOption.int_(3, 128, False), QuantOption.int_(4, 64, True), QuantOption.keep()]
    table = build_candidate_table(model, names, stats, options)
    assert table.groups == names
    assert table.num_weights == sum(o * i for o, i in table.shapes)
    for g, n in enumerate(names):
        w = weight_matrix(model.get_submodule(n))
        out_f, in_f = table.shapes[g]
        assert (out_f, in_f) == tuple(w.shape)
        for k, opt in enumerate(options):
            if not opt.fits(in_f):  # group 128 does not divide in=64
                assert not table.allowed[g, k]
                continue
            assert table.storage_bits[g, k] == opt.storage_bits(out_f, in_f)
            fisher, local, token_weighted = option_error(w, opt, stats[n])
            assert table.errors["fisher"][g, k] == fisher and table.errors["local"][g, k] == local
            assert table.errors["fisher-tw"][g, k] == token_weighted
    # in=64 rows cannot use g128; the c_proj of the MLP (in=256) can
    assert not table.allowed[names.index("transformer.h.0.attn.c_attn"), 0]
    assert table.allowed[names.index("transformer.h.0.mlp.c_proj"), 0]
    # more bits -> less predicted error, everywhere it is allowed
    e = table.errors["fisher"]
    assert (e[:, 1] > e[:, 2]).all()
