"""`bitalloc latency`: time every option's kernel at a model's real linear shapes on this machine."""

from __future__ import annotations

import datetime as _dt
import itertools
import platform
from typing import Iterable

import torch

from ..options import QuantOption
from .kernels import DEQUANT_DENSE, Kernel, LinearFn, kernels_for, reference_weight
from .profile import HardwareProfile, KernelCheck, LatencyEntry
from .timing import time_call
from ..progress import Bar

_DTYPE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def check_tolerance(kernel: str, option: QuantOption, dtype: torch.dtype) -> float:
    """Largest relative error a kernel may show against the dense matmul on the stored weight.
    Weight-only kernels differ only by accumulation order in the activation dtype. W8A8 FP8 also
    quantizes the activations; the dequantize fallback multiplies FP elements by their scales in
    the activation dtype, where a small scale (e5m2's: max|w| / 57344) can be an fp16 subnormal."""
    if kernel == "fp8_scaled_mm":
        return 0.08
    if kernel == "dequant_dense" and option.fmt == "fp":
        return 0.05
    return _DTYPE_TOLERANCE.get(dtype, 3e-2)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_activation_dtype(device: torch.device) -> torch.dtype:
    # bf16 everywhere: torch's weight-only int4/int8 kernels are bf16-first (on this project's AVX2
    # CPU they were 2-20x slower with fp32 activations than with bf16). --dtype float32 measures fp32.
    return torch.bfloat16


def _relative_error(fn: LinearFn, weight: torch.Tensor, option: QuantOption, dtype: torch.dtype) -> float:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, weight.shape[1], generator=gen).to(weight.device, dtype)
    want = x.float() @ reference_weight(weight, option).float().t()
    got = fn(x).float()
    return float((got - want).norm() / want.norm().clamp(min=1e-30))


def choose_kernel(option: QuantOption, device: torch.device, dtype: torch.dtype,
                  weight: torch.Tensor, checks: list[KernelCheck]) -> tuple[Kernel, LinearFn]:
    """The first kernel for this device that supports the option, runs, and matches the dense matmul
    on the stored weight; `dequant_dense` otherwise. Every attempt is recorded in `checks`."""
    for kernel in kernels_for(device.type):
        if not kernel.supports(option):
            continue
        try:
            fn = kernel.prepare(weight, option, dtype)
            err = _relative_error(fn, weight, option, dtype)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            checks.append(KernelCheck(kernel=kernel.name, option=option.label, status="failed", detail=str(e).splitlines()[0][:200]))
            continue
        ok = err <= check_tolerance(kernel.name, option, dtype)
        checks.append(KernelCheck(kernel=kernel.name, option=option.label, status="ok" if ok else "mismatch",
                                  relative_error=float(f"{err:.3g}")))
        if ok:
            return kernel, fn
    raise RuntimeError(f"no kernel ran {option.label} on {device}, not even {DEQUANT_DENSE.name}")


def prepare_or_choose(kernel: Kernel, option: QuantOption, device: torch.device, dtype: torch.dtype,
                      weight: torch.Tensor, checks: list[KernelCheck]) -> tuple[Kernel, LinearFn]:
    """The option's kernel for this weight; if it cannot take this shape (a tiling constraint, say),
    the next kernel that can, as `choose_kernel` finds it."""
    try:
        return kernel, kernel.prepare(weight, option, dtype)
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        checks.append(KernelCheck(kernel=kernel.name, option=option.label, status="failed",
                                  detail=f"shape {list(weight.shape)}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"))
        return choose_kernel(option, device, dtype, weight, checks)


# Twice the largest last-level cache of the machines measured here (32 MiB L3 on the CPU, 50 MB L2
# on the H100), so no layer is timed from a warm cache.
COLD_BYTES = 128 * 2**20
MAX_COPIES = 64


def cold_copies(out_features: int, in_features: int, cold_bytes: int) -> int:
    """Weight copies to rotate over so that their 16-bit size reaches cold_bytes."""
    return max(1, min(MAX_COPIES, -(-cold_bytes // (2 * out_features * in_features))))


def measure_profile(
    name: str,
    shapes: Iterable[tuple[int, int]],
    options: Iterable[QuantOption],
    device: str | torch.device = "cpu",
    tokens: Iterable[int] = (1, 512),
    dtype: torch.dtype | None = None,
    samples: int = 15,
    seed: int = 0,
    cold_bytes: int = COLD_BYTES,
    progress: bool = False,
) -> HardwareProfile:
    """Time each option at each (out, in) shape and activation row count on `device`.
    cold_bytes: rotate over enough weight copies that their 16-bit size exceeds this (0: one copy)."""
    from ..api import bitalloc_version

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        from ..errors import BadInputError, setting

        raise BadInputError(f"{setting('device')} cuda was asked for, but torch sees no CUDA device; use {setting('device')} cpu")
    dtype = dtype or default_activation_dtype(device)
    shapes = sorted(set((int(o), int(i)) for o, i in shapes))
    options = list(options)
    tokens = sorted(set(int(t) for t in tokens))
    gen = torch.Generator().manual_seed(seed)
    checks: list[KernelCheck] = []
    kernel_for_option: dict[str, str] = {}
    entries: list[LatencyEntry] = []
    work = [(o, s) for o in options for s in shapes]
    bar = Bar(len(work) * len(tokens), "latency", show=progress, unit="kernel")
    for option in options:
        chosen: Kernel | None = None
        for out_f, in_f in shapes:
            if not option.fits(in_f):
                bar.update(len(tokens))
                continue
            # Weights like a trained layer's (the values do not change dense kernels' speed).
            weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(device)
            if chosen is None:
                chosen, fn = choose_kernel(option, device, dtype, weight, checks)
                kernel_for_option[option.label] = chosen.name
                kernel = chosen
            else:
                kernel, fn = prepare_or_choose(chosen, option, device, dtype, weight, checks)
            # In a model every layer's weights arrive from memory, not from a cache that the previous
            # call warmed: calls rotate over copies that together exceed the caches.
            copies = [fn] + [kernel.prepare((torch.randn(out_f, in_f, generator=gen) * 0.02).to(device), option, dtype)
                             for _ in range(cold_copies(out_f, in_f, cold_bytes) - 1)]
            for t in tokens:
                x = torch.randn(t, in_f, generator=gen).to(device, dtype)
                turn = itertools.cycle(copies)
                timing = time_call(lambda: next(turn)(x), device, samples=samples)
                entries.append(LatencyEntry(
                    option=option.label, kernel=kernel.name, out_features=out_f, in_features=in_f, tokens=t,
                    median_s=timing.median_s, p10_s=timing.p10_s, p90_s=timing.p90_s,
                    samples=timing.samples, calls_per_sample=timing.calls_per_sample, host_s=timing.host_s,
                ))
                bar.update(1)
            del weight, fn, copies
    bar.close()
    return HardwareProfile(
        name=name,
        device_type=device.type,
        device_name=device_name(device),
        activation_dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        bitalloc_version=bitalloc_version(),
        measured_on=_dt.datetime.now(_dt.timezone.utc).date().isoformat(),
        kernels={k.name: k.summary for k in kernels_for(device.type)},
        kernel_for_option=dict(sorted(kernel_for_option.items())),
        checks=checks,
        entries=entries,
    )
