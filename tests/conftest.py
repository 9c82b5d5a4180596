"""Shared fixtures: tiny seeded models of several families, calibration ids, an on-disk model dir.

Nothing here touches the network or the user's cache: models are built from configs, the
tokenizer is trained offline on text written below, and every file goes under tmp_path.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

# Never reach a model hub, even by accident (transformers reads these at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from threads, and on a shared 2-core machine a second intra-op thread
# makes every forward pass ~100x slower under contention. Subprocesses inherit this too.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 256
CALIB_SHAPE = (4, 32)

torch.set_num_threads(1)


def pytest_configure(config):
    # pulp 3.x announces its 4.0 API on every variable (thousands of lines per run); the solver still
    # works, and the migration is noted for the maintainers, so keep the output readable.
    config.addinivalue_line("filterwarnings", r"ignore:.*PuLP 4\.0:DeprecationWarning")


# ---- tiny models -----------------------------------------------------------------------------


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def make_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).eval()


def make_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return OPTForCausalLM(cfg).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def make_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    # Gemma 3's shape: q/k norms, sandwich norms, one KV head, head_dim apart from hidden/heads, sliding and
    # global layers (the pattern of 2 puts one of each in two layers)
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=128, sliding_window=16,
        sliding_window_pattern=2, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return Gemma3ForCausalLM(cfg).eval()


FAMILIES = {"llama": make_llama, "qwen2": make_qwen2, "opt": make_opt, "gpt2": make_gpt2, "gemma3": make_gemma3}


@pytest.fixture(scope="session", autouse=True)
def _private_profile_cache(tmp_path_factory):
    """Safety net: even a call that forgets cache_dir=False never touches ~/.cache/bitalloc."""
    old = os.environ.get("BITALLOC_CACHE_DIR")
    os.environ["BITALLOC_CACHE_DIR"] = str(tmp_path_factory.mktemp("bitalloc-cache"))
    yield
    if old is None:
        os.environ.pop("BITALLOC_CACHE_DIR", None)
    else:
        os.environ["BITALLOC_CACHE_DIR"] = old


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def qwen2():
    return make_qwen2()


@pytest.fixture
def opt():
    return make_opt()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request):
    """(family name, fresh tiny model) for every family."""
    return request.param, FAMILIES[request.param]()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, CALIB_SHAPE, generator=g)


# ---- text and an on-disk model directory -------------------------------------------------------

WORDS = (
    "the a one two three red green blue small large quick slow fox dog cat bird river hill tree "
    "house road city runs walks jumps sleeps sees finds eats over under near far and but then "
    "while because morning evening night day rain sun wind stone water light dark old new"
).split()


def make_text(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        n = rng.randint(5, 12)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(n)) + " .")
    return "\n".join(lines) + "\n"


CALIB_TEXT = make_text(seed=1, sentences=120)  # ~1000 tokens: far more than 64, so the seed matters
EVAL_TEXT = make_text(seed=2, sentences=40)


def make_tokenizer(adds_bos: bool = False):
    """adds_bos: starts every sequence with [BOS], as Gemma's and Llama 3's tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tok.train_from_iterator([CALIB_TEXT, EVAL_TEXT], trainer=trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", tok.token_to_id("[BOS]"))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    )
    assert len(fast) <= VOCAB
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A directory holding a tiny Llama (safetensors) + its tokenizer, plus calib.txt and eval.txt."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tokenizer().save_pretrained(d)
    make_llama().save_pretrained(d)
    (d / "calib.txt").write_text(CALIB_TEXT, encoding="utf-8")
    (d / "eval.txt").write_text(EVAL_TEXT, encoding="utf-8")
    assert any(d.glob("*.safetensors"))
    return d


@pytest.fixture
def text_files(tmp_path) -> tuple[Path, Path]:
    calib, evalf = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(CALIB_TEXT, encoding="utf-8")
    evalf.write_text(EVAL_TEXT, encoding="utf-8")
    return calib, evalf
