"""One call for `bitalloc latency`: a model's shapes -> kernel timings -> end-to-end model timing."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInputError, setting
from ..models import load_model, model_from_config, select_modules, weight_matrix
from ..options import QuantOption
from .measure import default_activation_dtype, measure_profile
from .profile import HardwareProfile
from .runtime import measure_model_timings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def measure_latency(
    model_sources: list[str],
    options: list[QuantOption],
    *,
    name: str,
    device: str = "cpu",
    tokens: list[int] = (1, 512),
    context: int = 512,
    dtype: str | None = None,
    samples: int = 15,
    include_lm_head: bool = False,
    config_only: bool = False,
    model_timing: bool = True,
    progress: bool = False,
) -> HardwareProfile:
    """Measure every option's kernel at the models' planned-layer shapes on `device`, then (with
    model_timing) each whole model's forward pass, so plans can predict end-to-end latency.

    config_only: build the model from its config.json with random weights — kernel speed does not
    depend on the values, and it lets a machine without the weights measure.
    """
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise BadInputError(f"{setting('device')} {device!r} is not supported; use cpu or cuda")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError(f"{setting('device')} cuda was asked for, but torch sees no CUDA device; use {setting('device')} cpu")
    if dtype is not None and dtype not in DTYPES:
        raise BadInputError(f"{setting('dtype')} {dtype!r} is not one of {', '.join(DTYPES)}")
    act_dtype = DTYPES[dtype] if dtype else default_activation_dtype(dev)
    if any(t < 1 for t in tokens):
        raise BadInputError(f"{setting('tokens')} must be positive token counts, got {list(tokens)}")
    if not model_sources:
        raise BadInputError(f"name at least one model ({setting('model_sources')}) whose layer shapes to time")

    def load(source: str):
        if config_only:  # built straight on the device: an 8B model initialised on a CPU takes minutes
            return model_from_config(source, dtype=act_dtype, device=dev).model
        return load_model(source).model

    shapes: set[tuple[int, int]] = set()
    for source in model_sources:
        model = load(source)
        shapes |= {tuple(weight_matrix(model.get_submodule(n)).shape) for n in select_modules(model, include_lm_head=include_lm_head)}
        del model
    profile = measure_profile(name, sorted(shapes), options, dev, tokens=tokens, dtype=act_dtype, samples=samples, progress=progress)
    if not model_timing:
        return profile
    timings = []
    for source in model_sources:
        model = load(source).to(dev, act_dtype)
        names = select_modules(model, include_lm_head=include_lm_head)
        timings += measure_model_timings(model, names, profile, Path(source).name, list(tokens), context=context)
        del model
    return profile.model_copy(update={"models": timings})
