"""Write a complete GGUF (llama.cpp's model file) from a source GGUF and a plan in GGUF types.

Metadata (architecture, tokenizer, chat template, ...) is copied from the source GGUF; each planned
module's tensor holds the block bytes bitalloc's quantizer produced (formats/gguf.py, llama.cpp's
own algorithms), a planned `fp16` module is written as F16, and every other tensor (embeddings,
norms, unplanned layers) is copied byte for byte. So the file runs exactly the weights that
`bitalloc eval --plan` simulates, and its size is known before any quantization (`gguf_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .budget import Outside
from .errors import BadInputError
from .formats.gguf import QUANTIZERS
from .exports.gguf import FTYPE_OF, block_count, gguf_arch, gguf_tensor_name
from .io import atomic_output
from .options import GGUF_TYPES
from .plan import Assignment, Plan

# GGUF architectures whose tensors bitalloc can write back. llama's convert_hf_to_gguf.py permutes
# the rows of attn_q / attn_k (rotary halves interleaved) and transformers' loader undoes it, so the
# writer applies the same permutation; other architectures are added with their own conventions.
SUPPORTED_ARCHITECTURES = ("llama",)
_HEAD_COUNT = {"attn_q": "attention.head_count", "attn_k": "attention.head_count_kv"}


@dataclass(frozen=True)
class TensorEntry:
    name: str  # GGUF tensor name, e.g. blk.0.attn_q.weight
    ggml_type: str  # GGMLQuantizationType name
    nbytes: int
    module: str | None = None  # the planned module it is written from; None: copied from the source


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


def _reader(source: str | Path):
    path = Path(source).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise BadInputError(f"writing a GGUF needs the source model as a .gguf file (its tokenizer and metadata are "
                            f"copied); {str(source)!r} is not one. Convert a Hugging Face checkpoint with llama.cpp's "
                            "convert_hf_to_gguf.py first and plan on that file")
    return _gguf().GGUFReader(path)


def _field(reader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def planned_ggml_type(a: Assignment) -> str:
    """The GGUF type of one assignment; refuses options llama.cpp cannot store or that do not fit the row."""
    o = a.option.to_option()
    if o.fmt == "keep":
        return "F16"
    if o.fmt != "gguf":
        raise BadInputError(f"module {a.module} is planned as {a.label}, which is not a GGUF type; plan with "
                            "--target llama.cpp (or --formats gguf,keep) to write a .gguf")
    if o.element not in QUANTIZERS:
        raise BadInputError(f"module {a.module} is planned as {o.element}, which bitalloc cannot quantize yet; "
                            f"implemented: {', '.join(QUANTIZERS)}")
    width = a.shape[1]
    if width % o.group_size:
        fitting = [t for t in QUANTIZERS if width % GGUF_TYPES[t].block == 0]
        raise BadInputError(f"module {a.module} ({a.shape[0]}x{width}) is planned as {o.element}, whose {o.group_size}-weight "
                            f"blocks do not divide its row width {width}; types that fit: {', '.join(fitting)}")
    return o.element


def check_architecture(plan: Plan, reader) -> str:
    """The source's GGUF architecture name; refuses architectures the writer does not support."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise BadInputError(f"bitalloc writes GGUF files for {', '.join(SUPPORTED_ARCHITECTURES)} models only; "
                            f"this one is {arch!r} ({plan.model.architecture}). Use `bitalloc export --to gguf` and "
                            "llama-quantize for it")
    return arch


def _tensor_nbytes(ggml_type: str, out_f: int, in_f: int) -> int:
    if ggml_type == "F16":
        return out_f * in_f * 2
    t = GGUF_TYPES[ggml_type]
    return out_f * (in_f // t.block) * t.block_bytes


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def gguf_layout(plan: Plan, source: str | Path) -> GGUFLayout:
    """What `write_gguf` will write for `plan` from `source`: each tensor's type and bytes, the file size.

    Checks everything before any work: the architecture, that every planned option is a GGUF type
    whose block divides the row, and that every planned module has a tensor in the source.
    """
    gguf = _gguf()
    reader = _reader(source)
    arch = check_architecture(plan, reader)
    types = {a.module: planned_ggml_type(a) for a in plan.assignments}
    name_map = gguf.get_tensor_name_map(gguf_arch(plan.model.architecture), block_count(plan))
    by_tensor: dict[str, Assignment] = {}
    for a in plan.assignments:
        tensor = gguf_tensor_name(a, name_map)
        if tensor is None:
            raise BadInputError(f"module {a.module} has no GGUF tensor name in gguf's {arch} map; drop it from the plan")
        by_tensor[tensor] = a
    source_names = {t.name for t in reader.tensors}
    missing = sorted(set(by_tensor) - source_names)
    if missing:
        raise BadInputError(f"the source GGUF has no tensor {missing[0]} (for module {by_tensor[missing[0]].module}); "
                            "use the .gguf the plan was made for")
    entries = []
    for t in reader.tensors:
        a = by_tensor.get(t.name)
        if a is None:
            entries.append(TensorEntry(t.name, t.tensor_type.name, int(t.n_bytes)))
        else:
            entries.append(TensorEntry(t.name, types[a.module], _tensor_nbytes(types[a.module], *a.shape), a.module))
    align = _alignment(reader)
    data = sum(_pad(e.nbytes, align) for e in entries)
    return GGUFLayout(Path(source), arch, tuple(entries), _header_bytes(reader) + data)


def _alignment(reader) -> int:
    return int(_field(reader, "general.alignment") or _gguf().GGUF_DEFAULT_ALIGNMENT)


def _header_bytes(reader) -> int:
    """Bytes before the tensor data of a file written from `reader`'s metadata and tensor list.

    GGUF v3: magic, version, tensor count, KV count; the KVs (copied, so the same sizes); one tensor
    info per tensor (name, n_dims, dims, type, offset); padding to the alignment."""
    kv_bytes = sum(sum(p.nbytes for p in f.parts) for f in reader.fields.values() if not f.name.startswith("GGUF."))
    info_bytes = sum(8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4 + 8 for t in reader.tensors)
    return _pad(4 + 4 + 8 + 8 + kv_bytes + info_bytes, _alignment(reader))


def file_outside(source: str | Path, modules: list[str], architecture: str) -> Outside:
    """What a GGUF file written from `source` holds besides the planned tensors of `modules`.

    The part of the file that does not depend on the plan: header and metadata, every unplanned
    tensor as the source stores it (embeddings, norms, ...), and each planned tensor's worst-case
    padding to the alignment. A whole-model budget of a GGUF-typed plan is of this file (budget.Outside)."""
    gguf = _gguf()
    reader = _reader(source)
    n_blocks = max((int(m.split(".")[2]) for m in modules if m.startswith("model.layers.")), default=-1) + 1
    name_map = gguf.get_tensor_name_map(gguf_arch(architecture), n_blocks)
    names = {t.name for t in reader.tensors}
    planned = set()
    for m in modules:
        base = name_map.get_name(m)
        if base == "output" and "output.weight" not in names:
            base = "token_embd"  # a tied head is the token embedding in GGUF
        planned.add(f"{base}.weight")
    align = _alignment(reader)
    unplanned = [t for t in reader.tensors if t.name not in planned]
    fixed = _header_bytes(reader) + sum(_pad(int(t.n_bytes), align) for t in unplanned) + (align - 1) * len(planned)
    return Outside(sum(int(t.n_elements) for t in unplanned), fixed * 8,
                   f"the GGUF file's header, metadata and unplanned tensors ({fixed:,} bytes)")


def _row_order(tensor: str, out_f: int, reader) -> np.ndarray:
    """Row i of the GGUF tensor is row order[i] of the Hugging Face weight (llama's q/k permutation)."""
    kind = tensor.split(".")[-2]
    if kind not in _HEAD_COUNT:
        return np.arange(out_f)
    arch = _field(reader, "general.architecture")
    n_head = int(_field(reader, f"{arch}.{_HEAD_COUNT[kind]}"))
    # convert_hf_to_gguf.py LlamaModel.permute: [n_head, 2, d/2] -> [n_head, d/2, 2]
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
               calibration: torch.Tensor | None = None, check_hash: bool = True, progress: bool = False) -> GGUFLayout:
    """Quantize `model` (loaded from `source`) as `plan` says and write the GGUF file `out`, atomically.

    quantizer: rtn (llama.cpp's reference quantizers) or imatrix (importance from the layer inputs'
    mean x², as llama-quantize --imatrix; needs calibration); default: the plan's own.
    """
    from .apply import check_plan_matches
    from .quantizers.materialize import quantize_model

    gguf = _gguf()
    layout = gguf_layout(plan, source)  # all checks before any quantization
    check_plan_matches(model, plan, check_hash)
    reader = _reader(source)
    qweights = quantize_model(model, plan.options_by_module(), quantizer or plan.quantizer, calibration, progress=progress)
    ftype = _ftype(layout, plan)
    with atomic_output(out) as tmp:
        writer = gguf.GGUFWriter(tmp, layout.architecture)
        align = _field(reader, "general.alignment")
        if align:
            writer.data_alignment = int(align)
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            value = f.contents()
            if f.name == gguf.Keys.General.FILE_TYPE and ftype is not None:
                value = ftype
            sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, value, f.types[0], sub_type=sub_type)
        arrays = []
        for entry, t in zip(layout.tensors, reader.tensors):
            if entry.module is None:
                data, raw_type = t.data, t.tensor_type
            else:
                data = _planned_bytes(qweights[entry.module], entry, reader)
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


def _planned_bytes(q, entry: TensorEntry, reader) -> np.ndarray:
    """The planned tensor's data in GGUF row order: block bytes [out, row_bytes], or F16 [out, in]."""
    if entry.ggml_type == "F16":
        data = q.values.to(torch.float16).numpy()
    else:
        if q.blocks is None:
            raise BadInputError(f"the quantizer returned no GGUF blocks for {entry.name} ({entry.ggml_type}); "
                                "apply GGUF plans with --quantizer rtn or imatrix")
        data = q.blocks
    return np.ascontiguousarray(data[_row_order(entry.name, data.shape[0], reader)])
