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

import ctypes
import hashlib
import json
import struct
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .errors import BadInputError, setting
from .models import LoadedModel, hash_tensor

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
                            f"config.json + safetensors; download it first or drop {setting('stream')}")
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
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, GPT2TensorProcessor, LlamaTensorProcessor, TensorProcessor, get_gguf_hf_weights_map,
    )

    architecture, layout = gguf_layout(path)
    processor_cls = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    # Processors that merge or split tensors (MoE experts) cannot be applied one tensor at a time.
    if processor_cls not in (TensorProcessor, LlamaTensorProcessor, GPT2TensorProcessor):
        raise BadInputError(f"streaming GGUF models of architecture {architecture!r} is not supported "
                            f"(tensors are merged on load); drop {setting('stream')}")
    # The processors read only head counts, which the config took from the same GGUF metadata.
    processor = processor_cls(config=skeleton.config.to_dict())
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
             GGMLQuantizationType.F64: np.float64}

    def read(gguf_name: str, dims: tuple[int, ...], qtype: int, offset: int) -> torch.Tensor:
        qtype = GGMLQuantizationType(qtype)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(dims))  # GGUF lists dims fastest-first, as gguf.GGUFReader reverses them
        nbytes = int(np.prod(dims)) * type_size // block_size
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(nbytes)
        if qtype in plain:
            data = np.frombuffer(raw, dtype=plain[qtype]).reshape(shape)
        else:
            data = np.frombuffer(raw, dtype=np.uint8).reshape(quant_shape_to_byte_shape(shape, qtype))
        parsed: dict[str, dict] = {"tensors": {}}
        # as transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint does, one tensor at a time
        result = processor.process(weights=_dequantize_rows(data, qtype), name=gguf_name,
                                   tensor_key_mapping=name_map, parsed_parameters=parsed)
        if result.name is None:  # GPT-2's output.weight goes straight to lm_head.weight
            return parsed["tensors"]["lm_head.weight"]
        w = result.weights
        return torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else np.copy(w))

    tensors = {}
    for gguf_name, dims, qtype, offset in layout:
        hf_name = "lm_head.weight" if processor_cls is GPT2TensorProcessor and gguf_name == "output.weight" \
            else name_map.get(gguf_name)
        if hf_name is not None:
            tensors[hf_name] = TensorEntry(read=partial(read, gguf_name, dims, qtype, offset))
    return _check_complete(tensors, skeleton, str(path))


def _dequantize_rows(data: np.ndarray, qtype, rows_per_chunk: int = 4096) -> np.ndarray:
    """gguf.dequantize in chunks of rows: its temporaries (several times the output) stay small."""
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] <= rows_per_chunk:
        return dequantize(data, qtype)
    first = dequantize(data[:rows_per_chunk], qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows_per_chunk] = first
    for a in range(rows_per_chunk, data.shape[0], rows_per_chunk):
        out[a : a + rows_per_chunk] = dequantize(data[a : a + rows_per_chunk], qtype)
    return out


def gguf_layout(path: Path) -> tuple[str, list[tuple[str, tuple[int, ...], int, int]]]:
    """(general.architecture, [(tensor name, dims, ggml type, absolute data offset)]) of a GGUF file.

    A lean reader of the GGUF header (github.com/ggml-org/ggml docs/gguf.md): metadata values are
    skipped, not parsed. gguf.GGUFReader builds an object per tokenizer string, which for a 49k
    vocabulary costs more memory than a decoder block.
    """
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
    string_type, array_type = 8, 9
    with open(path, "rb", buffering=1 << 20) as fh:
        def u32() -> int:
            return struct.unpack("<I", fh.read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", fh.read(8))[0]

        def string() -> bytes:
            return fh.read(u64())

        def skip(vtype: int) -> None:
            if vtype == string_type:
                fh.seek(u64(), 1)
            elif vtype == array_type:
                etype, count = u32(), u64()
                if etype in scalar:
                    fh.seek(scalar[etype] * count, 1)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                fh.seek(scalar[vtype], 1)

        if fh.read(4) != b"GGUF" or u32() not in (2, 3):
            raise BadInputError(f"{str(path)!r} is not a little-endian GGUF v2/v3 file")
        n_tensors, n_kv = u64(), u64()
        architecture, alignment = None, 32  # GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key, vtype = string().decode(), u32()
            if key == "general.architecture" and vtype == string_type:
                architecture = string().decode()
            elif key == "general.alignment" and vtype == 4:
                alignment = u32()
            else:
                skip(vtype)
        infos = []
        for _ in range(n_tensors):
            name = string().decode()
            dims = tuple(u64() for _ in range(u32()))
            infos.append((name, dims, u32(), u64()))
        start = fh.tell()
    start += -start % alignment
    if architecture is None:
        raise BadInputError(f"GGUF file {str(path)!r} has no general.architecture")
    return architecture, [(n, d, t, start + off) for n, d, t, off in infos]


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


@cache
def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def return_freed_memory() -> None:
    """Hand the heap pages freed since the last call back to the OS.

    glibc keeps freed memory for reuse, and after a large block is freed it raises its mmap threshold,
    so the next large tensors (a block's weights, a head chunk's logits) come from the heap too and
    stay resident when freed: without this a streamed walk's RSS creeps up to its largest step plus
    everything freed before. malloc_trim(0) releases every whole free page (glibc >= 2.8).
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


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
        hash_tensor(h, name, t)
        del t
    return_freed_memory()
    return "sha256:" + h.hexdigest()
