"""Profile × options -> CandidateTable: storage bits and predicted loss increase per (group, option)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import quantizer_settings
from .models import weight_matrix
from .options import QuantOption
from .profile.statistics import ModuleStats
from .quantizers import measuring_quantizer, needs_hessian, quantize_weight_options
from .table import ERROR_MODELS, CandidateTable  # noqa: F401  (numpy-only home; re-exported here)
from .progress import steps


def option_error(weight: torch.Tensor, option: QuantOption, stats: ModuleStats, quantizer: str = "rtn",
                 supplied: bool = True) -> tuple[float, ...]:
    """Predicted loss increase under each of ERROR_MODELS (fisher, local, fisher-tw) of storing `weight` [out, in]
    as `option` with `quantizer`."""
    return option_errors(weight, [option], stats, quantizer, supplied)[0]


def option_errors(weight: torch.Tensor, options: list[QuantOption], stats: ModuleStats,
                  quantizer: str = "rtn", supplied: bool = True) -> list[tuple[float, ...]]:
    """option_error for several options of one weight (a Hessian quantizer shares its work across them).

    A Hessian-based quantizer (gptq) gets H = stats.hessian, the calibration inputs' second moment in
    the unquantized model; an embedding (no H: one-hot inputs) is always rounded to nearest. A quantizer
    measured by a stand-in (quantizers.measuring_quantizer; awq-gptq: awq) gets the stand-in's errors.
    supplied: H comes from text the user supplied, not the built-in set or the model's own (config.quantizer_settings).
    """
    quantizer = measuring_quantizer(quantizer)
    w = weight.detach().float()
    uses_h = needs_hessian(quantizer) and stats.hessian is not None
    quantized = quantize_weight_options(w, options, quantizer if uses_h else "rtn",
                                        hessian=stats.hessian if uses_h else None,
                                        **(quantizer_settings(quantizer, supplied) if uses_h else {}))
    return [_error(q.values - w, stats) for q in quantized]


def _error(dw: torch.Tensor, stats: ModuleStats) -> tuple[float, float, float]:
    """The ERROR_MODELS' predictions: ½ Σ_o F_o (ΔW H ΔWᵀ)_oo, Σ_o (ΔW H ΔWᵀ)_oo and ½ Σ_o (F_o/ΣF) (ΔW H_a ΔWᵀ)_oo
    (profile/statistics.py)."""
    if stats.hessian is None:  # embedding: one-hot inputs, so H is the diagonal of token shares; F is kept per
        dw2 = dw**2  # token id and dimension, so ½ Σ F ΔW² already weighs each token's own gradient (fisher-tw = fisher)
        fisher = 0.5 * float((stats.fisher * dw2).sum())
        return fisher, float((stats.token_share[:, None] * dw2).sum()), fisher
    per_row = ((dw @ stats.hessian) * dw).sum(dim=1)  # diag(ΔW H ΔWᵀ): [out]
    total = float(stats.fisher.sum())
    weighted = ((dw @ stats.grad_weighted_hessian) * dw).sum(dim=1)
    # no gradient reaches the module (total 0): its error cannot change the loss
    token_weighted = 0.5 * float(weighted @ stats.fisher) / total if total > 0 else 0.0
    return 0.5 * float(per_row @ stats.fisher), float(per_row.sum()), token_weighted


def build_candidate_table(
    model: nn.Module,
    module_names: list[str],
    stats: dict[str, ModuleStats],
    options: list[QuantOption],
    progress: bool = False,
    quantizer: str = "rtn",
    supplied: bool = True,
) -> CandidateTable:
    """Storage bits and predicted errors of every (module, option), with ΔW from `quantizer` (supplied: option_errors')."""
    shapes, bits_rows, err_rows = [], [], {m: [] for m in ERROR_MODELS}
    for name in steps(module_names, "candidate errors", show=progress, unit="module"):
        w = weight_matrix(model.get_submodule(name))
        out_f, in_f = w.shape
        shapes.append((int(out_f), int(in_f)))
        row_bits, row_err = [], {m: [] for m in ERROR_MODELS}
        fitting = [opt for opt in options if opt.fits(in_f)]
        errs = dict(zip(fitting, option_errors(w, fitting, stats[name], quantizer, supplied)))
        for opt in options:
            if opt not in errs:
                row_bits.append(np.nan)
                for m in ERROR_MODELS:
                    row_err[m].append(np.nan)
                continue
            row_bits.append(float(opt.storage_bits(out_f, in_f)))
            for m, value in zip(ERROR_MODELS, errs[opt]):
                row_err[m].append(value)
        bits_rows.append(row_bits)
        for m in ERROR_MODELS:
            err_rows[m].append(row_err[m])
    return CandidateTable(
        groups=list(module_names),
        shapes=shapes,
        options=list(options),
        storage_bits=np.asarray(bits_rows, dtype=np.float64),
        errors={m: np.asarray(v, dtype=np.float64) for m, v in err_rows.items()},
        quantizer=quantizer,
    )
