"""Run a model with its planned layers on the real kernels, and time its forward pass end to end:
the measurement that a latency prediction is checked against."""

from __future__ import annotations

import torch
from torch import nn

from ..models import cache_argument, weight_matrix
from ..options import QuantOption
from .kernels import LinearFn, get_kernel
from .measure import choose_kernel, prepare_or_choose
from .predict import LatencyModel, shape_signature
from .profile import HardwareProfile, ModelTiming
from .timing import Timing, time_call
from ..progress import steps


class KernelLinear(nn.Module):
    """A linear layer computed from its stored (quantized) weight by one kernel."""

    def __init__(self, fn: LinearFn, in_features: int, bias: torch.Tensor | None, kernel: str, option: str):
        super().__init__()
        self.fn, self.in_features, self.kernel, self.option = fn, in_features, kernel, option
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.fn(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, -1)

    def extra_repr(self) -> str:
        return f"{self.option} via {self.kernel}"


def attach_kernels(model: nn.Module, options: dict[str, QuantOption], profile: HardwareProfile | None = None,
                   dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, str]:
    """Replace each named module by a KernelLinear running its option (in place); returns
    module -> kernel. With a profile, each option runs the kernel the profile timed for it."""
    param = next(model.parameters())
    device, dtype = param.device, dtype or param.dtype
    used = {}
    for name, option in steps(sorted(options.items()), "kernels", show=progress, unit="module"):
        module = model.get_submodule(name)
        weight = weight_matrix(module).detach().float()
        bias = getattr(module, "bias", None)
        known = profile.kernel_for_option.get(option.label) if profile else None
        if known:
            kernel, fn = prepare_or_choose(get_kernel(known), option, device, dtype, weight, checks=[])
        else:
            kernel, fn = choose_kernel(option, device, dtype, weight, checks=[])
        _replace(model, name, KernelLinear(fn, weight.shape[1], bias, kernel.name, option.label))
        used[name] = kernel.name
    return used


def time_forward(model: nn.Module, tokens: int, context: int = 0, samples: int = 10, seed: int = 0,
                 vocab_size: int | None = None) -> Timing:
    """Seconds per forward pass: `tokens` new tokens after `context` cached ones (decode: tokens=1).
    The KV cache is cropped back to `context` after every step, so each step sees the same state."""
    device = next(model.parameters()).device
    vocab = vocab_size or model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, context + tokens), generator=gen).to(device)
    with torch.inference_mode():
        if context == 0:
            return time_call(lambda: model(ids, use_cache=False), device, samples=samples, min_sample_s=0.0)
        cache_arg = cache_argument(model)
        cache = model(ids[:, :context], use_cache=True)[cache_arg]
        step = ids[:, context:]

        def one_step():
            model(step, use_cache=True, **{cache_arg: cache})
            cache.crop(-tokens)  # drop the step just added (negative: count from the end)

        return time_call(one_step, device, samples=samples, min_sample_s=0.0)



class NullLinear(nn.Module):
    """Stands in for a planned layer while the rest of the model is timed: returns zeros of the
    layer's output shape (one memset), so what remains is attention, norms, embeddings, the head
    and the framework's own overhead."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def measure_model_timings(model: nn.Module, module_names: list[str], profile: HardwareProfile, source: str,
                          tokens: list[int], context: int = 512, samples: int = 10) -> list[ModelTiming]:
    """Time the model's forward pass with its planned layers replaced by NullLinear — the time a plan
    cannot change — and with them all dense (on the profile's kernels). On a CPU the second timing
    calibrates layer_scale: a layer inside the model runs slower than alone (its weights compete
    with activations and the KV cache for caches and memory bandwidth), and that factor, measured
    once per model, applies to every plan. Decode steps (1 token) run after `context` cached
    tokens; longer inputs are prefills from an empty cache. The model is modified in place."""
    keep = QuantOption.keep()
    shapes = [tuple(weight_matrix(model.get_submodule(n)).shape) for n in module_names]
    predict = LatencyModel(profile)
    signature = shape_signature(type(model).__name__, shapes)
    originals = {n: model.get_submodule(n) for n in module_names}
    for name, (out_f, _) in zip(module_names, shapes):
        _replace(model, name, NullLinear(out_f))
    others = {t: time_forward(model, t, context if t == 1 else 0, samples=samples).median_s for t in sorted(tokens)}
    for name, module in originals.items():
        _replace(model, name, module)
    attach_kernels(model, {n: keep for n in module_names}, profile)
    timings = []
    for t, other in others.items():
        ctx = context if t == 1 else 0
        dense = time_forward(model, t, ctx, samples=samples).median_s
        linear = sum(predict.predict(keep, o, i, t) for o, i in shapes)
        scale = 1.0 if predict.asynchronous else max((dense - other) / linear, 1e-3)
        timings.append(ModelTiming(model=source, signature=signature, tokens=t, context=ctx, other_s=other,
                                   linear_predicted_s=linear, dense_measured_s=dense, layer_scale=scale))
    return timings


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
