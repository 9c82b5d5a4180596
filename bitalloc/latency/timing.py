"""Time a callable the way kernel benchmarks do: warm up, batch calls per sample, keep the spread."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    calls_per_sample: int
    host_s: float | None = None  # asynchronous devices: median seconds to *issue* one call


# Calls issued back to back before a sync on a GPU: few enough that the launch queue (about a
# thousand kernels) never fills, so issuing never waits for the device and host time stays visible.
MAX_ASYNC_CALLS = 100


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str, samples: int = 15,
              min_sample_s: float = 2e-3, warmup: int = 3) -> Timing:
    """Seconds per call of fn(): the median over `samples` samples, each timing enough back-to-back
    calls to last `min_sample_s` (a single call of a small kernel is below timer resolution and
    launch jitter). p10/p90 record the spread. On a GPU, where a call only enqueues work, the time to
    issue the calls is recorded too (host_s): an eager model is as slow as the slower of host and
    device, and small layers are host-bound."""
    device = torch.device(device)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        # The fastest of a few single calls sets the batch size: one call that happened to be
        # descheduled must not make every sample a single call.
        singles = []
        for _ in range(3):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            singles.append(time.perf_counter() - start)
        one = max(min(singles), 1e-7)
        asynchronous = device.type == "cuda"
        calls = max(1, min(MAX_ASYNC_CALLS if asynchronous else 10_000, int(min_sample_s / one)))
        per_call, issue = [], []
        for _ in range(samples):
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            issued = time.perf_counter()
            _sync(device)
            per_call.append((time.perf_counter() - start) / calls)
            issue.append((issued - start) / calls)
    per_call.sort()
    q = statistics.quantiles(per_call, n=10, method="inclusive") if len(per_call) > 1 else per_call * 9
    return Timing(statistics.median(per_call), q[0], q[-1], samples, calls,
                  statistics.median(issue) if asynchronous else None)
