"""Check a solved plan against measured loss on held-back calibration windows, repair it, and guarantee it.

Why: the candidate table's errors are additive second-order predictions (Spearman ρ ≈ 0.58 against
single-module ablations on SmolLM2; a whole plan's ΔNLL is under-predicted by ~25%), so a solver that
trusts them can put a module at int2 that costs far more than predicted, and a mixed plan can end up
worse than a uniform one (exllamav3 #108, auto-round #2118).

verify_plan, on `windows` calibration windows that profiling did not use (never evaluation text):
  1. measure the solved plan: KL to the unquantized model and ΔNLL;
  2. localize: split the planned modules (model order) into `fanout` parts, measure what each part costs
     in the plan (swap it back to the original weights), and descend into the part whose measured cost
     most exceeds its prediction, down to one module: ~fanout·log_fanout(modules) measurements;
  3. calibrate: one scale per option family (int2, int3, ..., nvfp4) fitted to the top-level parts
     (each part's measured cost attributed to families in proportion to their predicted share; the loop
     only raises predictions, see REPAIR_SCALE_RANGE), and the found module's row scaled by
     measured / predicted when it was under-predicted;
  4. re-solve the corrected table under the same budget and constraints (the solvers stay untouched);
     repeat from 2 at most `max_rounds` times; keep the best measured plan;
  5. measure the `uniform_candidates` uniform options that fit the budget with the least predicted loss
     (an option on every module, or the runtime's fallback type where rows do not fit it);
     if the best of them measures better than the kept plan, return it (as a plan);
  6. where the table holds a stand-in's errors (awq-gptq: awq's), steps 1-5 measured the stand-in's weights,
     not the ones `apply` will write: GPTQ lowers some options' errors more than others, which can erase the
     plan's lead (docs/results.md, *Against uniform GPTQ at the same size*). So the kept plan and the best uniform
     option are both applied with the plan's own quantizer, as `apply` runs it, and the better one there is
     returned (settings.applied; two applies).
So the returned plan is never worse, on the slice and in `metric`, than every uniform option measured (with the
plan's own quantizer: than the best one by the stand-in's measure).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from .plan import sig6 as _sig
from .calibration import Calibration
from .config import VerifySettings  # noqa: F401  (re-exported)
from .table import CandidateTable
from .errors import BadInputError, setting
from .evaluate import evaluate, reference_logprobs
from .objective import CalibrationScore
from .quantizers import check_without_hessian, measuring_quantizer
from .options import QuantOption
from .uniform import uniform_candidates
from .plan import AppliedCheck, MeasuredLoss, Plan, RepairRound, UniformCheck, Verification

# A handful of measurements fit each family scale; bound it so that one noisy part can neither make a
# family free (scale 0) nor rule it out.
FAMILY_SCALE_RANGE = (0.25, 4.0)
# The repair loop only raises predictions: a family scaled down makes the solver spend fewer bits exactly
# where the additive model is least trustworthy (SmolLM2 at 4 bits: int2 fitted at 0.29, and the
# re-solved plan measured KL 0.64 on the slice against 0.29 as solved; bench/out/verify-4bits-two-sided-scales.json).
REPAIR_SCALE_RANGE = (1.0, FAMILY_SCALE_RANGE[1])


def option_family(option: QuantOption) -> str:
    """int3-g64-asym -> int3, nvfp4 -> nvfp4, fp8e4m3-ch -> fp8e4m3: format and bits, not the scale layout."""
    return option.label.split("-")[0]


def held_out_slice(calibration: Calibration, windows: int) -> tuple[torch.Tensor, dict]:
    """The last `windows` held-back calibration windows, and what the plan records about them."""
    held = calibration.held_out
    if held is None or held.shape[0] == 0:
        raise BadInputError(
            "verification needs calibration windows that profiling did not use: give the calibration as a text "
            f"file with more than {setting('calib_tokens')} tokens (or lower {setting('calib_tokens')}), or pass token ids through "
            "calibration_from_tokens(ids, held_out=other_ids)")
    n = min(windows, held.shape[0])
    return held[-n:], {
        "source": calibration.source, "text_sha256": calibration.text_sha256, "seq_len": int(held.shape[1]),
        "windows": n, "window_index": list(calibration.held_out_index[-n:]),
        "selection": "the last windows of the calibration text that profiling did not use"}


class SliceMeter:
    """Measured loss of assignments (choice[g] = option index, -1 = original weight) on the slice."""

    def __init__(self, model: nn.Module, table: CandidateTable, tokens: torch.Tensor, metric: str,
                 profiled_tokens: torch.Tensor | None = None):
        # gptq quantizes block by block from layer inputs: single modules cannot be swapped in and measured
        check_without_hessian(measuring_quantizer(table.quantizer), f"{setting('verify')} (measuring single-module swaps)",
                              f"verify a plan made with {setting('quantizer')} rtn, rtn-mse, rtn-w or rtn-w-signed, or drop {setting('verify')}")
        self.score = CalibrationScore(model, table, tokens, importance_tokens=profiled_tokens)
        self.tokens, self.metric = tokens, metric
        self.score.restore()
        self.reference = reference_logprobs(model, tokens)
        self.reference_nll = evaluate(self.reference, tokens).nll
        self.count = 0
        self._seen: dict[bytes, tuple[float, float]] = {}

    def measure(self, choice: np.ndarray) -> tuple[float, float]:
        """(ΔNLL, KL) of the model with `choice` loaded."""
        key = np.asarray(choice, dtype=np.int64).tobytes()
        if key not in self._seen:
            self.score.load(choice)
            r = evaluate(self.score.model, self.tokens, reference=self.reference)
            self._seen[key] = (r.nll - self.reference_nll, float(r.kl))
            self.count += 1
        return self._seen[key]

    def loss(self, choice: np.ndarray) -> float:
        d_nll, kl = self.measure(choice)
        return kl if self.metric == "kl" else d_nll

    def restore(self) -> None:
        self.score.restore()


def plan_choice(plan: Plan, table: CandidateTable) -> np.ndarray:
    return np.array([table.option_index(a.option) for a in plan.assignments], dtype=np.int64)


def verify_plan(plan: Plan, table: CandidateTable, model: nn.Module, calibration: Calibration,
                settings: VerifySettings, *, error_model: str, allowed: np.ndarray, max_storage_bits: float,
                resolve: Callable[[CandidateTable], Plan], uniform_plan: Callable[[np.ndarray], Plan]) -> Plan:
    """The verified plan (see the module docstring); `plan` was solved from `table`.

    allowed: [modules, options] what the constraints allow; resolve: solve a corrected table under the
    same budget, constraints and solver; uniform_plan(choice): the plan of a uniform choice (an option
    index per module: one option, or its fallback where rows do not fit it).
    """
    tokens, slice_record = held_out_slice(calibration, settings.windows)
    measured_with = measuring_quantizer(table.quantizer)
    if measured_with != table.quantizer:  # e.g. an awq-gptq plan measured with awq's weights
        slice_record["measured_with"] = measured_with
    raw = table.errors_of(error_model)
    meter = SliceMeter(model, table, tokens, settings.metric, profiled_tokens=calibration.tokens)
    try:
        family = [option_family(o) for o in table.options]
        scales = {f: 1.0 for f in sorted(set(family))}
        row_factor = np.ones(len(table.groups))
        corrected = False

        def calibrated() -> np.ndarray:
            col = np.array([scales[f] for f in family])
            return raw * col[None, :] * row_factor[:, None]

        def record(choice: np.ndarray, measured: tuple[float, float] | None = None) -> MeasuredLoss:
            d_nll, kl = measured or meter.measure(choice)
            rows = np.arange(len(choice))
            bits = float(table.storage_bits[rows, choice].sum()) / table.num_weights
            return MeasuredLoss(storage_bits_per_weight=round(bits, 6), predicted_delta_nll=_sig(raw[rows, choice].sum()),
                                calibrated_delta_nll=_sig(calibrated()[rows, choice].sum()) if corrected else None,
                                delta_nll=_sig(d_nll), kl=_sig(kl))

        choice = plan_choice(plan, table)
        solved = record(choice)
        best_plan, best_loss, best_choice = plan, meter.loss(choice), choice
        rounds, points = [], []
        for _ in range(settings.max_rounds):
            start = meter.count
            pred = calibrated()[np.arange(len(choice)), choice]
            leaf, top = _localize(meter, choice, pred, settings.fanout)
            points += [(idx, measured, choice) for idx, measured in top]
            scales.update(fit_family_scales(points, raw, family, REPAIR_SCALE_RANGE))
            corrected = True
            leaf_pred = None
            if leaf is not None:
                g, measured = leaf
                leaf_pred = float(calibrated()[g, choice[g]])
                if measured > leaf_pred > 0:
                    row_factor[g] *= measured / leaf_pred
            new_plan = resolve(_with_errors(table, error_model, calibrated()))
            new_choice = plan_choice(new_plan, table)
            changed = int((new_choice != choice).sum())
            measured_new = record(new_choice) if changed else None
            rounds.append(RepairRound(
                measurements=meter.count - start, module=None if leaf is None else table.groups[leaf[0]],
                module_measured=None if leaf is None else _sig(leaf[1]),
                module_predicted=None if leaf_pred is None else _sig(leaf_pred),
                family_scales={f: _sig(s) for f, s in scales.items()}, changed_modules=changed, plan=measured_new))
            if not changed:
                break
            choice = new_choice
            if meter.loss(choice) < best_loss:
                best_plan, best_loss, best_choice = new_plan, meter.loss(choice), choice

        uniform_checks, best_uniform, applied = [], None, None
        for label, u in uniform_candidates(table, raw, allowed, max_storage_bits, settings.uniform_candidates):
            uniform_checks.append(UniformCheck(label=label, loss=record(u)))
            if best_uniform is None or meter.loss(u) < best_uniform[1]:
                best_uniform = (u, meter.loss(u), label)
        kept = "solved" if best_plan is plan else "repaired"
        if best_uniform is None:
            outcome = "solved-unchecked" if kept == "solved" else kept
        else:
            uniform_choice, uniform_loss, uniform_label = best_uniform
            uniform = uniform_plan(uniform_choice)
            if settings.applied and measured_with != table.quantizer:
                meter.restore()  # the applies start from the model's own weights
                run_with, (kept_applied, uniform_applied) = _applied_losses(
                    model, [best_plan, uniform], calibration, tokens, meter, settings.progress)
                applied = AppliedCheck(quantizer=best_plan.quantizer, settings=run_with, plan=record(best_choice, kept_applied),
                                       uniform=UniformCheck(label=uniform_label, loss=record(uniform_choice, uniform_applied)))
                metric_index = 1 if settings.metric == "kl" else 0
                uniform_wins = uniform_applied[metric_index] < kept_applied[metric_index]
            else:
                uniform_wins = uniform_loss < best_loss
            if uniform_wins:
                outcome, best_plan, best_choice = "uniform", uniform, uniform_choice
            else:
                outcome = kept
        final = record(best_choice)
    finally:
        meter.restore()
    # The returned plan states the table's own predictions (comparable with unverified plans); the
    # calibrated ones are in verification.
    rows = np.arange(len(best_choice))
    assignments = [a.model_copy(update={"predicted_delta_loss": _sig(raw[g, best_choice[g]])})
                   for g, a in zip(rows, best_plan.assignments)]
    summary = best_plan.summary.model_copy(update={"predicted_delta_loss": _sig(sum(a.predicted_delta_loss for a in assignments))})
    verification = Verification(metric=settings.metric, slice=slice_record, reference_nll=_sig(meter.reference_nll),
                                solved=solved, rounds=rounds, uniform=uniform_checks, final=final, outcome=outcome,
                                applied=applied)
    return best_plan.model_copy(update={"assignments": assignments, "summary": summary, "verification": verification})


def _applied_losses(model: nn.Module, plans: list[Plan], calibration: Calibration,
                    tokens: torch.Tensor, meter: SliceMeter, progress: bool) -> tuple[dict, list[tuple[float, float]]]:
    """(the quantizer settings used, [(ΔNLL, KL) on the slice of each plan applied to a copy of `model` with its own
    quantizer, as `apply` runs it]). The Hessian text is the plan's own, less the slice's windows, so that what is
    measured was not fitted."""
    from .apply import apply, plan_quantizer_settings

    text = _without_slice(calibration, tokens.shape[0])
    losses = []
    for plan in plans:
        quantized = apply(copy.deepcopy(model), plan, calibration=text, progress=progress)
        r = evaluate(quantized, tokens, reference=meter.reference)
        losses.append((r.nll - meter.reference_nll, float(r.kl)))
        del quantized
    settings = plan_quantizer_settings(plans[0], plans[0].quantizer, {})
    return {k: settings[k] for k in sorted(settings)}, losses


def _without_slice(calibration: Calibration, n: int) -> Calibration:
    """`calibration` less its last n held-back windows (the slice): calibration.widened then picks the Hessian text among
    the others. The slice holds the held-back windows latest in the text, so dropping them moves no other held-back
    window's position; the profile's windows (and hence the fold) stay as they are."""
    if calibration.held_out is None:
        return calibration
    return replace(calibration, held_out=calibration.held_out[:-n], held_out_index=tuple(calibration.held_out_index[:-n]))


def _localize(meter: SliceMeter, choice: np.ndarray, predicted: np.ndarray,
              fanout: int) -> tuple[tuple[int, float] | None, list[tuple[np.ndarray, float]]]:
    """The module whose measured cost in the plan most exceeds its prediction, found by descending
    through `fanout` parts per level; also the top level's (module indices, measured cost) points."""
    whole = meter.loss(choice)
    part = np.arange(len(choice))
    if len(part) == 1:  # a one-module plan: its cost is the whole loss
        return ((0, whole) if whole > predicted[0] else None), [(part, whole)]
    top: list[tuple[np.ndarray, float]] = []
    cost = whole
    while len(part) > 1:
        measured = []
        for idx in np.array_split(part, min(fanout, len(part))):
            restored = choice.copy()
            restored[idx] = -1
            measured.append((idx, whole - meter.loss(restored)))
        if not top:
            top = measured
        idx, cost = max(measured, key=lambda m: m[1] - predicted[m[0]].sum())
        if cost - predicted[idx].sum() <= 0:
            return None, top  # nothing here costs more than predicted
        part = idx
    return (int(part[0]), float(cost)), top


def fit_family_scales(points, raw: np.ndarray, family: list[str],
                      scale_range: tuple[float, float] = FAMILY_SCALE_RANGE) -> dict[str, float]:
    """measured / predicted per option family over measured parts (module indices, measured cost, the
    choice they were measured in): each part's measured cost is split across the families of its
    modules in proportion to their (uncorrected) predicted share. Families never measured are absent."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for idx, measured, choice in points:
        pred = raw[idx, choice[idx]]
        total = float(pred.sum())
        if total <= 0:
            continue
        for g, p in zip(idx.tolist(), pred.tolist()):
            f = family[choice[g]]
            num[f] = num.get(f, 0.0) + max(measured, 0.0) * p / total
            den[f] = den.get(f, 0.0) + p
    lo, hi = scale_range
    return {f: float(np.clip(num[f] / den[f], lo, hi)) for f in den if den[f] > 0}


def _with_errors(table: CandidateTable, error_model: str, errors: np.ndarray) -> CandidateTable:
    return CandidateTable(groups=table.groups, shapes=table.shapes, options=table.options,
                          storage_bits=table.storage_bits, errors={**table.errors, error_model: errors},
                          quantizer=table.quantizer)

