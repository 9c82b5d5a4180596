"""Hutchinson estimate of the loss-Hessian trace per planned weight (HAWQ-V2, Dong et al. 2020, §3.1).

For a weight W with Hessian H = ∇²_W L, tr(H) = E_v[vᵀ H v] for Rademacher v (Hutchinson 1989).
H v comes from double backprop: g = ∂L/∂W with create_graph, then ∂(g·v)/∂W = H v (Pearlmutter).
One probe draws v for every planned weight at once; the cross terms v_aᵀ H_ab v_b have mean zero, so
each weight's share v_a·(H v)_a is an unbiased sample of its own block trace tr(H_aa).

L is the mean next-token NLL of one calibration window; probes go round-robin over the windows, so
after whole rounds the mean estimates tr of the Hessian of the calibration-mean NLL, and the sample
spread includes the window-to-window spread (the standard error is, if anything, conservative).
Each weight stops on its own, after a whole round and at least `min_probes`, when its relative
standard error is below `tol` ("relative") or its absolute standard error is below `abs_tol` times
the largest |trace| of all the weights ("absolute"), else at `max_probes`. The absolute rule is for
weights whose trace is ~0 (a layer whose output barely reaches the loss): their relative error
never settles, yet an error that small against the most sensitive layer cannot change a plan.
A stopped weight stays in every probe's v (its cross terms are part of the others' samples, so the
samples of a weight never depend on which others still probe) but stops accumulating. The predicted loss increase of a perturbation ΔW is then HAWQ-V2's
½ · tr(H)/n · ‖ΔW‖² (eq. 6: the average eigenvalue stands in for the unknown spectrum).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..calibration import Calibration
from ..models import Conv1D
from .records import TraceEstimate
from .statistics import refuse_non_finite
from ..progress import Bar


def _param(module: nn.Module) -> tuple[torch.Tensor, bool]:
    """The weight Parameter itself (autograd needs the leaf) and whether it is stored [in, out]."""
    return module.weight, bool(Conv1D) and isinstance(module, Conv1D)


def stop_rule(est: TraceEstimate, tol: float, abs_tol: float, largest_trace: float) -> str | None:
    """Which rule stops this estimate now (relative checked first), or None to keep probing."""
    if est.rel_stderr <= tol:
        return "relative"
    if abs_tol > 0 and est.stderr <= abs_tol * largest_trace:
        return "absolute"
    return None


def hutchinson_traces(
    model: nn.Module,
    module_names: list[str],
    calibration: Calibration,
    *,
    tol: float = 0.1,
    abs_tol: float = 0.01,
    min_probes: int = 8,
    max_probes: int = 64,
    group_rows: int = 64,
    seed: int = 0,
    windows: int | None = None,
    tokens: int | None = None,
    state: dict[str, TraceEstimate] | None = None,
    on_round: Callable[[dict[str, TraceEstimate]], None] | None = None,
    progress: bool = False,
) -> dict[str, TraceEstimate]:
    """Hutchinson trace of ∇²_W (mean NLL) for each module's weight, each stopping on its own standard error.

    tol: relative standard error that stops a weight; abs_tol: standard error, as a fraction of the
    largest |trace| among the weights, that stops it too (0 turns the absolute rule off).
    windows: how many calibration windows the probes cycle over (default all); stopping is checked
    after whole rounds only. tokens: use only each window's first `tokens` tokens (a probe costs about
    five forward passes; shorter windows make it affordable on a CPU). state: estimates to continue
    (resume); probe k always draws the same v for a weight (seeded by seed and k), so a resumed run
    equals an uninterrupted one. on_round(state) is called after every round (to persist it).
    Each estimate's `stopped_by` says which rule stopped it and `probes` how many it used.
    """
    ids = calibration.tokens if windows is None else calibration.tokens[:windows]
    if tokens is not None:
        ids = ids[:, :tokens]
    n_win = int(ids.shape[0])
    modules = [model.get_submodule(n) for n in module_names]
    params = [_param(m) for m in modules]
    if state is None:
        state = {}
    for name, (p, transposed) in zip(module_names, params):
        out_f = p.shape[1] if transposed else p.shape[0]
        if name not in state:
            state[name] = TraceEstimate(numel=p.numel(), group_rows=group_rows,
                                        group_total=np.zeros(-(-out_f // group_rows)))
        elif state[name].stopped_by == "max_probes" and state[name].probes < max_probes:
            state[name].stopped_by = None  # resumed with a larger budget: keep probing
    # A tied weight appears once in autograd's inputs; map each module to its parameter's slot.
    unique: list[torch.Tensor] = []
    slot = []
    for p, _ in params:
        for i, q in enumerate(unique):
            if q is p:
                slot.append(i)
                break
        else:
            slot.append(len(unique))
            unique.append(p)

    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in unique))
    done = max(s.probes for s in state.values())
    bar = Bar(max_probes, "hessian trace probes", show=progress, unit="probe", initial=done)
    try:
        # The math SDPA kernel has a double backward on every device; the fused ones may not.
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            while True:
                active = [i for i, n in enumerate(module_names) if state[n].stopped_by is None]
                if not active:
                    break
                if done >= max_probes:
                    for i in active:
                        state[module_names[i]].stopped_by = "max_probes"
                    break
                for k in range(done, min(done + n_win, max_probes)):
                    _one_probe(model, ids[k % n_win], unique, slot, params, module_names, active, state, seed, k)
                    bar.update(1)
                done = min(done + n_win, max_probes)
                for i in active:  # before the round is kept (on_round): a resumed run never starts from NaN sums
                    s = state[module_names[i]]
                    refuse_non_finite(module_names[i], "trace", np.concatenate([[s.total, s.total_sq], s.group_total]))
                if done >= min_probes:
                    largest = max(abs(s.trace) for s in state.values())
                    for i in active:
                        state[module_names[i]].stopped_by = stop_rule(state[module_names[i]], tol, abs_tol, largest)
                if on_round is not None:
                    on_round(state)
    finally:
        bar.close()
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return state


def _one_probe(model, window, unique, slot, params, names, active, state, seed: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    vs = [torch.randint(0, 2, p.shape, generator=g, dtype=torch.int8).to(p.dtype) * 2 - 1 for p in unique]
    logits = model(input_ids=window[None]).logits
    loss = nn.functional.cross_entropy(logits[0, :-1].float(), window[1:], reduction="mean")
    grads = torch.autograd.grad(loss, unique, create_graph=True)
    hvs = torch.autograd.grad(grads, unique, grad_outputs=vs)
    contribs = [(v * hv).detach().double() for v, hv in zip(vs, hvs)]
    for i in active:
        name, (_, transposed) = names[i], params[i]
        c = contribs[slot[i]].t() if transposed else contribs[slot[i]]  # [out, in]
        s = state[name]
        per_row = c.sum(dim=1)
        value = float(per_row.sum())
        s.probes += 1
        s.total += value
        s.total_sq += value * value
        pad = s.group_total.size * s.group_rows - per_row.numel()
        s.group_total += nn.functional.pad(per_row, (0, pad)).view(-1, s.group_rows).sum(1).numpy()
