"""Write a plan as a packed compressed-tensors checkpoint: safetensors + config.json (+ tokenizer).

Each planned module's stored form is built from its QuantizedWeight, under the tensor names the
compressed-tensors compressors use, so the library (and transformers, vLLM) read it back:
  int  (pack-quantized):  weight_packed int32 [out, ceil(in*b/32)] (pack_to_int32, the library's
                          own packer), weight_scale fp16 [out, n_groups], weight_shape int64 [2],
                          asymmetric also weight_zero_point int32 [ceil(out*b/32), n_groups]
  fp8e4m3 (naive-quantized): weight float8_e4m3fn [out, in], weight_scale fp16 [out, n_groups|1]
                          (per tensor: fp32 [1])
  nvfp4 (nvfp4-pack-quantized): weight_packed uint8 [out, in/2], weight_scale float8_e4m3fn
                          [out, in/16], weight_global_scale fp32 [1] (the reciprocal of ours)
  mxfp4 (mxfp4-pack-quantized): weight_packed uint8 [out, in/2], weight_scale uint8 E8M0 [out, in/32]
  fp16 (keep):            weight in 16 bits, listed in `ignore`
compressed-tensors' codes are signed whatever the symmetry: our unsigned asymmetric codes c in
[0, 2^b-1] with zero-point z become c - 2^(b-1) and z - 2^(b-1); (c - z)·s is unchanged.

Everything is written into a temporary folder next to `out` and renamed into place at the end,
so a failure never leaves a half-written checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .apply import check_plan_matches, checked_hash, plan_quantizer_settings, plan_windows
from .errors import BadInputError, BitallocError, OutputPathError, setting
from .exports.compressed_tensors import check_expressible, quantization_config, serving_notes, weight_args
from .io import atomic_write_text, canonical_json, check_output_dir
from .models import is_linear
from .plan import Plan
from .quantizers import QuantizedWeight
from .quantizers.materialize import quantize_model

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Tensors a compressed module stores besides (or instead of) `weight`.
PACKED_SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_global_scale")


@dataclass
class CheckpointReport:
    """What `save_checkpoint` wrote and what it measured from the files on disk."""

    out: Path
    files: list[Path]
    modules_by_label: dict[str, int]  # option label -> planned modules stored with it
    format_by_label: dict[str, str]  # option label -> compressed-tensors format ("dense" for fp16)
    planned_weights: int
    planned_bytes: int  # bytes of the planned modules' tensors in the safetensors files, weight_shape excluded
    shape_bytes: int  # weight_shape tensors (int64 [2] per packed module), which the plan does not count
    predicted_bits_per_weight: float  # plan.summary.storage_bits_per_weight
    checkpoint_bytes: int  # every file in the folder
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def measured_bits_per_weight(self) -> float:
        """Storage bits per planned weight from the bytes on disk (payload + scales + zero-points)."""
        return 8 * self.planned_bytes / self.planned_weights

    @property
    def measured_bits_per_weight_with_shapes(self) -> float:
        return 8 * (self.planned_bytes + self.shape_bytes) / self.planned_weights

    def to_dict(self) -> dict:
        return {
            "out": str(self.out), "files": [p.name for p in self.files],
            "modules_by_label": self.modules_by_label, "format_by_label": self.format_by_label,
            "planned_weights": self.planned_weights, "planned_bytes": self.planned_bytes,
            "shape_bytes": self.shape_bytes, "measured_bits_per_weight": self.measured_bits_per_weight,
            "measured_bits_per_weight_with_shapes": self.measured_bits_per_weight_with_shapes,
            "predicted_bits_per_weight": self.predicted_bits_per_weight, "checkpoint_bytes": self.checkpoint_bytes,
            "warnings": self.warnings, "notes": self.notes,
        }


def save_checkpoint(model: nn.Module, plan: Plan, out: str | Path, quantizer: str | None = None,
                    calibration: torch.Tensor | None = None, *, tokenizer: Any = None, force: bool = False,
                    check_hash: bool = True, allow_untied: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    dtype: torch.dtype | None = None, progress: bool = False,
                    cache_dir: str | Path | bool | None = None, settings: dict | None = None) -> CheckpointReport:
    """Quantize a copy of `model` as `plan` says and write it as a packed compressed-tensors checkpoint.

    out: folder to create (an existing one is replaced only with force=True). allow_untied: write
    a plan whose q/k/v or gate/up of a block differ (transformers loads it, vLLM does not) with a warning.
    quantizer: None = the one the plan was made for (plan.quantizer).
    calibration: token ids [windows, seq_len] for quantizers that need layer Hessians (gptq, rtn-w, awq);
    without it, `tokenizer` rebuilds the plan's own windows (apply.plan_windows).
    dtype: what the unplanned tensors (embeddings, norms, lm_head) are stored and the checkpoint
    declared as; None = the model's own (a GGUF loads as float32; bfloat16 halves those bytes).
    cache_dir: the profile cache, where an equalizing quantizer (awq) finds the scales its profile searched (a
    folder, True = the default one, None/False = none: profile.store.cache_folder).
    settings: the quantizer's, over the plan's defaults (apply.plan_quantizer_settings; e.g. hessian_tokens).
    The caller's model is left unchanged.
    """
    out, leftovers = prepare_checkpoint_out(out, force)
    dtype = dtype or next(model.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise BadInputError(f"checkpoint dtype must be float32, float16 or bfloat16, not {dtype}")
    check_plan_matches(model, plan, check_hash)
    warnings = check_expressible(plan, allow_untied)
    _check_modules(model, plan)
    _library()  # fail before the (slow) quantization if compressed-tensors is missing

    quantizer = quantizer or plan.quantizer
    settings = plan_quantizer_settings(plan, quantizer, settings or {})
    calibration = plan_windows(model, plan, quantizer, calibration, tokenizer)
    simulated = copy.deepcopy(model)  # quantizers work in place (GPTQ needs later layers to see quantized inputs)
    options = plan.options_by_module()
    qweights = quantize_model(simulated, options, quantizer, calibration, progress=progress, cache_dir=cache_dir,
                              content_hash=checked_hash(plan, check_hash), **settings)
    tensors, scale_notes = _state_dict(simulated, qweights, dtype)  # norms as equalization folded them (awq)
    linears = [n for n, m in model.named_modules() if is_linear(m)]
    qconfig = quantization_config(plan, linears)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        files = _write_safetensors(tensors, tmp, max_shard_bytes)
        _write_config(simulated, qconfig, tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        report = _measure(tmp, plan)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.out = out
    report.files = [out / p.name for p in files]
    report.warnings = warnings
    report.notes = leftovers + scale_notes + serving_notes(plan) + _dtype_notes(dtype, plan)
    return report


def prepare_checkpoint_out(out: str | os.PathLike, force: bool) -> tuple[Path, list[str]]:
    """The --out folder of a checkpoint, checked before the model loads: a folder or nothing, existing only
    with force; leftovers of a killed earlier run are cleaned up first (their notes are returned)."""
    out = check_output_dir(out)
    notes = clean_leftovers(out) if out.parent.is_dir() else []
    if out.exists() and not force:
        restored = "".join(f" ({n})" for n in notes if n.startswith("restored"))
        raise OutputPathError(f"{setting('out')} {str(out)!r} already exists{restored}; pass {setting('force')} to replace it, "
                              f"or choose another {setting('out')}")
    return out, notes


def clean_leftovers(out: Path) -> list[str]:
    """Remove what a killed earlier write of `out` left beside it (see _replace_dir); notes saying what was done.

    .OUT.*.tmp: an unfinished checkpoint, removed. .OUT.*.old: the previous checkpoint moved aside;
    if `out` itself is missing the kill came between the two renames, so the previous one is put back.
    """
    notes = []
    for leftover in sorted(out.parent.glob(f".{out.name}.*.tmp")) + sorted(out.parent.glob(f".{out.name}.*.old")):
        if not leftover.is_dir() or leftover.is_symlink():
            continue
        previous = leftover / out.name
        if leftover.suffix == ".old" and previous.is_dir() and not os.path.lexists(out):
            os.replace(previous, out)
            notes.append(f"restored {out} from {leftover.name}, left by an interrupted earlier run")
        shutil.rmtree(leftover, ignore_errors=True)
        notes.append(f"removed {leftover.name}, left by an interrupted earlier run")
    return notes


def _dtype_notes(dtype: torch.dtype, plan: Plan) -> list[str]:
    stored = {weight_args(o)[1] for a in plan.assignments if (o := a.option).fmt != "keep"}
    notes = []
    if stored & {"nvfp4-pack-quantized", "mxfp4-pack-quantized"} and dtype != torch.bfloat16:
        notes.append("compressed-tensors decompresses NVFP4/MXFP4 weights to bfloat16: load this checkpoint with "
                     "dtype=torch.bfloat16 in transformers")
    if stored & {"pack-quantized", "naive-quantized"} and dtype == torch.bfloat16:
        notes.append("a bfloat16 model loads the fp16 scales into bfloat16 parameters: reloaded weights match the "
                     "simulation to one bfloat16 rounding, not bit for bit")
    return notes


def _library():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise BadInputError("writing a compressed-tensors checkpoint needs the compressed-tensors package; "
                            "pip install 'compressed-tensors>=0.20'") from None
    return pack_to_int32


def _check_modules(model: nn.Module, plan: Plan) -> None:
    """Only nn.Linear weights, each stored once: compressed-tensors packs Linear modules, and a
    weight shared with another module (tied lm_head/embedding) would need both forms at once."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for a in plan.assignments:
        module = model.get_submodule(a.module)
        if a.option.fmt == "keep":
            continue
        if not isinstance(module, nn.Linear):
            raise BadInputError(f"{a.module} is a {type(module).__name__}; the compressed-tensors checkpoint packs "
                                "nn.Linear weights only: re-plan without it (or pin it to fp16)")
        sharing = [n for n in owners[id(module.weight)] if n != f"{a.module}.weight"]
        if sharing:
            raise BadInputError(f"{a.module}.weight is tied to {', '.join(sharing)}; a checkpoint cannot store it "
                                f"packed for one and dense for the other: re-plan with {setting('pins')} '{a.module}=fp16' "
                                f"or without {setting('include_lm_head')}")


def _state_dict(model: nn.Module, qweights: dict[str, QuantizedWeight], dtype: torch.dtype) -> tuple[dict, list[str]]:
    """Checkpoint tensors: planned modules in their compressed form, the rest as in the model.

    Tied parameters are written once, under their first name (transformers re-ties them)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            continue
        seen.add(key)
        t = t.detach().cpu()
        tensors[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    notes = []
    for module, q in qweights.items():
        del tensors[f"{module}.weight"]
        packed, note = compressed_tensors_of(q, keep_dtype=_keep_dtype(dtype))
        tensors.update({f"{module}.{k}": v for k, v in packed.items()})
        if note:
            notes.append(f"{module}: {note}")
    return tensors, notes


def _keep_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16 is what "keep" stores and simulates; a bf16 checkpoint keeps bf16 (a bf16 model's values round-trip).
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def compressed_tensors_of(q: QuantizedWeight, keep_dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], str]:
    """The compressed-tensors tensors (local names) storing one quantized weight, from the codes and
    scales its quantizer returned, and a note if a scale could not be stored in the width the plan assumed."""
    option = q.option
    if option.fmt == "keep":
        return {"weight": q.values.to(keep_dtype).contiguous()}, ""
    try:
        _, fmt = weight_args(option)  # what compressed-tensors can hold is declared there, once
    except ValueError as e:
        raise BadInputError(f"compressed-tensors cannot store {option.label}: {e}; re-plan with int, fp8e4m3, "
                            "nvfp4, mxfp4 or fp16 options") from None
    if q.codes is None or q.scale is None:
        raise BitallocError(f"the quantizer returned no codes and scales for {option.label}; cannot pack")
    return _PACKERS[fmt](q)


def _int_tensors(q: QuantizedWeight) -> tuple[dict[str, torch.Tensor], str]:
    pack_to_int32 = _library()
    option = q.option
    b = option.bits
    # compressed-tensors stores signed codes in [-2^(b-1), 2^(b-1)-1] for both symmetries.
    offset = 0 if option.symmetric else 2 ** (b - 1)
    codes = (q.codes - offset).to(torch.int8)  # [out, in]
    out_f, in_f = codes.shape
    tensors = {"weight_packed": pack_to_int32(codes, b), "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
    scale, note = _scale_as_fp16(q.scale)
    tensors["weight_scale"] = scale  # [out, n_groups]; per channel n_groups = 1
    if not option.symmetric:
        zero = q.zero - offset
        if not torch.equal(zero, zero.round()):
            raise BitallocError(f"{option.label}: zero-points are not integers; cannot pack")
        tensors["weight_zero_point"] = pack_to_int32(zero.to(torch.int8), b, packed_dim=0)  # [ceil(out*b/32), n_groups]
    return tensors, note


def _scale_as_fp16(scale: torch.Tensor) -> tuple[torch.Tensor, str]:
    """fp16 when exact (RTN rounds its scales to fp16); otherwise fp32 and a note, never a silent rounding."""
    half = scale.to(torch.float16)
    if torch.equal(half.float(), scale.float()):
        return half.contiguous(), ""
    return scale.float().contiguous(), "scales are not fp16 values; stored as fp32 (2 bytes more per group than planned)"


def _fp8_tensors(q: QuantizedWeight) -> tuple[dict[str, torch.Tensor], str]:
    # compressed-tensors dequantizes as fp8.to(scale dtype) * scale: the codes are E4M3 values, exactly.
    tensors = {"weight": q.codes.to(torch.float8_e4m3fn).contiguous()}  # [out, in]
    if q.option.per_tensor:
        tensors["weight_scale"] = q.scale.reshape(1).float()  # one fp32 scale per tensor
        return tensors, ""
    tensors["weight_scale"], note = _scale_as_fp16(q.scale)  # [out, n_groups]
    return tensors, note


def _nvfp4_tensors(q: QuantizedWeight) -> tuple[dict[str, torch.Tensor], str]:
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    # compressed-tensors keeps the reciprocal global scale (448·6 / amax) and dequantizes as
    # e2m1 · (e4m3 scale / global): the same product up to the fp32 rounding of the reciprocal.
    return {
        "weight_packed": pack_fp4_to_uint8(q.codes),  # uint8 [out, in/2], two E2M1 codes per byte
        "weight_scale": q.scale.to(torch.float8_e4m3fn).contiguous(),  # [out, in/16]
        "weight_global_scale": (1.0 / q.tensor_scale).reshape(1).float(),  # fp32 [1]
    }, ""


def _mxfp4_tensors(q: QuantizedWeight) -> tuple[dict[str, torch.Tensor], str]:
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    _, e = torch.frexp(q.scale.float())  # scale = 2^X exactly: X = e - 1
    return {
        "weight_packed": pack_fp4_to_uint8(q.codes),  # uint8 [out, in/2]
        "weight_scale": (e.to(torch.int32) - 1 + 127).to(torch.uint8).contiguous(),  # E8M0: biased exponent [out, in/32]
    }, ""


# compressed-tensors format (exports.compressed_tensors.weight_args) -> its tensors.
_PACKERS = {"pack-quantized": _int_tensors, "naive-quantized": _fp8_tensors, "nvfp4-pack-quantized": _nvfp4_tensors,
            "mxfp4-pack-quantized": _mxfp4_tensors}


def _write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        path = folder / "model.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        files.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write_text(folder / "model.safetensors.index.json",
                      canonical_json({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return files


def _write_config(model: nn.Module, qconfig: dict, folder: Path, dtype: torch.dtype) -> None:
    config = model.config.to_dict()
    # What save_pretrained records (vLLM picks the model class from `architectures`); a model built
    # from a config in memory has neither.
    config["architectures"] = [type(model).__name__]
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = qconfig
    atomic_write_text(folder / "config.json", canonical_json(config))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(str(folder))


def safetensors_tensor_bytes(path: Path) -> dict[str, tuple[str, int]]:
    """name -> (dtype, bytes) read from a safetensors file's header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], v["data_offsets"][1] - v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def _measure(folder: Path, plan: Plan) -> CheckpointReport:
    sizes: dict[str, tuple[str, int]] = {}
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        sizes.update(safetensors_tensor_bytes(f))
    planned_bytes = shape_bytes = 0
    for a in plan.assignments:
        for suffix in PACKED_SUFFIXES:
            key = f"{a.module}.{suffix}"
            if key in sizes:
                if suffix == "weight_shape":
                    shape_bytes += sizes[key][1]
                else:
                    planned_bytes += sizes[key][1]
    labels = Counter(a.label for a in plan.assignments)
    fmt = {}
    for a in plan.assignments:
        option = a.option
        fmt[a.label] = "dense" if option.fmt == "keep" else weight_args(option)[1]
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return CheckpointReport(
        out=folder, files=files, modules_by_label=dict(sorted(labels.items())), format_by_label=dict(sorted(fmt.items())),
        planned_weights=plan.summary.planned_weights, planned_bytes=planned_bytes, shape_bytes=shape_bytes,
        predicted_bits_per_weight=plan.summary.storage_bits_per_weight, checkpoint_bytes=total,
    )


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing `out` is moved aside first, removed last."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    # mkdtemp makes the folder 0700 (and safetensors its files 0600): give what a plain mkdir/open would.
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)
    for p in tmp.iterdir():
        os.chmod(p, 0o666 & ~mask)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
