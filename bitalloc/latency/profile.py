"""Hardware profile: measured kernel latencies of one machine, as versioned JSON (profiles/*.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BadInputError, PlanVersionError, step
from ..io import atomic_write_text, canonical_json

PROFILE_SCHEMA_VERSION = 1
PROFILE_FORMAT = "bitalloc.latency-profile"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyEntry(_Strict):
    option: str = Field(description="option label, e.g. int4-g128-asym")
    kernel: str = Field(description="kernel that ran it (dequant_dense = no kernel for the format)")
    out_features: int = Field(ge=1)
    in_features: int = Field(ge=1)
    tokens: int = Field(ge=1, description="rows of the activation: 1 = decode, e.g. 512 = prefill")
    median_s: float = Field(gt=0)
    p10_s: float = Field(gt=0)
    p90_s: float = Field(gt=0)
    samples: int = Field(ge=1)
    calls_per_sample: int = Field(ge=1)
    host_s: float | None = Field(None, ge=0, description="GPU only: median seconds the host spends issuing one call")


class KernelCheck(_Strict):
    """Whether a kernel ran an option and matched the dense matmul on the stored weight."""

    kernel: str
    option: str
    status: Literal["ok", "failed", "mismatch"]
    relative_error: float | None = None
    detail: str = ""


class ModelTiming(_Strict):
    """A model's forward time outside its planned layers (attention, norms, embeddings, head,
    framework overhead), measured with those layers replaced by no-ops, and once more with them all
    dense, which calibrates how isolated kernel timings translate into the model (layer_scale);
    LatencyModel.combine adds a plan's layers to it."""

    model: str = Field(description="where the timed model came from")
    signature: str = Field(description="architecture and planned-layer shapes; plans of any copy of the model match it")
    tokens: int
    context: int = Field(description="tokens already in the KV cache (0 for prefill)")
    other_s: float = Field(description="measured forward time with the planned layers replaced by no-ops")
    linear_predicted_s: float = Field(description="the planned layers kept dense: sum of their isolated kernel timings")
    dense_measured_s: float | None = Field(None, description="measured forward time with the planned layers kept dense")
    layer_scale: float = Field(1.0, gt=0, description="CPU: (dense_measured_s - other_s) / linear_predicted_s, how much slower "
                               "a layer runs inside the model than alone; 1 on GPUs, where the host hides the device")


class HardwareProfile(_Strict):
    format: Literal["bitalloc.latency-profile"] = PROFILE_FORMAT
    schema_version: Literal[1] = PROFILE_SCHEMA_VERSION
    name: str
    device_type: Literal["cpu", "cuda"]
    device_name: str
    activation_dtype: str
    threads: int
    torch_version: str
    bitalloc_version: str
    measured_on: str = Field(description="UTC date of the measurement")
    kernels: dict[str, str] = Field(description="kernels tried on this device: name -> summary")
    kernel_for_option: dict[str, str] = Field(description="option label -> kernel used (after the checks)")
    checks: list[KernelCheck]
    entries: list[LatencyEntry]
    models: list[ModelTiming] = Field(default_factory=list)

    def to_json(self) -> str:
        return canonical_json(self.model_dump(mode="json"))

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "HardwareProfile":
        p = Path(path).expanduser()
        if not p.is_file():
            raise BadInputError(f"latency profile {str(path)!r} does not exist; measure one with {step('latency')} or pick one in profiles/")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BadInputError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from None
        if not isinstance(raw, dict) or raw.get("format") != PROFILE_FORMAT:
            raise BadInputError(f"{path} is not a bitalloc latency profile (no \"format\": \"{PROFILE_FORMAT}\")")
        if raw.get("schema_version") != PROFILE_SCHEMA_VERSION:
            raise PlanVersionError(
                f"{path} has latency-profile schema version {raw.get('schema_version')!r}; this bitalloc reads "
                f"version {PROFILE_SCHEMA_VERSION}: re-measure it with {step('latency')} or upgrade bitalloc"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise BadInputError(f"{path} is not a valid latency profile: {where}: {err['msg']}") from None


PROFILE_SCHEMA_PATH = Path(__file__).parent.parent / "schema" / f"latency-profile-v{PROFILE_SCHEMA_VERSION}.json"
