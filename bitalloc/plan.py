"""The Plan: what every planned module is stored as, why, and how it was decided. Versioned JSON.

Loading checks the schema, then the plan against itself: every derived field (an assignment's label
and storage bits from its option and shape, the summary from the assignments) is recomputed, and a
plan that disagrees, assigns a module twice or assigns nothing is refused, naming the first field
and module. `apply` and the exports then never meet a plan whose parts say different things.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, GetPydanticSchema, PrivateAttr, ValidationError,
                      model_serializer, model_validator)
from pydantic_core import core_schema

from .budget import UNPLANNED_BITS
from .errors import BadInputError, PlanVersionError, step
from .io import atomic_write_text, canonical_json
from .options import QuantOption

SCHEMA_VERSION = 1
PLAN_FORMAT = "bitalloc.plan"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_FP_FIELDS = ("element", "scale_fmt", "tensor_scale_bits")


def _registered(field: str):
    """The JSON schema's enum for a field: its values over the registered format families (the checked-in
    schema lists the built-in ones). Loading checks a value with its family (QuantOption)."""
    def extra(schema: dict) -> None:
        from .formats import all_formats

        values = {"fmt": lambda f: (f.fmt,), "element": lambda f: f.elements, "scale_fmt": lambda f: f.scale_fmts}[field]
        schema["enum"] = list(dict.fromkeys(v for f in all_formats() for v in values(f)))
    return extra


# How a plan file writes a QuantOption (the schema's "OptionSpec"); a loaded plan holds the QuantOption itself.
class OptionSpec(_Strict):
    fmt: str = Field(json_schema_extra=_registered("fmt"))
    bits: int = Field(ge=2, le=16)
    group_size: int | None = Field(
        None, ge=0, description="weights per scale along the input; null = per output channel; 0 = one scale per tensor")
    symmetric: bool
    scale_bits: int = Field(ge=0)
    zero_bits: int = Field(ge=0)
    # Added after the first v1 plans (which are INT/keep only); the defaults are what those meant.
    element: str = Field(
        "", description="fp element format (sign, exponent, mantissa bits), or the ggml tensor type of a gguf "
        "option (Q4_K, ...); empty for int and keep", json_schema_extra=_registered("element"))
    scale_fmt: str = Field("fp16", description="storage format of each scale: fp16, fp32 (per tensor), e8m0 (MX), "
                           "e4m3 (NVFP4)", json_schema_extra=_registered("scale_fmt"))
    tensor_scale_bits: int = Field(0, ge=0, description="bits stored once per tensor on top of the group scales (NVFP4: 32)")

    @model_serializer(mode="wrap")
    def _omit_fp_defaults(self, handler):
        # Options that leave all three at their defaults (INT, keep) are written exactly as before these
        # fields existed, so their plans stay byte-identical and readable by earlier bitalloc versions;
        # the others (FP, GGUF: a non-empty element) write all fields.
        d = handler(self)
        if (self.element, self.scale_fmt, self.tensor_scale_bits) == ("", "fp16", 0):
            for key in _FP_FIELDS:
                d.pop(key, None)
        return d

    @classmethod
    def of(cls, o: QuantOption) -> "OptionSpec":
        return cls(**o.to_dict())

    def to_option(self) -> QuantOption:
        return QuantOption.from_dict(self.model_dump())


def _plan_option_schema(source, handler) -> core_schema.CoreSchema:
    # Validated as OptionSpec (its JSON schema and strictness), then by QuantOption (its family's checks; a
    # ValueError makes the plan invalid), held and used as the QuantOption.
    as_spec = core_schema.no_info_after_validator_function(OptionSpec.to_option, handler.generate_schema(OptionSpec))
    return core_schema.no_info_before_validator_function(
        lambda v: v.to_dict() if isinstance(v, QuantOption) else v, as_spec,
        serialization=core_schema.plain_serializer_function_ser_schema(lambda o: OptionSpec.of(o).model_dump()))


PlanOption = Annotated[QuantOption, GetPydanticSchema(_plan_option_schema)]


class Assignment(_Strict):
    module: str
    rows: tuple[int, int] | None = Field(None, description="row range [start, stop) of the group; null = whole module")
    shape: tuple[int, int] = Field(description="[out_features, in_features] of the weight")
    option: PlanOption
    label: str
    storage_bits: int
    predicted_delta_loss: float = Field(description="predicted increase of mean next-token NLL, nats")
    predicted_latency_s: float | None = Field(None, description="this layer's kernel latency on the plan's hardware profile")
    tied_to: list[str] = Field(default_factory=list, description="other modules sharing this tensor")

    @model_validator(mode="after")
    def _option_fits_shape(self) -> "Assignment":
        # A group size that does not divide the input features cannot be quantized or packed (apply/eval/export).
        if not self.option.fits(self.shape[1]):
            raise ValueError(f"group_size {self.option.group_size} does not divide the {self.shape[1]} input features of "
                             f"{self.module}; re-create the plan with {step('plan')}")
        return self


class Summary(_Strict):
    planned_modules: int
    planned_weights: int
    nominal_bits_per_weight: float
    storage_bits_per_weight: float
    storage_bytes: int
    fp16_bytes: int
    predicted_delta_loss: float
    # Added after the first v1 plans; null where the plan (or its profile) predates them.
    ties: dict[str, int] | None = Field(None, description="ties the solver honoured, as tied groups per kind: qkv, "
                                        "gate_up, w1_w3, experts_gate_up, experts_down (the default 'fused' ties) or the "
                                        "--tie regex; {} = none")
    unplanned_weights: int | None = Field(None, ge=0, description="elements of the tensors the plan does not cover "
                                          "(embedding, head, norms, biases)")
    unplanned_bytes: int | None = Field(None, ge=0, description="their storage at 16 bits (fp16/bf16) each")
    model_bytes: int | None = Field(None, ge=0, description="storage_bytes + unplanned_bytes: the whole model")


class BudgetSpec(_Strict):
    kind: Literal["bits", "bytes", "percent"]
    value: float
    text: str
    max_storage_bits: float = Field(description="the planned weights' storage limit the solver met")
    scope: Literal["planned", "model"] = Field("planned", description="planned: the budget is of the planned weights; "
                                               "model: of the whole model as its target stores it (fixed_bits)")
    # Added with whole-file GGUF budgets; null for planned-scope budgets and plans made before.
    fixed_bits: float | None = Field(None, description="model scope: what the whole model stores besides the planned "
                                     "weights, in bits (unplanned tensors at 16 bits; for a GGUF-typed plan of a .gguf "
                                     "model, the file's header, metadata and unplanned tensors as stored)")


class ModelSpec(_Strict):
    source: str
    architecture: str
    content_hash: str


class SolverSpec(_Strict):
    name: str
    settings: dict
    status: str
    objective: float
    bound: float | None = Field(None, description="proven lower bound on the optimal objective; null if unknown")
    details: dict = Field(default_factory=dict, description="solver facts worth keeping, e.g. backend, DP resolution, "
                          "an evolutionary search's warm-start and best true-objective scores")


class LatencySpec(_Strict):
    """Predicted latency of the plan on a measured hardware profile (bitalloc latency)."""

    profile: str = Field(description="hardware profile name")
    device: str
    activation_dtype: str
    tokens: int = Field(ge=1, description="tokens per forward: 1 = a decode step, more = a prefill")
    context: int = Field(ge=0, description="tokens already cached before the step")
    layers_s: float = Field(description="predicted time of the planned layers on their kernels")
    other_s: float | None = Field(description="measured time of the rest of the model; null if the profile did not time this model")
    predicted_s: float | None = Field(description="layers_s + other_s; null without other_s")
    max_s: float | None = Field(None, description="the latency limit the plan was solved under, if any")


class MeasuredLoss(_Strict):
    """A plan's predicted and measured loss on the verification slice (nats per scored token)."""

    storage_bits_per_weight: float
    predicted_delta_nll: float = Field(description="Σ of the candidate table's predictions (the plan's error model)")
    calibrated_delta_nll: float | None = Field(
        None, description="the same after the measured corrections (family scales, module factors); null before any")
    delta_nll: float = Field(description="measured mean NLL minus the unquantized model's, on the slice")
    kl: float = Field(description="measured mean KL(unquantized || quantized), on the slice")


class RepairRound(_Strict):
    """One round of the repair loop (bitalloc/verify.py)."""

    measurements: int = Field(description="slice measurements this round took (parts swapped back + the re-solved plan)")
    module: str | None = Field(description="the module whose measured cost most exceeded its prediction; null if none did")
    module_measured: float | None = Field(None, description="its measured cost in the plan (restoring it), in the metric")
    module_predicted: float | None = Field(None, description="its calibrated prediction before this round")
    family_scales: dict[str, float] = Field(description="measured/predicted per option family, fitted so far")
    changed_modules: int = Field(description="modules whose option the re-solve changed")
    plan: MeasuredLoss | None = Field(description="the re-solved plan; null when the re-solve changed nothing")


class UniformCheck(_Strict):
    label: str = Field(description="the option every module takes; 'Q4_K (Q5_0 where rows do not fit)': the runtime's "
                       "fallback type on the modules whose rows do not fit that option, as llama-quantize writes them")
    loss: MeasuredLoss


class AppliedCheck(_Strict):
    """The kept plan and the best uniform option, each applied with the plan's own quantizer (block by block) and
    measured on the slice: done where the table holds a stand-in's errors (awq-gptq: awq's), whose weights the
    repair loop and the uniform check measured (bitalloc/verify.py)."""

    quantizer: str = Field(description="the quantizer both were applied with: the plan's")
    settings: dict = Field(description="the quantizer settings they were applied with, as `apply` runs the plan; the "
                           "Hessian text never holds the slice's windows")
    plan: MeasuredLoss = Field(description="the plan the repair loop kept, applied")
    uniform: UniformCheck = Field(description="the uniform option that measured best with the stand-in's weights, applied")


class Verification(_Strict):
    """The plan checked against measured loss on held-back calibration windows, repaired, and compared
    with the best uniform options that fit the same budget (bitalloc/verify.py)."""

    metric: Literal["kl", "delta_nll"] = Field(description="what the repair loop and the guarantee compare")
    slice: dict = Field(description="the held-back calibration windows: source, text hash, seq_len, windows, "
                        "window_index (position among the text's non-overlapping windows), selection; measured_with: "
                        "the quantizer whose weights the measured plans held, where it is not the plan's (awq-gptq: awq)")
    reference_nll: float = Field(description="the unquantized model's mean NLL on the slice")
    solved: MeasuredLoss = Field(description="the plan as first solved")
    rounds: list[RepairRound]
    uniform: list[UniformCheck] = Field(description="the measured uniform options that fit the budget")
    final: MeasuredLoss
    outcome: Literal["solved", "repaired", "uniform", "solved-unchecked"] = Field(
        description="which plan was returned: as solved, a repaired one, or the best uniform option (it measured "
        "better: applied, where `applied` is there); solved-unchecked: no uniform option (with its fallback) fits "
        "every module under the constraints")
    applied: AppliedCheck | None = Field(
        None, description="the kept plan and the best uniform option applied with the plan's own quantizer; the "
        "better of the two there is returned; null where the table holds the plan quantizer's own errors or the check was turned off")


class Plan(_Strict):
    format: Literal["bitalloc.plan"] = PLAN_FORMAT
    schema_version: Literal[1] = SCHEMA_VERSION
    bitalloc_version: str
    model: ModelSpec
    calibration: dict
    error_model: str
    quantizer: str = Field("rtn", pattern=r"^[a-z0-9][a-z0-9_-]*$",
                           description="quantizer the plan is applied with (rtn, gptq), and whose errors the candidates "
                           "hold, or a cheaper stand-in's where the registry names one (awq-gptq: awq); plans "
                           "without this field are rtn")
    options: list[str] = Field(description="labels of the candidate options offered to the solver")
    solver: SolverSpec
    seed: int
    budget: BudgetSpec
    summary: Summary
    latency: LatencySpec | None = Field(None, description="predicted latency on a hardware profile, when one was given")
    assignments: list[Assignment]
    constraints: dict | None = Field(None, description="constraints the plan was solved under (bit bounds, pins, "
                                     "option filters, ties, latency limit); null if none")
    verification: Verification | None = Field(
        None, description="predicted vs measured loss on held-back calibration windows, the repair loop and the "
        "uniform guarantee (bitalloc plan --verify); absent if the plan was not verified")
    # The calibration token ids [windows, seq_len] a plan made in this process was profiled on: never saved
    # (a saved plan rebuilds them from `calibration` with a tokenizer) and not part of its identity (__eq__).
    # With them, apply(model, plan) right after plan(...) quantizes with importance-weighted scales (rtn-w,
    # the default) without being handed the windows again.
    _windows: Any = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self.__dict__ == other.__dict__  # the fields only

    @property
    def calibration_windows(self) -> Any:
        """The calibration this plan was profiled on (a Calibration, or its token ids), when it was made in this
        process; None once saved and loaded."""
        return self._windows

    def made_on(self, windows: Any) -> "Plan":
        """This plan, remembering the calibration windows it was made on (calibration_windows)."""
        self._windows = windows
        return self

    @model_serializer(mode="wrap")
    def _omit_new_fields_at_their_defaults(self, handler):
        # RTN plans (and unverified ones) are written exactly as before these fields existed:
        # byte-identical, and readable by earlier bitalloc versions (which reject unknown fields).
        d = handler(self)
        if d.get("quantizer") == "rtn":
            d.pop("quantizer")
        if d.get("verification", 0) is None:
            d.pop("verification")
        elif d["verification"].get("applied", 0) is None:
            d["verification"].pop("applied")  # verified without the applied check: written as before it existed
        if isinstance(d.get("budget"), dict) and d["budget"].get("fixed_bits", 0) is None:
            d["budget"].pop("fixed_bits")  # planned-scope budgets, as before the field existed
        return d

    def to_json(self) -> str:
        return canonical_json(self.model_dump(mode="json"))

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path).expanduser()
        if not p.is_file():
            raise BadInputError(f"plan file {str(path)!r} does not exist; make one with {step('plan')} and save it as {p.name}")
        return cls.from_json(p.read_text(encoding="utf-8"), origin=str(path))

    @classmethod
    def from_json(cls, text: str, origin: str = "<plan>") -> "Plan":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{origin} is not valid JSON (line {e.lineno}): {e.msg}") from None
        if not isinstance(raw, dict) or raw.get("format") != PLAN_FORMAT:
            raise BadInputError(f"{origin} is not a bitalloc plan (no \"format\": \"{PLAN_FORMAT}\")")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            hint = "upgrade bitalloc to read it" if newer else "re-create the plan with this bitalloc"
            raise PlanVersionError(
                f"{origin} has plan schema version {version!r}; this bitalloc reads version {SCHEMA_VERSION}: {hint}"
            )
        try:
            # Strict: "14" is not an int and "yes" not a bool, exactly as plan-v1.json says.
            plan = cls.model_validate_json(text, strict=True)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise BadInputError(f"{origin} is not a valid plan: {where}: {err['msg']} ({e.error_count()} error(s))") from None
        if (problem := plan_inconsistency(plan)) is not None:
            raise BadInputError(f"{origin} is not a consistent plan: {problem}; it was edited or damaged: re-create it "
                                f"with {step('plan')}")
        return plan

    def options_by_module(self) -> dict[str, QuantOption]:
        return {a.module: a.option for a in self.assignments}


def sig6(x: float) -> float:
    """Six significant digits: what the estimates support, and stable in JSON."""
    return float(f"{float(x):.6g}")


def summarize(assignments: list[Assignment], ties: dict[str, int] | None = None,
              unplanned_weights: int | None = None) -> Summary:
    """The plan's summary, derived from its assignments (weights, bits per weight, bytes, predicted ΔNLL).

    ties (the ties the solver honoured) and unplanned_weights (elements outside the plan) are not
    derivable from the assignments and are taken as given; the whole-model bytes follow from them.
    """
    n = sum(a.shape[0] * a.shape[1] for a in assignments)
    nominal = sum(a.option.bits * a.shape[0] * a.shape[1] for a in assignments)
    storage = sum(a.storage_bits for a in assignments)
    storage_bytes = -(-storage // 8)
    unplanned_bytes = None if unplanned_weights is None else -(-unplanned_weights * UNPLANNED_BITS // 8)
    return Summary(planned_modules=len(assignments), planned_weights=n,
                   nominal_bits_per_weight=round(nominal / n, 6) if n else 0.0,
                   storage_bits_per_weight=round(storage / n, 6) if n else 0.0, storage_bytes=storage_bytes,
                   fp16_bytes=2 * n, predicted_delta_loss=sig6(sum(a.predicted_delta_loss for a in assignments)),
                   ties=ties, unplanned_weights=unplanned_weights, unplanned_bytes=unplanned_bytes,
                   model_bytes=None if unplanned_bytes is None else storage_bytes + unplanned_bytes)


def plan_inconsistency(plan: Plan) -> str | None:
    """The first derived field that disagrees with what it is derived from, naming field and module; or None."""
    if not plan.assignments:
        return "assignments is empty (a plan assigns at least one module)"
    seen: dict[str, list[tuple[int, int] | None]] = {}
    for i, a in enumerate(plan.assignments):
        where = f"assignments[{i}] ({a.module})"
        if min(a.shape) < 1:
            return f"{where}: shape {list(a.shape)} has no weights"
        if a.rows is not None and not (0 <= a.rows[0] < a.rows[1] and a.rows[1] - a.rows[0] == a.shape[0]):
            return f"{where}: rows {list(a.rows)} do not span its shape's {a.shape[0]} rows"
        option = a.option
        if a.label != option.label:
            return f"{where}: label {a.label!r} is not its option's label {option.label!r}"
        if not option.fits(a.shape[1]):
            return f"{where}: option {option.label} does not tile rows of {a.shape[1]} weights"
        if a.storage_bits != (want := option.storage_bits(*a.shape)):
            return f"{where}: storage_bits {a.storage_bits} is not {want}, what {option.label} needs for shape {list(a.shape)}"
        rows = seen.setdefault(a.module, [])
        if None in rows or (rows and a.rows is None) or any(r[0] < a.rows[1] and a.rows[0] < r[1] for r in rows):
            return f"{where}: module {a.module} is assigned twice"
        rows.append(a.rows)
    derived = summarize(plan.assignments, plan.summary.ties, plan.summary.unplanned_weights)
    for name in Summary.model_fields:
        got, want = getattr(plan.summary, name), getattr(derived, name)
        # floats: the summary rounds to 6 decimals / 6 significant digits; NaN and inf never match
        same = math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-12) if isinstance(want, float) else got == want
        if not same:
            return f"summary.{name} is {got}, its assignments give {want}"
    return None


def plan_json_schema() -> dict:
    return Plan.model_json_schema()


SCHEMA_PATH = Path(__file__).parent / "schema" / f"plan-v{SCHEMA_VERSION}.json"
