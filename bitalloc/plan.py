"""The Plan: what every planned module is stored as, why, and how it was decided. Versioned JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from .errors import BadInputError, PlanVersionError
from .io import atomic_write_text, canonical_json
from .options import GGUF_TYPES, QuantOption

SCHEMA_VERSION = 1
PLAN_FORMAT = "bitalloc.plan"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_FP_FIELDS = ("element", "scale_fmt", "tensor_scale_bits")


class OptionSpec(_Strict):
    fmt: Literal["int", "fp", "gguf", "keep"]
    bits: int = Field(ge=2, le=16)
    group_size: int | None = Field(
        None, ge=0, description="weights per scale along the input; null = per output channel; 0 = one scale per tensor")
    symmetric: bool
    scale_bits: int = Field(ge=0)
    zero_bits: int = Field(ge=0)
    # Added after the first v1 plans (which are INT/keep only); the defaults are what those meant.
    element: Literal["", "e4m3", "e5m2", "e2m3", "e3m2", "e2m1", *GGUF_TYPES] = Field(
        "", description="fp element format (sign, exponent, mantissa bits), or the ggml tensor type of a gguf "
        "option (Q4_K, ...); empty for int and keep")
    scale_fmt: Literal["fp16", "fp32", "e8m0", "e4m3"] = Field(
        "fp16", description="storage format of each scale: fp16, fp32 (per tensor), e8m0 (MX), e4m3 (NVFP4)")
    tensor_scale_bits: int = Field(0, ge=0, description="bits stored once per tensor on top of the group scales (NVFP4: 32)")

    @model_validator(mode="after")
    def _is_an_option(self) -> "OptionSpec":
        self.to_option()  # QuantOption's own checks (e.g. element width = bits); ValueError -> invalid plan
        return self

    @model_serializer(mode="wrap")
    def _omit_fp_defaults(self, handler):
        # INT/keep options are written exactly as before the FP fields existed, so their plans stay
        # byte-identical and readable by earlier bitalloc versions; FP and GGUF options write all fields.
        d = handler(self)
        if self.fmt in ("int", "keep"):
            for key in _FP_FIELDS:
                d.pop(key, None)
        return d

    @classmethod
    def of(cls, o: QuantOption) -> "OptionSpec":
        return cls(**o.to_dict())

    def to_option(self) -> QuantOption:
        return QuantOption.from_dict(self.model_dump())


class Assignment(_Strict):
    module: str
    rows: tuple[int, int] | None = Field(None, description="row range [start, stop) of the group; null = whole module")
    shape: tuple[int, int] = Field(description="[out_features, in_features] of the weight")
    option: OptionSpec
    label: str
    storage_bits: int
    predicted_delta_loss: float = Field(description="predicted increase of mean next-token NLL, nats")
    predicted_latency_s: float | None = Field(None, description="this layer's kernel latency on the plan's hardware profile")
    tied_to: list[str] = Field(default_factory=list, description="other modules sharing this tensor")


class Summary(_Strict):
    planned_modules: int
    planned_weights: int
    nominal_bits_per_weight: float
    storage_bits_per_weight: float
    storage_bytes: int
    fp16_bytes: int
    predicted_delta_loss: float


class BudgetSpec(_Strict):
    kind: Literal["bits", "bytes", "percent"]
    value: float
    text: str
    max_storage_bits: float


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


class Plan(_Strict):
    format: Literal["bitalloc.plan"] = PLAN_FORMAT
    schema_version: Literal[1] = SCHEMA_VERSION
    bitalloc_version: str
    model: ModelSpec
    calibration: dict
    error_model: str
    quantizer: str = Field("rtn", pattern=r"^[a-z0-9][a-z0-9_-]*$",
                           description="quantizer the candidate errors were computed with and the plan is applied "
                           "with (rtn, gptq); plans without this field are rtn")
    options: list[str] = Field(description="labels of the candidate options offered to the solver")
    solver: SolverSpec
    seed: int
    budget: BudgetSpec
    summary: Summary
    latency: LatencySpec | None = Field(None, description="predicted latency on a hardware profile, when one was given")
    assignments: list[Assignment]
    constraints: dict | None = Field(None, description="constraints the plan was solved under (bit bounds, pins, "
                                     "option filters, ties, latency limit); null if none")

    @model_serializer(mode="wrap")
    def _omit_rtn_quantizer(self, handler):
        # RTN plans are written exactly as before the quantizer field existed: byte-identical, and
        # readable by earlier bitalloc versions (which reject unknown fields).
        d = handler(self)
        if d.get("quantizer") == "rtn":
            d.pop("quantizer")
        return d

    def to_json(self) -> str:
        return canonical_json(self.model_dump(mode="json"))

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path).expanduser()
        if not p.is_file():
            raise BadInputError(f"plan file {str(path)!r} does not exist; make one with `bitalloc plan MODEL --out {p.name}`")
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
            return cls.model_validate_json(text, strict=True)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise BadInputError(f"{origin} is not a valid plan: {where}: {err['msg']} ({e.error_count()} error(s))") from None

    def options_by_module(self) -> dict[str, QuantOption]:
        return {a.module: a.option.to_option() for a in self.assignments}


def plan_json_schema() -> dict:
    return Plan.model_json_schema()


SCHEMA_PATH = Path(__file__).parent / "schema" / f"plan-v{SCHEMA_VERSION}.json"
