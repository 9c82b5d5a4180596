"""What each profile signal records per module, as plain data (numpy only): the profile artifact
reads and writes these without importing torch, so planning from a saved profile needs no torch.
The modules that compute them (hessian_trace, salience, spikes, interactions) re-export them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TraceEstimate:
    """Running Hutchinson estimate for one weight [out, in]; group_trace sums rows in blocks of group_rows."""

    numel: int
    group_rows: int
    probes: int = 0
    total: float = 0.0  # Σ over probes of v·Hv
    total_sq: float = 0.0  # Σ over probes of (v·Hv)²
    group_total: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [row blocks] Σ over probes
    stopped_by: str | None = None  # "relative" | "absolute" | "max_probes"; None while probing

    @property
    def trace(self) -> float:
        return self.total / self.probes if self.probes else math.nan

    @property
    def stderr(self) -> float:
        """Standard error of the running mean (sample std / √probes)."""
        n = self.probes
        if n < 2:
            return math.inf
        var = max(self.total_sq / n - (self.total / n) ** 2, 0.0) * n / (n - 1)
        return math.sqrt(var / n)

    @property
    def rel_stderr(self) -> float:
        t = abs(self.trace)
        return self.stderr / t if t > 0 else math.inf

    @property
    def per_param(self) -> float:
        return self.trace / self.numel

    @property
    def group_trace(self) -> np.ndarray:
        return self.group_total / max(self.probes, 1)

    def predicted_delta_loss(self, dw_sq_sum: float) -> float:
        """HAWQ-V2 eq. 6: ½ · tr(H)/n · ‖ΔW‖²."""
        return 0.5 * self.per_param * dw_sq_sum


@dataclass
class Salience:
    """Per-column sums [in], group sums [row blocks, column groups], and clustering, per kind."""

    group_rows: int
    group_cols: int
    column: dict[str, np.ndarray]
    groups: dict[str, np.ndarray]
    top1pct_share: dict[str, float]
    gini: dict[str, float]

    def total(self, kind: str = "hessian") -> float:
        return float(self.column[kind].sum())


@dataclass
class SiteSpikes:
    """Spike statistics of one activation site [tokens, channels]."""

    tokens: int
    max_abs: float
    channel_max: np.ndarray  # [channels] max |x|
    channel_rms: np.ndarray  # [channels]
    kurtosis: float
    ratio: float  # max_abs / median(channel_rms)
    top_channels: np.ndarray  # [k] channel ids, largest max |x| first
    top_tokens: np.ndarray  # [k, 3] (window, position, channel), largest |x| first
    top_values: np.ndarray  # [k] |x| at those tokens
    flagged: bool


@dataclass
class ProjectionSpikes:
    input: SiteSpikes
    output: SiteSpikes


@dataclass
class Interaction:
    a: str
    b: str
    relation: str  # "sibling" (same input) or "sequential" (a's stage feeds b's)
    option: str
    single_a: float
    single_b: float
    joint: float

    @property
    def correction(self) -> float:
        return self.joint - self.single_a - self.single_b
