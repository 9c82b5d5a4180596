"""What planning needs from a hardware profile: a latency per (group, option) and the limit on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInputError, BudgetInfeasibleError, setting, step
from .predict import LatencyModel, parse_latency, shape_signature
from .profile import HardwareProfile


@dataclass(frozen=True)
class LatencyTarget:
    """Plan against `profile` at `tokens` per forward (1 = decode step); optionally at most
    `max_latency` for the whole forward pass ('30ms', or seconds)."""

    profile: HardwareProfile | str | Path
    tokens: int = 1
    max_latency: str | float | None = None

    def resolved_profile(self) -> HardwareProfile:
        return self.profile if isinstance(self.profile, HardwareProfile) else HardwareProfile.load(self.profile)


@dataclass(frozen=True)
class LatencyInputs:
    profile: HardwareProfile
    tokens: int
    context: int
    matrix: np.ndarray  # [groups, options] device seconds, NaN where not allowed
    host: np.ndarray  # [groups, options] host seconds to issue (0 on a CPU)
    other_s: float | None  # the model outside its planned layers, if the profile timed it
    max_latency_s: float | None  # for the whole forward pass
    max_layers_s: float | None  # the limit on the sum of `matrix` over the chosen cells
    model: LatencyModel

    def predicted(self, layers_s: float, host_s: float) -> float | None:
        return None if self.other_s is None else self.model.combine(self.other_s, layers_s, host_s)


def latency_inputs(target: LatencyTarget, architecture: str, shapes: list[tuple[int, int]], options: list,
                   allowed: np.ndarray) -> LatencyInputs:
    """The latency matrix and the limit on it that make `max_latency` a linear constraint.

    CPU: layers + other <= limit, so the layers get limit - other. GPU (host and device overlap):
    max(other + host, layers) <= limit, i.e. layers <= limit and other + host <= limit. Issuing
    barely depends on the option, so the host side is checked here for every plan at once: if some
    plans could break it, the limit is refused rather than silently exceeded.
    """
    profile = target.resolved_profile()
    model = LatencyModel(profile)
    matrix = model.matrix(shapes, options, allowed, target.tokens)
    host = model.matrix(shapes, options, allowed, target.tokens, host=True)
    signature = shape_signature(architecture, shapes)
    timing = next((m for m in profile.models if m.signature == signature and m.tokens == target.tokens), None)
    other = timing.other_s if timing else None
    if timing is not None and not model.asynchronous:
        matrix = matrix * timing.layer_scale  # each layer as it runs inside this model (see ModelTiming)
    limit = parse_latency(target.max_latency) if target.max_latency is not None else None
    layers_limit = None
    if limit is not None:
        if other is None:
            raise BadInputError(
                f"latency profile {profile.name!r} did not time this model ({architecture}, {len(shapes)} planned layers) at "
                f"{target.tokens} token(s), so a whole-forward latency cannot be predicted; measure it with "
                f"{step('latency')} on this model at {setting('tokens')} {target.tokens}"
            )
        if model.asynchronous:
            host_low = other + float(np.nanmin(host, axis=1).sum())
            host_high = other + float(np.nanmax(host, axis=1).sum())
            if host_high > limit:
                raise BudgetInfeasibleError(
                    f"{setting('max_latency')} {limit * 1e3:.4g} ms: on {profile.name} this model's forward is host-bound — issuing it takes "
                    f"{host_low * 1e3:.4g} to {host_high * 1e3:.4g} ms whatever the formats — so no plan is sure to meet the limit; "
                    "raise it above that, or run the model with CUDA graphs / a larger batch and re-measure"
                )
            layers_limit = limit
        else:
            layers_limit = limit - other
            if layers_limit <= 0:
                raise BudgetInfeasibleError(
                    f"{setting('max_latency')} {limit * 1e3:.4g} ms is below the {other * 1e3:.4g} ms the model spends outside its planned "
                    f"layers on {profile.name}; raise the limit"
                )
    return LatencyInputs(profile, target.tokens, timing.context if timing else 0, matrix, host, other, limit,
                         layers_limit, model)
