"""What the service computes: a profile from a ProfileSpec, and a plan from a stored profile.

A stored profile holds what `api.solve_table` needs besides the table: the model record
(`api.model_record`: source, architecture, content hash, embedding names and ties) and the
calibration windows. Planning from it therefore takes the solver's time only, loads no weights and
no transformers model, and gives the same plan, byte for byte, as `bitalloc.plan` on the loaded
model (tests/test_service.py checks this). Solvers that score plans on the model (evolutionary)
load its weights in a worker.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .. import api, solvers
from ..budget import default_scope, gguf_typed, parse_budget
from ..calibration import Calibration, builtin_text, make_calibration, read_text, recorded_special_as_text
from ..config import SolveConfig, check_solver_names
from ..table import CandidateTable
from ..constraints import Constraints
from ..errors import BadInputError
from ..io import canonical_json
from ..models import LoadedModel, load_model, select_modules
from ..quantizers import equalizes
from ..options import QuantOption
from ..plan import Plan
from ..profile.artifact import Profile
from ..progress import reporting
from .sources import ProfileSpec
from .store import PlanRecord, ProfileRecord, Store
from .wording import http_text

Progress = Callable[[float, str], None]


# ---- profiles --------------------------------------------------------------------------------------


def build_profile(store: Store, spec: ProfileSpec, job_id: str | None, progress: Progress,
                  ray=None) -> tuple[ProfileRecord, LoadedModel, Calibration]:
    """Load the model, calibrate, build the candidate table; write the files, then the row.

    ray: a config.RaySpec: the statistics and table rows run on that Ray cluster (the same profile:
    bit-identical with one worker, within profile/distributed.SHARD_RTOL with more)."""
    progress(0.05, "loading model")
    # trust_remote_code is never taken from a request: a model's own Python never runs here.
    loaded = load_model(spec.source, trust_remote_code=False)
    progress(0.15, "tokenizing calibration text")
    builtin = spec.calib_path.startswith("builtin:")
    text = builtin_text(spec.calib_path.removeprefix("builtin:")) if builtin else read_text(spec.calib_path)
    calib = make_calibration(loaded.tokenizer, text, seq_len=spec.seq_len, tokens=spec.calib_tokens, seed=spec.seed,
                             source=spec.calib_path if builtin else Path(spec.calib_path).name)
    modules = select_modules(loaded.model, spec.include_lm_head, spec.include_embeddings)
    options = [QuantOption.from_dict(d) for d in spec.options]
    if equalizes(spec.quantizer):
        if ray is not None:
            raise BadInputError(f"quantizer {spec.quantizer} folds scales into the whole model, which Ray workers "
                                "do not share; profile it without Ray")
        progress(0.18, "equalizing")
        loaded = api.equalized(loaded, calib, copy_model=False)
    progress(0.2, f"profiling {len(modules)} modules on {calib.n_windows} windows x {calib.seq_len} tokens")
    with reporting(_job_progress(progress)):
        table = api.profile(loaded, calib, modules, options, cache_dir=None, quantizer=spec.quantizer, ray=ray)
    progress(0.95, "saving profile")
    profile_id = spec.profile_id
    tokens = calib.tokens.numpy()
    meta = {
        "spec": spec.to_dict(),
        "content_hash": loaded.content_hash,
        "architecture": type(loaded.model).__name__,
        "model_record": api.model_record(loaded),
        "calibration": {"text_sha256": calib.text_sha256, "source": calib.source, "seed": calib.seed,
                        "settings": calib.settings()},
        "modules": table.groups,
        "options": [o.label for o in table.options],
        "num_weights": table.num_weights,
    }
    # the profile folder format of `bitalloc profile --out` (profile/artifact.py), one checksum over it all
    Profile(key=profile_id, settings=meta, modules=[], table=table, calibration_tokens=tokens).save(
        store.profile_dir(profile_id))
    record = ProfileRecord(id=profile_id, model_source=spec.source, model_hash=loaded.content_hash,
                           architecture=meta["architecture"], meta=meta, created=time.time(), job_id=job_id)
    store.put_profile(record)  # a no-op when another job stored the same profile first
    return store.get_profile(profile_id), loaded, calib


# The profiler's two loops and the share of the job's progress each one fills.
_STEPS = {"calibration windows": (0.2, 0.6), "candidate errors": (0.6, 0.95)}


def _job_progress(progress: Progress, every_s: float = 0.5):
    """A progress.Report that passes the profiler's loops (windows, then modules) on as job progress with
    counts, at most every `every_s` seconds."""
    last = [0.0]

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s:
            last[0] = now
            lo, hi = _STEPS.get(stage, (0.2, 0.95))
            progress(lo + (hi - lo) * done / max(total, 1), f"profiling: {stage} {done}/{total}")

    return report


@dataclass
class StoredProfile:
    record: ProfileRecord
    table: CandidateTable
    calibration: Calibration

    def context(self, loaded: LoadedModel | None = None) -> api.PlanContext:
        """What the plan records; with the loaded model, also what a scoring solver measures on."""
        return api.PlanContext(model=self.record.meta["model_record"], calibration=self.calibration.settings(),
                               score_model=None if loaded is None else loaded.model,
                               score_tokens=None if loaded is None else self.calibration.tokens)


_loaded_profiles: OrderedDict[str, StoredProfile] = OrderedDict()
_loaded_lock = threading.Lock()
_KEEP_PROFILES = 8


def open_profile(store: Store, profile_id: str) -> StoredProfile | None:
    """A stored profile ready to plan from (kept in memory for the next request), or None."""
    with _loaded_lock:
        if profile_id in _loaded_profiles:
            _loaded_profiles.move_to_end(profile_id)
            return _loaded_profiles[profile_id]
    record = store.get_profile(profile_id)
    if record is None:
        return None
    try:
        stored = _read_profile(store.profile_dir(profile_id), record)
    except StoredProfileError:
        store.forget_profile(profile_id)
        raise
    with _loaded_lock:
        _loaded_profiles[profile_id] = stored
        while len(_loaded_profiles) > _KEEP_PROFILES:
            _loaded_profiles.popitem(last=False)
    return stored


def _read_profile(folder: Path, record: ProfileRecord) -> StoredProfile:
    """The stored profile folder, verified (artifact.Profile.load: one checksum over the table, the
    calibration tokens and the metadata), and for this profile id."""
    try:
        profile = Profile.load(folder, key=record.id)
    except BadInputError as e:
        raise StoredProfileError(
            f"stored profile {record.id} in {folder} failed its checks ({http_text(e)}); it is damaged, edited, or written by an "
            "older bitalloc; the service dropped it: recompute it with POST /v1/profiles", record.id) from None
    if profile.table is None or profile.calibration_tokens is None:
        raise StoredProfileError(f"stored profile {record.id} in {folder} has no candidate table or calibration tokens; "
                                 "the service dropped it: recompute it with POST /v1/profiles", record.id)
    c = record.meta["calibration"]
    calibration = Calibration(tokens=torch.from_numpy(profile.calibration_tokens), text_sha256=c["text_sha256"],
                              source=c["source"], seed=c["seed"], bos=c["settings"].get("bos"),
                              special_as_text=recorded_special_as_text(c["settings"]))
    return StoredProfile(record=record, table=profile.table, calibration=calibration)


class StoredProfileError(BadInputError):
    """A stored profile failed its checks; the store forgets it, so the next request recomputes it."""

    def __init__(self, message: str, profile_id: str):
        super().__init__(message)
        self.profile_id = profile_id


# ---- plans -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSpec:
    """The plan settings of a request, checked; together with a profile id they decide the plan."""

    budget: str
    solver: str = SolveConfig.solver
    solver_settings: tuple[tuple[str, object], ...] = ()
    error_model: str | None = SolveConfig.error_model  # None: the table's default
    seed: int = SolveConfig.seed
    constraints: Constraints = Constraints()
    families: tuple[str, ...] | None = None  # narrow the profile's options to these format families
    # what the budget limits: the planned weights or the whole model; None: budget.default_scope's rule
    budget_scope: str | None = None

    def to_dict(self) -> dict:
        d = {"budget": self.budget, "solver": self.solver, "solver_settings": dict(self.solver_settings),
             "error_model": self.error_model, "seed": self.seed, "constraints": self.constraints.to_dict(),
             "families": None if self.families is None else list(self.families)}
        if self.budget_scope is not None:  # only when asked for, so default requests keep their plans' ids
            d["budget_scope"] = self.budget_scope
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PlanSpec":
        c = d["constraints"]
        constraints = Constraints(min_bits=c["min_bits"], max_bits=c["max_bits"],
                                  pins=tuple(tuple(p) for p in c["pins"]), allow=tuple(tuple(a) for a in c["allow"]),
                                  ties=tuple(c["ties"]), max_latency=c["max_latency"])
        return cls(budget=d["budget"], solver=d["solver"], solver_settings=tuple(sorted(d["solver_settings"].items())),
                   error_model=d["error_model"], seed=d["seed"], constraints=constraints,
                   families=None if d["families"] is None else tuple(d["families"]),
                   budget_scope=d.get("budget_scope"))

    def plan_id(self, profile_id: str) -> str:
        key = canonical_json({"profile": profile_id, "plan": self.to_dict()})
        return "plan_" + hashlib.sha256(key.encode()).hexdigest()[:32]

    @property
    def needs_model(self) -> bool:
        """Solvers that score candidates on the real model (evolutionary) need its weights."""
        return "score" in solvers.base.solver_settings(self.solver)


def check_plan_spec(spec: PlanSpec) -> None:
    """Everything about the plan settings that can be checked without a profile."""
    parse_budget(spec.budget, spec.budget_scope)
    check_solver_names(spec.solver, spec.error_model)
    accepted = set(solvers.base.solver_settings(spec.solver)) - {"score"}
    unknown = sorted(k for k, _ in spec.solver_settings if k not in accepted)
    if unknown:
        raise BadInputError(f"solver {spec.solver!r} takes no setting {', '.join(unknown)}; "
                            f"it takes {', '.join(sorted(accepted)) or 'none'}")


def narrow_table(table: CandidateTable, families: tuple[str, ...] | None) -> CandidateTable:
    """The table with only the options of these format families (a plan request's formats/target)."""
    if families is None:
        return table
    keep = [k for k, o in enumerate(table.options) if o.family in families]
    if not keep:
        offered = sorted({o.family for o in table.options})
        raise BadInputError(f"the profile offers none of the formats {', '.join(families)} (it has {', '.join(offered)}); "
                            "choose among those or make a profile with these formats")
    # replace() carries every other field (the quantizer among them) over unchanged
    return replace(table, options=[table.options[k] for k in keep], storage_bits=table.storage_bits[:, keep],
                   errors={m: e[:, keep] for m, e in table.errors.items()})


def make_plan(stored: StoredProfile, spec: PlanSpec, loaded: LoadedModel | None = None) -> Plan:
    """The plan for a stored profile; `loaded` (the model) only for solvers that score on it."""
    table = narrow_table(stored.table, spec.families)
    scope = spec.budget_scope or default_scope(parse_budget(spec.budget).kind,
                                               gguf_typed(table.options, stored.record.model_source))
    return api.solve_table(table, parse_budget(spec.budget, scope), stored.context(loaded),
                           solver=spec.solver, solver_settings=dict(spec.solver_settings),
                           error_model=spec.error_model, seed=spec.seed, constraints=spec.constraints)


def store_plan(store: Store, profile: ProfileRecord, spec: PlanSpec, plan: Plan) -> PlanRecord:
    """Insert the plan under its content id (a repeat is a no-op) and return the stored record."""
    plan_id = spec.plan_id(profile.id)
    store.put_plan(PlanRecord(seq=0, id=plan_id, profile_id=profile.id, model_source=profile.model_source,
                              model_hash=profile.model_hash, budget=spec.budget, solver=spec.solver,
                              request=spec.to_dict(), plan_json=plan.to_json(), created=time.time()))
    return store.get_plan(plan_id)


def plan_from_stored(store: Store, profile_id: str, spec: PlanSpec) -> PlanRecord:
    """The plan for a stored profile, computed in the caller (the solver's time only)."""
    existing = store.get_plan(spec.plan_id(profile_id))
    if existing is not None:
        return existing
    stored = open_profile(store, profile_id)
    if stored is None:
        raise KeyError(profile_id)
    plan = make_plan(stored, spec)
    return store_plan(store, stored.record, spec, plan)
