"""Activation spikes at every planned projection's input and output, from one forward pass per window.

"Activation spikes" (Yang et al. 2024, "Mitigating Quantization Errors Due to Activation Spikes in
GLU-Based LLMs"; Sun et al. 2024, "Massive Activations in LLMs") are a few channels that reach values
hundreds to thousands of times the typical magnitude at a few tokens (often the first token or a
delimiter), concentrated in a few down_proj / o_proj inputs. They say which layers' inputs a
quantizer must not clip and which layers the planner should keep at high precision.

Per site (a projection's input or output), over every calibration token:
  max |x|, per-channel max |x| and RMS, the top-k channels by max |x|, the kurtosis of all values
  (Pearson: 3 for a Gaussian), ratio = max |x| / median channel RMS, the k tokens (window, position)
  with the largest |x| and the channel where each peaks, and flagged = ratio > threshold.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np
import torch
from torch import nn

from ..calibration import Calibration
from ..config import SPIKE_THRESHOLD
from ..models import forward_hooks
from .records import ProjectionSpikes, SiteSpikes
from .statistics import refuse_non_finite
from ..progress import steps

# max |x| over median channel RMS. A Gaussian channel at 8k tokens reaches ~4.5; on SmolLM2-135M six
# down_proj inputs exceed 300 (layers 1, 2, 9, 11, 28, 29: 400 to 23000) and the next is 281.
DEFAULT_THRESHOLD = SPIKE_THRESHOLD


class _SiteAccumulator:
    """Streaming moments, channel extremes and the top-k tokens of one site."""

    def __init__(self, top_k: int):
        self.k = top_k
        self.n = 0
        self.moments = np.zeros(4)  # Σx, Σx², Σx³, Σx⁴ over all elements (float64)
        self.ch_max = None
        self.ch_sq = None
        self.top: list[tuple[float, int, int, int]] = []  # (|x|, window, position, channel)

    def add(self, x: torch.Tensor, window: int, offset: int = 0) -> None:
        """x: the site's values at consecutive tokens of `window`, the first at position `offset`."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [seq, channels]; sums below accumulate in float64
        a = x.abs()
        x2 = x * x
        f64 = torch.float64
        self.n += x.shape[0]
        self.moments += np.array([float(x.sum(dtype=f64)), float(x2.sum(dtype=f64)), float((x2 * x).sum(dtype=f64)),
                                  float((x2 * x2).sum(dtype=f64))])
        cmax, csq = a.amax(0).double(), x2.sum(0, dtype=f64)
        self.ch_max = cmax if self.ch_max is None else torch.maximum(self.ch_max, cmax)
        self.ch_sq = csq if self.ch_sq is None else self.ch_sq + csq
        tok_max, tok_ch = a.max(dim=1)
        vals, pos = tok_max.topk(min(self.k, tok_max.numel()))
        self.top += [(float(v), window, offset + int(p), int(tok_ch[p])) for v, p in zip(vals, pos)]
        self.top = sorted(self.top, key=lambda t: (-t[0], t[1], t[2]))[: self.k]

    def finish(self, threshold: float) -> SiteSpikes:
        count = self.n * self.ch_max.numel()
        m1, m2, m3, m4 = self.moments / count
        var = m2 - m1**2
        # fourth central moment from raw moments: E(x−μ)⁴ = m4 − 4μm3 + 6μ²m2 − 3μ⁴
        kurt = (m4 - 4 * m1 * m3 + 6 * m1**2 * m2 - 3 * m1**4) / var**2 if var > 0 else float("nan")
        ch_max = self.ch_max.numpy()
        ch_rms = (self.ch_sq / self.n).sqrt().numpy()
        median = float(np.median(ch_rms))
        max_abs = float(ch_max.max())
        ratio = max_abs / median if median > 0 else float("inf")
        order = np.argsort(-ch_max, kind="stable")[: self.k]
        return SiteSpikes(
            tokens=self.n, max_abs=max_abs, channel_max=ch_max, channel_rms=ch_rms, kurtosis=float(kurt),
            ratio=float(ratio), top_channels=order.astype(np.int64),
            top_tokens=np.array([t[1:] for t in self.top], dtype=np.int64).reshape(-1, 3),
            top_values=np.array([t[0] for t in self.top]), flagged=bool(ratio > threshold),
        )


class SpikeCollector:
    """Spike accumulators of named modules, fed by forward hooks; the caller says which window (and,
    when a window arrives in token chunks, at which position the chunk starts) is running."""

    def __init__(self, module_names: list[str], top_k: int = 8):
        self.acc = {n: (_SiteAccumulator(top_k), _SiteAccumulator(top_k)) for n in module_names}
        self.window = 0
        self.offset = 0

    def at(self, window: int, offset: int = 0) -> None:
        """What runs next is `window`, from token `offset` on."""
        self.window, self.offset = window, offset

    def hooked(self, modules: dict[str, nn.Module]) -> AbstractContextManager:
        """Record the inputs and outputs of `modules` (those of them this collector tracks) while inside."""
        def hook(mod, args, output, name):
            self.acc[name][0].add(args[0], self.window, self.offset)
            self.acc[name][1].add(output, self.window, self.offset)

        return forward_hooks((m, lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in modules.items() if n in self.acc)

    def finish(self, threshold: float = DEFAULT_THRESHOLD) -> dict[str, ProjectionSpikes]:
        for n, sites in self.acc.items():
            for site, a in zip(("input", "output"), sites):
                if a.ch_max is None:
                    raise RuntimeError(f"module {n} was never called during the spikes pass; is it used in forward?")
                # kurtosis NaN (a constant site) and ratio inf (median RMS 0) are defined outcomes; the sums are not
                refuse_non_finite(n, f"spikes ({site})", np.concatenate([a.moments, a.ch_max.numpy(), a.ch_sq.numpy()]))
        return {n: ProjectionSpikes(input=a.finish(threshold), output=b.finish(threshold)) for n, (a, b) in self.acc.items()}


@torch.no_grad()
def collect_spikes(model: nn.Module, module_names: list[str], calibration: Calibration, *, top_k: int = 8,
                   threshold: float = DEFAULT_THRESHOLD, progress: bool = False) -> dict[str, ProjectionSpikes]:
    """Spike statistics of every named module's input and output over all calibration windows."""
    collector = SpikeCollector(module_names, top_k)
    with collector.hooked({n: model.get_submodule(n) for n in module_names}):
        for i, window in enumerate(steps(calibration.tokens, "activation spikes", show=progress, unit="win")):
            collector.at(i)
            model(input_ids=window[None])
    return collector.finish(threshold)
