"""Latency model: (layer shape, option, tokens) -> predicted seconds, from a measured profile."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from ..errors import BadInputError, setting, step
from ..options import QuantOption
from .profile import HardwareProfile, LatencyEntry


class LatencyModel:
    """Looks up measured kernel latencies; a shape that was not measured takes the nearest measured
    shape of the same option and token count (nearest in log weight count), scaled by the ratio of
    weight counts. Both regimes the profile covers scale that way: decode (memory-bound, time ∝
    weight bytes) and prefill (compute-bound, time ∝ out·in·tokens).

    A whole forward pass combines the layers with the rest of the model (`combine`): on a CPU the
    times add up; on a GPU the host issues kernels while the device runs earlier ones, so an eager
    forward lasts as long as the slower of the two pipelines (host: the rest of the model plus
    issuing each layer; device: the layers' kernels)."""

    def __init__(self, profile: HardwareProfile):
        self.profile = profile
        self._entries: dict[tuple[str, int], list[LatencyEntry]] = defaultdict(list)
        for e in profile.entries:
            self._entries[(e.option, e.tokens)].append(e)

    @property
    def tokens(self) -> list[int]:
        return sorted({t for _, t in self._entries})

    def predict(self, option: QuantOption | str, out_features: int, in_features: int, tokens: int) -> float:
        label = option if isinstance(option, str) else option.label
        measured = self._entries.get((label, tokens))
        if not measured:
            have = sorted({o for o, t in self._entries if t == tokens})
            if not have:
                raise BadInputError(
                    f"latency profile {self.profile.name!r} has no timings at {tokens} tokens (it has {self.tokens}); "
                    f"pick one of those or re-measure with {step('latency')} at {setting('tokens')} {tokens}"
                )
            raise BadInputError(
                f"latency profile {self.profile.name!r} has no timing for option {label}; re-measure it with "
                f"{step('latency')} offering that option, or plan without it (it has {len(have)} options, e.g. {', '.join(have[:4])})"
            )
        best = _nearest(measured, out_features * in_features)
        return best.median_s * out_features * in_features / (best.out_features * best.in_features)

    def predict_host(self, option: QuantOption | str, out_features: int, in_features: int, tokens: int) -> float:
        """Host seconds to issue one call (GPU profiles; 0 where the profile has none). Issuing does
        not grow with the weight, so the nearest measured shape's value is taken as it is."""
        self.predict(option, out_features, in_features, tokens)  # same errors for unknown options
        label = option if isinstance(option, str) else option.label
        return _nearest(self._entries[(label, tokens)], out_features * in_features).host_s or 0.0

    @property
    def asynchronous(self) -> bool:
        return self.profile.device_type == "cuda"

    def combine(self, other_s: float, layers_s: float, layers_host_s: float, layer_scale: float = 1.0) -> float:
        """Whole-forward seconds from the rest of the model and the planned layers' device and host time
        (layer_scale: the model timing's in-model slowdown of layers, applied on synchronous devices)."""
        if self.asynchronous:
            return max(other_s + layers_host_s, layers_s)
        return other_s + layer_scale * layers_s

    def matrix(self, shapes: list[tuple[int, int]], options: list[QuantOption], allowed: np.ndarray, tokens: int,
               host: bool = False) -> np.ndarray:
        """[groups, options] predicted seconds (host=True: issue seconds); NaN where not allowed."""
        fn = self.predict_host if host else self.predict
        out = np.full((len(shapes), len(options)), np.nan)
        for g, (o, i) in enumerate(shapes):
            for k, opt in enumerate(options):
                if allowed[g, k]:
                    out[g, k] = fn(opt, o, i, tokens)
        return out


def _nearest(entries: list[LatencyEntry], size: int) -> LatencyEntry:
    """The measured shape closest in log weight count (ties broken by shape, so lookups are stable)."""
    return min(entries, key=lambda e: (abs(math.log(e.out_features * e.in_features / size)), e.out_features, e.in_features))


def shape_signature(architecture: str, shapes: list[tuple[int, int]]) -> str:
    """Names a model's planned layers by architecture and shapes, not by path or weights: the time a
    layer takes depends on those alone."""
    import hashlib

    digest = hashlib.sha256(repr(sorted(shapes)).encode()).hexdigest()[:12]
    return f"{architecture}/{len(shapes)} layers/{digest}"


_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_latency(text: str | float) -> float:
    """'12ms', '0.8s', '950us' -> seconds (a bare number is seconds)."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        t = text.strip().lower()
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if t.endswith(u)), "")
        try:
            seconds = float(t[: len(t) - len(unit)]) * _UNITS.get(unit, 1.0)
        except ValueError:
            raise BadInputError(f"cannot read latency {text!r}; write e.g. '12ms', '0.8s' or '950us'") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise BadInputError(f"latency limit must be a positive time, got {text!r}; write e.g. '12ms'")
    return seconds
