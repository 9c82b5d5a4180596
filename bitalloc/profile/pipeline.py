"""Compute a Profile: every requested signal for the planned modules, resumable block by block.

Work is cut into units, each saved to `<out>/parts/<unit>.npz` (atomically, with the profile key in
its header) the moment it finishes:
  block-NNN               fisher, H diagonal, salience and candidate-table rows of block NNN's modules
                          (streamed: also their empirical-Fisher trace, profile/fisher_trace.py)
  spikes                  activation spikes of every module (one forward pass over the calibration)
  trace                   the Hutchinson running sums, rewritten after every probe round (whole model)
  interactions-block-NNN  measured pair corrections for pairs starting in block NNN
A run that finds parts with the same key reuses them (an interrupted run resumes where it stopped;
the trace continues from its last round with the same probes); parts with another key are ignored.
When everything is done the parts are folded into profile.json + tensors.npz and removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..calibration import Calibration
from ..config import DEFAULT_SIGNALS, EMPIRICAL_FISHER as FISHER_TRACE, SIGNALS, ProfileSettings, supplied_calibration  # noqa: F401  (re-exported)
from ..candidates import CandidateTable, build_candidate_table
from ..errors import BadInputError, setting
from ..io import atomic_write_bytes, canonical_json
from ..models import weight_matrix
from ..options import QuantOption, parse_option
from .artifact import ModuleProfile, Profile, decode, encode, npz_bytes, profile_checksum, try_load
from .fisher_trace import fisher_trace_estimate
from .hessian_trace import hutchinson_traces
from .interactions import block_index, candidate_pairs, dataflow_graph, measure_interactions
from .salience import salience
from ..quantizers import importance_only, measuring_quantizer
from .spikes import SpikeCollector, collect_spikes
from .statistics import collect_statistics, input_importance
from .store import numerics_fingerprint
from ..progress import steps


def code_fingerprint() -> str:
    """sha256 of the source that computes profile contents (the table's numerics + every signal)."""
    h = hashlib.sha256(numerics_fingerprint().encode())
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def compute_profile(model: nn.Module, module_names: list[str], calibration: Calibration, key: str,
                    settings: ProfileSettings, out: Path, *, options: list[QuantOption] | None = None,
                    meta: dict | None = None, progress: bool = False, streamed_from=None,
                    quantizer: str = "rtn", ray_pool=None) -> Profile:
    """The profile for these inputs: read from `out` when complete and matching, else computed (resuming parts).

    streamed_from: the checkpoint.StreamedModel whose skeleton `model` is; the signals are then computed
    with one block loaded at a time: one walk (profile/streamed.py) for every signal but interactions,
    the trace as the empirical-Fisher trace (settings.trace_estimator must say so); the interactions by
    profile/streamed_interactions.py.
    quantizer: whose ΔW the table's errors measure (config.ProfileConfig.quantizer; recorded in the table).
    ray_pool: a distributed.RayPool: the per-block signals' statistics, each block's signals and the
    spikes are computed on its Ray actors (trace and interactions stay in this process).
    """
    out = Path(out)
    if (done := try_load(out, key)) is not None:
        return done
    parts = _Parts(out / "parts", key)
    model.eval()
    sig = set(settings.signals)
    streamed = streamed_from is not None
    _check_trace_estimator(settings, streamed)
    supplied = supplied_calibration(calibration)  # GPTQ's column order follows it (config.quantizer_settings)
    blocks: dict[int | None, list[str]] = {}
    for n in module_names:
        blocks.setdefault(block_index(model, n), []).append(n)
    per_block = sig & ({"fisher", "salience", "table", "trace"} if streamed else {"fisher", "salience", "table"})
    if streamed:
        _streamed_walk(streamed_from, module_names, calibration, blocks, parts, settings, options, quantizer,
                       per_block, progress, supplied)
    elif per_block:
        missing = [b for b in blocks if parts.get(_block_unit(b)) is None]
        if missing:
            todo = [n for b in missing for n in blocks[b]]
            if ray_pool is not None:
                stats = ray_pool.statistics(todo, calibration)
                signals = ray_pool.map_groups(_block_signals, [blocks[b] for b in missing], stats, settings=settings,
                                              options=options, quantizer=quantizer, supplied=supplied)
                for b, got in zip(missing, steps(signals, "profile blocks (ray)", show=progress, unit="block",
                                                 total=len(missing))):
                    parts.put(_block_unit(b), got)
                missing = []
            else:
                stats = collect_statistics(model, todo, calibration, progress=progress)
            for b in steps(missing, "profile blocks", show=progress, unit="block"):
                parts.put(_block_unit(b), _block_signals(model, blocks[b], stats, settings, options, quantizer, supplied))
                for n in blocks[b]:
                    del stats[n]  # free H as we go
    if "spikes" in sig and parts.get("spikes") is None:
        if ray_pool is not None:
            parts.put("spikes", ray_pool.spikes(module_names, calibration, top_k=settings.spike_top_k,
                                                threshold=settings.spike_threshold))
        else:
            parts.put("spikes", collect_spikes(model, module_names, calibration, top_k=settings.spike_top_k,
                                               threshold=settings.spike_threshold, progress=progress))
    if "trace" in sig and not streamed:
        state = parts.get("trace")
        state = hutchinson_traces(model, module_names, calibration, tol=settings.trace_tol,
                                  abs_tol=settings.trace_abs_tol,
                                  min_probes=settings.trace_min_probes, max_probes=settings.trace_max_probes,
                                  group_rows=settings.group_rows, seed=settings.seed, windows=settings.trace_windows,
                                  tokens=settings.trace_tokens,
                                  state=state, on_round=lambda s: parts.put("trace", s), progress=progress)
        parts.put("trace", state)
    interactions = []
    if "interactions" in sig:
        wanted = [b for b in blocks if b is not None and (settings.interaction_blocks is None or b in settings.interaction_blocks)]
        with contextlib.ExitStack() as stack:
            measure = _interaction_meter(model, module_names, calibration, settings, measuring_quantizer(quantizer),
                                         streamed_from, stack, progress)
            singles: dict[str, float] = {}
            for b in steps(wanted, "interaction blocks", show=progress, unit="block"):
                got = parts.get(f"interactions-block-{b:03d}")
                if got is None:
                    got = measure(b, singles)
                    parts.put(f"interactions-block-{b:03d}", got)
                for r in got:
                    singles.setdefault(r.a, r.single_a)
                    singles.setdefault(r.b, r.single_b)
                interactions += got
    profile = _assemble(model, module_names, blocks, parts, key, settings, options, interactions, meta or {})
    profile.calibration_tokens = calibration.tokens.numpy()
    profile.save(out)
    parts.clear()
    return profile


def _interaction_meter(model, module_names, calibration, settings: ProfileSettings, quantizer: str, streamed_from,
                       stack: contextlib.ExitStack, progress: bool = False):
    """measure(block, singles) -> that block's Interaction records; the whole model's forward passes, or,
    streamed, streamed_interactions.StreamedInteractions (its clean walk runs on the first call only,
    so a resumed profile whose blocks are all done loads nothing)."""
    option = parse_option(settings.interaction_option)
    windows = calibration.tokens[: settings.interaction_windows]
    if streamed_from is None:
        graph = dataflow_graph(model, module_names, calibration.tokens[0, :16])
        importance = None
        if importance_only(quantizer):  # rtn-w swaps hold the table's weights: diag H of the same windows
            importance = input_importance(model, module_names, calibration.tokens)
        return lambda b, singles: measure_interactions(model, candidate_pairs(graph, {b}), option, windows,
                                                       singles=singles, quantizer=quantizer, importance=importance)
    from .streamed_interactions import StreamedInteractions

    # the skeleton's weights are on the meta device: a meta forward gives the call order, no data needed
    graph = dataflow_graph(model, module_names, torch.arange(16, device="meta"))
    meter: list[StreamedInteractions] = []

    def measure(b, singles):
        if not meter:
            meter.append(stack.enter_context(StreamedInteractions(
                streamed_from, module_names, calibration.tokens, settings.interaction_windows,
                importance=importance_only(quantizer), progress=progress)))
        return meter[0].measure(candidate_pairs(graph, {b}), option, singles, quantizer)

    return measure


def _check_trace_estimator(settings: ProfileSettings, streamed: bool) -> None:
    if "trace" not in settings.signals:
        return
    if streamed and settings.trace_estimator != FISHER_TRACE:
        raise BadInputError(f"the {settings.trace_estimator} trace needs the whole model; streamed, the trace is "
                            f"trace_estimator={FISHER_TRACE!r} (or drop {setting('stream')})")
    if not streamed and settings.trace_estimator != "hutchinson":
        raise BadInputError(f"trace_estimator={settings.trace_estimator!r} is the streamed walk's stand-in; "
                            f"profile with {setting('stream')}, or use trace_estimator='hutchinson'")


def _streamed_walk(loaded, module_names, calibration, blocks, parts, settings: ProfileSettings, options, quantizer,
                   per_block: set, progress: bool, supplied: bool) -> None:
    """The per-block parts still missing and the spikes part, from one block-by-block walk (profile/streamed.py)."""
    from .streamed import iter_block_statistics

    missing = [b for b in blocks if parts.get(_block_unit(b)) is None] if per_block else []
    want_spikes = "spikes" in settings.signals and parts.get("spikes") is None
    if not missing and not want_spikes:
        return
    collector = SpikeCollector(module_names, settings.spike_top_k) if want_spikes else None
    todo = [n for b in missing for n in blocks[b]]
    # each part: one block's (or the outside modules') stats, while their weights are loaded
    for part in iter_block_statistics(loaded, todo, calibration, progress=progress, spikes=collector,
                                      statistics=bool(todo), fisher_trace="trace" in settings.signals):
        b = block_index(loaded.model, next(iter(part)))
        parts.put(_block_unit(b), _block_signals(loaded.model, blocks[b], part, settings, options, quantizer, supplied))
    if collector is not None:
        parts.put("spikes", collector.finish(settings.spike_threshold))


def _block_unit(b: int | None) -> str:
    return "block-outside" if b is None else f"block-{b:03d}"


def _block_signals(model, names, stats, settings: ProfileSettings, options, quantizer: str = "rtn",
                   supplied: bool = True) -> dict:
    result = {"fisher": {}, "h_diag": {}, "salience": {}, "trace": {}, "table": None}
    for n in names:
        s = stats[n]
        result["fisher"][n] = s.fisher.double().numpy()
        if s.fisher_trace is not None and "trace" in settings.signals:
            result["trace"][n] = fisher_trace_estimate(s.fisher_trace, model.get_submodule(n).weight.numel(),
                                                       settings.group_rows)
        if s.hessian is not None:
            result["h_diag"][n] = torch.diagonal(s.hessian).double().numpy()
            if "salience" in settings.signals:
                result["salience"][n] = salience(weight_matrix(model.get_submodule(n)), s.hessian,
                                                 group_rows=settings.group_rows, group_cols=settings.group_cols,
                                                 damp=settings.salience_damp)
    if "table" in settings.signals and options:
        result["table"] = build_candidate_table(model, names, stats, options, quantizer=quantizer, supplied=supplied)
    return result


def _assemble(model, names, blocks, parts, key, settings, options, interactions, meta) -> Profile:
    spikes = parts.get("spikes") or {}
    trace = parts.get("trace") or {}
    per_block = {b: parts.get(_block_unit(b)) for b in blocks}
    modules, tables = [], []
    for b, block_names in blocks.items():
        got = per_block[b] or {"fisher": {}, "h_diag": {}, "salience": {}, "trace": {}, "table": None}
        if got["table"] is not None:
            tables.append(got["table"])
        for n in block_names:
            w = weight_matrix(model.get_submodule(n))
            modules.append(ModuleProfile(
                name=n, block=b, shape=(int(w.shape[0]), int(w.shape[1])),
                fisher=got["fisher"].get(n) if "fisher" in settings.signals else None,
                h_diag=got["h_diag"].get(n) if "fisher" in settings.signals else None,
                trace=trace.get(n) or got.get("trace", {}).get(n), salience=got["salience"].get(n),
                spikes=spikes.get(n)))
    table = _concat(tables) if tables else None
    recorded = {**meta, **asdict(settings), "signals": list(settings.signals),
                "options": [o.label for o in options] if table is not None else []}
    return Profile(key=key, settings=recorded, modules=modules, interactions=interactions, table=table)


def _concat(tables: list[CandidateTable]) -> CandidateTable:
    first = tables[0]
    return CandidateTable(groups=[g for t in tables for g in t.groups], shapes=[s for t in tables for s in t.shapes],
                          options=first.options, storage_bits=np.concatenate([t.storage_bits for t in tables]),
                          errors={m: np.concatenate([t.errors[m] for t in tables]) for m in first.errors},
                          quantizer=first.quantizer)


class _Parts:
    """Finished units of an unfinished profile: one .npz each, header = key + checksum + JSON body."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key

    def put(self, unit: str, value) -> None:
        arrays: dict[str, np.ndarray] = {}
        body = _encode_part(value, arrays)
        header = json.loads(canonical_json({"key": self.key, "body": body}))  # as get() will parse it
        header["checksum"] = profile_checksum(header, arrays)  # covers the body too, not only the arrays
        arrays["__header__"] = np.frombuffer(canonical_json(header).encode(), dtype=np.uint8)
        atomic_write_bytes(self.folder / f"{unit}.npz", npz_bytes(arrays))

    def get(self, unit: str):
        path = self.folder / f"{unit}.npz"
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {n: z[n] for n in z.files}
            header = json.loads(bytes(arrays.pop("__header__")).decode())
            if header["key"] != self.key:
                return None  # another run's leftovers: recompute (and overwrite)
            if header["checksum"] != profile_checksum(header, arrays):
                raise ValueError("checksum mismatch")
            return _decode_part(header["body"], arrays)
        except Exception as e:  # damaged: recompute, never use
            warnings.warn(f"ignoring damaged profile part {path.name} ({e}); recomputing it", stacklevel=2)
            return None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _encode_part(value, arrays):
    if isinstance(value, dict) and isinstance(value.get("table"), CandidateTable):
        from .artifact import encode_table

        return {"__block__": encode({k: v for k, v in value.items() if k != "table"}, "b", arrays),
                "table": encode_table(value["table"], arrays)}
    return encode(value, "p", arrays)


def _decode_part(body, arrays):
    if isinstance(body, dict) and "__block__" in body:
        from .artifact import decode_table

        return {**decode(body["__block__"], arrays), "table": decode_table(body["table"], arrays)}
    return decode(body, arrays)
