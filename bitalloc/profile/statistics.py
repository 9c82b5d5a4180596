"""Second-order statistics per planned module from calibration passes (forward + backward).

For a linear layer Y = X Wᵀ we keep
  H   = mean_t x_t x_tᵀ              [in, in]   (input second moment; GPTQ's Hessian up to a factor 2)
  F   = mean_t (∂L/∂y_t)²            [out]      (diagonal empirical Fisher of the layer output)
  H_a = mean_t a_t x_t x_tᵀ          [in, in]   (a_t = ‖∂L/∂y_t‖², each token weighted by its gradient)
where L is the summed next-token NLL, so ∂L/∂y_t is the per-token loss gradient. The loss increase of a
weight perturbation ΔW is ½ Σ_t Σ_o g_to² (Δw_o·x_t)² under a diagonal output Fisher (BRECQ, Li et al.
2021, eq. 10). Taking a token's gradient as independent of its input gives ½ Σ_o F_o (ΔW H ΔWᵀ)_oo, the
"fisher" error model (candidates.py, the default); splitting g_to² ≈ a_t · F_o/ΣF instead (rank 1: each
token's size times each row's share) gives ½ Σ_o (F_o/ΣF) (ΔW H_a ΔWᵀ)_oo, "fisher-tw". The split keeps
the link between a token's input and its gradient that H loses: SmolLM2's massive activations sit on
tokens whose gradient is tiny, and under "fisher" some modules' errors are overrated ten-fold
(bench/error_model_diagnosis.py; bench/sensitivity.py --rescore compares both on single-module ablations).
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
from ..models import forward_hooks
from ..progress import steps
from .fisher_trace import row_sums


@dataclass
class ModuleStats:
    """hessian: [in, in] mean x xᵀ (linear) or None; fisher: [out] (linear) or [vocab, hidden] (embedding);
    grad_weighted_hessian: [in, in] mean_t ‖∂L/∂y_t‖² x_t x_tᵀ (linear only: H_a of the module docstring);
    token_share: [vocab] fraction of inputs that are each token id (embedding only);
    fisher_trace: [windows, out rows] each window's empirical-Fisher trace per row (fisher_trace.py),
    only from the streamed walk when asked for."""

    fisher: torch.Tensor
    hessian: torch.Tensor | None = None
    token_share: torch.Tensor | None = None
    fisher_trace: torch.Tensor | None = None
    grad_weighted_hessian: torch.Tensor | None = None


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
DIVIDE_BY = {"fisher": "n_predicted", "hessian": "n_inputs", "token_share": "n_inputs", "fisher_trace": None,
             "grad_weighted_hessian": "n_predicted"}


def collect_statistics(
    model: nn.Module, module_names: list[str], calibration: Calibration, progress: bool = False
) -> dict[str, ModuleStats]:
    return finish_statistics(statistic_sums(model, module_names, calibration, progress=progress))


def statistic_sums(
    model: nn.Module, module_names: list[str], calibration: Calibration, progress: bool = False
) -> StatisticSums:
    """The sums behind collect_statistics, accumulated window by window in calibration order."""
    modules = {n: model.get_submodule(n) for n in module_names}
    acc = StatisticAccumulator()
    n_inputs = 0
    n_predicted = 0
    # entered first: hooks run in order, and a planned embedding's own hook needs the flag set
    with activation_gradients(model), acc.hooked(modules):
        for window in steps(calibration.tokens, "calibration windows", show=progress, unit="win"):
            ids = window[None]
            logits = model(input_ids=ids).logits
            loss = nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
            loss.backward()
            acc.end_pass()
            n_inputs += ids.shape[1]
            n_predicted += ids.shape[1] - 1
            del logits, loss
    return StatisticSums(modules={n: acc.pop_sums(n, m) for n, m in modules.items()},
                         n_inputs=n_inputs, n_predicted=n_predicted)


class StatisticAccumulator:
    """Running sums of every ModuleStats field per planned module, fed by forward hooks (inputs) and the
    gradient hooks they register on the outputs; end_pass after each backward. Both walks use it: the
    whole model (statistic_sums) and one block at a time (streamed.py), so their sums agree.
    fisher_trace: also Σ_t g_{t,i}² ‖x_t‖² per row and per calibration window (`window`, set by the walk)."""

    def __init__(self, fisher_trace: bool = False):
        self.xtx: dict[str, torch.Tensor] = {}
        self.weighted_xtx: dict[str, torch.Tensor] = {}
        self.grad_sq: dict[str, torch.Tensor] = {}
        self.id_counts: dict[str, torch.Tensor] = {}
        self.window_inputs: dict[str, torch.Tensor] = {}
        self.fisher_trace = fisher_trace
        self.trace_rows: dict[str, dict[int, torch.Tensor]] = {}
        self.window = 0

    def hooked(self, modules: dict[str, nn.Module]) -> contextlib.AbstractContextManager:
        return forward_hooks((mod, self._hook(name)) for name, mod in modules.items())

    def end_pass(self) -> None:
        _accumulate_xtx(self.window_inputs, self.xtx)
        self.window_inputs.clear()

    def pop_sums(self, name: str, module: nn.Module) -> ModuleStats:
        """The module's sums (fisher_trace per window, still summed over each window's tokens), dropped here."""
        if name not in self.grad_sq:
            raise RuntimeError(f"module {name} received no gradient during calibration; is it used in forward?")
        trace = None
        if self.fisher_trace:
            rows = self.trace_rows.pop(name)
            trace = torch.stack([rows[w] for w in sorted(rows)])
        if isinstance(module, nn.Embedding):
            return ModuleStats(fisher=self.grad_sq.pop(name), token_share=self.id_counts.pop(name), fisher_trace=trace)
        return ModuleStats(fisher=self.grad_sq.pop(name), hessian=self.xtx.pop(name), fisher_trace=trace,
                           grad_weighted_hessian=self.weighted_xtx.pop(name))

    def _add(self, sums: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        sums[name] = sums[name] + value if name in sums else value

    def _add_trace(self, name: str, rows: torch.Tensor) -> None:
        per_window = self.trace_rows.setdefault(name, {})
        per_window[self.window] = per_window[self.window] + rows if self.window in per_window else rows

    def _hook(self, name: str):
        def hook(mod, args, output):
            x = args[0]
            if isinstance(mod, nn.Embedding):
                ids = x.reshape(-1)
                self._add(self.id_counts, name, torch.bincount(ids, minlength=mod.num_embeddings).float())

                def on_grad(g, ids=ids, n=mod.num_embeddings):
                    g2 = g.detach().float().reshape(-1, g.shape[-1]) ** 2
                    self.grad_sq.setdefault(name, torch.zeros(n, g.shape[-1])).index_add_(0, ids, g2)
                    if self.fisher_trace:  # one-hot inputs: ‖x_t‖ = 1, row = token id
                        self._add_trace(name, torch.zeros(n, dtype=torch.float64).index_add_(0, ids, g2.sum(1).double()))
            else:
                self.window_inputs[name] = x_in = x.detach().reshape(-1, x.shape[-1])

                def on_grad(g, x_in=x_in):
                    g = g.detach().reshape(-1, g.shape[-1])
                    g2 = g.float() ** 2
                    self._add(self.grad_sq, name, g2.sum(0))
                    xf = x_in.float()
                    self._add(self.weighted_xtx, name, (xf * g2.sum(1, keepdim=True)).T @ xf)
                    if self.fisher_trace:
                        self._add_trace(name, row_sums(x_in, g))

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook


@contextlib.contextmanager
def activation_gradients(model: nn.Module):
    """Within the block, a backward pass gives the activations' gradients and none of the parameters': parameters
    stop requiring grad (restored after) and the input embedding's output starts (output_requires_grad), with grad
    mode on (callers may run under no_grad: apply does)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    saved_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), output_requires_grad(emb):
            yield
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)


def output_requires_grad(module: nn.Module | None) -> contextlib.AbstractContextManager:
    """Within the block, `module`'s output (the input embedding's) requires grad: parameters need no
    gradients, activations do, so the gradient hooks on later modules fire. None: nothing to do."""
    return forward_hooks([(module, lambda m, a, out: out.requires_grad_(True))] if module is not None else [])


def finish_statistics(sums: StatisticSums) -> dict[str, ModuleStats]:
    """Means from sums (each field divided by its DIVIDE_BY count), checked finite."""
    return {name: mean_stats(name, s, sums.n_inputs, sums.n_predicted) for name, s in sums.modules.items()}


def mean_stats(name: str, sums: ModuleStats, n_inputs: int, n_predicted: int, per_window: int = 1) -> ModuleStats:
    """One module's means from its sums, checked finite; per-window fields (DIVIDE_BY None) divided by
    `per_window`, the predicted tokens of one window (the streamed walk's fisher_trace), else kept."""
    counts = {"n_inputs": n_inputs, "n_predicted": n_predicted, None: per_window}
    return check_finite_stats(name, ModuleStats(**{
        f.name: None if (t := getattr(sums, f.name)) is None else t / counts[DIVIDE_BY[f.name]]
        for f in fields(ModuleStats)}))


class ImportanceSums:
    """input_importance's running sums, Σ over windows of diag(XᵀX) per planned linear, fed by forward hooks
    one window at a time (end_window after each); a streamed walk feeds it block by block."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.window_inputs: dict[str, torch.Tensor] = {}
        self.diag: dict[str, torch.Tensor] = {}

    def hooked(self) -> contextlib.AbstractContextManager:
        def hook(name: str):
            def grab(mod, args, output):
                self.window_inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1])
            return grab

        return forward_hooks((mod, hook(n)) for n, mod in self.modules.items() if not isinstance(mod, nn.Embedding))

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


def output_gradient_weights(model: nn.Module, module_names: list[str], windows: torch.Tensor,
                            progress: bool = False) -> dict[str, torch.Tensor]:
    """a_t = ‖∂L/∂y_t‖² per token of each planned linear's output, scaled to mean 1 over all tokens: [windows,
    seq_len] per module, from one forward and backward pass of `model` per window (L the summed next-token NLL,
    as collect_statistics; a window's last token predicts nothing, so its weight is 0).

    The token weights of "fisher-tw" (the module docstring): GPTQ weighting its Hessian by them
    (quantizers/sequential.py, token_weighted) minimises the loss increase that error model predicts, not the
    plain layer output error, so tokens whose output barely moves the loss (the attention sink, whose massive
    activations dominate H) stop deciding where the rounding error goes.
    """
    modules = {n: model.get_submodule(n) for n in module_names}
    # Filled in place: small tensors kept per window between the passes' large short-lived ones would pin the
    # allocator's freed pages (resident memory grew by ~90 MB a window on SmolLM2).
    sums = {n: torch.zeros(windows.shape, dtype=torch.float32) for n in modules}
    seen = {n: torch.zeros(len(windows), dtype=torch.bool) for n in modules}
    current = [0]

    def hook(name: str):
        def on_grad(g):
            sums[name][current[0]] = g.detach().float().pow(2).sum(-1).reshape(-1)
            seen[name][current[0]] = True

        def on_output(mod, args, output):
            if output.requires_grad:
                output.register_hook(on_grad)
        return on_output

    with activation_gradients(model), forward_hooks((m, hook(n)) for n, m in modules.items()):
        for w, window in enumerate(steps(windows, "token weights", show=progress, unit="win")):
            current[0], ids = w, window[None]
            logits = model(input_ids=ids, use_cache=False).logits
            nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").backward()
            del logits
    result = {}
    for name, a in sums.items():
        if not seen[name].all():
            raise RuntimeError(f"module {name} received no gradient in some calibration window; is it used in forward?")
        refuse_non_finite(name, "output gradient", a)
        result[name] = a / a.mean().clamp_min(torch.finfo(torch.float32).tiny)
    return result


def check_finite_stats(name: str, stats: ModuleStats) -> ModuleStats:
    """Refuse NaN/Inf fisher, hessian or token_share of one module (refuse_non_finite)."""
    for signal in (f.name for f in fields(ModuleStats)):
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

