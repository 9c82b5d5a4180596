"""A true objective for search solvers: the model's loss with an assignment applied.

`CalibrationScore(choice)` swaps each planned module's weight for its quantize-dequantize value
under the chosen option (in place: no copy of the model), measures the mean next-token NLL on a
small calibration slice, and leaves the weights swapped; `restore()` (or leaving the `with`
block) puts the originals back. Quantized weights are cached per (module, option), so a trial
costs about one forward pass over the slice.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import setting
from .table import CandidateTable
from .models import set_weight_matrix, weight_matrix
from .quantizers import check_without_hessian, importance_only, measuring_quantizer, weight_values


class CalibrationScore:
    def __init__(self, model: nn.Module, table: CandidateTable, tokens: torch.Tensor, cache_bytes: float = 2e9,
                 importance_tokens: torch.Tensor | None = None):
        """tokens: [windows, seq_len] calibration ids (never the evaluation text).

        Trials hold the weights of the quantizer that measured the table (rtn, rtn-mse, rtn-w; awq for an
        awq-gptq table: quantizers.measuring_quantizer); a sequential Hessian quantizer (gptq) is refused up
        front, since a trial has no layer inputs to run it on.
        importance_tokens: the windows the table was profiled on (default `tokens`); an rtn-w table's
        trials take diag H from them on the unquantized model, so they hold the table's weights.
        """
        self.quantizer = measuring_quantizer(table.quantizer)
        check_without_hessian(self.quantizer, "scoring plans on the model (evolutionary solver)",
                              f"plan with the ilp, lagrangian or dp solver, or profile with {setting('quantizer')} rtn")
        self.model, self.table, self.tokens = model, table, tokens
        self.modules = [model.get_submodule(n) for n in table.groups]
        self.original = [weight_matrix(m).detach().clone() for m in self.modules]
        self.importance: dict[str, torch.Tensor | None] = {}
        if importance_only(self.quantizer):
            from .profile.statistics import input_importance

            self.importance = input_importance(model, list(table.groups), tokens if importance_tokens is None
                                               else importance_tokens)
        self.current = [-1] * len(self.modules)  # option loaded per module; -1 = original
        self.cache: dict[tuple[int, int], torch.Tensor] = {}
        self.cache_bytes, self.cached_bytes = cache_bytes, 0
        self.description = f"mean NLL on {tokens.shape[0]}x{tokens.shape[1]} calibration tokens"
        self.calls = 0

    def __call__(self, choice: np.ndarray) -> float:
        self.load(choice)
        self.calls += 1
        return mean_nll(self.model, self.tokens)

    def load(self, choice: np.ndarray) -> None:
        """Swap every module's weight to its chosen option; -1 = the original weight."""
        for g, k in enumerate(np.asarray(choice, dtype=np.int64).tolist()):
            if self.current[g] != k:
                set_weight_matrix(self.modules[g], self.original[g] if k == -1 else self._quantized(g, k))
                self.current[g] = k

    def _quantized(self, g: int, k: int) -> torch.Tensor:
        if (g, k) in self.cache:
            return self.cache[g, k]
        w = weight_values(self.original[g], self.table.options[k], self.quantizer,
                          self.importance.get(self.table.groups[g]))
        size = w.numel() * w.element_size()
        if self.cached_bytes + size <= self.cache_bytes:
            self.cache[g, k] = w
            self.cached_bytes += size
        return w

    def restore(self) -> None:
        for g, m in enumerate(self.modules):
            if self.current[g] != -1:
                set_weight_matrix(m, self.original[g])
                self.current[g] = -1

    def __enter__(self) -> "CalibrationScore":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


@torch.no_grad()
def mean_nll(model: nn.Module, tokens: torch.Tensor) -> float:
    """Mean next-token NLL over every token after the first of each window."""
    total, n = 0.0, 0
    for w in tokens:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        n += w.numel() - 1
    return total / n
