"""GGUF: a llama.cpp `--tensor-type-file` plus the `llama-quantize` command that reads it.

llama-quantize (tools/quantize/quantize.cpp) reads the file as whitespace-separated
`PATTERN=TYPE` pairs; src/llama-quant.cpp compiles each PATTERN (lower-cased) as a std::regex and
gives a tensor the type of the first pattern that `regex_search`es its name, so we anchor every
pattern (`^blk\\.3\\.attn_q\\.weight$`). TYPE is any ggml type name, case-insensitive.

GGUF types quantize rows in fixed blocks: K-quants in 256 weights, the legacy Q4_0..Q8_0 in 32.
When a row width (in_features, ggml's ne[0]) is not a multiple of the block, llama-quantize
silently swaps the type (Q4_K -> Q5_0, Q6_K -> Q8_0, ...). We choose among the types whose block
divides the row ourselves, never rounding below the plan's bits, and list every tensor where the
block forced another type than the width-blind choice. Options with no GGUF counterpart (fp8, fp6,
plain fp4) take the nearest integer type and are listed too: GGUF never errors on an option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, step
from ..io import atomic_write_text
from ..formats.gguf import GGUF_TYPES
from ..options import QuantOption
from ..plan import Assignment, Plan
from . import ExportResult, register_export
from .common import require_whole_modules

TENSOR_TYPE_FILE = "tensor-types.txt"


@dataclass(frozen=True)
class GGUFType:
    name: str  # GGMLQuantizationType member name
    nominal_bits: int  # bits of each quantized element
    symmetric: bool  # True: scale only; False: scale and min (zero-point) per block


# Linear (non-codebook) types llama-quantize makes without an importance matrix (IQ2/IQ1 need one).
# Scale/min layout from ggml-common.h: Q2_K/Q4_K/Q5_K and Q4_1/Q5_1 store a min per block.
INT_TYPES = (
    GGUFType("Q2_K", 2, False), GGUFType("Q3_K", 3, True), GGUFType("Q4_K", 4, False),
    GGUFType("Q5_K", 5, False), GGUFType("Q6_K", 6, True),
    GGUFType("Q4_0", 4, True), GGUFType("Q4_1", 4, False), GGUFType("Q5_0", 5, True),
    GGUFType("Q5_1", 5, False), GGUFType("Q8_0", 8, True), GGUFType("F16", 16, True),
)
# FP options with an exact GGUF counterpart, by label: OCP MXFP4 (E2M1 x32, E8M0 scale), NVFP4.
FP_TYPES = {"mxfp4": "MXFP4", "nvfp4": "NVFP4"}
KEEP_TYPE = "F16"

# llama-quantize's positional `type` names the file type (QUANT_OPTIONS in quantize.cpp): the
# default for tensors the file does not name. K types go by their _M mixtures.
FTYPE_OF = {"Q2_K": "Q2_K", "Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q6_K": "Q6_K",
            "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "F16": "F16"}

# Hugging Face architecture -> gguf MODEL_ARCH member, where the lower-cased name does not match
# (convert_hf_to_gguf.py registers Mistral under llama).
ARCH_ALIASES = {"LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA", "Qwen2ForCausalLM": "QWEN2",
                "Qwen3ForCausalLM": "QWEN3", "Phi3ForCausalLM": "PHI3", "GemmaForCausalLM": "GEMMA",
                "Gemma2ForCausalLM": "GEMMA2", "Gemma3ForCausalLM": "GEMMA3", "GPT2LMHeadModel": "GPT2",
                "MixtralForCausalLM": "LLAMA", "OPTForCausalLM": None}


@dataclass(frozen=True)
class TensorType:
    module: str  # Hugging Face module name
    tensor: str  # GGUF tensor name, e.g. blk.3.attn_q.weight
    label: str  # the plan's option
    ggml_type: str  # type written to the file
    row_width: int  # in_features
    fallback: str = ""  # why the type differs from the width-blind choice, or ""


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is a base dependency
        raise BadInputError("the gguf export needs the gguf package: pip install gguf") from None
    return gguf


def type_sizes() -> dict[str, tuple[int, float]]:
    """GGML type name -> (block size in weights, storage bits per weight), from gguf's GGML_QUANT_SIZES."""
    gguf = _gguf()
    return {t.name: (block, type_size * 8 / block) for t, (block, type_size) in gguf.GGML_QUANT_SIZES.items()}


def nearest_int_type(o: QuantOption, row_width: int | None) -> GGUFType:
    """The integer GGUF type nearest to `o`: not below its bits, then the closest bit width, the same
    symmetry, the closest storage bits per weight. row_width=None ignores block sizes."""
    sizes = type_sizes()
    bits = o.bits if o.fmt != "keep" else 16
    option_bpw = o.bits_per_weight(row_width) if row_width and o.fits(row_width) and o.fmt != "keep" else float(bits)
    fitting = [t for t in INT_TYPES if row_width is None or row_width % sizes[t.name][0] == 0]
    return min(fitting, key=lambda t: (t.nominal_bits < bits, abs(t.nominal_bits - bits),
                                       t.symmetric != o.symmetric, abs(sizes[t.name][1] - option_bpw)))


def choose_type(o: QuantOption, row_width: int) -> tuple[str, str, str]:
    """(type, width-blind type, note on a format change) for one tensor.

    A GGUF option (a --target llama.cpp plan) is its own type, exactly: never mapped, never swapped."""
    sizes = type_sizes()
    if o.fmt == "gguf":
        if row_width % o.group_size:
            fitting = [t for t, (block, _) in sizes.items() if t in GGUF_TYPES and row_width % block == 0]
            raise BadInputError(f"the plan gives {o.element} to a tensor with rows of {row_width} weights, which its "
                                f"{o.group_size}-weight blocks do not divide; types that fit: {', '.join(fitting)}")
        return o.element, o.element, ""
    if o.fmt == "keep":
        return KEEP_TYPE, KEEP_TYPE, ""
    exact = FP_TYPES.get(o.label) if o.fmt == "fp" else None
    if exact and exact in sizes:  # MXFP4/NVFP4 arrived in later gguf releases
        if row_width % sizes[exact][0] == 0:
            return exact, exact, ""
        return nearest_int_type(o, row_width).name, exact, ""
    note = f"GGUF has no {o.label} type; nearest integer type" if o.fmt != "int" else ""
    return nearest_int_type(o, row_width).name, nearest_int_type(o, None).name, note


def gguf_arch(architecture: str):
    gguf = _gguf()
    name = ARCH_ALIASES.get(architecture, "")
    if name is None:
        raise BadInputError(f"llama.cpp has no GGUF conversion for {architecture}; export to another target")
    if not name:  # e.g. Qwen2MoeForCausalLM -> qwen2moe
        stem = re.sub(r"(ForCausalLM|LMHeadModel|ForConditionalGeneration)$", "", architecture).lower()
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        if stem not in by_name:
            raise BadInputError(f"no GGUF architecture for {architecture}; known: {', '.join(sorted(ARCH_ALIASES))}")
        return by_name[stem]
    return gguf.MODEL_ARCH[name]


def block_count(plan: Plan) -> int:
    layers = [int(m[1]) for a in plan.assignments if (m := re.search(r"\.(\d+)\.", a.module))]
    return max(layers, default=-1) + 1


def gguf_tensor_name(a: Assignment, name_map) -> str | None:
    """GGUF tensor name of a planned module; a tied output head is the token embedding in GGUF."""
    base = name_map.get_name(a.module)
    if base == "output" and any(name_map.get_name(t) == "token_embd" for t in a.tied_to):
        base = "token_embd"
    return None if base is None else f"{base}.weight"


def gguf_tensor_types(plan: Plan) -> tuple[list[TensorType], list[str]]:
    """Each planned module's GGUF tensor and type, plus lines for modules with no GGUF tensor."""
    gguf = _gguf()
    name_map = gguf.get_tensor_name_map(gguf_arch(plan.model.architecture), block_count(plan))
    rows, unmapped = [], []
    for a in sorted(plan.assignments, key=lambda a: a.module):
        tensor = gguf_tensor_name(a, name_map)
        if tensor is None:
            unmapped.append(f"{a.module} ({a.label}): no GGUF tensor name for it in gguf's {plan.model.architecture} map")
            continue
        o = a.option
        width = a.shape[1]
        try:
            chosen, blind, note = choose_type(o, width)
        except BadInputError as e:
            raise BadInputError(f"{tensor} ({a.module}): {e.unphrased}") from None
        why = []
        if note:
            why.append(f"{note} {chosen}")
        if chosen != blind:
            block = type_sizes()[blind][0]
            why.append(f"row width {width} is not a multiple of {block} ({blind}); using {chosen}")
        rows.append(TensorType(a.module, tensor, a.label, chosen, width, "; ".join(why)))
    return rows, unmapped


def tensor_type_lines(rows: list[TensorType]) -> list[str]:
    return [f"^{re.escape(r.tensor)}$={r.ggml_type}" for r in rows]


def base_ftype(rows: list[TensorType], plan: Plan) -> str:
    """The file type for tensors the file does not name: the type covering the most planned weights."""
    weights: dict[str, int] = {}
    shapes = {a.module: a.shape for a in plan.assignments}
    for r in rows:
        if r.ggml_type in FTYPE_OF:
            weights[r.ggml_type] = weights.get(r.ggml_type, 0) + shapes[r.module][0] * shapes[r.module][1]
    if not weights:
        return "Q8_0"
    return FTYPE_OF[max(sorted(weights), key=weights.__getitem__)]


def f16_gguf_name(source: str) -> str:
    stem = Path(source.rstrip("/")).name
    stem = re.sub(r"\.gguf$", "", stem, flags=re.I)
    stem = re.sub(r"[.-](I?Q\d\w*|F16|BF16|F32)$", "", stem, flags=re.I)  # drop a quant-type suffix
    return f"{stem}-F16.gguf"


IMATRIX_FILE = "imatrix.gguf"


def _write_imatrix(plan: Plan, out: Path, model, calibration, dataset: str) -> Path:
    """imatrix.gguf from the mean x² of every linear layer's inputs over the calibration windows."""
    from .gguf_imatrix import imatrix_modules, input_square_sums, write_imatrix

    gguf = _gguf()
    modules = imatrix_modules(model)
    name_map = gguf.get_tensor_name_map(gguf_arch(plan.model.architecture), block_count(plan))
    tied = getattr(model.config, "tie_word_embeddings", False)
    names = {}
    for m in modules:
        base = name_map.get_name(m)
        if base is not None:
            names[m] = f"{'token_embd' if base == 'output' and tied else base}.weight"
    sums, count = input_square_sums(model, calibration, modules)
    return write_imatrix(out / IMATRIX_FILE, sums, count, names, dataset, int(calibration.shape[1]))


@register_export("gguf", "llama.cpp: a --tensor-type-file for llama-quantize and its command line")
def export_gguf(plan: Plan, out: Path, model=None, calibration=None, calibration_source: str = "", **_) -> ExportResult:
    """model + calibration (token ids [windows, seq_len]): also write imatrix.gguf for llama-quantize."""
    require_whole_modules(plan, "gguf")
    rows, unmapped = gguf_tensor_types(plan)
    if not rows:
        raise BadInputError("no planned module maps to a GGUF tensor; nothing to export")
    path = atomic_write_text(out / TENSOR_TYPE_FILE, "\n".join(tensor_type_lines(rows)) + "\n")
    files = [path]
    if model is not None and calibration is not None:
        files.append(_write_imatrix(plan, out, model, calibration, calibration_source))
    fallbacks = [r for r in rows if r.fallback]
    unsupported = [f"{r.tensor} ({r.module}, {r.label}): {r.fallback}" for r in fallbacks] + unmapped
    source = f16_gguf_name(plan.model.source)
    target = source.replace("-F16.gguf", "-bitalloc.gguf")
    imatrix = f"--imatrix {files[1]} " if len(files) > 1 else ""
    command = f"llama-quantize {imatrix}--tensor-type-file {path} {source} {target} {base_ftype(rows, plan)}"
    notes = [
        f"{len(fallbacks)} of {len(rows)} tensors fell back to another GGUF type (listed above)",
        f"run: {command}",
        f"{source} is an f16/bf16 GGUF of {plan.model.source}, e.g. from llama.cpp's "
        f"`python convert_hf_to_gguf.py MODEL_DIR --outtype f16 --outfile {source}`; quantizing an already "
        "quantized GGUF needs --allow-requantize and loses quality",
    ]
    if len(files) == 1 and plan.quantizer == "imatrix":
        notes.append(f"the plan was made with importance weights; {step('export')} to gguf also writes "
                     f"{IMATRIX_FILE} for llama-quantize --imatrix (with --calib FILE when the plan was calibrated on a file)")
    return ExportResult("gguf", files, unsupported, notes)
