"""The empirical-Fisher trace: what `--stream` records as `trace` (settings `trace_estimator: "empirical-fisher"`).

The Hutchinson trace (hessian_trace.py) needs Hessian-vector products through the whole model, which a
walk holding one block cannot form. From the per-token output gradient g_t = ∂L/∂y_t [out] and input
x_t [in] that the streamed backward already sees, we take instead the trace of the empirical Fisher
with tokens as samples:

    tr F(W) = 1/N Σ_t ‖g_t x_tᵀ‖²_F = 1/N Σ_t ‖g_t‖² ‖x_t‖²,   per row i: 1/N Σ_t g_{t,i}² ‖x_t‖²

with N the predicted tokens, the scale of the Hutchinson trace of the *mean* NLL: ∇²(1/N Σ_n ℓ_n) is
1/N Σ_n ∇²ℓ_n, and each ∇²ℓ_n is stood in for by ∇ℓ_n ∇ℓ_nᵀ. For an embedding (one-hot inputs,
‖x_t‖ = 1) row v gets 1/N Σ_{t: id_t = v} ‖g_t‖².

Why this is an approximation, and of what:
  - For NLL under a softmax, the Gauss–Newton matrix equals the Fisher E_{y~p_θ}[∇ℓ ∇ℓᵀ], where the
    label is drawn from the model's own predictive. The empirical Fisher uses the data's labels; the
    two agree only in expectation when the data follow the model, and the GN/Fisher drops the
    residual term of the Hessian (Kunstner et al. 2019, "Limitations of the empirical Fisher").
    It is never negative, unlike the Hessian's trace away from a minimum.
  - Tokens are taken as independent samples: g_t is the gradient of the window's summed loss at
    position t (every later token's loss reaches it through attention), and the cross terms
    Σ_{s≠t} ⟨g_s x_sᵀ, g_t x_tᵀ⟩ of the window's full weight gradient are dropped.
  - Tied weights (embedding + head) get each use's own trace, not the shared parameter's.
So it ranks layers the way the Hessian trace does only as far as bench/streamed_signals.py measures
(Spearman rank correlation per module, bench/out/streamed_signals.json).

The estimate is kept as a records.TraceEstimate with one "probe" per calibration window (that
window's trace), so its standard error is the window-to-window spread, as for Hutchinson's rounds.
"""

from __future__ import annotations

import numpy as np
import torch

from .records import TraceEstimate


def row_sums(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_t g_{t,i}² ‖x_t‖² per output row i [out]; x: [tokens, in] layer inputs, g: [tokens, out] ∂L/∂y."""
    # float32 products (a head chunk's g is [tokens, vocab]); the caller sums windows in float64
    x_sq = (x.float() ** 2).sum(-1)  # [tokens]
    return (x_sq @ (g.float() ** 2)).double()  # [out]


def fisher_trace_estimate(per_window: torch.Tensor, numel: int, group_rows: int) -> TraceEstimate:
    """The TraceEstimate of per-window row traces [windows, out] (each already divided by its window's
    predicted tokens) of a weight with `numel` elements."""
    rows = per_window.double().numpy()
    totals = rows.sum(1)  # [windows]: each window's trace
    pad = -rows.shape[1] % group_rows
    groups = np.pad(rows.sum(0), (0, pad)).reshape(-1, group_rows).sum(1)
    return TraceEstimate(numel=numel, group_rows=group_rows, probes=int(rows.shape[0]), total=float(totals.sum()),
                         total_sq=float((totals**2).sum()), group_total=groups)
