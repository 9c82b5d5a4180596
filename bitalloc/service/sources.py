"""Model and calibration sources named in requests: checked against the server's rules, and keyed.

A request may name a local model (directory or .gguf) or calibration file only inside the allowed
roots when roots are configured (symlinks and '..' resolved first, and for a model folder every
file in it: a model.safetensors linked to a file outside the roots is refused), and a hub id only
when the server allows the hub. The profile id is a content key: the model files' bytes, the calibration
text's bytes and every setting that shapes the candidate table, so the same work always gets the
same id, whatever path or spelling named it.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..config import KEYLESS_QUANTIZER
from ..errors import BadInputError
from ..profile.store import content_key, short_id

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


@dataclass(frozen=True)
class SourceRules:
    """allowed_roots: local paths must resolve inside one of these (empty: any path).
    allow_hub: whether requests may name a hub id (the server then downloads it)."""

    allowed_roots: tuple[Path, ...] = ()
    allow_hub: bool = False

    @classmethod
    def of(cls, roots: list[str] | tuple[str, ...] = (), allow_hub: bool = False) -> "SourceRules":
        return cls(tuple(Path(r).expanduser().resolve() for r in roots), allow_hub)

    def inside(self, resolved: Path) -> bool:
        """Whether a resolved path may be opened (any path when no roots are configured)."""
        return not self.allowed_roots or any(resolved.is_relative_to(root) for root in self.allowed_roots)

    def roots_text(self) -> str:
        return ", ".join(str(r) for r in self.allowed_roots)


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or source.endswith(".gguf") or "\\" in source


def checked_path(text: str, what: str, rules: SourceRules) -> Path:
    """An existing absolute local path inside the allowed roots, resolved."""
    if "\x00" in text:
        raise BadInputError(f"{what} {text!r} contains a NUL byte; pass a plain absolute path")
    p = Path(text)
    if not p.is_absolute():
        raise BadInputError(f"{what} {text!r} is not an absolute path; the server resolves no relative paths, "
                            "pass e.g. /data/models/tiny")
    resolved = p.resolve()
    if not rules.inside(resolved):
        raise BadInputError(f"{what} {text!r} is outside the allowed roots ({rules.roots_text()}); place it under one of them")
    if not resolved.exists():
        raise BadInputError(f"{what} {text!r} does not exist on the server")
    return resolved


def check_folder_inside(folder: Path, what: str, text: str, rules: SourceRules) -> None:
    """Every file and folder under `folder` must resolve inside the allowed roots: a loader opens
    config, tokenizer and weight files by name, and one symlinked elsewhere would be read."""
    if not rules.allowed_roots:
        return
    for entry in sorted(folder.rglob("*")):  # rglob does not descend into symlinked folders; the check below sees them
        target = entry.resolve()
        if not rules.inside(target):
            raise BadInputError(f"{what} {text!r}: {entry.relative_to(folder)} resolves to {str(target)!r}, outside the "
                                f"allowed roots ({rules.roots_text()}); copy the file under one of them instead of "
                                "linking it")


def checked_model_source(source: str, rules: SourceRules) -> str:
    """The model source as the worker will load it: a resolved local path or a hub id."""
    if looks_like_path(source):
        path = checked_path(source, "model path", rules)
        if path.is_file() and path.suffix == ".gguf":
            return str(path)
        # the rule load_model follows, checked here so the request fails, not the job
        if path.is_dir() and ((path / "config.json").is_file() or len(list(path.glob("*.gguf"))) == 1):
            check_folder_inside(path, "model path", source, rules)
            return str(path)
        raise BadInputError(f"model path {source!r} is neither a .gguf file nor a directory with config.json "
                            "(+ safetensors) or exactly one .gguf file")
    if not HUB_ID.fullmatch(source):
        raise BadInputError(f"model {source!r} is neither an absolute path nor a hub id like 'org/name'")
    if not rules.allow_hub:
        raise BadInputError(f"model {source!r} is a hub id, and this server does not download from the hub "
                            "(start it with --allow-hub); pass a local path instead")
    return source


# ---- content keys --------------------------------------------------------------------------------

_digest_cache: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) so a repeat request is cheap."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        if key in _digest_cache:
            return _digest_cache[key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    with _digest_lock:
        _digest_cache[key] = digest
    return digest


def model_fingerprint(source: str) -> dict:
    """What identifies the model's content: file digests for local models, the id for hub models."""
    p = Path(source)
    if not looks_like_path(source):
        return {"hub": source}
    if p.is_file():
        return {"files": {p.name: file_sha256(p)}}
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return {"files": {f.name: file_sha256(f) for f in files}}


@dataclass(frozen=True)
class ProfileSpec:
    """Everything a worker needs to build a profile, and everything its id depends on."""

    source: str  # resolved local path or hub id
    model: dict  # model_fingerprint
    calib_path: str
    calib_sha256: str
    seq_len: int
    calib_tokens: int
    seed: int
    options: list[dict]  # QuantOption.to_dict() each, in grid order
    include_lm_head: bool = False
    include_embeddings: bool = False
    code: dict = field(default_factory=dict)  # bitalloc version + numerics fingerprint
    quantizer: str = KEYLESS_QUANTIZER  # whose ΔW the table's errors measure (records without the field: rtn)

    def key_parts(self) -> dict:
        return {
            "model": self.model,
            "calibration": {"sha256": self.calib_sha256, "seq_len": self.seq_len, "tokens": self.calib_tokens,
                            "seed": self.seed},
            "options": self.options,
            "modules": {"lm_head": self.include_lm_head, "embeddings": self.include_embeddings},
            "code": self.code,
            # rtn stays out of the key, so profiles stored before this field keep their ids
            **({} if self.quantizer == KEYLESS_QUANTIZER else {"quantizer": self.quantizer}),
        }

    @property
    def profile_id(self) -> str:
        return "prof_" + short_id(content_key(self.key_parts()))

    def to_dict(self) -> dict:
        return {"source": self.source, "model": self.model, "calib_path": self.calib_path,
                "calib_sha256": self.calib_sha256, "seq_len": self.seq_len, "calib_tokens": self.calib_tokens,
                "seed": self.seed, "options": self.options, "include_lm_head": self.include_lm_head,
                "include_embeddings": self.include_embeddings, "code": self.code, "quantizer": self.quantizer}

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileSpec":
        return cls(**d)
