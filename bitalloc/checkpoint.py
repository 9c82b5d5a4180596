"""A model whose weights stay in the checkpoint: a meta-device skeleton + tensors read one at a time.

For profiling with memory bounded by one decoder block (GPTQ-style sequential pipeline): the
skeleton has the architecture (parameters on the meta device, buffers real), and `materialize`
fills one module's parameters from the checkpoint and `release` puts them back on meta.

Tensors are read with plain file reads, not memory maps: pages of a mapped checkpoint stay
resident (and count in RSS) for as long as the map lives, which would grow to the whole file.
The values equal those of models.load_model: safetensors bytes as stored; GGUF tensors
dequantized with gguf.dequantize and renamed/reshaped by transformers' own GGUF tensor
processors (Llama q/k un-permutation, GPT-2 transposes), so the content hash matches too.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .errors import BadInputError
from .models import LoadedModel

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class TensorEntry:
    """Where one tensor lives: `read()` returns it in the model's layout (dtype as stored)."""

    read: Callable[[], torch.Tensor]


class SafetensorsIndex:
    """Tensor name -> (file, dtype, shape, byte range) from safetensors headers (no tensor data read)."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise BadInputError(f"no .safetensors files in {str(directory)!r}; save the model with save_pretrained "
                                "(safe_serialization) or pass a .gguf file")
        self.entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                self.entries[name] = (f, _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + start, end - start)

    def read(self, name: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self.entries[name]
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = bytearray(fh.read(nbytes))
        return torch.frombuffer(raw, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


@dataclass
class StreamedModel(LoadedModel):
    """A LoadedModel whose `model` is a meta skeleton; `tensors` maps state_dict names to checkpoint reads."""

    tensors: dict[str, TensorEntry] = field(default_factory=dict, repr=False)

    @property
    def content_hash(self) -> str:
        if self._content_hash is None:
            self._content_hash = streamed_weights_hash(self)
        return self._content_hash


def open_streamed(source: str, *, trust_remote_code: bool = False) -> StreamedModel:
    """The skeleton, tokenizer and tensor index of a local checkpoint (directory with config.json +
    safetensors, or a .gguf file); no weight is read yet."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(source).expanduser()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    gguf_path = None
    if path.suffix == ".gguf" and path.is_file():
        where, kwargs["gguf_file"], gguf_path = str(path.parent), path.name, path
    elif path.is_dir() and (path / "config.json").is_file():
        where = str(path)
    elif path.is_dir() and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        where, kwargs["gguf_file"], gguf_path = str(path), ggufs[0].name, ggufs[0]
    else:
        raise BadInputError(f"streaming needs a local checkpoint: {source!r} is not a .gguf file or a directory with "
                            "config.json + safetensors; download it first or drop --stream")
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"could not read model {source!r}: {first}") from None
    skeleton = meta_skeleton(config, trust_remote_code=trust_remote_code)
    if gguf_path is not None:
        tensors = _gguf_tensors(gguf_path, skeleton)
    else:
        tensors = _safetensors_tensors(Path(where), skeleton)
    return StreamedModel(model=skeleton, tokenizer=tokenizer, source=str(source), tensors=tensors)


def meta_skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `config` with parameters on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):  # rotary inv_freq etc. are computed, not loaded
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model.eval()


def _safetensors_tensors(directory: Path, skeleton: nn.Module) -> dict[str, TensorEntry]:
    index = SafetensorsIndex(directory)
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    tensors = {}
    for name in skeleton.state_dict():
        # Hub checkpoints of some families store the base model without its prefix (GPT-2: "h.0...").
        short = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None
        key = name if name in index.entries else (short if short in index.entries else None)
        if key is not None:
            tensors[name] = TensorEntry(read=lambda key=key: index.read(key))
    return _check_complete(tensors, skeleton, str(directory))


def _gguf_tensors(path: Path, skeleton: nn.Module) -> dict[str, TensorEntry]:
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, GPT2TensorProcessor, LlamaTensorProcessor, TensorProcessor, get_gguf_hf_weights_map,
        load_gguf_checkpoint, read_field,
    )

    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor_cls = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    # Processors that merge or split tensors (MoE experts) cannot be applied one tensor at a time.
    if processor_cls not in (TensorProcessor, LlamaTensorProcessor, GPT2TensorProcessor):
        raise BadInputError(f"streaming GGUF models of architecture {architecture!r} is not supported "
                            "(tensors are merged on load); drop --stream")
    config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    processor = processor_cls(config=config)
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    # Only offsets are kept: the reader's memory map is dropped with it, and each read is a plain file read.
    layout = [(t.name, int(t.data_offset), int(t.n_bytes), t.tensor_type, t.data.dtype, tuple(t.data.shape))
              for t in reader.tensors]
    del reader

    def read(gguf_name, offset, nbytes, qtype, dtype, shape) -> torch.Tensor:
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = np.frombuffer(fh.read(nbytes), dtype=dtype).reshape(shape)
        parsed: dict[str, dict] = {"tensors": {}}
        # as transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint does, one tensor at a time
        result = processor.process(weights=dequantize(raw, qtype), name=gguf_name,
                                   tensor_key_mapping=name_map, parsed_parameters=parsed)
        if result.name is None:  # GPT-2's output.weight goes straight to lm_head.weight
            return parsed["tensors"]["lm_head.weight"]
        return torch.from_numpy(np.copy(result.weights))

    tensors = {}
    for gguf_name, *rest in layout:
        hf_name = "lm_head.weight" if processor_cls is GPT2TensorProcessor and gguf_name == "output.weight" \
            else name_map.get(gguf_name)
        if hf_name is not None:
            tensors[hf_name] = TensorEntry(read=lambda g=gguf_name, r=tuple(rest): read(g, *r))
    return _check_complete(tensors, skeleton, str(path))


def _check_complete(tensors: dict[str, TensorEntry], skeleton: nn.Module, where: str) -> dict[str, TensorEntry]:
    """Every parameter must come from the checkpoint, directly or through a tied twin."""
    missing = []
    for name, locations in _parameter_locations(skeleton).items():
        if not any(n in tensors for n in locations):
            missing.append(name)
    if missing:
        raise BadInputError(f"checkpoint {where!r} lacks {len(missing)} parameter(s) of the model, e.g. {missing[0]!r}; "
                            "is it the same architecture as its config?")
    return tensors


def _parameter_locations(model: nn.Module) -> dict[str, list[str]]:
    """First name of each distinct parameter -> all its names (tied weights have several)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names for names in by_id.values()}


# ---- materializing parts of the skeleton ------------------------------------------------------------


def materialize(loaded: StreamedModel, module: nn.Module, prefix: str) -> None:
    """Read the parameters of `module` (named `prefix` in the model) from the checkpoint into it."""
    model = loaded.model
    names = _parameter_locations(model)
    for local, p in list(module.named_parameters()):
        if not p.is_meta:
            continue
        full = f"{prefix}.{local}" if prefix else local
        # a tied parameter may be stored under its twin's name
        twins = next((v for v in names.values() if full in v), [full])
        key = next((n for n in twins if n in loaded.tensors), None)
        if key is None:
            raise BadInputError(f"checkpoint of {loaded.source!r} has no tensor for {full!r}")
        value = loaded.tensors[key].read().to(p.dtype)
        if tuple(value.shape) != tuple(p.shape):
            raise BadInputError(f"checkpoint tensor {key!r} has shape {list(value.shape)}, the model expects "
                                f"{list(p.shape)}")
        _set_everywhere(model, p, nn.Parameter(value, requires_grad=False))


def release(loaded: StreamedModel, module: nn.Module) -> None:
    """Put `module`'s parameters back on the meta device, freeing their memory."""
    for _, p in list(module.named_parameters()):
        if not p.is_meta:
            _set_everywhere(loaded.model, p, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


def _set_everywhere(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    # Tied weights are one Parameter held by two modules: replace it in both.
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is old:
                mod._parameters[pname] = new


def outside_modules(model: nn.Module, blocks_prefix: str) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs holding parameters outside the decoder blocks (embeddings, norms, head)."""
    found = []
    for name, mod in model.named_modules():
        if name == blocks_prefix or name.startswith(blocks_prefix + "."):
            continue
        if any(True for _ in mod.parameters(recurse=False)):
            found.append((name, mod))
    return found


def streamed_weights_hash(loaded: StreamedModel) -> str:
    """models.weights_hash of the model as load_model would build it, reading one tensor at a time."""
    h = hashlib.sha256()
    model = loaded.model
    first_name = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), []).append(name)
    params = dict(model.named_parameters(remove_duplicate=False))
    param_of = {name: id(p) for name, p in params.items()}
    buffers = dict(model.named_buffers())
    seen: set[int] = set()
    for name in sorted(model.state_dict(keep_vars=True)):
        if name in param_of:
            pid = param_of[name]
            if pid in seen:  # tied: the whole model hashes the shared tensor once, under its first sorted name
                continue
            seen.add(pid)
            key = next(n for n in sorted(first_name[pid]) if n in loaded.tensors)
            t = loaded.tensors[key].read().to(params[name].dtype)
        else:
            t = buffers[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()
