"""Worker processes: claim a queued job, run it under a lease, and record the result exactly once.

A lease owner is "host:pid:worker". While a job runs, a thread renews its heartbeat every
HEARTBEAT_S seconds. The server re-queues a running job when its owner is dead: on start (the
owner's process on this host is gone, or its heartbeat is older than LEASE_S) and every few
seconds while it runs. A worker finishes a job only while it still holds the lease, so a job
re-queued from a worker that was merely slow cannot be recorded twice; profile and plan ids
are content keys, so even a second computation stores nothing new.

Workers die with the server (PR_SET_PDEATHSIG on Linux, and a parent check in the loop), so
a killed server leaves no worker behind to race the restarted one.

A job cancelled by a client (DELETE /v1/jobs/{id}) or past the job timeout is marked failed first,
then its worker is killed and replaced: a solver cannot be interrupted from outside its process,
and the mark first means the old worker can no longer record a result.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback

from ..errors import BitallocError
from .limits import ServiceLimits
from .sources import ProfileSpec, SourceRules, checked_model_source, checked_path
from .store import RUNNING, Job, SQLiteStore, Store
from .work import PlanSpec, build_profile, make_plan, open_profile, store_plan
from .wording import http_text

HEARTBEAT_S = 1.0
LEASE_S = 15.0  # a heartbeat older than this means the owner is gone (another host, or a hung process)
MAX_ATTEMPTS = 3
POLL_S = 0.2


def run_job(store: Store, job: Job, progress, rules: SourceRules = SourceRules(), ray=None) -> dict:
    """Do the work of one job; returns its result ({"profile_id"} or {"profile_id", "plan_id"}).

    The model and calibration paths are checked against `rules` again here, just before they are
    opened: a file may have been replaced by a link since the request was accepted.
    ray: a config.RaySpec: a profile's statistics and table rows run on that Ray cluster."""
    spec = ProfileSpec.from_dict(job.request["profile"])
    profile = store.get_profile(spec.profile_id)
    loaded = None
    if profile is None or job.kind == "plan":
        checked_model_source(spec.source, rules)
    if profile is None:
        if not spec.calib_path.startswith("builtin:"):  # the built-in set is package data, not a file named by the request
            checked_path(spec.calib_path, "calibration path", rules)
        profile, loaded, _ = build_profile(store, spec, job.id, progress, ray=ray)
    if job.kind == "profile":
        return {"profile_id": profile.id}
    plan_spec = PlanSpec.from_dict(job.request["plan"])
    progress(0.96, "solving")
    stored = open_profile(store, profile.id)
    if plan_spec.needs_model and loaded is None:
        from ..models import load_model

        loaded = load_model(profile.model_source, trust_remote_code=False)
    plan = make_plan(stored, plan_spec, loaded if plan_spec.needs_model else None)
    record = store_plan(store, profile, plan_spec, plan)
    return {"profile_id": profile.id, "plan_id": record.id}


def owner_name(index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


def owner_is_dead(job: Job, now: float | None = None, live_owners: set[str] = frozenset()) -> bool:
    """A running job's owner is dead when its process on this host is gone or its heartbeat is stale."""
    if job.state != RUNNING or job.lease_owner is None:
        return False
    if job.lease_owner in live_owners:
        return False
    now = time.time() if now is None else now
    age = float("inf") if job.heartbeat is None else now - job.heartbeat
    host, _, rest = job.lease_owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname() and pid_text.isdigit():
        # On this host the process table answers; a stale heartbeat alone (a busy machine) is
        # not death, unless it is so old that the pid may have been reused.
        return not _pid_alive(int(pid_text)) or age > 4 * LEASE_S
    return age > LEASE_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers kill(0).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_main(store_root: str, index: int, parent_pid: int, rules: SourceRules = SourceRules(), ray=None) -> None:
    """One worker process: claim, run, record; until the parent is gone."""
    _die_with_parent()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    store = SQLiteStore(store_root)
    owner = owner_name(index)
    while os.getppid() == parent_pid:
        job = store.claim_job(owner)
        if job is None:
            time.sleep(POLL_S)
            continue
        _run_claimed(store, job, owner, rules, ray)


def _run_claimed(store: Store, job: Job, owner: str, rules: SourceRules = SourceRules(), ray=None) -> None:
    state = {"progress": None, "stage": None}
    stop = threading.Event()

    def progress(fraction: float, stage: str) -> None:
        state["progress"], state["stage"] = fraction, stage
        store.heartbeat(job.id, owner, fraction, stage)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            store.heartbeat(job.id, owner)

    beater = threading.Thread(target=beat, name=f"heartbeat-{job.id}", daemon=True)
    beater.start()
    try:
        result = run_job(store, job, progress, rules, ray)
    except BitallocError as e:
        store.fail_job(job.id, owner, http_text(e))
    except Exception as e:  # an internal failure: recorded on the job, the worker lives on
        traceback.print_exc()
        store.fail_job(job.id, owner, f"internal error: {type(e).__name__}: {e}")
    else:
        store.finish_job(job.id, owner, result)
    finally:
        stop.set()
        beater.join()


class WorkerPool:
    """N worker processes plus a reaper thread that re-queues jobs of dead owners, fails jobs past the
    job timeout, and restarts workers."""

    def __init__(self, store: Store, workers: int, reap_every_s: float = 2.0, rules: SourceRules = SourceRules(),
                 limits: ServiceLimits = ServiceLimits(), ray=None):
        self.store = store
        self.ray = ray  # config.RaySpec: where profile jobs compute (None: in the worker process)
        self.n = workers
        self.reap_every_s = reap_every_s
        self.rules = rules
        self.limits = limits
        self._ctx = mp.get_context("spawn")  # no fork of a threaded server process
        self._procs: list[mp.Process | None] = [None] * workers
        self._procs_lock = threading.Lock()  # the reaper and a cancel request both replace workers
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def start(self) -> list[str]:
        """Re-queue jobs left running by a dead process, then start the workers; returns the re-queued ids."""
        requeued = self.store.requeue_dead(owner_is_dead, MAX_ATTEMPTS)
        with self._procs_lock:
            for i in range(self.n):
                self._spawn(i)
        self._reaper = threading.Thread(target=self._reap_loop, name="job-reaper", daemon=True)
        self._reaper.start()
        return requeued

    def _spawn(self, i: int) -> None:
        p = self._ctx.Process(target=worker_main, args=(str(self.store.root), i, os.getpid(), self.rules, self.ray),
                              name=f"bitalloc-worker-{i}", daemon=True)
        p.start()
        self._procs[i] = p

    def stop_owner(self, owner: str | None) -> bool:
        """Kill the worker holding a lease (its job was cancelled or timed out) and start a fresh one."""
        host, _, rest = (owner or "").partition(":")
        pid_text, _, index_text = rest.partition(":")
        if host != socket.gethostname() or not index_text.isdigit() or int(index_text) >= self.n:
            return False
        i = int(index_text)
        with self._procs_lock:
            p = self._procs[i]
            if p is None or str(p.pid) != pid_text or self._stop.is_set():
                return False
            p.kill()
            p.join(10)
            self._spawn(i)
        return True

    def _reap_loop(self) -> None:
        while not self._stop.wait(self.reap_every_s):
            with self._procs_lock:
                for i, p in enumerate(self._procs):
                    if p is not None and not p.is_alive() and not self._stop.is_set():
                        p.join(0)
                        self._spawn(i)
            for job in self.store.expire_jobs(self.limits.job_timeout_s):
                self.stop_owner(job.lease_owner)
            self.store.requeue_dead(owner_is_dead, MAX_ATTEMPTS)

    def stop(self) -> None:
        self._stop.set()
        for p in self._procs:
            if p is not None and p.is_alive():
                p.terminate()
        for p in self._procs:
            if p is not None:
                p.join(5)
