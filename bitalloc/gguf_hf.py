"""A Hugging Face checkpoint folder as llama.cpp's convert_hf_to_gguf.py would write it as GGUF.

What `gguf_file.write_gguf` needs when the model was not loaded from a .gguf: the metadata
(`TextModel.set_gguf_parameters` + `LlamaModel`'s additions, from config.json), the tensors under
gguf's `TensorNameMap` names with llama's q/k row permutation, and the tokenizer converted as
`TextModel._set_vocab_gpt2` does (byte-level BPE from tokenizer.json; `gguf.SpecialVocab` for merges,
special ids, add_bos/eos and the chat template). Metadata is recorded through a `gguf.GGUFWriter` with
no file, so every key has the type gguf's own `add_*` gives it.

Llama 3's RoPE scaling becomes the converter's extra tensor rope_freqs.weight (bitalloc/rope.py).

Unplanned tensors keep their checkpoint dtype (F32, F16 or BF16; 1-D ones F32, as the converter
stores norms and biases), so the file holds exactly the weights `bitalloc eval --plan` runs; a dtype
may be asked for instead (the converter's default for a float32 checkpoint is F16).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import rope
from .errors import BadInputError

# Hugging Face architecture -> GGUF architecture the writer converts (convert_hf_to_gguf.py's
# LlamaModel registers Mistral too, but its tokenizers are sentencepiece: refused below anyway).
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# Architectures whose attn_q/attn_k rows convert_hf_to_gguf.py permutes (LlamaModel.undo_permute).
PERMUTED = ("llama",)

# The string convert_hf_to_gguf.py's get_vocab_base_pre() tokenizes to identify the pre-tokenizer.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
# tokenizer.json pre-tokenizer regexes of llama.cpp's pre types (src/llama-vocab.cpp keeps the originals
# in comments next to its adapted ones).
_QWEN2_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_LLAMA3_RE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def _reference_pre_tokenizers() -> dict[str, tuple[Any, bool]]:
    """llama.cpp pre type -> (the tokenizers pre-tokenizer that splits text as it does, its ignore_merges)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    bytes_only = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt-2": (byte_level, False),
        "smollm": (pt.Sequence([pt.Digits(individual_digits=True), byte_level]), False),
        "qwen2": (pt.Sequence([pt.Split(Regex(_QWEN2_RE), "isolated"), bytes_only]), False),
        "llama-bpe": (pt.Sequence([pt.Split(Regex(_LLAMA3_RE), "isolated"), bytes_only]), True),
    }


SUPPORTED_TOKENIZERS = ("byte-level BPE (gpt2-style) tokenizer.json with a gpt-2, smollm, qwen2 or llama-bpe "
                        "pre-tokenizer")


def is_hf_folder(source: str | Path) -> bool:
    return Path(source).expanduser().is_dir() and (Path(source).expanduser() / "config.json").is_file()


def hf_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def gguf_architecture(directory: Path) -> str:
    """The GGUF architecture of a checkpoint folder; refuses what the writer cannot convert."""
    archs = hf_config(directory).get("architectures") or ["(none)"]
    if archs[0] not in HF_ARCHITECTURES:
        raise BadInputError(f"bitalloc writes GGUF files from Hugging Face checkpoints of "
                            f"{', '.join(HF_ARCHITECTURES)} only; {str(directory)!r} is {archs[0]}. Convert it with "
                            "llama.cpp's convert_hf_to_gguf.py and write from that .gguf")
    return HF_ARCHITECTURES[archs[0]]


# --- tokenizer: TextModel.get_vocab_base + _set_vocab_gpt2 ------------------------------------------


def _check_bpe_tokenizer(directory: Path) -> dict:
    """tokenizer.json of a byte-level BPE the converter's gpt2 path handles; refuses anything else."""
    where = str(directory)
    if (directory / "tokenizer.model").is_file():
        raise BadInputError(f"{where} has a sentencepiece tokenizer (tokenizer.model); bitalloc converts only a "
                            f"{SUPPORTED_TOKENIZERS}. Convert it with llama.cpp's convert_hf_to_gguf.py and write from that .gguf")
    if not (directory / "tokenizer.json").is_file():
        raise BadInputError(f"{where} has no tokenizer.json; bitalloc converts only a {SUPPORTED_TOKENIZERS}. Save the "
                            "tokenizer with save_pretrained, or write from a .gguf")
    spec = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        kind = f"{model.get('type')} model, {decoder.get('type')} decoder, byte_fallback={model.get('byte_fallback')}"
        raise BadInputError(f"the tokenizer in {where} is not byte-level BPE ({kind}); bitalloc converts only a "
                            f"{SUPPORTED_TOKENIZERS}. Convert it with llama.cpp's convert_hf_to_gguf.py")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # llama.cpp's BPE has no normalizer; Qwen2's NFC is what it ignores too
        raise BadInputError(f"the tokenizer in {where} has a {normalizer} normalizer, which llama.cpp's BPE tokenizer "
                            f"does not apply; bitalloc converts only a {SUPPORTED_TOKENIZERS} without one")
    return spec


def pre_tokenizer_name(tokenizer, spec: dict, where: str) -> str:
    """tokenizer.ggml.pre: llama.cpp's pre type whose splitting of the converter's test text equals this one's.

    convert_hf_to_gguf.py hashes the token ids of that text and knows the hashes of published
    vocabularies; a vocabulary it never saw (a retrained tokenizer) has none. What llama.cpp runs for
    each pre type is a regex split (src/llama-vocab.cpp), so we compare the splits themselves."""
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    if pre is None:
        raise BadInputError(f"the tokenizer in {where} has no pre-tokenizer; bitalloc converts only a {SUPPORTED_TOKENIZERS}")
    splits = [s for s, _ in pre.pre_tokenize_str(CHKTXT)]
    ignore_merges = bool((spec.get("model") or {}).get("ignore_merges", False))
    for name, (reference, ref_ignore) in _reference_pre_tokenizers().items():
        if [s for s, _ in reference.pre_tokenize_str(CHKTXT)] == splits and ignore_merges == ref_ignore:
            return name
    raise BadInputError(f"the pre-tokenizer in {where} ({json.dumps(spec.get('pre_tokenizer'))[:120]}) splits text like "
                        f"none of llama.cpp's it is checked against; bitalloc converts only a {SUPPORTED_TOKENIZERS}. "
                        "Convert it with llama.cpp's convert_hf_to_gguf.py")


def _looks_special(token: str) -> bool:
    # convert_hf_to_gguf.py TextModel.does_token_look_special
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def add_tokenizer(writer, directory: Path, hparams: dict, arch: str) -> None:
    """tokenizer.ggml.* and the chat template into `writer`, as convert_hf_to_gguf.py's gpt2 path does."""
    import gguf
    from transformers import AutoTokenizer

    spec = _check_bpe_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if not getattr(tokenizer, "is_fast", False):
        raise BadInputError(f"the tokenizer in {directory} does not load as a fast tokenizer; bitalloc converts only a "
                            f"{SUPPORTED_TOKENIZERS}")
    vocab = tokenizer.get_vocab()
    vocab_size = hparams.get("vocab_size", len(vocab))
    if max(vocab.values()) >= vocab_size:
        raise BadInputError(f"the tokenizer in {directory} has ids up to {max(vocab.values())}, beyond the model's "
                            f"vocab_size {vocab_size}; use the tokenizer the model was trained with")
    pre = pre_tokenizer_name(tokenizer, spec, str(directory))
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # get_vocab_base: ids the tokenizer lacks are [PADi], UNUSED
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            # llama.cpp assumes CONTROL / USER_DEFINED tokens pre-normalized: normalize them as the converter does
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    if arch == "llama":  # LlamaModel.set_vocab
        config = directory / "tokenizer_config.json"
        if config.is_file() and (prefix := json.loads(config.read_text()).get("add_prefix_space")) is not None:
            writer.add_add_space_prefix(prefix)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    if arch == "llama" and hparams.get("vocab_size", 32000) == 49152:
        writer.add_add_bos_token(False)  # LlamaModel.set_vocab: "Apply to granite small models only" (SmolLM2 too)


# --- metadata: TextModel.set_gguf_parameters + LlamaModel.set_gguf_parameters ------------------------


def _rope_parameters(hparams: dict) -> dict:
    params = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    params.setdefault("rope_theta", hparams.get("rope_theta"))
    return params


def rope_dimension(hparams: dict) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def llama3_rope(hparams: dict, arch: str) -> dict | None:
    """The llama3 RoPE parameters of a llama checkpoint (stored as rope_freqs.weight, bitalloc/rope.py), else None."""
    params = _rope_parameters(hparams)
    return params if arch == "llama" and params.get("rope_type", params.get("type")) == "llama3" else None


def add_parameters(writer, directory: Path, hparams: dict, arch: str) -> None:
    """Architecture metadata from config.json; refuses RoPE scalings bitalloc does not convert."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(directory.name)
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams.get("num_key_value_heads", hparams["num_attention_heads"]))
    params = _rope_parameters(hparams)
    rope_type = params.get("rope_type", params.get("type"))
    # llama3 (on llama) is no metadata but the rope_freqs.weight tensor (hf_tensors)
    if rope_type not in (None, "default", "linear") and llama3_rope(hparams, arch) is None:
        raise BadInputError(f"{directory} uses {rope_type} RoPE scaling, which bitalloc converts only as linear or "
                            "(llama) llama3; convert with convert_hf_to_gguf.py and write from that .gguf")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])
    if params.get("rope_theta") is not None:
        writer.add_rope_freq_base(params["rope_theta"])
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    if (head_dim := hparams.get("head_dim")) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)  # replaced by the plan's when written
    if arch == "llama":
        writer.add_vocab_size(hparams["vocab_size"])
        writer.add_rope_dimension_count(rope_dimension(hparams))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def hf_metadata(directory: Path, arch: str) -> dict:
    """Every GGUF key/value (gguf.GGUFValue) a file converted from `directory` carries, general.architecture first."""
    import gguf

    hparams = hf_config(directory)
    recorder = gguf.GGUFWriter(None, arch)  # collects key/values; writes nothing
    add_parameters(recorder, directory, hparams, arch)
    add_tokenizer(recorder, directory, hparams, arch)
    return dict(recorder.kv_data[0])


# --- tensors ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFTensor:
    name: str  # GGUF tensor name
    hf_name: str | None  # state_dict name in the checkpoint; None: computed by the converter (extra_tensor)
    shape: tuple[int, ...]  # as in PyTorch ([out, in] for a weight)
    ggml_type: str  # F32, F16 or BF16


_GGML_OF = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def hf_tensors(directory: Path, arch: str, dtype: torch.dtype | None = None) -> list[HFTensor]:
    """Every checkpoint tensor under its GGUF name, in the checkpoint's order, stored as the converter does.

    dtype: of the 2-D tensors (float32, float16 or bfloat16); None: as the checkpoint stores each."""
    import gguf

    from .checkpoint import SafetensorsIndex

    hparams = hf_config(directory)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hparams["num_hidden_layers"])
    tied = hparams.get("tie_word_embeddings", False)
    wanted = dtype
    if wanted is not None and wanted not in _GGML_OF:
        raise BadInputError(f"GGUF tensors can be float32, float16 or bfloat16, not {wanted}")
    # the converter yields its extra tensors (LlamaModel.generate_extra_tensors) before the checkpoint's
    out = [HFTensor(rope.TENSOR, None, (rope_dimension(hparams) // 2,), "F32")] if llama3_rope(hparams, arch) else []
    for hf_name, (_, dtype, shape, _, _) in SafetensorsIndex(directory).entries.items():
        if tied and hf_name == "lm_head.weight":
            continue  # a tied head is the token embedding; transformers ties it again at load
        if hf_name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
            continue  # buffers older checkpoints saved; ModelBase.prepare_tensors skips them too
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadInputError(f"checkpoint tensor {hf_name} in {directory} has no GGUF name in gguf's {arch} map; "
                                "bitalloc converts plain Llama / Qwen2 checkpoints only")
        if dtype not in _GGML_OF:
            raise BadInputError(f"checkpoint tensor {hf_name} is {dtype}; bitalloc converts float32/float16/bfloat16 checkpoints")
        out.append(HFTensor(name, hf_name, shape, "F32" if len(shape) == 1 else _GGML_OF[wanted or dtype]))
    return out


def extra_tensor(directory: Path, name: str) -> np.ndarray:
    """A tensor the converter computes rather than copies: llama3's rope_freqs.weight from config.json."""
    hparams = hf_config(directory)
    if name != rope.TENSOR or (params := llama3_rope(hparams, gguf_architecture(directory))) is None:
        raise AssertionError(f"{name} is not a tensor bitalloc computes for {directory}")
    return rope.factors(params, rope_dimension(hparams))


def tensor_bytes(value: torch.Tensor, entry: HFTensor) -> np.ndarray:
    """The tensor as the file stores it: its GGUF type's numpy array (BF16 as its uint16 bits)."""
    t = value.detach().cpu()
    if entry.ggml_type == "BF16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return t.to(torch.float16 if entry.ggml_type == "F16" else torch.float32).numpy()
