"""bench/gptq_corrections.py: the two closed-form corrections remove what they should, and nothing they should not."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from gptq_corrections import bias_ratio, norm_refit_ratio, output_error  # noqa: E402


def _inputs(tokens: int, width: int, mean: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, width, generator=g, dtype=torch.float64) + mean * torch.linspace(-1, 1, width, dtype=torch.float64)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / len(x)


def test_a_column_rescaling_is_undone_by_the_norm_refit_and_noise_is_not():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    scaled = w / torch.linspace(0.8, 1.25, 32, dtype=torch.float64)  # what a wrong norm weight would do
    h_fit, h_test = _hessian(_inputs(2048, 32, 0.5, 1)), _hessian(_inputs(2048, 32, 0.5, 2))
    assert norm_refit_ratio(w, scaled, h_fit, h_test) < 1e-6
    noisy = w + 0.1 * torch.randn(48, 32, generator=g, dtype=torch.float64)
    assert norm_refit_ratio(w, noisy, h_fit, h_test) > 0.9  # random rounding noise has no per-column scale to fix


def test_the_bias_removes_exactly_the_mean_inputs_share_of_the_error():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(16, 32, generator=g, dtype=torch.float64)
    fit, test = _inputs(4096, 32, 2.0, 4), _inputs(4096, 32, 2.0, 5)
    h_test, mu_test = _hessian(test), test.mean(0)
    ratio = bias_ratio(delta, mu_test, mu_test, h_test)  # fitted on the test mean itself: the exact optimum
    centred = output_error(delta, h_test - torch.outer(mu_test, mu_test))
    assert abs(ratio - centred / output_error(delta, h_test)) < 1e-9 and ratio < 0.5
    # fitted on other windows it removes almost as much, never more than the optimum
    held_out = bias_ratio(delta, fit.mean(0), mu_test, h_test)
    assert ratio <= held_out < ratio + 0.02
