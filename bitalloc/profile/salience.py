"""Weight salience (SliM-LLM, Huang et al. 2024, §3.2) per element, aggregated per group, and how clustered it is.

Two element saliences for W [out, in] with H = mean x xᵀ [in, in] from calibration:
  hessian:    δ_ij = w_ij² / [H_d⁻¹]_jj²   (SliM-LLM eq. 5; H_d = H + damp·mean(diag H)·I, GPTQ's damping,
                                            so a dead input channel does not make H singular)
  activation: a_ij = |w_ij| · ‖x_j‖        (‖x_j‖ as an RMS over calibration tokens, √H_jj, so values do
                                            not grow with the calibration size)
SliM-LLM observes that salience concentrates in a few input channels (those with outlier activations);
the clustering numbers say how much: the share of all salience in the top 1% of input columns and the
Gini coefficient of the per-column salience (0 = even, → 1 = all in one column).
"""

from __future__ import annotations


import numpy as np
import torch

from .records import Salience


def element_salience(weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """{kind: [out, in]} element saliences (float64) of weight [out, in] under H [in, in]."""
    w = weight.detach().double()
    H = hessian.detach().double()
    diag = torch.diagonal(H)
    Hd = H + damp * float(diag.mean().clamp_min(1e-12)) * torch.eye(H.shape[0], dtype=H.dtype)
    hinv_diag = torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(Hd)))
    return {
        "hessian": w**2 / hinv_diag[None, :] ** 2,
        "activation": w.abs() * diag.clamp_min(0).sqrt()[None, :],
    }


def salience(weight: torch.Tensor, hessian: torch.Tensor, *, group_rows: int = 64, group_cols: int = 128,
             damp: float = 0.01) -> Salience:
    """Aggregate element salience per input column and per (row block, column group); last groups may be partial."""
    column, groups, top, gini = {}, {}, {}, {}
    for kind, s in element_salience(weight, hessian, damp).items():
        col = s.sum(dim=0).numpy()
        column[kind] = col
        groups[kind] = _block_sums(s.numpy(), group_rows, group_cols)
        top[kind] = top_share(col, 0.01)
        gini[kind] = gini_coefficient(col)
    return Salience(group_rows=group_rows, group_cols=group_cols, column=column, groups=groups,
                    top1pct_share=top, gini=gini)


def _block_sums(s: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out_f, in_f = s.shape
    r, c = -(-out_f // rows), -(-in_f // cols)
    padded = np.zeros((r * rows, c * cols))
    padded[:out_f, :in_f] = s
    return padded.reshape(r, rows, c, cols).sum(axis=(1, 3))


def top_share(values: np.ndarray, fraction: float) -> float:
    """Share of the sum held by the largest ceil(fraction·n) entries (at least one)."""
    total = float(values.sum())
    if total <= 0:
        return 0.0
    k = max(1, int(np.ceil(fraction * values.size)))
    return float(np.sort(values)[::-1][:k].sum() / total)


def gini_coefficient(values: np.ndarray) -> float:
    """Gini of non-negative values: Σ_i (2i − n − 1)·x_(i) / (n·Σx), x sorted ascending, i from 1."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = x.size, float(x.sum())
    if n == 0 or total <= 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * x).sum() / (n * total))
