"""The Profile artifact: every signal per module + the candidate table + the settings, as versioned files.

On disk a profile is a folder:
  profile.json   {"format", "version", "key", "checksum", "arrays", "profile": the dataclasses as JSON}
                 `checksum` (version 3) covers all of it: every field of profile.json but itself, and
                 every array's bytes
  tensors.npz    one uint8 member "packed": every array's bytes back to back; "arrays" in profile.json
                 says where each one lies ({name: [dtype, shape, offset]}), named by its path in the JSON
                 ({"__array__": "modules/3/fisher"})
Version 1 stored one .npz member per array; a SmolLM2 profile has ~2500 arrays, and opening that
many zip members took most of the time of re-planning from a profile (~1 s), so version 2 packs
them (one read, one hash). Versions 1 and 2 checksummed the arrays only, so an edit to profile.json
(an option's bits, a shape, a module name, the seed, the key) went unnoticed; version 3's checksum
covers the metadata too. Older folders cannot be verified and are refused (re-run `bitalloc profile`).
tensors.npz is written first and profile.json last, both atomically, so a folder with a profile.json
is complete. `key` is the sha256 of everything that determines the contents (weights, calibration,
modules, settings, code). A folder whose key differs from the one asked for, whose checksum fails,
or that does not parse is reported and recomputed, never used. The checksum finds damage and
edits, not forgery: whoever can write the folder can also recompute it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..table import CandidateTable, table_inconsistency
from ..errors import BadInputError, step
from ..io import atomic_write_bytes, atomic_write_text, canonical_json
from ..options import QuantOption
from .records import Interaction, ProjectionSpikes, Salience, SiteSpikes, TraceEstimate

PROFILE_FORMAT = "bitalloc-profile"
PROFILE_VERSION = 3


@dataclass
class ModuleProfile:
    """Signals of one planned module; a signal not computed is None."""

    name: str
    block: int | None
    shape: tuple[int, int]  # [out, in]
    fisher: np.ndarray | None = None  # [out] mean (∂L/∂y)² (profile/statistics.py)
    h_diag: np.ndarray | None = None  # [in] mean x_j²
    trace: TraceEstimate | None = None
    salience: Salience | None = None
    spikes: ProjectionSpikes | None = None


@dataclass
class Profile:
    key: str
    settings: dict
    modules: list[ModuleProfile]
    interactions: list[Interaction] = field(default_factory=list)
    table: CandidateTable | None = None
    calibration_tokens: np.ndarray | None = None  # [windows, seq_len] ids: lets a search solver score without re-tokenizing

    def module(self, name: str) -> ModuleProfile:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        arrays: dict[str, np.ndarray] = {}
        body = {"settings": encode(self.settings, "settings", arrays),
                "modules": encode(self.modules, "modules", arrays),
                "interactions": encode(self.interactions, "interactions", arrays),
                "table": None if self.table is None else encode_table(self.table, arrays),
                "calibration_tokens": encode(self.calibration_tokens, "calibration_tokens", arrays)}
        packed, index = pack_arrays(arrays)
        atomic_write_bytes(folder / "tensors.npz", npz_bytes({"packed": packed}))
        doc = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "key": self.key, "arrays": index, "profile": body}
        doc = json.loads(canonical_json(doc))  # the checksum is of what load() will parse: tuples are lists, keys str
        doc["checksum"] = profile_checksum(doc, arrays)
        atomic_write_text(folder / "profile.json", canonical_json(doc))
        return folder

    @classmethod
    def load(cls, folder: str | Path, key: str | None = None) -> "Profile":
        """Read a profile folder; BadInputError if it is missing, damaged, newer, or (with key) for other inputs."""
        folder = Path(folder)
        path = folder / "profile.json"
        if not path.is_file():
            raise BadInputError(f"{str(folder)!r} holds no profile.json; pass a folder written by {step('profile')}")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInputError(f"{path} is not a readable profile ({e}); recompute it: re-run {step('profile')}") from None
        rerun = f"recompute the profile: re-run {step('profile')}"
        if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
            raise BadInputError(f"{path} is not a bitalloc profile; pass a folder written by {step('profile')}")
        version = doc.get("version")
        if type(version) is not int:
            raise BadInputError(f"{path} has profile version {version!r}, not a whole number (damaged or edited); {rerun}")
        if version > PROFILE_VERSION:
            raise BadInputError(f"{path} is profile version {version}, newer than this bitalloc reads "
                                f"({PROFILE_VERSION}); upgrade bitalloc")
        if version < 3:
            raise BadInputError(f"{path} is profile version {version}, whose checksum does not cover profile.json, so "
                                f"edits to it cannot be detected; {rerun}")
        if key is not None and doc.get("key") != key:
            raise BadInputError(f"{path} was computed for other weights, calibration or settings; {rerun}")
        try:
            with np.load(folder / "tensors.npz", allow_pickle=False) as z:
                arrays = unpack_arrays(z["packed"], doc["arrays"])
        except Exception as e:  # OSError, ValueError, zipfile.BadZipFile (CRC), a bad index: all mean damaged
            raise BadInputError(f"{folder / 'tensors.npz'} is missing or damaged ({e}); {rerun}") from None
        if profile_checksum(doc, arrays) != doc.get("checksum"):
            raise BadInputError(f"{folder} does not match its checksum (profile.json or tensors.npz damaged or edited); "
                                f"{rerun}")
        # Only a folder whose checksum was recomputed after an edit can fail from here on.
        try:
            body = doc["profile"]
            profile = cls(key=doc["key"], settings=decode(body["settings"], arrays),
                          modules=decode(body["modules"], arrays), interactions=decode(body["interactions"], arrays),
                          table=None if body["table"] is None else decode_table(body["table"], arrays),
                          calibration_tokens=decode(body.get("calibration_tokens"), arrays))
            problem = profile_inconsistency(profile)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            problem = f"it does not describe a profile ({type(e).__name__}: {e})"
        if problem is not None:
            raise BadInputError(f"{path} passes its checksum but is inconsistent: {problem}; {rerun}")
        return profile


def profile_inconsistency(profile: Profile) -> str | None:
    """What in a read-back profile disagrees with itself (module types, the table, shapes), or None."""
    if not isinstance(profile.key, str) or not isinstance(profile.settings, dict):
        return "key or settings of the wrong type"
    if not all(isinstance(m, ModuleProfile) for m in profile.modules):
        return "modules holds something other than module profiles"
    if profile.table is None:
        return None
    if (problem := table_inconsistency(profile.table)) is not None:
        return f"candidate table: {problem}"
    shapes = dict(zip(profile.table.groups, profile.table.shapes))
    for m in profile.modules:
        if m.name in shapes and tuple(m.shape) != shapes[m.name]:
            return f"module {m.name} has shape {list(m.shape)}, the candidate table says {list(shapes[m.name])}"
    return None


def try_load(folder: Path, key: str) -> Profile | None:
    """The profile in `folder` if it is complete and for `key`; else None (with a warning if one was there)."""
    if not (folder / "profile.json").is_file():
        return None
    try:
        return Profile.load(folder, key)
    except BadInputError as e:
        warnings.warn(f"not reusing the profile in {folder}: {e}", stacklevel=2)
        return None


# ---- dataclasses <-> JSON + arrays ------------------------------------------------------------------

_TYPES = {c.__name__: c for c in (ModuleProfile, TraceEstimate, Salience, SiteSpikes, ProjectionSpikes, Interaction)}


def encode(obj: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON-able form of obj; arrays move to `arrays` under their path."""
    if is_dataclass(obj):
        return {"__type__": type(obj).__name__,
                **{f.name: encode(getattr(obj, f.name), f"{path}/{f.name}", arrays) for f in fields(obj)}}
    if isinstance(obj, np.ndarray):
        arrays[path] = obj
        return {"__array__": path}
    if isinstance(obj, dict):
        return {str(k): encode(v, f"{path}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v, f"{path}/{i}", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, (np.floating, float)):
        x = float(obj)
        return x if math.isfinite(x) else {"__float__": repr(x)}  # strict JSON has no inf/nan
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    return obj


def decode(obj: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, list):
        return [decode(v, arrays) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__array__" in obj:
        return arrays[obj["__array__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__type__" in obj:
        cls = _TYPES[obj["__type__"]]
        values = {k: decode(v, arrays) for k, v in obj.items() if k != "__type__"}
        if cls is ModuleProfile:
            values["shape"] = tuple(values["shape"])
        return cls(**values)
    return {k: decode(v, arrays) for k, v in obj.items()}


def encode_table(table: CandidateTable, arrays: dict[str, np.ndarray]) -> dict:
    arrays["table/storage_bits"] = table.storage_bits
    for m, e in table.errors.items():
        arrays[f"table/errors/{m}"] = e
    return {"groups": table.groups, "shapes": [list(s) for s in table.shapes],
            "options": [o.to_dict() for o in table.options], "error_models": sorted(table.errors),
            "quantizer": table.quantizer}


def decode_table(doc: dict, arrays: dict[str, np.ndarray]) -> CandidateTable:
    return CandidateTable(groups=list(doc["groups"]), shapes=[tuple(s) for s in doc["shapes"]],
                          options=[QuantOption.from_dict(d) for d in doc["options"]],
                          storage_bits=arrays["table/storage_bits"],
                          errors={m: arrays[f"table/errors/{m}"] for m in doc["error_models"]},
                          quantizer=doc.get("quantizer", "rtn"))  # before the field: always rtn


def pack_arrays(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """All arrays' bytes back to back (each at an 8-byte aligned offset) and where each lies."""
    index, chunks, offset = {}, [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        if a.dtype.hasobject:
            raise ValueError(f"array {name} holds Python objects; a profile stores numbers only")
        index[name] = [a.dtype.str, list(a.shape), offset]
        raw = a.tobytes()
        pad = -len(raw) % 8
        chunks += [raw, b"\0" * pad]
        offset += len(raw) + pad
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), index


def unpack_arrays(packed: np.ndarray, index: dict) -> dict[str, np.ndarray]:
    """Inverse of pack_arrays (each array its own writable copy)."""
    buf = packed.tobytes() if not packed.flags.c_contiguous else packed.data
    out = {}
    for name, (dtype, shape, offset) in index.items():
        # checked before numpy sees them: an edited index (a float, a negative size) is damage, not a cast warning
        if not all(type(n) is int and n >= 0 for n in (*shape, offset)):
            raise ValueError(f"array {name}: shape {shape} / offset {offset} are not whole numbers ≥ 0")
        dt = np.dtype(dtype)
        count = math.prod(shape)
        out[name] = np.frombuffer(buf, dtype=dt, count=count, offset=int(offset)).reshape(shape).copy()
    return out


def arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def profile_checksum(doc: dict, arrays: dict[str, np.ndarray]) -> str:
    """sha256 of profile.json's content (all fields but `checksum`) and of every array."""
    meta = canonical_json({k: v for k, v in doc.items() if k != "checksum"})
    return "sha256:" + hashlib.sha256((meta + arrays_checksum(arrays)).encode()).hexdigest()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
