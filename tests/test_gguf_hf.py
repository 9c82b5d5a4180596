"""`bitalloc apply DIR --format gguf`: a GGUF written from a Hugging Face checkpoint folder (no source .gguf).

Tiny Llama / Qwen2 checkpoints saved with a small byte-level BPE trained here by the `tokenizers`
library; the written file must load in transformers with the simulated plan's logits and the same
token ids, and (with BITALLOC_LLAMA_CPP_BIN) tokenize the same in llama.cpp's own llama-tokenize.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from bitalloc import api
from bitalloc.cli import app
from bitalloc.errors import BadInputError
from bitalloc.gguf_file import gguf_layout
from bitalloc.gguf_hf import _QWEN2_RE
from bitalloc.models import load_model
from test_gguf_file import OPTIONS, check_written_file, tiny_hf_model

MODEL_VOCAB = 320  # > the tokenizer's 300 ids: the converter pads with [PADi] tokens
SAMPLE = "The quick brown fox said: \"hello there, 1234 times!\"\n  It's 3.14 -- she'd've known.<|im_end|>"
TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
        "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass doors "
        "of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust from entering along "
        "with him. 1984 hello hello there the the the ") * 4
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def bpe_tokenizer(pre: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE of 300 ids (3 special, 256 bytes, 41 merges) with gpt-2's or qwen2's pre-tokenizer."""
    tok = Tokenizer(models.BPE())
    if pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_RE), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=pre == "prefix-space", use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    if pre == "gpt-2":  # llama: a BOS in front (SpecialVocab reads add_bos_token from this template)
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", pair="<|im_start|> $A $B",
                                                           special_tokens=[("<|im_start|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT)


def save_checkpoint(directory: Path, arch: str, pre: str, dtype: torch.dtype = torch.float32) -> Path:
    model = tiny_hf_model(arch, seed=3, vocab=MODEL_VOCAB).to(dtype)
    model.save_pretrained(directory)
    bpe_tokenizer(pre).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def calib_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 300, (4, 32), generator=g)


def _llama_tokenize(path: Path, text: str) -> list[int] | None:
    bin_dir = os.environ.get("BITALLOC_LLAMA_CPP_BIN")
    if not bin_dir or not (Path(bin_dir) / "llama-tokenize").is_file():
        return None
    r = subprocess.run([str(Path(bin_dir) / "llama-tokenize"), "-m", str(path), "-p", text, "--ids", "--log-disable"], capture_output=True, text=True, check=True)
    return [int(x) for x in r.stdout.strip().strip("[]").split(",") if x.strip()]


@pytest.mark.parametrize(("arch", "pre", "dtype"), [("llama", "gpt-2", torch.float32), ("qwen2", "qwen2", torch.bfloat16)])
def test_writes_gguf_from_a_checkpoint_folder(tmp_path, calib_ids, arch, pre, dtype):
    folder = save_checkpoint(tmp_path / f"tiny-{arch}", arch, pre, dtype)
    loaded = load_model(str(folder))
    table, loaded, calib = api.prepare(loaded, calib_ids, options=OPTIONS, cache_dir=False, quantizer="imatrix")
    plan = api.plan_from_table(table, "5bits", loaded, calib)
    out = tmp_path / f"tiny-{arch}-bitalloc.gguf"
    # size and types as planned; transformers' GGUF loader gives the simulated plan's logits exactly
    reader = check_written_file(folder, plan, calib_ids, out)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    stored = "F32" if dtype == torch.float32 else "BF16"
    assert types["token_embd.weight"] == stored and types["blk.1.ffn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied head: the token embedding
    assert sum(name.endswith(".bias") for name in types) == (6 if arch == "qwen2" else 0)
    assert field("general.architecture") == arch and field(f"{arch}.block_count") == 2
    assert field(f"{arch}.attention.head_count_kv") == 2 and field(f"{arch}.context_length") == 128
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == pre
    tokens, token_types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == MODEL_VOCAB and tokens[300:] == [f"[PAD{i}]" for i in range(300, MODEL_VOCAB)]
    assert token_types[:3] == [gguf.TokenType.CONTROL] * 3 and set(token_types[3:300]) == {gguf.TokenType.NORMAL}
    assert set(token_types[300:]) == {gguf.TokenType.UNUSED}
    assert len(field("tokenizer.ggml.merges")) == 300 - 3 - 256
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.unknown_token_id") == 0 and field("tokenizer.ggml.padding_token_id") == 0
    assert field("tokenizer.chat_template") == CHAT
    if arch == "llama":
        assert field("tokenizer.ggml.add_bos_token") is True and field("llama.vocab_size") == MODEL_VOCAB
    # the tokenizer round-trips: transformers' tokenizer from the GGUF gives the checkpoint's ids
    hf = AutoTokenizer.from_pretrained(str(folder))
    from_gguf = load_model(str(out)).tokenizer
    expected = hf(SAMPLE).input_ids
    assert len(expected) < len(SAMPLE.encode()) - 10  # merges at work, not bytes only
    assert from_gguf(SAMPLE).input_ids == expected
    assert from_gguf.decode(expected, skip_special_tokens=True) == hf.decode(expected, skip_special_tokens=True)
    # and in llama.cpp itself (its pre-tokenizer regex, merges, BOS), where a build is at hand
    ids = _llama_tokenize(out, SAMPLE)
    if ids is not None:
        assert ids == expected


def test_cli_apply_from_a_folder_in_float16(tmp_path, calib_ids, monkeypatch):
    """--dtype float16 (convert_hf_to_gguf's default for a float32 checkpoint): unplanned 2-D tensors F16,
    the file as predicted, running the simulated plan with those tensors rounded to float16."""
    from bitalloc.apply import apply

    monkeypatch.setenv("BITALLOC_CACHE_DIR", str(tmp_path / "cache"))
    folder = save_checkpoint(tmp_path / "tiny", "llama", "gpt-2")
    loaded = load_model(str(folder))
    table, loaded, calib = api.prepare(loaded, calib_ids, options=OPTIONS, cache_dir=False, quantizer="rtn")
    plan = api.plan_from_table(table, "4.5bits", loaded, calib)
    plan_path = plan.save(tmp_path / "plan.json")
    out = tmp_path / "out.gguf"
    r = CliRunner().invoke(app, ["apply", str(folder), "--plan", str(plan_path), "--format", "gguf", "--out", str(out),
                                 "--dtype", "float16", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads([line for line in r.stdout.splitlines() if line.strip()][-1])
    assert report["file_bytes"] == report["predicted_file_bytes"] == out.stat().st_size
    assert out.stat().st_size == gguf_layout(plan, folder, torch.float16).file_bytes < gguf_layout(plan, folder).file_bytes
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
    simulated = apply(load_model(str(folder)).model, plan)
    with torch.no_grad():
        emb = simulated.model.embed_tokens.weight
        emb.copy_(emb.half().float())
        assert torch.equal(load_model(str(out)).model(calib_ids).logits, simulated(calib_ids).logits)
    # a .gguf source's tensors are copied as stored: no dtype for them
    with pytest.raises(BadInputError, match=r"copied as stored; a dtype for them .* only when writing from a Hugging Face"):
        gguf_layout(plan, out, torch.float16)


def test_whole_file_budget_of_a_folder_holds_for_the_written_file(tmp_path, calib_ids):
    from bitalloc.budget import gguf_typed, parse_budget
    from bitalloc.gguf_file import write_gguf

    folder = save_checkpoint(tmp_path / "tiny", "llama", "gpt-2")
    assert gguf_typed(OPTIONS, str(folder))  # a size budget of it defaults to the whole file
    loaded = load_model(str(folder))
    table, loaded, calib = api.prepare(loaded, calib_ids, options=OPTIONS, cache_dir=False, quantizer="rtn")
    sizes = []
    for text in ("900KB", "1.1MB"):
        plan = api.plan_from_table(table, parse_budget(text, "model"), loaded, calib)
        out = tmp_path / f"{text}.gguf"
        layout = write_gguf(load_model(str(folder)).model, plan, folder, out)
        limit = parse_budget(text).value
        assert out.stat().st_size == layout.file_bytes and limit - 20_000 < layout.file_bytes <= limit
        sizes.append(layout.file_bytes)
    assert sizes[0] < sizes[1]
    # a folder bitalloc cannot write has no file to budget: said so, with the way out
    (folder / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(BadInputError, match=r"size budget of a llama.cpp plan is of the whole GGUF file, which bitalloc "
                                            r"cannot write from this model: .*sentencepiece.*budget_scope planned"):
        api.plan_from_table(table, parse_budget("900KB", "model"), loaded, calib)


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # 5 of the 32 frequencies of a 64-dim head in the interpolated band


def test_llama3_rope_is_written_as_llama_cpps_rope_freqs_and_read_back(tmp_path, calib_ids):
    """Llama 3's RoPE scaling: convert_hf_to_gguf.py writes it as the F32 tensor rope_freqs.weight (first in
    the file), which transformers' GGUF loader ignores; load_model recovers the parameters from it, so the
    written file runs exactly the simulated plan (with plain RoPE its logits would differ)."""
    from bitalloc import rope

    folder = save_checkpoint(tmp_path / "tiny", "llama", "gpt-2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": LLAMA3}))
    loaded = load_model(str(folder))
    assert loaded.model.config.rope_parameters["rope_type"] == "llama3"
    table, loaded, calib = api.prepare(loaded, calib_ids, options=OPTIONS, cache_dir=False, quantizer="rtn")
    plan = api.plan_from_table(table, "5bits", loaded, calib)
    out = tmp_path / "tiny-llama3.gguf"
    reader = check_written_file(folder, plan, calib_ids, out)  # size as predicted; transformers = the simulated plan
    first = reader.tensors[0]
    assert (first.name, first.tensor_type.name) == (rope.TENSOR, "F32")
    factors = np.asarray(first.data)
    assert factors.tolist()[:4] == [1.0] * 4 and factors.tolist()[9:] == [8.0] * 23
    assert np.all((factors[4:9] > 1) & (factors[4:9] < 8)) and np.all(np.diff(factors[4:9]) > 0)
    assert reader.get_field("llama.rope.freq_base").contents() == 10000.0
    assert reader.get_field("llama.rope.scaling.type") is None  # no metadata: the tensor is the scaling
    with parses_counted() as parses:
        assert load_model(str(out)).model.config.rope_parameters == LLAMA3
    # one parse serves transformers' tokenizer, config and weights and the RoPE check (each would parse again)
    assert parses == [out.name]
    # qwen2's converter has no such tensor: refused there
    qwen = save_checkpoint(tmp_path / "qwen", "qwen2", "qwen2")
    qconfig = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**qconfig, "rope_parameters": LLAMA3}))
    with pytest.raises(BadInputError, match=r"uses llama3 RoPE scaling, which bitalloc converts only as linear or \(llama\) llama3"):
        gguf_layout(plan, qwen)


@pytest.mark.parametrize(("factor", "low", "high", "original"), [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192),
                                                                 (16.0, 2.0, 8.0, 4096)])
def test_llama3_rope_parameters_are_recovered_from_the_factors(factor, low, high, original):
    """Llama 3.1 (factor 8) and 3.2 (factor 32) as published (head 128, base 500000), and a made-up one: the
    recovered parameters give the same factors; for low_freq_factor 1 they are the published ones."""
    from bitalloc import rope

    params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": low,
              "high_freq_factor": high, "original_max_position_embeddings": original}
    stored = rope.factors(params, 128)
    recovered = rope.parameters_from_factors(stored, 500000.0, 128, "x.gguf")
    assert np.array_equal(rope.factors(recovered, 128), stored)
    if low == 1.0:
        assert recovered == params
    # factors no llama3 parameters give are refused, naming the file
    broken = stored.copy()
    broken[10:14] = [1.5, 7.0, 1.2, 3.0]
    with pytest.raises(BadInputError, match=r"x\.gguf: its rope_freqs\.weight .* is not a llama3 RoPE scaling"):
        rope.parameters_from_factors(broken, 500000.0, 128, "x.gguf")


@contextmanager
def parses_counted():
    """The names of the files gguf.GGUFReader parses inside the block; afterwards the real class is back."""
    real, parses = gguf.GGUFReader, []

    class Counting(real):
        def __init__(self, path, mode="r"):
            parses.append(Path(path).name)
            super().__init__(path, mode)

    gguf.GGUFReader = Counting
    try:
        yield parses
        assert gguf.GGUFReader is Counting  # load_model put back what it found
    finally:
        gguf.GGUFReader = real


def test_a_gguf_load_parses_the_file_once_and_gives_what_transformers_gives(tmp_path, calib_ids):
    """load_model hands transformers' loader one reader for the tokenizer, config and weights; the model and
    tokenizer are the ones transformers makes parsing the file each time. A file that fails to load leaves
    gguf.GGUFReader as it was."""
    from transformers import AutoModelForCausalLM

    folder = save_checkpoint(tmp_path / "tiny", "qwen2", "qwen2")
    out = tmp_path / "tiny.gguf"
    check_written_file(folder, _plan_for(folder, calib_ids), calib_ids, out)
    with parses_counted() as parses:
        loaded = load_model(str(out))
    assert parses == [out.name]
    with parses_counted() as parses:
        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert parses == [out.name] * 3  # transformers alone: for the tokenizer, then the model's config and weights
    assert loaded.tokenizer(SAMPLE).input_ids == tokenizer(SAMPLE).input_ids
    assert loaded.model.config.to_dict() == model.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size // 2])  # the header whole, the tensors cut off
    with parses_counted() as parses, pytest.raises(BadInputError, match="could not read GGUF file"):
        load_model(str(cut))
    assert parses == [cut.name]


def _plan_for(folder: Path, calib_ids):
    loaded = load_model(str(folder))
    table, loaded, calib = api.prepare(loaded, calib_ids, options=OPTIONS[:2], cache_dir=False, quantizer="rtn")
    return api.plan_from_table(table, "7bits", loaded, calib)


def test_refuses_what_it_cannot_convert_faithfully(tmp_path, calib_ids):
    folder = save_checkpoint(tmp_path / "tiny", "llama", "gpt-2")
    plan = _plan_for(folder, calib_ids)
    gguf_layout(plan, folder)  # the good folder passes
    supported = r"bitalloc converts only a byte-level BPE \(gpt2-style\) tokenizer\.json"
    # a ByteLevel pre-tokenizer that adds a prefix space splits like none of llama.cpp's
    bpe_tokenizer("prefix-space").save_pretrained(folder)
    with pytest.raises(BadInputError, match=rf"splits text like none of llama\.cpp's.*{supported}"):
        gguf_layout(plan, folder)
    # a sentencepiece model file: the converter would build an SPM vocabulary, which bitalloc does not
    bpe_tokenizer("gpt-2").save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(BadInputError, match=rf"sentencepiece tokenizer \(tokenizer\.model\); {supported}"):
        gguf_layout(plan, folder)
    (folder / "tokenizer.model").unlink()
    # a WordPiece tokenizer.json
    spec = json.loads((folder / "tokenizer.json").read_text())
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    (folder / "tokenizer.json").write_text(wordpiece.to_str())
    with pytest.raises(BadInputError, match=rf"is not byte-level BPE \(WordPiece model.*{supported}"):
        gguf_layout(plan, folder)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    # an architecture the converter conventions are not implemented for
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Phi3ForCausalLM"]}))
    with pytest.raises(BadInputError, match=r"from Hugging Face checkpoints of LlamaForCausalLM, Qwen2ForCausalLM only; .* is Phi3ForCausalLM"):
        gguf_layout(plan, folder)
    # RoPE scalings other than linear and llama3 (yarn adds metadata and attention scaling bitalloc does not write)
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(BadInputError, match=r"uses yarn RoPE scaling, which bitalloc converts only as linear or \(llama\) llama3"):
        gguf_layout(plan, folder)
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_pre_tokenizer_is_named_by_how_it_splits(name):
    from bitalloc.gguf_hf import _reference_pre_tokenizers, pre_tokenizer_name

    pre, ignore_merges = _reference_pre_tokenizers()[name]
    tok = bpe_tokenizer("gpt-2")
    tok.backend_tokenizer.pre_tokenizer = pre
    spec = {"model": {"type": "BPE", "ignore_merges": ignore_merges}}
    assert pre_tokenizer_name(tok, spec, "here") == name
    # llama.cpp's llama-bpe ignores merges for whole-vocabulary words; the same split without it is none of them
    if name == "llama-bpe":
        with pytest.raises(BadInputError, match="splits text like none"):
            pre_tokenizer_name(tok, {"model": {"type": "BPE", "ignore_merges": False}}, "here")
