"""Equalization scales kept in the profile cache: a fold searched once (by the profile) is folded again without
the search wherever the same weights meet the same windows: a re-plan from the cache, `apply`, `eval --plan`.

An entry is a few KB of safetensors (one vector of scales per equalization group), keyed by the weights' content
hash, the calibration windows and the numerics code (profile.store.numerics_fingerprint covers equalize.py):
other code searches again.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from .equalize import equalize, weights_before, windows_digest
from .io import atomic_write_bytes
from .models import weights_hash


def equalize_cached(model: nn.Module, windows: torch.Tensor, cache_dir: str | Path | bool | None,
                    content_hash: str | None = None, progress: bool = False) -> None:
    """equalize(model, windows) in place, with the scales read from cache_dir when an earlier fold of these weights
    on these windows left them there, and left there otherwise. cache_dir: as profile.store.cache_folder reads it
    (None/False: no cache, equalize as it is). content_hash: models.weights_hash(model) when the caller has it."""
    from .profile.store import cache_folder

    cache_dir = cache_folder(cache_dir)
    if cache_dir is None or weights_before(model) is not None:  # no cache, or folded already (equalize checks it)
        equalize(model, windows, progress=progress, content_hash=content_hash)
        return
    content_hash = content_hash or weights_hash(model)
    path = scales_path(cache_dir, content_hash, windows)
    scales = _read(path)
    found = equalize(model, windows, progress=progress, content_hash=content_hash, scales=scales)
    if scales is None and found:
        from safetensors.torch import save

        atomic_write_bytes(path, save({k: v.contiguous() for k, v in found.items()}))


def scales_path(cache_dir: Path, content_hash: str, windows: torch.Tensor) -> Path:
    """Where the equalization scales of these weights on these windows, by this code, are cached."""
    from .profile.store import content_key, numerics_fingerprint, short_id

    key = content_key({"equalize": content_hash, "numerics": numerics_fingerprint(), "windows": windows_digest(windows)})
    return Path(cache_dir) / f"equalize-{short_id(key)}.safetensors"


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    """The scales cached at `path`, or None: absent or unreadable (then searched again and rewritten)."""
    if not path.is_file():
        return None
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - any damage means: search again
        warnings.warn(f"ignoring damaged equalization cache entry {path.name} ({e}); searching again", stacklevel=3)
        return None
