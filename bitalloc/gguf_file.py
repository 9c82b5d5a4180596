"""Write a complete GGUF (llama.cpp's model file) from a source model and a plan in GGUF types.

The source is a .gguf file or a Hugging Face checkpoint folder. From a .gguf, metadata (architecture,
tokenizer, chat template, ...) is copied and every unplanned tensor (embeddings, norms, biases,
unplanned layers) byte for byte; from a folder, both are converted as llama.cpp's
convert_hf_to_gguf.py does (gguf_hf.py). Each planned module's tensor holds the block bytes
bitalloc's quantizer produced (formats/gguf.py, llama.cpp's own algorithms), and a planned `fp16`
module is written as F16. So the file runs exactly the weights that `bitalloc eval --plan`
simulates, and its size is known before any quantization (`gguf_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .budget import Outside
from .errors import BadInputError, setting, step
from .formats.gguf import QUANTIZERS
from .exports.gguf import FTYPE_OF, block_count, gguf_arch, gguf_tensor_name
from .io import atomic_output
from .options import GGUF_TYPES
from .plan import Assignment, Plan

# GGUF architectures whose tensors bitalloc can write. llama's convert_hf_to_gguf.py permutes the
# rows of attn_q / attn_k (rotary halves interleaved) and transformers' loader undoes it, so the writer
# applies the same permutation (gguf_hf.PERMUTED); qwen2's converter (Qwen2Model) and transformers'
# loader (no qwen2 TensorProcessor) keep the Hugging Face row order, and its q/k/v biases are plain
# F32 tensors, copied or converted like any unplanned tensor. gemma3 from a .gguf only (gguf_hf converts
# llama and qwen2 folders): its converter (Gemma3Model) keeps the row order too and stores each norm as
# 1 + w, which transformers' loader undoes; norms are unplanned, so they are copied as the source stores them.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
ONE_PLUS_NORMS = ("gemma3",)  # converters that store a norm's weight w as 1 + w
_HEAD_COUNT = {"attn_q": "attention.head_count", "attn_k": "attention.head_count_kv"}


@dataclass(frozen=True)
class TensorEntry:
    name: str  # GGUF tensor name, e.g. blk.0.attn_q.weight
    ggml_type: str  # GGMLQuantizationType name
    nbytes: int
    module: str | None = None  # the planned module it is written from; None: copied/converted from the source
    hf_name: str | None = None  # the checkpoint tensor it is converted from (a Hugging Face source)
    shape: tuple[int, ...] = ()  # the source tensor's dimensions (their count is in the header)


@dataclass(frozen=True)
class Source:
    """The model a GGUF is written from: its metadata (gguf.GGUFValue by key) and tensors, in file order."""

    path: Path
    architecture: str  # GGUF architecture name
    metadata: dict[str, Any]
    tensors: tuple[TensorEntry, ...]
    alignment: int
    reader: Any = None  # the GGUFReader of a .gguf source; None for a checkpoint folder

    def value(self, key: str) -> Any:
        v = self.metadata.get(key)
        return None if v is None else v.value


@dataclass(frozen=True)
class GGUFLayout:
    """Every tensor of the file to write, in the source's order, and the exact file size."""

    source: Path
    architecture: str
    tensors: tuple[TensorEntry, ...]
    file_bytes: int

    @property
    def planned(self) -> dict[str, TensorEntry]:
        return {t.module: t for t in self.tensors if t.module is not None}


def _gguf():
    import gguf

    return gguf


def _field(reader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def open_source(source: str | Path, dtype: torch.dtype | None = None) -> Source:
    """A .gguf file (copied) or a Hugging Face checkpoint folder (converted); refuses anything else.

    dtype: a folder's unplanned 2-D tensors in this dtype instead of the checkpoint's."""
    from . import gguf_hf

    path = Path(source).expanduser()
    if gguf_hf.is_hf_folder(path):
        arch = gguf_hf.gguf_architecture(path)
        metadata = gguf_hf.hf_metadata(path, arch)
        tensors = tuple(TensorEntry(t.name, t.ggml_type, _tensor_nbytes(t.ggml_type, *_rows_cols(t.shape)),
                                    hf_name=t.hf_name, shape=t.shape) for t in gguf_hf.hf_tensors(path, arch, dtype))
        return Source(path, arch, metadata, tensors, _gguf().GGUF_DEFAULT_ALIGNMENT)
    if path.suffix != ".gguf" or not path.is_file():
        raise BadInputError(f"writing a GGUF needs the source model as a .gguf file (its tokenizer and metadata are "
                            f"copied) or a Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json); "
                            f"{str(source)!r} is neither")
    if dtype is not None:
        raise BadInputError(f"a .gguf source's unplanned tensors are copied as stored; a dtype for them ({dtype}) "
                            "applies only when writing from a Hugging Face checkpoint folder")
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    metadata = {}
    for f in reader.fields.values():
        if not f.name.startswith("GGUF."):  # the reader's own header pseudo-fields
            sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            metadata[f.name] = gguf.GGUFValue(f.contents(), f.types[0], sub_type)
    tensors = tuple(TensorEntry(t.name, t.tensor_type.name, int(t.n_bytes), shape=tuple(int(d) for d in t.shape))
                    for t in reader.tensors)
    align = int(_field(reader, "general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT)
    return Source(path, str(_field(reader, "general.architecture")), metadata, tensors, align, reader)


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, shape[0]) if len(shape) == 1 else (int(np.prod(shape[:-1])), shape[-1])


def planned_ggml_type(a: Assignment) -> str:
    """The GGUF type of one assignment; refuses options llama.cpp cannot store or that do not fit the row."""
    o = a.option
    if o.fmt == "keep":
        return "F16"
    if o.fmt != "gguf":
        raise BadInputError(f"module {a.module} is planned as {a.label}, which is not a GGUF type; plan with "
                            f"{setting('target')} llama.cpp (or {setting('formats')} gguf,keep) to write a .gguf")
    if o.element not in QUANTIZERS:
        raise BadInputError(f"module {a.module} is planned as {o.element}, which bitalloc cannot quantize yet; "
                            f"implemented: {', '.join(QUANTIZERS)}")
    width = a.shape[1]
    if width % o.group_size:
        fitting = [t for t in QUANTIZERS if width % GGUF_TYPES[t].block == 0]
        raise BadInputError(f"module {a.module} ({a.shape[0]}x{width}) is planned as {o.element}, whose {o.group_size}-weight "
                            f"blocks do not divide its row width {width}; types that fit: {', '.join(fitting)}")
    return o.element


def check_architecture(plan: Plan, source: Source) -> str:
    """The source's GGUF architecture name; refuses architectures the writer does not support."""
    if source.architecture not in SUPPORTED_ARCHITECTURES:
        raise BadInputError(f"bitalloc writes GGUF files for {', '.join(SUPPORTED_ARCHITECTURES)} models only; "
                            f"this one is {source.architecture!r} ({plan.model.architecture}). Use {step('export')} to gguf "
                            "and llama-quantize for it")
    return source.architecture


def _tensor_nbytes(ggml_type: str, out_f: int, in_f: int) -> int:
    if ggml_type in ("F32", "F16", "BF16"):
        return out_f * in_f * (4 if ggml_type == "F32" else 2)
    t = GGUF_TYPES[ggml_type]
    return out_f * (in_f // t.block) * t.block_bytes


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def gguf_layout(plan: Plan, source: str | Path | Source, dtype: torch.dtype | None = None) -> GGUFLayout:
    """What `write_gguf` will write for `plan` from `source`: each tensor's type and bytes, the file size.

    dtype: a checkpoint folder's unplanned 2-D tensors in this dtype (default: as the checkpoint stores them).

    Checks everything before any work: the source and its architecture, that every planned option is a
    GGUF type whose block divides the row, and that every planned module has a tensor in the source.
    """
    gguf = _gguf()
    src = source if isinstance(source, Source) else open_source(source, dtype)
    arch = check_architecture(plan, src)
    types = {a.module: planned_ggml_type(a) for a in plan.assignments}
    name_map = gguf.get_tensor_name_map(gguf_arch(plan.model.architecture), block_count(plan))
    by_tensor: dict[str, Assignment] = {}
    for a in plan.assignments:
        tensor = gguf_tensor_name(a, name_map)
        if tensor is None:
            raise BadInputError(f"module {a.module} has no GGUF tensor name in gguf's {arch} map; drop it from the plan")
        by_tensor[tensor] = a
    source_names = {t.name for t in src.tensors}
    missing = sorted(set(by_tensor) - source_names)
    if missing:
        raise BadInputError(f"the source has no tensor {missing[0]} (for module {by_tensor[missing[0]].module}); "
                            "use the model the plan was made for")
    entries = []
    for t in src.tensors:
        a = by_tensor.get(t.name)
        if a is None:
            entries.append(t)
        else:
            entries.append(TensorEntry(t.name, types[a.module], _tensor_nbytes(types[a.module], *a.shape), a.module,
                                       t.hf_name, t.shape))
    data = sum(_pad(e.nbytes, src.alignment) for e in entries)
    return GGUFLayout(src.path, arch, tuple(entries), _header_bytes(src, entries) + data)


def _header_bytes(src: Source, entries) -> int:
    """Bytes before the tensor data of the file written from `src`'s metadata and `entries`.

    GGUF v3: magic, version, tensor count, KV count; each KV as gguf's writer packs it; one tensor
    info per tensor (name, n_dims, dims, type, offset); padding to the alignment."""
    gguf = _gguf()
    packer = gguf.GGUFWriter(None, src.architecture)
    kv_bytes = sum(len(packer._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False))
                   + len(packer._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type))
                   for key, v in src.metadata.items())
    info_bytes = sum(8 + len(e.name.encode()) + 4 + 8 * len(e.shape) + 4 + 8 for e in entries)
    return _pad(4 + 4 + 8 + 8 + kv_bytes + info_bytes, src.alignment)


def file_outside(source: str | Path, modules: list[str], architecture: str) -> Outside:
    """What a GGUF file written from `source` holds besides the planned tensors of `modules`.

    The part of the file that does not depend on the plan: header and metadata, every unplanned
    tensor as the source stores it (embeddings, norms, ...), and each planned tensor's worst-case
    padding to the alignment. A whole-model budget of a GGUF-typed plan is of this file (budget.Outside)."""
    gguf = _gguf()
    src = open_source(source)
    n_blocks = max((int(m.split(".")[2]) for m in modules if m.startswith("model.layers.")), default=-1) + 1
    name_map = gguf.get_tensor_name_map(gguf_arch(architecture), n_blocks)
    names = {t.name for t in src.tensors}
    planned = set()
    for m in modules:
        base = name_map.get_name(m)
        if base == "output" and "output.weight" not in names:
            base = "token_embd"  # a tied head is the token embedding in GGUF
        planned.add(f"{base}.weight")
    unplanned = [t for t in src.tensors if t.name not in planned]
    fixed = (_header_bytes(src, src.tensors) + sum(_pad(t.nbytes, src.alignment) for t in unplanned)
             + (src.alignment - 1) * len(planned))
    weights = sum(int(np.prod(t.shape)) for t in unplanned)
    return Outside(weights, fixed * 8, f"the GGUF file's header, metadata and unplanned tensors ({fixed:,} bytes)")


def _row_order(tensor: str, out_f: int, src: Source) -> np.ndarray:
    """Row i of the GGUF tensor is row order[i] of the Hugging Face weight (llama's q/k permutation)."""
    from .gguf_hf import PERMUTED

    kind = tensor.split(".")[-2]
    if kind not in _HEAD_COUNT or src.architecture not in PERMUTED:
        return np.arange(out_f)
    n_head = int(src.value(f"{src.architecture}.{_HEAD_COUNT[kind]}"))
    # convert_hf_to_gguf.py LlamaModel.permute: [n_head, 2, d/2] -> [n_head, d/2, 2] (weights and biases)
    return np.arange(out_f).reshape(n_head, 2, out_f // n_head // 2).swapaxes(1, 2).reshape(-1)


def _ftype(layout: GGUFLayout, plan: Plan) -> int | None:
    """general.file_type: the llama.cpp file type of the GGUF type holding most planned weights."""
    gguf = _gguf()
    weights: dict[str, int] = {}
    for a in plan.assignments:
        t = layout.planned[a.module].ggml_type
        weights[t] = weights.get(t, 0) + a.shape[0] * a.shape[1]
    if not weights:
        return None
    top = max(sorted(weights), key=weights.__getitem__)
    name = "ALL_F32" if top == "F32" else f"MOSTLY_{FTYPE_OF.get(top, top)}"
    return int(gguf.LlamaFileType[name]) if name in gguf.LlamaFileType.__members__ else None


def write_gguf(model: nn.Module, plan: Plan, source: str | Path, out: str | Path, quantizer: str | None = None,
               calibration: torch.Tensor | None = None, check_hash: bool = True, progress: bool = False,
               dtype: torch.dtype | None = None, cache_dir: str | Path | bool | None = None,
               settings: dict | None = None) -> GGUFLayout:
    """Quantize `model` (loaded from `source`) as `plan` says and write the GGUF file `out`, atomically.

    source: the .gguf file or Hugging Face checkpoint folder the model was loaded from.
    quantizer: rtn (llama.cpp's reference quantizers), imatrix (importance from the layer inputs'
    mean x², as llama-quantize --imatrix; needs calibration), awq (imatrix on the model with equalization
    folded in; the divided norms are written from it) or gptq; default: the plan's own.
    dtype: a checkpoint folder's unplanned 2-D tensors in this dtype (default: as stored; then the file
    runs exactly the simulated plan, otherwise those tensors are rounded to it).
    cache_dir: the profile cache, where awq finds the scales its profile searched (as apply.apply reads it).
    settings: the quantizer's, over the plan's defaults (apply.plan_quantizer_settings).
    """
    from . import gguf_hf
    from .apply import check_plan_matches, checked_hash, plan_quantizer_settings
    from .quantizers import equalizes
    from .quantizers.materialize import quantize_model

    gguf = _gguf()
    src = open_source(source, dtype)
    layout = gguf_layout(plan, src)  # all checks before any quantization
    check_plan_matches(model, plan, check_hash)
    state = model.state_dict() if src.reader is None else {}
    by_name = {t.name: t for t in src.reader.tensors} if src.reader is not None else {}
    quantizer = quantizer or plan.quantizer
    qweights = quantize_model(model, plan.options_by_module(), quantizer, calibration, progress=progress,
                              cache_dir=cache_dir, content_hash=checked_hash(plan, check_hash),
                              **plan_quantizer_settings(plan, quantizer, settings or {}))
    # an equalizing quantizer (awq) divided norms and biases the source stores unfolded: written from the model
    # (a checkpoint folder's are converted from the model's own tensors anyway)
    folded = _equalized_tensors(model, plan, src) if equalizes(quantizer or plan.quantizer) and src.reader else {}
    ftype = _ftype(layout, plan)
    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(tmp, layout.architecture)
        if src.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            writer.data_alignment = src.alignment
        for key, v in src.metadata.items():
            if key == gguf.Keys.General.ARCHITECTURE:
                continue  # written by GGUFWriter itself
            value = ftype if key == gguf.Keys.General.FILE_TYPE and ftype is not None else v.value
            writer.add_key_value(key, value, v.type, sub_type=v.sub_type)
        arrays = []
        for entry in layout.tensors:
            if entry.module is not None:
                data = _planned_bytes(qweights[entry.module], entry, src)
                raw_type = gguf.GGMLQuantizationType[entry.ggml_type]
            elif entry.name in folded:
                data, raw_type = folded[entry.name], gguf.GGMLQuantizationType.F32
            elif src.reader is not None:
                t = by_name[entry.name]
                data, raw_type = t.data, t.tensor_type
            elif entry.hf_name is None:  # computed by the converter, not in the checkpoint (llama3's rope_freqs)
                data, raw_type = gguf_hf.extra_tensor(src.path, entry.name), gguf.GGMLQuantizationType.F32
            else:
                data = _converted(state[entry.hf_name], entry, src)
                raw_type = gguf.GGMLQuantizationType[entry.ggml_type]
            if data.nbytes != entry.nbytes:
                raise AssertionError(f"{entry.name}: {data.nbytes} bytes, layout says {entry.nbytes}")
            writer.add_tensor_info(entry.name, data.shape, data.dtype, data.nbytes, raw_type)
            arrays.append(data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in arrays:
            writer.write_tensor_data(data)
        writer.close()
    return layout


def _equalized_tensors(model: nn.Module, plan: Plan, src: Source) -> dict[str, np.ndarray]:
    """GGUF name -> F32 data of each unplanned tensor equalization divided (the norm in front of a group, the bias
    of rows it divided), from the folded model, stored as the source stores it (Gemma's norms as 1 + w: read back,
    (1 + w) − 1 may differ from w by a float32 rounding). Refuses a group whose divided weights are not all planned:
    the source's copy of such a weight would not match its folded partner."""
    from .equalize import block_groups
    from .models import decoder_blocks

    prefix, blocks = decoder_blocks(model)
    name_map = _gguf().get_tensor_name_map(gguf_arch(plan.model.architecture), len(blocks))
    planned = {a.module for a in plan.assignments}
    stored = {t.name: t.ggml_type for t in src.tensors}
    out = {}
    for i, block in enumerate(blocks):
        for group in block_groups(block):
            producer = block.get_submodule(group.producer)
            divided = [*group.consumers, *([group.producer] if isinstance(producer, nn.Linear) else [])]
            unplanned = [f"{prefix}.{i}.{m}" for m in divided if f"{prefix}.{i}.{m}" not in planned]
            if unplanned:
                raise BadInputError(f"equalization divided {unplanned[0]}, which the plan leaves unplanned, so the "
                                    f"GGUF file would copy it unfolded; plan it, or use {setting('quantizer')} imatrix")
            tensors = {"bias": getattr(producer, "bias", None)}
            if not isinstance(producer, nn.Linear):
                tensors["weight"] = producer.weight
            base = name_map.get_name(f"{prefix}.{i}.{group.producer}")
            for kind, p in tensors.items():
                if p is None:
                    continue
                name = f"{base}.{kind}"
                if stored.get(name) != "F32":
                    raise BadInputError(f"equalization divided {name}, which the source stores as "
                                        f"{stored.get(name, 'nothing')}, not F32; use {setting('quantizer')} imatrix")
                value = p.detach().float()
                if kind == "weight" and src.architecture in ONE_PLUS_NORMS:
                    value = value + 1
                out[name] = value.numpy()
    return out


def _planned_bytes(q, entry: TensorEntry, src: Source) -> np.ndarray:
    """The planned tensor's data in GGUF row order: block bytes [out, row_bytes], or F16 [out, in]."""
    if entry.ggml_type == "F16":
        data = q.values.to(torch.float16).numpy()
    else:
        if q.blocks is None:
            raise BadInputError(f"the quantizer returned no GGUF blocks for {entry.name} ({entry.ggml_type}); "
                                f"apply GGUF plans with {setting('quantizer')} rtn, imatrix or gptq")
        data = q.blocks
    return np.ascontiguousarray(data[_row_order(entry.name, data.shape[0], src)])


def _converted(value: torch.Tensor, entry: TensorEntry, src: Source) -> np.ndarray:
    """An unplanned checkpoint tensor as convert_hf_to_gguf.py stores it (its dtype, llama's q/k row order)."""
    from .gguf_hf import HFTensor, tensor_bytes

    data = tensor_bytes(value, HFTensor(entry.name, entry.hf_name, tuple(value.shape), entry.ggml_type))
    return np.ascontiguousarray(data[_row_order(entry.name, data.shape[0], src)])
