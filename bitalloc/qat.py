"""Quantization-aware training from a plan: fake-quant wrappers, re-planning during training, and back.

    model = bitalloc.qat.prepare(model, plan)          # planned linears -> FakeQuantLinear
    ... train (plain torch or HF Trainer + ReplanCallback) ...
    quantized = bitalloc.qat.convert(model)            # plain modules on the grid + codes/scales

A wrapper keeps the layer's float weight as the trainable parameter (the same Parameter object, so
an optimizer built before or after `prepare` trains it, and a re-plan does not disturb it) and runs
the layer with the weight its option would store. Rounding passes gradients straight through
(STE, Bengio et al. 2013); with `learnable_scales=True` INT scales are parameters trained as in LSQ
(Esser et al., ICLR 2020): the gradient of ŵ = (clamp(round(w/s) + z) - z)·s w.r.t. s is
round(w/s) - w/s inside the range and the clamped code outside it (eq. 3), scaled by
1/sqrt(group · Q_P) (§2.2). Without learnable scales every forward uses the RTN scales of the
current weight, so at any step the wrapped model equals `bitalloc.apply` of its float weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from .apply import check_plan_matches
from .budget import Budget
from .calibration import Calibration, calibration_from_tokens
from .constraints import Constraints
from .errors import BadInputError, BitallocError, setting
from .formats import fake_quant
from .formats.int import fake_quant_int, grouped, int_codes, int_dequantize, int_range, int_scales
from .models import Conv1D, LoadedModel, is_linear, set_weight_matrix, weight_matrix
from .options import QuantOption, parse_option
from .plan import Plan
from .quantizers import QuantizedWeight, quantize_weight
from .ste import Fp16STE, GradScale

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object

log = logging.getLogger(__name__)

FP16_MIN_SUBNORMAL = 2.0**-24  # smallest positive fp16: a learned scale never reaches 0


# ---- the wrapper ---------------------------------------------------------------------------------


class FakeQuantLinear(nn.Module):
    """A planned linear layer (nn.Linear or GPT-2 Conv1D) run with its quantized weight.

    weight / bias: the wrapped layer's own Parameters (state_dict names stay `<module>.weight`).
    scale: [out, n_groups] learnable INT scale (only with learnable_scales), zero: its integer
    zero-points (asymmetric; fixed, as stored), both initialised from RTN.
    """

    def __init__(self, module: nn.Module, option: QuantOption, learnable_scale: bool = False):
        super().__init__()
        if not is_linear(module):
            raise BadInputError(f"QAT wraps linear layers (nn.Linear, Conv1D), not {type(module).__name__}")
        # The plain layer is kept unregistered: its parameters are registered here, once.
        object.__setattr__(self, "_plain", module)
        self.weight = module.weight
        self.bias = module.bias
        self.option = option
        self.transposed = bool(Conv1D) and isinstance(module, Conv1D)  # Conv1D stores [in, out]
        self.learnable_scale = learnable_scale and option.fmt == "int"
        if self.learnable_scale:
            w = grouped(self.weight_matrix().detach().float(), option.group_size)
            scale, zero = int_scales(w, option)
            self.scale = nn.Parameter(scale.squeeze(-1))  # [out, n_groups]
            self.register_buffer("zero", zero.squeeze(-1))
            # LSQ §2.2: g = 1/sqrt(N·Q_P), N = weights sharing the scale.
            group = w.shape[-1]
            self.grad_factor = 1.0 / math.sqrt(group * int_range(option)[1])

    def weight_matrix(self) -> torch.Tensor:
        """The float (trainable) weight as [out, in]."""
        return self.weight.t() if self.transposed else self.weight

    def stored_scale(self) -> torch.Tensor:
        """The learned scale as it will be stored (positive, fp16-representable), float32 [out, n_groups]."""
        s = GradScale.apply(self.scale, self.grad_factor)
        return Fp16STE.apply(s.clamp(min=FP16_MIN_SUBNORMAL))

    def fake_weight(self) -> torch.Tensor:
        """The weight the stored option reproduces, [out, in], differentiable (STE)."""
        w = self.weight_matrix()
        wf = w.float()
        if self.learnable_scale:
            out = fake_quant_int(wf, self.option, self.stored_scale(), self.zero)
        else:  # the family's own (formats/<family>.py), with the RTN scales of the current weight
            out = fake_quant(wf, self.option)
        return out.to(w.dtype)

    def forward(self, *args, **kwargs):
        w = self.fake_weight()
        # Run the wrapped layer's own forward with the quantized weight: same kernel, same numerics.
        return torch.func.functional_call(self._plain, {"weight": w.t() if self.transposed else w}, args, kwargs)

    @torch.no_grad()
    def quantized(self) -> QuantizedWeight:
        """Codes, scales, zero-points and values of the current weight (what convert stores)."""
        w = self.weight_matrix().detach().float()
        if not self.learnable_scale:
            return quantize_weight(w, self.option, "rtn")
        codes, scale, zero = int_codes(w, self.option, self.stored_scale().detach(), self.zero)
        return QuantizedWeight(self.option, int_dequantize(codes, scale, zero), codes, scale.clone(), zero.clone())

    def plain(self) -> nn.Module:
        """The wrapped layer, holding this wrapper's (float) parameters."""
        m = self._plain
        m.weight, m.bias = self.weight, self.bias
        return m

    def extra_repr(self) -> str:
        return f"{self.option.label}{', learnable scale' if self.learnable_scale else ''}"


# ---- prepare / convert ---------------------------------------------------------------------------

_STATE_ATTR = "bitalloc_qat"


@dataclass
class QATState:
    """What `prepare` leaves on the model: the plan it follows and whether scales are learned."""

    plan: Plan
    learnable_scales: bool


def prepare(model: nn.Module, plan: Plan, learnable_scales: bool = False) -> nn.Module:
    """Swap each planned linear layer for a FakeQuantLinear with its option, in place; returns the model.

    fp16 ("keep") linear layers are wrapped too, so training sees the fp16-rounded weight that
    `convert` stores (the deployed model is the trained one). On a model already prepared, this is a re-plan: wrappers whose
    option is unchanged are kept (learned scales included), the others are rebuilt from the float weight.
    The fake quantization rounds to nearest (min/max or learned scales) whatever the plan's quantizer: the
    weights move every step, so an rtn-w plan's searched scales would be stale after the first one.
    """
    if not isinstance(plan, Plan):
        raise BadInputError(f"prepare needs a bitalloc.Plan, got {type(plan).__name__}; load one with bitalloc.Plan.load(path)")
    previous = _unwrap(model)
    try:
        # The weights change during training, so only names and shapes are checked.
        check_plan_matches(model, plan, check_hash=False)
        for a in plan.assignments:
            module = model.get_submodule(a.module)
            if a.option.fmt != "keep" and (a.tied_to or not is_linear(module)):
                raise BadInputError(
                    f"QAT wraps untied linear layers; {a.module} ({type(module).__name__}"
                    f"{', tied to ' + ', '.join(a.tied_to) if a.tied_to else ''}) is not one: "
                    f"plan without {setting('include_embeddings')} / {setting('include_lm_head')} (tied) for QAT")
            if not module.weight.is_floating_point():
                raise BadInputError(f"{a.module} holds {module.weight.dtype} weights; QAT trains float weights: "
                                    "load the model unquantized")
    except BitallocError:
        _rewrap(model, previous)
        raise
    tied = {a.module for a in plan.assignments if a.tied_to}
    for name, option in plan.options_by_module().items():
        if option.fmt == "keep" and (name in tied or not is_linear(model.get_submodule(name))):
            continue  # a kept embedding / tied head: convert rounds it to fp16, as apply does
        old = previous.get(name)
        keep_old = old is not None and old.option == option and old.learnable_scale == (learnable_scales and option.fmt == "int")
        _set_submodule(model, name, old if keep_old else FakeQuantLinear(model.get_submodule(name), option, learnable_scales))
    _drop_stale_gguf_quantizer(model)
    object.__setattr__(model, _STATE_ATTR, QATState(plan, learnable_scales))
    return model


def _drop_stale_gguf_quantizer(model: nn.Module) -> None:
    """Let the HF Trainer train a model loaded from a .gguf file.

    transformers loads GGUF by dequantizing every weight to a plain float tensor but keeps the
    GGUF quantizer on the model, and Trainer then refuses "a purely quantized model". When every
    parameter is a float tensor the label is stale: remove it the way transformers itself does after
    dequantizing (HfQuantizer.remove_quantization_config). Weights kept in GGUF blocks keep it.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    all_float = all(p.is_floating_point() for p in model.parameters())
    if quantizer is not None and getattr(method, "value", method) == "gguf" and all_float:
        quantizer.remove_quantization_config(model)
        log.info("removed the GGUF quantization label (the weights were dequantized at load) so the model can train")


def current_plan(model: nn.Module) -> Plan:
    """The plan a prepared model follows."""
    return _state(model).plan


def fake_quant_modules(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def convert(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Fold the wrappers back: plain layers whose weights are on the quantization grid, in place.

    Returns module -> QuantizedWeight (int codes, scales, zero-points; values only for fp/mx/nvfp4
    and fp16), for the packers. fp16 ("keep") modules are rounded to fp16, as `apply` stores them.
    """
    state = _state(model)
    result = {}
    for name, option in state.plan.options_by_module().items():
        module = model.get_submodule(name)
        if isinstance(module, FakeQuantLinear):
            q = module.quantized()
            module = module.plain()
            _set_submodule(model, name, module)
        else:
            q = quantize_weight(weight_matrix(module).detach().float(), option, "rtn")
        set_weight_matrix(module, q.values.to(module.weight.dtype))
        result[name] = q
    object.__delattr__(model, _STATE_ATTR)
    return result


def _state(model: nn.Module) -> QATState:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise BadInputError("this model has no fake-quant layers; call bitalloc.qat.prepare(model, plan) first")
    return state


def _unwrap(model: nn.Module) -> dict[str, FakeQuantLinear]:
    """Put every wrapped layer back as its plain (float) layer; return the wrappers by name."""
    wrappers = fake_quant_modules(model)
    for name, w in wrappers.items():
        _set_submodule(model, name, w.plain())
    return wrappers


def _rewrap(model: nn.Module, wrappers: dict[str, FakeQuantLinear]) -> None:
    for name, w in wrappers.items():
        _set_submodule(model, name, w)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# ---- re-planning ---------------------------------------------------------------------------------


@dataclass
class Replan:
    """One re-plan: the new plan and which modules changed option."""

    plan: Plan
    changed: list[str]

    def summary(self) -> dict[str, float]:
        s = self.plan.summary
        return {
            "storage_bits_per_weight": s.storage_bits_per_weight,
            "nominal_bits_per_weight": s.nominal_bits_per_weight,
            "predicted_delta_loss": s.predicted_delta_loss,
            "changed_modules": len(self.changed),
            "planned_modules": s.planned_modules,
        }


def replan(model: nn.Module, calibration: torch.Tensor | Calibration, budget: str | Budget, *, solver: str = "ilp",
           options: list[QuantOption] | None = None, error_model: str | None = None, constraints: Constraints | None = None,
           solver_settings: dict | None = None, seed: int = 0, learnable_scales: bool | None = None,
           progress: bool = False, quantizer: str | None = None) -> Replan:
    """Re-plan a prepared model at `budget` from sensitivities of its current float weights; re-wrap.

    calibration: token ids [windows, seq_len] (keep it small: one forward + backward per window) or a
    Calibration. options: the candidate grid; default the one the current plan was solved over.
    The planned modules stay those of the current plan. quantizer: whose errors the new table
    measures; default the current plan's (the one it will be applied with), or for a plan made with an
    equalizing quantizer what it is on unfolded weights (awq, the default: rtn-w; awq-gptq: gptq): its scales
    cannot be folded into a model being trained.
    """
    from . import api  # api imports the profilers; only a re-plan needs them
    from .quantizers import equalizes, unfolded_quantizer

    state = _state(model)
    old = state.plan
    if quantizer is None:
        quantizer = unfolded_quantizer(old.quantizer)
    if equalizes(quantizer):
        raise BadInputError(f"a re-plan measures the model being trained as it is, and the {quantizer} "
                            f"quantizer would fold scales into its weights; re-plan with "
                            f"quantizer={unfolded_quantizer(quantizer)!r}")
    calib = calibration if isinstance(calibration, Calibration) else calibration_from_tokens(calibration, seed=seed)
    device = next(model.parameters()).device
    calib = dataclasses.replace(calib, tokens=calib.tokens.to(device))
    grid = list(options) if options else [parse_option(label) for label in old.options]
    names = [a.module for a in old.assignments]
    was_training = model.training
    wrappers = _unwrap(model)
    try:
        loaded = LoadedModel(model=model, source=old.model.source)
        table = api.profile(loaded, calib, names, grid, cache_dir=None, progress=progress,
                            quantizer=quantizer)
        new = api.plan_from_table(table, budget, loaded, calib, solver=solver, solver_settings=solver_settings,
                                  error_model=error_model, seed=seed, constraints=constraints)
    finally:
        _rewrap(model, wrappers)
        model.train(was_training)
    before, after = old.options_by_module(), new.options_by_module()
    changed = [n for n in names if before[n] != after[n]]
    prepare(model, new, state.learnable_scales if learnable_scales is None else learnable_scales)
    return Replan(new, changed)


class ReplanCallback(TrainerCallback):
    """Hugging Face Trainer callback: at the given optimizer steps, re-plan the prepared model.

    Sensitivities are measured on `calibration` (token ids [windows, seq_len]; a few short windows
    suffice) with the current float weights, the plan is solved again at `budget`, wrappers whose
    option changed are rebuilt, and the summary is logged (logger + `state.log_history`, keys
    `replan/...`). New learnable scales join the optimizer's no-weight-decay parameter group.
    `replans` keeps every (step, Replan).
    """

    def __init__(self, calibration: torch.Tensor | Calibration, budget: str | Budget, at_steps: Iterable[int],
                 solver: str = "ilp", **replan_kwargs: Any):
        steps = sorted({int(s) for s in at_steps})
        if not steps or steps[0] < 1:
            raise BadInputError(f"at_steps must name optimizer steps >= 1, got {list(at_steps)!r}")
        if not isinstance(calibration, Calibration):
            calibration = calibration_from_tokens(calibration)  # checks the shape now, not mid-training
        self.calibration, self.budget, self.at_steps, self.solver = calibration, budget, steps, solver
        self.replan_kwargs = replan_kwargs
        self.replans: list[tuple[int, Replan]] = []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step not in self.at_steps:
            return control
        before = {id(p) for p in model.parameters()}
        result = replan(model, self.calibration, self.budget, solver=self.solver, **self.replan_kwargs)
        new_params = [p for p in model.parameters() if id(p) not in before and p.requires_grad]
        if new_params and optimizer is not None:
            groups = optimizer.param_groups
            group = next((g for g in groups if g.get("weight_decay", 0) == 0), groups[0])
            group["params"].extend(new_params)
        self.replans.append((state.global_step, result))
        logs = {f"replan/{k}": v for k, v in result.summary().items()}
        log.info("step %d: re-planned at %s: %s", state.global_step, result.plan.budget.text, logs)
        entry = dict(logs)
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        state.log_history.append({**entry, "step": state.global_step})
        return control
