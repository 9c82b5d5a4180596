"""Load a model from a hub id, a local directory or a .gguf file; pick the modules to plan; hash weights."""

from __future__ import annotations

import hashlib
import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .errors import BadInputError, NonFiniteError, setting


def cache_argument(model: nn.Module) -> str:
    """The name of the model's KV-cache argument and output: `cache` from transformers 5.2x on, where
    `past_key_values` is deprecated (and warns), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

try:  # GPT-2 style models store linear layers as Conv1D with weight [in, out].
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any = None
    source: str = "<in-memory>"
    _content_hash: str | None = field(default=None, repr=False)

    @property
    def content_hash(self) -> str:
        if self._content_hash is None:
            self._content_hash = weights_hash(self.model)
        return self._content_hash


def load_model(source: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a causal LM and its tokenizer from a .gguf file, a local directory, or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BadInputError(f"GGUF file {source!r} does not exist; pass the path of an existing .gguf file")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            where = str(path)
        elif len(ggufs) == 1:
            where, kwargs["gguf_file"] = str(path), ggufs[0].name
        else:
            found = ", ".join(p.name for p in ggufs) or "none"
            raise BadInputError(
                f"directory {source!r} has no config.json and not exactly one .gguf file (found: {found}); "
                "pass a directory with config.json + safetensors, or the path of one .gguf file"
            )
    elif source.startswith((".", "/", "~")) or path.exists():
        raise BadInputError(f"model path {source!r} does not exist; pass a directory, a .gguf file or a hub id")
    else:
        where = source  # a hub id such as "HuggingFaceTB/SmolLM2-135M"
    gguf_path = Path(where) / kwargs["gguf_file"] if "gguf_file" in kwargs else None
    try:
        with gguf_parsed_once(gguf_path) as reader:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            if reader is not None and (rope := gguf_rope_parameters(gguf_path, reader)) is not None:
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(where, **kwargs)
                config.rope_parameters = rope  # what transformers' GGUF loader drops (bitalloc/rope.py)
                kwargs["config"] = config
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged GGUF fails anywhere in its reader (struct.error, IndexError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "gguf_file" in kwargs:
            raise BadInputError(f"could not read GGUF file {source!r} ({type(e).__name__}: {first[:200]}); the file is "
                                "damaged or incomplete (a cut-off download?): download or convert it again") from None
        if not isinstance(e, (OSError, ValueError)):
            raise
        raise BadInputError(
            f"could not load model {source!r}: {first}. Offline? pass a local directory or .gguf file; "
            f"custom code needs {setting('trust_remote_code')}"
        ) from None
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(source))


# gguf.GGUFReader swapped for the shared one while one load runs (gguf_parsed_once); loads in threads take turns
_GGUF_SWAP = threading.Lock()


@contextmanager
def gguf_parsed_once(path: Path | None) -> Iterator[Any]:
    """Yield one gguf.GGUFReader of `path` (None: no GGUF, yields None), the one every GGUFReader(path) made in
    the block gets.

    Why: transformers' GGUF loader parses the file again for the tokenizer, the config and the weights
    (load_gguf_checkpoint, each time), and a parse is Python per vocabulary string: ~9 s each for SmolLM2's 49k
    tokens on this project's 2-core CI machine, most of a 43 s load. The loader only reads the reader, so one
    serves all. Outside the block, and for other files or modes, GGUFReader is the real class again.
    """
    if path is None:
        yield None
        return
    import gguf

    real = gguf.GGUFReader
    target = Path(path).resolve()
    with _GGUF_SWAP:
        reader, active = real(target), [True]

        def shared(p, mode="r"):
            return reader if active[0] and mode == "r" and Path(p).resolve() == target else real(p, mode)

        gguf.GGUFReader = shared
        try:
            yield reader
        finally:
            active[0] = False  # a name bound to `shared` inside the block builds real readers from now on
            gguf.GGUFReader = real


def gguf_rope_parameters(path: Path, reader: Any = None) -> dict | None:
    """The llama3 RoPE parameters of a GGUF that stores them as llama.cpp does, as the per-frequency
    tensor rope_freqs.weight (bitalloc/rope.py); None when it has no such tensor. reader: a gguf.GGUFReader of
    `path` already made (else one is)."""
    import gguf

    from . import rope

    reader = reader if reader is not None else gguf.GGUFReader(path)
    tensor = next((t for t in reader.tensors if t.name == rope.TENSOR), None)
    if tensor is None:
        return None

    def value(key: str):
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = value("general.architecture")
    if arch != "llama":
        raise BadInputError(f"{path} is a {arch} GGUF with {rope.TENSOR} (per-frequency RoPE divisors), which "
                            "transformers' GGUF loader ignores and bitalloc recovers for llama only; load the model "
                            "from its Hugging Face checkpoint folder instead")
    dim = value(f"{arch}.rope.dimension_count") or value(f"{arch}.embedding_length") // value(f"{arch}.attention.head_count")
    base = value(f"{arch}.rope.freq_base") or 10000.0
    return rope.parameters_from_factors(np.asarray(tensor.data), float(base), int(dim), str(path))


def model_from_config(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoadedModel:
    """A causal LM with random weights built from a config.json (or a directory holding one).

    For work that needs the architecture but not the trained values (kernel timing, shapes), on
    machines where the weights are not at hand; never for planning, whose errors need real weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path).expanduser()
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise BadInputError(f"no config.json at {str(path)!r}; pass a directory holding config.json or the file itself")
    config = AutoConfig.from_pretrained(str(cfg_path.parent))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return LoadedModel(model=model, source=f"{p} (config only, random weights)")


def check_weights(model: nn.Module) -> None:
    """Refuse weights that are not loaded (meta device) or not finite, naming the module; before any profiling."""
    for name, p in model.named_parameters():
        if p.is_meta:
            raise BadInputError("the model's weights are on the meta device (not loaded, e.g. built under "
                                "init_empty_weights or device_map='meta'); load them first, e.g. from_pretrained(..., "
                                "device_map='cpu'), or pass the model's path")
        finite = torch.isfinite(p.detach())
        if not bool(finite.all()):
            module, _, kind = name.rpartition(".")
            first = [int(i) for i in (~finite).nonzero()[0]]
            raise NonFiniteError(f"{kind} of {module or name} is not finite: {int((~finite).sum())} NaN/Inf value(s), "
                                 f"first at {first}; the checkpoint is damaged (or saved from a diverged run): "
                                 "load an intact copy")


def check_token_ids(model: nn.Module, ids: torch.Tensor, what: str) -> None:
    """Refuse token ids [windows, seq_len] outside the model's vocabulary or longer than its positions."""
    cfg = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(cfg, "vocab_size", None)
    if vocab is not None and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise BadInputError(f"{what} contain id {bad}, outside the model's vocabulary of {vocab} (ids 0..{vocab - 1}); "
                                "tokenize with the model's own tokenizer")
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if positions is not None and ids.ndim == 2 and ids.shape[1] > positions:
        raise BadInputError(f"{what}: {ids.shape[1]} tokens per window is more than the model's {positions} positions; "
                            f"use at most {positions} ({setting('seq_len')})")


def as_loaded(model_or_source: Any, tokenizer: Any = None, **load_kwargs) -> LoadedModel:
    if isinstance(model_or_source, LoadedModel):
        return model_or_source
    if isinstance(model_or_source, nn.Module):
        return LoadedModel(model=model_or_source, tokenizer=tokenizer)
    if isinstance(model_or_source, (str, Path)):
        return load_model(str(model_or_source), **load_kwargs)
    raise BadInputError(f"expected a model, a LoadedModel or a model source string, got {type(model_or_source).__name__}")


def weights_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes); tied tensors count once."""
    h = hashlib.sha256()
    seen: set[int] = set()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        key = t.untyped_storage().data_ptr() + t.storage_offset() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        hash_tensor(h, name, t)
    return "sha256:" + h.hexdigest()


def hash_tensor(h, name: str, t: torch.Tensor) -> None:
    """Feed one named tensor to a weights hash: name, dtype, shape, then its bytes (without a copy)."""
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    h.update(memoryview(t.detach().contiguous().cpu().view(torch.uint8).numpy()))


# ---- which modules get planned -------------------------------------------------------------------


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated transformer blocks: the list holding the most linear parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        n = sum(m.weight.numel() for blk in mod for m in blk.modules() if is_linear(m))
        if n and (best is None or n > best[0]):
            best = (n, name, mod)
    if best is None:
        raise BadInputError(f"found no repeated blocks with linear layers in {type(model).__name__}")
    return best[1], best[2]


def output_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    return _name_of(model, head) if head is not None else None


def input_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get else None
    return _name_of(model, emb) if emb is not None else None


def _name_of(model: nn.Module, target: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def tied_embeddings(model: nn.Module) -> bool:
    head, emb = output_embedding_name(model), input_embedding_name(model)
    if head is None or emb is None:
        return False
    return model.get_submodule(head).weight is model.get_submodule(emb).weight


def select_modules(model: nn.Module, include_lm_head: bool = False, include_embeddings: bool = False) -> list[str]:
    """Names of the modules to plan, sorted by their order in the model.

    Every linear layer inside the decoder blocks; the output head and the input embedding only on
    request. With tied embeddings the shared tensor appears once, as the head (the matmul that
    costs time), and quantizing it changes the embedding too.
    """
    prefix, _ = decoder_blocks(model)
    names = [n for n, m in model.named_modules() if n.startswith(prefix + ".") and is_linear(m)]
    head, emb = output_embedding_name(model), input_embedding_name(model)
    tied = tied_embeddings(model)
    if include_lm_head:
        if head is None:
            raise BadInputError(f"{type(model).__name__} has no output head to plan; drop {setting('include_lm_head')}")
        names.append(head)
    if include_embeddings:
        if emb is None:
            raise BadInputError(f"{type(model).__name__} has no input embedding to plan; drop {setting('include_embeddings')}")
        if not (tied and include_lm_head):
            names.append(emb)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(set(names), key=order.__getitem__)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view where possible): Conv1D stores [in, out]."""
    if bool(Conv1D) and isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight  # Linear [out, in]; Embedding [vocab, hidden] groups along hidden


def set_weight_matrix(module: nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        if bool(Conv1D) and isinstance(module, Conv1D):
            module.weight.copy_(value.t())
        else:
            module.weight.copy_(value)


def stages_by_shared_input(calls) -> list[list[str]]:
    """Group modules, in call order, into stages of consecutive calls on the same input tensor
    (q/k/v, then o, then gate/up, then down). calls: (name, input) pairs as forward hooks saw them;
    a module called twice (weight sharing) keeps its first place."""
    stages: list[list[str]] = []
    last_input = None
    seen: set[str] = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        if stages and x is last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = x
    return stages


@contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """Within the block, each (module, hook) is a registered forward hook (pre: a forward pre-hook, which
    sees the inputs before the module runs), in the given order; all removed after."""
    handles = [module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
               for module, hook in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
