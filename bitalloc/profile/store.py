"""On-disk cache of candidate tables, keyed by everything that determines them.

Re-planning at another budget, with another solver or another error model reuses the table
instead of recomputing calibration statistics. An entry is a profile folder (artifact.py, the one
on-disk format of `bitalloc profile --out` and the service's store too) holding just the table,
checksummed over all of its content. Anything that fails to load, whose key or checksum disagrees,
or whose storage bits are not those of its options and shapes, is treated as absent (and
overwritten), never used. Store version 4 (one content_key for the cache, profile folders and the
service's profiles) finds no entry of older versions: those are recomputed.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from ..errors import BadInputError
from ..io import canonical_json
from ..table import CandidateTable
from .artifact import Profile

STORE_VERSION = 4


def default_cache_dir() -> Path:
    return Path(os.environ.get("BITALLOC_CACHE_DIR", Path.home() / ".cache" / "bitalloc"))


def cache_folder(cache_dir: str | Path | bool | None) -> Path | None:
    """The one reading of every cache_dir argument (profile, apply, pack, write_gguf): a folder, True = the
    default one (default_cache_dir), None or False = no cache (the library's default: it writes none unless asked)."""
    if cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir) if cache_dir else None


def numerics_fingerprint() -> str:
    """sha256 of the source that computes table entries, so a changed quantizer or error model
    never reuses tables computed by the old code (a version number would rely on memory)."""
    pkg = Path(__file__).resolve().parents[1]
    files = sorted([*pkg.glob("formats/*.py"), *pkg.glob("quantizers/*.py"), pkg / "profile" / "statistics.py",
                    pkg / "candidates.py", pkg / "options.py", pkg / "equalize.py", pkg / "blockwalk.py"])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def content_key(parts: dict) -> str:
    """The one key of everything bitalloc stores: table cache entries, profile folders (`bitalloc profile
    --out`) and the service's profiles. `parts` is what the stored result depends on (model content,
    calibration, modules, options, settings, code fingerprint); the store version salts it, so a change
    of format never finds an old entry."""
    return "sha256:" + hashlib.sha256(canonical_json({"store_version": STORE_VERSION, **parts}).encode()).hexdigest()


def short_id(key: str) -> str:
    """32 hex digits of a content_key: folder names and the service's ids."""
    return key.removeprefix("sha256:")[:32]


def entry_dir(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"table-{short_id(key)}"


def save_table(cache_dir: Path, key: str, table: CandidateTable) -> Path:
    """Cache `table` under `key`: a profile folder (artifact.py) holding the table alone."""
    return Profile(key=key, settings={}, modules=[], table=table).save(entry_dir(cache_dir, key))


def load_table(cache_dir: Path, key: str) -> CandidateTable | None:
    """The cached table of `key`, or None: absent, or damaged (warned about, and recomputed by the caller)."""
    folder = entry_dir(cache_dir, key)
    if not (folder / "profile.json").is_file():
        return None
    try:
        profile = Profile.load(folder, key)
    except BadInputError as e:  # any damage means: recompute
        warnings.warn(f"ignoring damaged profile cache entry {folder.name} ({e}); recomputing", stacklevel=2)
        return None
    return profile.table
