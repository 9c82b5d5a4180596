"""On-disk cache of candidate tables, keyed by everything that determines them.

Re-planning at another budget, with another solver or another error model reuses the table
instead of recomputing calibration statistics. An entry is a single .npz holding the arrays and
a JSON header with the key and a checksum of the header and the arrays (version 1 covered the
arrays only, so an edited option or module name went unnoticed; its entries are not found under
version 2's keys and are recomputed); anything that fails to load, whose key or checksum
disagrees, or whose storage bits are not those of its options and shapes, is treated as absent
(and overwritten), never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np

from ..table import ERROR_MODELS, CandidateTable, table_inconsistency
from ..io import atomic_write_bytes, canonical_json
from ..options import QuantOption

STORE_VERSION = 2


def default_cache_dir() -> Path:
    return Path(os.environ.get("BITALLOC_CACHE_DIR", Path.home() / ".cache" / "bitalloc"))


def numerics_fingerprint() -> str:
    """sha256 of the source that computes table entries, so a changed quantizer or error model
    never reuses tables computed by the old code (a version number would rely on memory)."""
    pkg = Path(__file__).resolve().parents[1]
    files = sorted([*pkg.glob("formats/*.py"), *pkg.glob("quantizers/*.py"), pkg / "profile" / "statistics.py",
                    pkg / "candidates.py", pkg / "options.py"])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(canonical_json({"store_version": STORE_VERSION, **parts}).encode()).hexdigest()


def _arrays(table: CandidateTable) -> dict[str, np.ndarray]:
    arrays = {"storage_bits": table.storage_bits, "shapes": np.asarray(table.shapes, dtype=np.int64)}
    arrays.update({f"err_{m}": table.errors[m] for m in ERROR_MODELS})
    return arrays


def _checksum(header: dict, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(canonical_json({k: v for k, v in header.items() if k != "checksum"}).encode())
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def save_table(cache_dir: Path, key: str, table: CandidateTable) -> Path:
    arrays = _arrays(table)
    header = {
        "key": key,
        "groups": table.groups,
        "options": [o.to_dict() for o in table.options],
        "quantizer": table.quantizer,
    }
    header["checksum"] = _checksum(header, arrays)
    buf = io.BytesIO()
    np.savez(buf, header=np.frombuffer(canonical_json(header).encode(), dtype=np.uint8), **arrays)
    return atomic_write_bytes(Path(cache_dir) / f"table-{key[:32]}.npz", buf.getvalue())


def load_table(cache_dir: Path, key: str) -> CandidateTable | None:
    path = Path(cache_dir) / f"table-{key[:32]}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            arrays = {name: z[name] for name in z.files if name != "header"}
        if header["key"] != key or header["checksum"] != _checksum(header, arrays):
            raise ValueError("key or checksum mismatch")
        table = CandidateTable(
            groups=list(header["groups"]),
            shapes=[tuple(int(v) for v in s) for s in arrays["shapes"]],
            options=[QuantOption.from_dict(d) for d in header["options"]],
            storage_bits=arrays["storage_bits"],
            errors={m: arrays[f"err_{m}"] for m in ERROR_MODELS},
            quantizer=header.get("quantizer", "rtn"),
        )
        if (problem := table_inconsistency(table)) is not None:
            raise ValueError(problem)
        return table
    except Exception as e:  # any damage means: recompute
        warnings.warn(f"ignoring damaged profile cache entry {path.name} ({e}); recomputing", stacklevel=2)
        return None
