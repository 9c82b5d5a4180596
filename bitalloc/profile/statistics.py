"""Second-order statistics per planned module from calibration passes (forward + backward).

For a linear layer Y = X Wᵀ we keep
  H = mean_t x_t x_tᵀ            [in, in]   (input second moment; GPTQ's Hessian up to a factor 2)
  F = mean_t (∂L/∂y_t)²          [out]      (diagonal empirical Fisher of the layer output)
where L is the summed next-token NLL, so ∂L/∂y_t is the per-token loss gradient. With both, the
loss increase of a weight perturbation ΔW is predicted as ½ Σ_o F_o (ΔW H ΔWᵀ)_oo — the
output-Fisher-weighted error of BRECQ (Li et al., 2021, eq. 10) under a diagonal output Fisher.
For an embedding (one-hot inputs) H is diagonal, so we keep per-token-id sums instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from ..calibration import Calibration
from ..errors import NonFiniteError
from ..progress import steps


@dataclass
class ModuleStats:
    """hessian: [in, in] mean x xᵀ (linear) or None; fisher: [out] (linear) or [vocab, hidden] (embedding);
    token_share: [vocab] fraction of inputs that are each token id (embedding only);
    fisher_trace: [windows, out rows] each window's empirical-Fisher trace per row (fisher_trace.py),
    only from the streamed walk when asked for."""

    fisher: torch.Tensor
    hessian: torch.Tensor | None = None
    token_share: torch.Tensor | None = None
    fisher_trace: torch.Tensor | None = None


@dataclass
class StatisticSums:
    """What collect_statistics averages, still as sums: per module a ModuleStats whose fields hold
    Σ (∂L/∂y)², Σ x xᵀ and Σ token-id counts, and the token counts the means divide by.

    Sums over disjoint calibration windows add field by field (profile/distributed.py reduces shards so).
    """

    modules: dict[str, ModuleStats]
    n_inputs: int  # tokens fed in: what hessian and token_share are averaged over
    n_predicted: int  # tokens with a next token: what fisher is averaged over


# The count each ModuleStats field is a mean over; a new summed field adds its entry here. None: a
# field already kept per calibration window (rows [windows, ...]), which shards concatenate in order.
DIVIDE_BY = {"fisher": "n_predicted", "hessian": "n_inputs", "token_share": "n_inputs", "fisher_trace": None}


def collect_statistics(
    model: nn.Module, module_names: list[str], calibration: Calibration, progress: bool = False
) -> dict[str, ModuleStats]:
    return finish_statistics(statistic_sums(model, module_names, calibration, progress=progress))


def statistic_sums(
    model: nn.Module, module_names: list[str], calibration: Calibration, progress: bool = False
) -> StatisticSums:
    """The sums behind collect_statistics, accumulated window by window in calibration order."""
    modules = {n: model.get_submodule(n) for n in module_names}
    xtx: dict[str, torch.Tensor] = {}
    grad_sq: dict[str, torch.Tensor] = {}
    id_counts: dict[str, torch.Tensor] = {}
    window_inputs: dict[str, torch.Tensor] = {}
    handles = []

    def on_forward(name: str):
        def hook(mod, args, output):
            x = args[0]
            if isinstance(mod, nn.Embedding):
                ids = x.reshape(-1)
                counts = torch.bincount(ids, minlength=mod.num_embeddings).float()
                id_counts[name] = id_counts.get(name, 0) + counts

                def on_grad(g, ids=ids, name=name, n=mod.num_embeddings):
                    g2 = g.detach().float().reshape(-1, g.shape[-1]) ** 2
                    acc = grad_sq.setdefault(name, torch.zeros(n, g.shape[-1]))
                    acc.index_add_(0, ids, g2)
            else:
                window_inputs[name] = x.detach().reshape(-1, x.shape[-1])

                def on_grad(g, name=name):
                    g2 = (g.detach().float() ** 2).reshape(-1, g.shape[-1]).sum(0)
                    grad_sq[name] = grad_sq[name] + g2 if name in grad_sq else g2

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    # Parameters need no gradients; activations do, so make the embedding output require grad.
    # Registered first: hooks run in order, and a planned embedding's own hook needs the flag set.
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        handles.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    for name, mod in modules.items():
        handles.append(mod.register_forward_hook(on_forward(name)))
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)

    n_inputs = 0
    n_predicted = 0
    try:
        for window in steps(calibration.tokens, "calibration windows", show=progress, unit="win"):
            window_inputs.clear()
            ids = window[None]
            logits = model(input_ids=ids).logits
            loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            loss.backward()
            _accumulate_xtx(window_inputs, xtx)
            n_inputs += ids.shape[1]
            n_predicted += ids.shape[1] - 1
            del logits, loss
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)

    sums = {}
    for name, mod in modules.items():
        if name not in grad_sq:
            raise RuntimeError(f"module {name} received no gradient during calibration; is it used in forward?")
        if isinstance(mod, nn.Embedding):
            sums[name] = ModuleStats(fisher=grad_sq[name], token_share=id_counts[name])
        else:
            sums[name] = ModuleStats(fisher=grad_sq[name], hessian=xtx[name])
    return StatisticSums(modules=sums, n_inputs=n_inputs, n_predicted=n_predicted)


def finish_statistics(sums: StatisticSums) -> dict[str, ModuleStats]:
    """Means from sums (each field divided by its DIVIDE_BY count), checked finite."""
    stats = {}
    for name, s in sums.modules.items():
        means = {f.name: t if (t := getattr(s, f.name)) is None or DIVIDE_BY[f.name] is None
                 else t / getattr(sums, DIVIDE_BY[f.name]) for f in fields(ModuleStats)}
        stats[name] = check_finite_stats(name, ModuleStats(**means))
    return stats


class ImportanceSums:
    """input_importance's running sums, Σ over windows of diag(XᵀX) per planned linear, fed by forward hooks
    one window at a time (end_window after each); a streamed walk feeds it block by block."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.window_inputs: dict[str, torch.Tensor] = {}
        self.diag: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def hooked(self):
        def hook(name: str):
            def grab(mod, args, output):
                self.window_inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])
            return grab

        handles = [mod.register_forward_hook(hook(n)) for n, mod in self.modules.items()
                   if not isinstance(mod, nn.Embedding)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def end_window(self) -> None:
        window_xtx: dict[str, torch.Tensor] = {}
        _accumulate_xtx(self.window_inputs, window_xtx)
        for n, prod in window_xtx.items():
            d = torch.diagonal(prod)
            self.diag[n] = self.diag[n] + d if n in self.diag else d.clone()
        self.window_inputs.clear()

    def finish(self, n_inputs: int) -> dict[str, torch.Tensor | None]:
        """diag H per module (None for an embedding): the sums over `n_inputs` tokens."""
        result: dict[str, torch.Tensor | None] = {}
        for n, mod in self.modules.items():
            if isinstance(mod, nn.Embedding):
                result[n] = None
                continue
            if n not in self.diag:
                raise RuntimeError(f"module {n} saw no input during calibration; is it used in forward?")
            result[n] = self.diag[n] / n_inputs
            refuse_non_finite(n, "input importance", result[n])
        return result


@torch.no_grad()
def input_importance(model: nn.Module, module_names: list[str], windows: torch.Tensor,
                     progress: bool = False) -> dict[str, torch.Tensor | None]:
    """diag H [in] per planned linear (None for an embedding) from forward passes over `windows` [n, seq_len].

    What importance-weighted quantizers (rtn-w) need at apply time. It is the diagonal of the H that
    collect_statistics gives on the same windows, bit for bit: the same per-window XᵀX products summed
    in the same order and divided by the same count (a diagonal of a sum is the sum of the diagonals,
    element by element), so an applied weight is exactly the one whose error the candidate table holds.
    Forward only: no gradients, and only [in] per module is kept.
    """
    sums = ImportanceSums({n: model.get_submodule(n) for n in module_names})
    n_inputs = 0
    with sums.hooked():
        for window in steps(windows, "input importance", show=progress, unit="win"):
            model(input_ids=window[None])
            sums.end_window()
            n_inputs += window.shape[0]
    return sums.finish(n_inputs)


def check_finite_stats(name: str, stats: ModuleStats) -> ModuleStats:
    """Refuse NaN/Inf fisher, hessian or token_share of one module (refuse_non_finite)."""
    for signal in ("fisher", "hessian", "token_share", "fisher_trace"):
        t = getattr(stats, signal)
        if t is not None:
            refuse_non_finite(name, signal, t)
    return stats


def refuse_non_finite(name: str, signal: str, values: torch.Tensor | np.ndarray | float) -> None:
    """Refuse NaN/Inf statistics, naming module and signal: every error computed from them would be garbage."""
    if isinstance(values, torch.Tensor):
        bad = int((~torch.isfinite(values)).sum())
    else:
        bad = int((~np.isfinite(np.asarray(values, dtype=np.float64))).sum())
    if bad:
        raise NonFiniteError(f"statistics of {name}: {signal} is not finite ({bad} NaN/Inf value(s)); the calibration "
                             "forward or backward overflowed: check the weights for NaN/Inf and calibrate in float32")


def _accumulate_xtx(window_inputs: dict[str, torch.Tensor], xtx: dict[str, torch.Tensor]) -> None:
    # q/k/v (and gate/up) read the same tensor: form XᵀX once per distinct input.
    # The stored views keep their storage alive, so equal (pointer, shape) means the same tensor.
    by_input: dict[tuple, list[str]] = {}
    for name, x in window_inputs.items():
        by_input.setdefault((x.data_ptr(), tuple(x.shape)), []).append(name)
    for names in by_input.values():
        x = window_inputs[names[0]].float()
        prod = x.T @ x
        for n in names:
            if n in xtx:
                xtx[n] += prod
            else:
                xtx[n] = prod.clone()

