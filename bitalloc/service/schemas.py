"""Request and response models of the HTTP API (they make up its OpenAPI document).

Requests are strict about their shape (unknown fields are errors, so a typo never silently falls
back to a default) and never accept `trust_remote_code`: whether a model's own Python may run
is the operator's decision, not a client's.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import CalibrationSpec, SolveConfig
from ..options import DEFAULT_BITS, DEFAULT_GROUP_SIZES

Scalar = Union[bool, int, float, str, None]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_remote_code(cls, data: Any) -> Any:
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError("trust_remote_code cannot be set by a request: this server never runs a model's own code")
        return data


class CalibrationIn(_Request):
    path: Optional[str] = Field(None, description="absolute path on the server of a UTF-8 calibration text (e.g. "
                                "wiki.valid.tokens); null = the built-in set (bitalloc/data/calibration/)")
    seq_len: int = Field(CalibrationSpec.seq_len, ge=2, le=32768, description="tokens per calibration window")
    tokens: int = Field(CalibrationSpec.tokens, ge=2, le=4_000_000, description="calibration tokens (random windows of seq_len)")
    seed: int = Field(CalibrationSpec.seed, ge=0, le=2**31 - 1)


class OptionsIn(_Request):
    """The candidate grid the profile prices (as `bitalloc plan --bits/--group-sizes/--formats/--target`)."""

    bits: list[int] = Field(list(DEFAULT_BITS), max_length=16)
    group_sizes: list[Union[int, Literal["ch"]]] = Field(["ch" if g is None else g for g in DEFAULT_GROUP_SIZES], max_length=16,
                                                          description="'ch' = per channel")
    keep: bool = Field(True, description="offer keeping a module in fp16")
    formats: Optional[list[str]] = Field(None, max_length=16, description="format families, e.g. ['int', 'fp8', 'keep']")
    target: Optional[str] = Field(None, description="hardware target restricting the formats: cpu, a100, h100, h200, b200, any")


def _timeout_field():
    return Field(None, gt=0, allow_inf_nan=False,
                 description="seconds the job may run once a worker claims it (at most the server's --job-timeout; "
                 "a larger value is refused); past it the job is failed with the reason and never retried. "
                 "null = the server's --job-timeout. A request that joins a live job for the same work gets that job")


class ProfileIn(_Request):
    timeout_s: Optional[float] = _timeout_field()
    model: str = Field(max_length=4096, description="absolute path of a model directory or .gguf file, or a hub id")
    calibration: CalibrationIn = CalibrationIn()
    options: OptionsIn = OptionsIn()
    include_lm_head: bool = False
    include_embeddings: bool = False
    quantizer: Optional[str] = Field(None, max_length=32, description="quantizer the plans will be applied with (rtn, "
                                     "rtn-mse, rtn-w, awq, gptq, awq-gptq, imatrix; default imatrix for GGUF types, else "
                                     "awq-gptq, or rtn-w on a server with Ray workers); the table holds its errors")


class ConstraintsIn(_Request):
    min_bits: Optional[int] = Field(None, ge=1, le=16)
    max_bits: Optional[int] = Field(None, ge=1, le=16)
    pins: list[tuple[str, str]] = Field([], max_length=256, description="[module regex, option label] pairs")
    allow: list[tuple[str, str]] = Field([], max_length=256, description="[module regex, option-label regex] pairs")
    ties: list[str] = Field(["fused"], max_length=256, description="'fused' (the default: q/k/v, gate/up and each "
                            "projection across a block's experts, what serving stacks fuse) or module regexes whose "
                            "matches share one option; [] = no ties")


class PlanIn(_Request):
    """Either `profile_id` (a stored profile) or `model` + `calibration` (+ `options`): the profile settings."""

    profile_id: Optional[str] = Field(None, max_length=64)
    model: Optional[str] = Field(None, max_length=4096)
    timeout_s: Optional[float] = _timeout_field()
    calibration: Optional[CalibrationIn] = None
    options: Optional[OptionsIn] = None
    include_lm_head: bool = False
    include_embeddings: bool = False
    quantizer: Optional[str] = Field(None, max_length=32, description="quantizer the plan will be applied with; "
                                     "default imatrix for GGUF types, else awq-gptq with a calibration path and awq "
                                     "without (rtn-w on a server with Ray workers), "
                                     "or with profile_id the profile's (another one is refused)")
    budget: str = Field(max_length=64, description="'3.2bits', '1.5GB', '800MB', '2GiB' or '30%' of fp16")
    budget_scope: Optional[Literal["planned", "model"]] = Field(
        None, description="what the budget limits: the planned weights, or the whole model (embedding, head and "
        "norms at 16 bits included), as `bitalloc plan --budget-scope`. Default as there: 'model' for a size "
        "budget of a llama.cpp file (a .gguf model planned in GGUF types: the whole file), else 'planned'")
    solver: str = Field(SolveConfig.solver, max_length=64)
    solver_settings: dict[str, Scalar] = Field({}, max_length=32)
    error_model: Optional[str] = Field(SolveConfig.error_model, max_length=32, description="fisher, local or fisher-tw; "
                                       "default fisher-tw")
    seed: int = Field(SolveConfig.seed, ge=0, le=2**31 - 1)
    constraints: ConstraintsIn = ConstraintsIn()
    formats: Optional[list[str]] = Field(None, max_length=16, description="format families the plan may use")
    target: Optional[str] = Field(None, description="hardware target restricting the formats")

    @model_validator(mode="after")
    def _one_profile(self) -> "PlanIn":
        if (self.profile_id is None) == (self.model is None):
            raise ValueError("give exactly one of profile_id (a stored profile) and model (+ calibration)")
        if self.profile_id is not None and (self.calibration is not None or self.options is not None):
            raise ValueError("with profile_id the profile's calibration and options are fixed; drop calibration/options")
        return self


class JobOut(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "done", "failed"]
    progress: float
    stage: Optional[str]
    error: Optional[str]
    attempts: int = Field(description="times a worker claimed the job")
    requeues: int = Field(description="times it was re-queued because its worker died")
    timeout_s: Optional[float] = Field(None, description="the request's own job timeout; null = the server's --job-timeout")
    note: Optional[str]
    created: float
    updated: float
    profile_id: Optional[str]
    plan_id: Optional[str]


class ProfileOut(BaseModel):
    id: str
    model_source: str
    model_hash: str
    architecture: str
    modules: int
    options: list[str]
    calibration: dict
    created: float


class ProfileResponse(BaseModel):
    profile_id: str
    state: Literal["queued", "running", "done", "failed"]
    job: Optional[JobOut] = Field(description="the job building it (null when it was stored before)")
    profile: Optional[ProfileOut] = Field(description="set once the profile is stored")


class PlanRow(BaseModel):
    """What the store keeps beside every plan (one row of the history)."""

    id: str
    profile_id: str
    model_source: str
    model_hash: str
    budget: str
    solver: str
    created: float


class PlanOut(PlanRow):
    plan: dict = Field(description="the plan (plan-v1 schema, as `bitalloc plan` writes it)")


class PlanResponse(BaseModel):
    plan_id: str = Field(description="content id: same profile + settings -> same id")
    profile_id: str
    state: Literal["queued", "running", "done", "failed"]
    job: Optional[JobOut] = Field(description="set when the plan needs a job (profile not stored yet, or a "
                                  "solver that scores on the model)")
    plan: Optional[PlanOut] = Field(description="set when the plan is ready")


class PlanHistoryItem(PlanRow):
    summary: dict


class PlanHistory(BaseModel):
    plans: list[PlanHistoryItem]


class ErrorOut(BaseModel):
    error: str = Field(description="what kind of error, e.g. 'bad input', 'unauthorized', 'not found'")
    detail: str = Field(description="what is wrong and how to fix it")
