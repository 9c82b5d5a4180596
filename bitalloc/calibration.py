"""Text -> fixed-length token windows, for calibration (random windows) and evaluation (in order)."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import BadInputError, CalibrationMismatchError, setting


SPECIAL_AS_TEXT = "text"  # settings()["special_tokens"]: the text's special-token strings were tokenized as characters


@dataclass(frozen=True)
class Calibration:
    """Token windows [n_windows, seq_len] plus what is needed to tell two calibrations apart."""

    tokens: torch.Tensor
    text_sha256: str
    source: str
    seed: int
    # Windows of the same text that profiling does not use (text order) and their positions among the
    # text's non-overlapping windows: what `verify` measures plans on. Not part of settings(), so the
    # profile and its cache key are unchanged.
    held_out: torch.Tensor | None = field(default=None, compare=False, repr=False)
    held_out_index: tuple[int, ...] = field(default=(), compare=False, repr=False)
    sampling: str = "random non-overlapping windows"
    # The id written over each window's first token when the tokenizer starts its sequences with BOS
    # (None: windows are the text's tokens as they are); see leading_bos.
    bos: int | None = None
    # True when the windows are make_calibration's seeded pick among all of the text's windows and held_out
    # is every other one: widened() can then pick more of the same text the same way. Not part of settings().
    seeded_pick: bool = field(default=False, compare=False, repr=False)
    # True when the text holds a special token's string ("<unk>", "<|endoftext|>") and it was tokenized as
    # plain characters (see tokenize): the ids differ from the parsed ones. Recorded only then, so that other
    # texts keep their profile keys.
    special_as_text: bool = False

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_windows(self) -> int:
        return int(self.tokens.shape[0])

    def settings(self) -> dict:
        return {
            "source": self.source,
            "text_sha256": self.text_sha256,
            "seq_len": self.seq_len,
            "windows": self.n_windows,
            "tokens": self.n_windows * self.seq_len,
            "sampling": self.sampling,
            "seed": self.seed,
            # only when set, so that profiles of models without BOS keep their keys
            **({} if self.bos is None else {"bos": self.bos}),
            **({"special_tokens": SPECIAL_AS_TEXT} if self.special_as_text else {}),
        }


def recorded_special_as_text(settings: dict) -> bool:
    """Whether recorded calibration settings read special-token strings as text (older records did not)."""
    return settings.get("special_tokens") == SPECIAL_AS_TEXT


# The set used when no calibration is given (bitalloc/data/calibration/README.md: what it is, its license).
BUILTIN_CALIBRATION = "austen"
SELF_CALIBRATION = "self"  # --calib self: text sampled from the model itself (calibration_self.py)


def builtin_text(name: str = BUILTIN_CALIBRATION) -> str:
    """The text of a calibration set shipped inside the package."""
    from importlib.resources import files

    path = files("bitalloc") / "data" / "calibration" / f"{name}.txt"
    if not path.is_file():
        raise BadInputError(f"no built-in calibration set {name!r}; the built-in set is {BUILTIN_CALIBRATION!r}")
    return path.read_text(encoding="utf-8")


BUILTIN_PREFIX = "builtin:"  # plan.calibration.source of a shipped set: "builtin:austen"
ACCEPT_OTHER_TEXT = "--skip-calib-hash-check (check_calib_hash=False)"


def plan_calibration_text(recorded: dict, text_path: str | Path | None = None, check_hash: bool = True) -> str | None:
    """The text a plan's calibration windows were cut from; None when they were sampled from the model (self).

    recorded: plan.calibration (source, text_sha256, seq_len, tokens, seed). text_path: a text given
    instead (--calib); its sha256 must be the recorded one unless check_hash is False. Without it a
    built-in set is the shipped text, and a plan calibrated on a file is refused (the file is needed).
    Reads no model, so callers can refuse before loading one.
    """
    source, want = recorded.get("source"), recorded.get("text_sha256")
    if text_path is not None:
        return _hash_checked(read_text(text_path), want, check_hash,
                             f"calibration text {Path(text_path).name!r} has {{got}}, the plan was calibrated on {source!r} "
                             f"with {want}; pass the text the plan was calibrated on, or calibrate on this one with "
                             f"{ACCEPT_OTHER_TEXT}")
    if not source:
        raise BadInputError(f"the plan records no calibration source; pass the text it was calibrated on as {setting('calibration')}")
    if source == SELF_CALIBRATION:
        return None
    if source.startswith(BUILTIN_PREFIX):
        name = source.removeprefix(BUILTIN_PREFIX)
        return _hash_checked(builtin_text(name), want, check_hash,
                             f"this bitalloc's built-in calibration set {name!r} has {{got}}, the plan was calibrated on "
                             f"{want} (another version's set); pass that text as {setting('calibration')}, or calibrate on this one "
                             f"with {ACCEPT_OTHER_TEXT}")
    if source.startswith("<"):  # "<token ids>", "<text>": handed over in Python, no file to name
        raise BadInputError(
            f"the plan was calibrated on {source} given in Python, which cannot be rebuilt from the plan; apply it in Python "
            f"with the same ids (calibration=ids), or pass a text as {setting('calibration')} and {ACCEPT_OTHER_TEXT}")
    raise BadInputError(f"the plan was calibrated on the text file {source!r}; pass it as {setting('calibration')} "
                        f"(its sha256 must be {want})")


def _hash_checked(text: str, want: str | None, check_hash: bool, mismatch: str) -> str:
    """text, refused when its sha256 is not the plan's `want`; mismatch: the message, {got} = the hash found."""
    got = text_sha256(text)
    if check_hash and got != want:
        raise CalibrationMismatchError(mismatch.replace("{got}", got))  # not format(): names may hold braces
    return text


def rebuildable_without_text(recorded: dict) -> bool:
    """Whether a plan's calibration windows can be rebuilt without a text from the user (built-in set, self)."""
    source = str(recorded.get("source") or "")
    return source == SELF_CALIBRATION or source.startswith(BUILTIN_PREFIX)


def calibration_for_plan(recorded: dict, tokenizer: Any, model: Any = None, text_path: str | Path | None = None,
                         check_hash: bool = True) -> "Calibration":
    """The calibration windows a plan was made with, rebuilt from what it recorded (plan.calibration).

    builtin:NAME: the shipped text; self: sampled again from `model` (the unquantized one) with the
    recorded seed, its ids' sha256 checked against the recorded one; a file: `text_path` (see
    plan_calibration_text). Windows always use the recorded seq_len, tokens and seed, so applying a
    plan quantizes with the layer statistics its candidate table was measured on.
    """
    text = plan_calibration_text(recorded, text_path, check_hash)
    try:
        seq_len, tokens, seed = int(recorded["seq_len"]), int(recorded["tokens"]), int(recorded["seed"])
    except (KeyError, TypeError, ValueError):
        raise BadInputError("the plan records no calibration windows (seq_len, tokens, seed); re-plan with this bitalloc") from None
    if text is None:
        from .calibration_self import self_calibration

        if model is None:
            raise BadInputError("the plan was calibrated on text sampled from the model (self); rebuilding it needs the unquantized model")
        calib = self_calibration(model, tokenizer, seq_len=seq_len, tokens=tokens, seed=seed)
        if check_hash and calib.text_sha256 != recorded.get("text_sha256"):
            raise CalibrationMismatchError(
                f"the self-calibration windows sampled again have {calib.text_sha256}, the plan's had "
                f"{recorded.get('text_sha256')} (sampling follows the float logits: another machine, thread count or dtype "
                f"samples other text); use these windows with {ACCEPT_OTHER_TEXT}, or pass a text as {setting('calibration')}")
    else:
        source = Path(text_path).name if text_path is not None else str(recorded["source"])
        # the recorded BOS, not this tokenizer's: a plan made before windows began with BOS rebuilds its own windows
        calib = make_calibration(tokenizer, text, seq_len=seq_len, tokens=tokens, seed=seed, source=source,
                                 bos=recorded.get("bos"), special_as_text=recorded_special_as_text(recorded))
    if model is not None:
        from .models import check_token_ids

        check_token_ids(model, calib.tokens, "calibration token ids")
    return calib


def read_text(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BadInputError(f"text file {str(path)!r} does not exist; pass a UTF-8 text file (e.g. wiki.valid.tokens)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInputError(f"text file {str(path)!r} is not UTF-8 (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise BadInputError(f"text file {str(path)!r} is empty; pass a file with text to calibrate/evaluate on")
    return text


def tokenize(tokenizer: Any, text: str, special_as_text: bool = True) -> torch.Tensor:
    """The whole text as one 1-D id tensor, no special tokens inserted (GPTQ-line convention).

    The text is read as text: a special token's string in it ("<unk>", "<|endoftext|>") becomes the tokens of
    its characters, not the special id, as llama-imatrix and llama-perplexity read their text. Otherwise
    Gemma's tokenizer turns each of WikiText's `<unk>` placeholders into its unknown-token id, an input the
    model was never trained on, and calibration statistics are taken on it. special_as_text=False parses
    them (how plans made before this rebuild their windows)."""
    if tokenizer is None:
        raise BadInputError("text needs a tokenizer: load the model from a source, or pass token ids instead of text")
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=special_as_text, return_tensors="pt").input_ids[0]
    return ids.long()


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS id this tokenizer starts every sequence with, or None when it adds none.

    Why windows start with it: a model trained with BOS first (Gemma, Llama 3) puts much of its attention
    on that position (an attention sink); without it the activations profiling measures are ones the model
    never sees in use. llama.cpp's llama-imatrix and llama-perplexity write BOS over each chunk's first token
    for such models (tokenizer.ggml.add_bos_token); bitalloc's calibration windows do the same. Models
    whose tokenizer adds no BOS (SmolLM2, GPT-2) keep their windows, and their profiles their keys."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return int(bos) if len(ids) > 0 and int(ids[0]) == int(bos) else None


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """windows with `bos` over each first token (a copy), as llama.cpp's tools cut their chunks."""
    if bos is None:
        return windows
    out = windows.clone()
    out[:, 0] = bos
    return out


def text_sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def sequential_windows(ids: torch.Tensor, seq_len: int, n_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start: the evaluation convention, identical for every config."""
    available = ids.numel() // seq_len
    if available == 0:
        raise BadInputError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; lower {setting('seq_len')}")
    n = available if n_windows is None else min(n_windows, available)
    return ids[: n * seq_len].view(n, seq_len)


def random_windows(ids: torch.Tensor, seq_len: int, n_windows: int, seed: int) -> torch.Tensor:
    """n distinct non-overlapping windows picked with `seed`, kept in text order."""
    all_windows = sequential_windows(ids, seq_len)
    return all_windows[_random_pick(all_windows.shape[0], n_windows, seed)]


def _random_pick(available: int, n_windows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=g)[:n_windows].sort().values


FROM_TOKENIZER = "tokenizer"  # make_calibration(bos=...): BOS first when the tokenizer adds one


def make_calibration(
    tokenizer: Any, text: str, *, seq_len: int = 512, tokens: int = 8192, seed: int = 0, source: str = "<text>",
    bos: int | None | str = FROM_TOKENIZER, special_as_text: bool = True,
) -> Calibration:
    """Random non-overlapping windows of `text`; bos: the id over each window's first token, None for
    none, or FROM_TOKENIZER (leading_bos: what the model's tokenizer starts its sequences with)."""
    if seq_len < 2 or tokens < seq_len:
        raise BadInputError(f"need seq_len >= 2 and calibration tokens >= seq_len, got {seq_len} and {tokens}")
    warn_placeholders(text, source)
    ids = tokenize(tokenizer, text, special_as_text)
    # recorded only where reading as text changed the ids (a string search would be slow over Gemma's 6,249
    # special tokens, and would flag its non-special added ones, e.g. "\n", whose ids do not change)
    special_as_text = special_as_text and not torch.equal(ids, tokenize(tokenizer, text, special_as_text=False))
    if bos == FROM_TOKENIZER:
        bos = leading_bos(tokenizer)
    all_windows = with_bos(sequential_windows(ids, seq_len), bos)
    picked = _seeded_split(all_windows, tokens // seq_len, seed)
    return Calibration(text_sha256=text_sha256(text), source=source, seed=seed, bos=bos, seeded_pick=True,
                       special_as_text=special_as_text, **picked)


PLACEHOLDER = "<unk>"  # what tokenized corpora (WikiText's tokenized release, PTB) put in place of rare words
PLACEHOLDER_SHARE = 0.01  # of the text's words: above it, calibration warns


def warn_placeholders(text: str, source: str) -> None:
    """Warn when the calibration text is full of `<unk>` placeholders: text the model will not see in use, whose
    tokens weigh in every statistic profiling takes. On WikiText-2's tokenized validation split they are 5.5 % of
    the words (13 % of SmolLM2's tokens); with them Gemma 3's 4.3125-bit default plan lost to uniform int4-g64-asym
    in KL at calibration seed 0 (+7 %, both applied with awq-gptq; level at seed 1), without them it won (-2.8 %), as
    SmolLM2's did (-3.3 %; docs/results.md, *Against uniform GPTQ at the same size*, *The calibration text's `<unk>`
    placeholders*)."""
    words = len(text.split())
    found = text.count(PLACEHOLDER)
    if words and found / words > PLACEHOLDER_SHARE:
        warnings.warn(f"calibration text {source}: {found} '{PLACEHOLDER}' placeholders ({100 * found / words:.1f} % of "
                      "its words, as in a tokenized corpus's release); the plan would be fitted to them. Calibrate on "
                      "the raw release (e.g. wikitext-2-raw-v1) or remove them first (sed 's/ <unk>//g')", stacklevel=3)


def _seeded_split(all_windows: torch.Tensor, n_windows: int, seed: int) -> dict:
    """The random_windows pick of n_windows among all of a text's windows, and every other one held out (text order)."""
    pick = _random_pick(all_windows.shape[0], n_windows, seed)
    unused = sorted(set(range(all_windows.shape[0])) - set(pick.tolist()))
    return {"tokens": all_windows[pick], "held_out": all_windows[unused], "held_out_index": tuple(unused)}


def widened(calib: Calibration, tokens: int) -> Calibration | None:
    """The windows make_calibration picks for `tokens` tokens of the same text with the same seed (as many as
    the text holds), rebuilt from `calib`'s own and its held-out ones: no text or tokenizer needed. They include
    calib's windows (the seeded pick of more windows starts with the same ones). None when calib's windows
    were not picked from a text (ids given as they are, text sampled from the model): there is no more of it."""
    if not calib.seeded_pick or calib.held_out is None:
        return None
    every = torch.empty((calib.n_windows + calib.held_out.shape[0], calib.seq_len), dtype=calib.tokens.dtype)
    held = torch.tensor(calib.held_out_index, dtype=torch.long)
    picked = torch.ones(every.shape[0], dtype=torch.bool)
    picked[held] = False
    every[picked], every[held] = calib.tokens, calib.held_out
    return replace(calib, **_seeded_split(every, tokens // calib.seq_len, calib.seed))


def calibration_from_tokens(tokens: torch.Tensor, seed: int = 0, source: str = "<token ids>",
                            held_out: torch.Tensor | None = None) -> Calibration:
    """Use given windows [n, seq_len] as they are (tests, pipelines that tokenize themselves).

    held_out: other windows [m, seq_len] of calibration text, kept out of profiling, that `verify`
    measures plans on (never evaluation text)."""
    check_windows(tokens, "calibration token ids")
    if held_out is not None:
        check_windows(held_out, "held-out token ids")
    digest = "sha256:" + hashlib.sha256(tokens.long().numpy().tobytes()).hexdigest()
    return Calibration(tokens=tokens.long(), text_sha256=digest, source=source, seed=seed,
                       held_out=None if held_out is None else held_out.long(),
                       held_out_index=() if held_out is None else tuple(range(held_out.shape[0])))


def check_windows(tokens: torch.Tensor, what: str) -> None:
    """Token windows must be an integer tensor [windows >= 1, seq_len >= 2]: each window predicts its tokens after the first."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise BadInputError(f"{what} must be an integer tensor [windows, seq_len], got {got}")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise BadInputError(f"{what} have shape {list(tokens.shape)}; need at least 1 window of at least 2 tokens, "
                            "[windows, seq_len] (each window predicts its tokens after the first)")
