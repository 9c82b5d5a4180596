"""Where the service keeps jobs, profiles and plans: a small interface and an embedded SQLite store.

The database row is the commit point: a profile's files (candidate table, model config,
calibration tokens) are written atomically first, and the profile exists only once its row is
inserted. Ids of profiles and plans are content keys, so inserting one twice is a no-op
(INSERT OR IGNORE) and concurrent requests for the same thing cannot duplicate it.

Jobs move queued -> running -> done | failed. A worker claims a job inside one write
transaction (`UPDATE ... WHERE state='queued'`), holds a lease (owner + heartbeat), and can
finish only while it still holds that lease; a job whose owner died is re-queued, counting
attempts, and given up after `max_attempts`. A job cancelled by a client or stopped by the job
timeout (the server's, or the shorter one its request asked for) is marked failed with the reason;
failed is final, so it is never re-queued.

Fair queue: a free worker takes the oldest queued job of the client served least recently (a
client never served first). One client's hundred queued jobs therefore alternate with another
client's one, instead of running ahead of it. A client is the request's X-Bitalloc-Client header
(or its address): it shares the work out, it is not an identity to trust.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


@dataclass(frozen=True)
class Job:
    id: str
    kind: str  # "profile" or "plan"
    state: str
    request: dict  # the normalized work: what a worker needs to run it
    dedupe_key: str | None
    progress: float  # 0..1
    stage: str | None
    error: str | None
    result: dict | None  # {"profile_id": ...} or {"profile_id": ..., "plan_id": ...}
    attempts: int  # times a worker claimed it
    requeues: int  # times it was re-queued because its worker died
    completions: int  # times a worker finished it: 0 or 1, never more
    lease_owner: str | None
    heartbeat: float | None
    created: float
    updated: float
    note: str | None  # e.g. "re-queued: worker host:123:0 died"
    client: str | None = None  # who asked (fair queue)
    claimed: float | None = None  # when a worker last claimed it (job timeout)
    timeout_s: float | None = None  # the request's own job timeout; None = the server's


@dataclass(frozen=True)
class ProfileRecord:
    id: str
    model_source: str
    model_hash: str
    architecture: str
    meta: dict
    created: float
    job_id: str | None


@dataclass(frozen=True)
class PlanRecord:
    seq: int
    id: str
    profile_id: str
    model_source: str
    model_hash: str
    budget: str
    solver: str
    request: dict
    plan_json: str
    created: float


class Store(Protocol):
    """What the service needs from storage; a server database can implement the same methods."""

    root: Path

    def profile_dir(self, profile_id: str) -> Path: ...
    def create_job(self, kind: str, request: dict, dedupe_key: str | None, client: str | None = None,
                   timeout_s: float | None = None) -> tuple[Job, bool]: ...
    def get_job(self, job_id: str) -> Job | None: ...
    def claim_job(self, owner: str) -> Job | None: ...
    def heartbeat(self, job_id: str, owner: str, progress: float | None = None, stage: str | None = None) -> bool: ...
    def finish_job(self, job_id: str, owner: str, result: dict) -> bool: ...
    def fail_job(self, job_id: str, owner: str, error: str) -> bool: ...
    def requeue_dead(self, is_dead: Callable[[Job], bool], max_attempts: int) -> list[str]: ...
    def cancel_job(self, job_id: str, reason: str) -> Job | None: ...
    def expire_jobs(self, max_run_s: float, now: float | None = None) -> list[Job]: ...
    def put_profile(self, record: ProfileRecord) -> bool: ...
    def get_profile(self, profile_id: str) -> ProfileRecord | None: ...
    def forget_profile(self, profile_id: str) -> None: ...
    def put_plan(self, record: PlanRecord) -> bool: ...
    def get_plan(self, plan_id: str) -> PlanRecord | None: ...
    def list_plans(self, model: str | None = None, limit: int = 100) -> list[PlanRecord]: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    dedupe_key TEXT,
    progress REAL NOT NULL DEFAULT 0,
    stage TEXT,
    error TEXT,
    result TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    requeues INTEGER NOT NULL DEFAULT 0,
    completions INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    heartbeat REAL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    note TEXT
);
-- at most one live job per piece of work: a second request joins the first
CREATE UNIQUE INDEX IF NOT EXISTS jobs_live ON jobs(dedupe_key) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created);
-- jobs.client, jobs.claimed and jobs.timeout_s are added by _add_columns (stores made before them lack them)
CREATE TABLE IF NOT EXISTS profiles (
    id TEXT PRIMARY KEY,
    model_source TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    architecture TEXT NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL,
    job_id TEXT
);
CREATE TABLE IF NOT EXISTS plans (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    profile_id TEXT NOT NULL,
    model_source TEXT NOT NULL,
    model_hash TEXT NOT NULL,
    budget TEXT NOT NULL,
    solver TEXT NOT NULL,
    request TEXT NOT NULL,
    plan TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS plans_model ON plans(model_source, seq);
CREATE INDEX IF NOT EXISTS plans_hash ON plans(model_hash, seq);
"""


class SQLiteStore:
    """SQLite in WAL mode (readers never block the writer) at ROOT/bitalloc.db; files under ROOT.

    One connection per thread: sqlite3 connections must not cross threads, and FastAPI runs
    handlers on a thread pool.
    """

    def __init__(self, root: str | Path, busy_timeout_s: float = 30.0):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "bitalloc.db"
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)  # idempotent (IF NOT EXISTS): a restart reopens the same store
        self._add_columns()

    def _add_columns(self) -> None:
        """Columns added after the first stores: client (fair queue), claimed and timeout_s (job timeout)."""
        with self._write() as db:
            have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, kind in (("client", "TEXT"), ("claimed", "REAL"), ("timeout_s", "REAL")):
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")

    # ---- connections -----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a read-then-write takes
            # the write lock up front instead of failing to upgrade a read lock under contention.
            conn = sqlite3.connect(self.db_path, timeout=self._busy_timeout_s, isolation_level=None,
                                   check_same_thread=True)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def _write(self):
        return _Transaction(self._conn())

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        return self._conn().execute(sql, args).fetchone()

    def profile_dir(self, profile_id: str) -> Path:
        return self.root / "profiles" / profile_id

    # ---- jobs --------------------------------------------------------------------------------

    def create_job(self, kind: str, request: dict, dedupe_key: str | None, client: str | None = None,
                   timeout_s: float | None = None) -> tuple[Job, bool]:
        """(job, created): with a dedupe_key already live, the live job (with its own timeout) and False."""
        now = time.time()
        job_id = "job_" + uuid.uuid4().hex
        with self._write() as db:
            if dedupe_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE dedupe_key=? AND state IN ('queued','running')",
                                 (dedupe_key,)).fetchone()
                if row is not None:
                    return _job(row), False
            db.execute(
                "INSERT INTO jobs (id, kind, state, request, dedupe_key, created, updated, client, timeout_s) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (job_id, kind, QUEUED, json.dumps(request, sort_keys=True), dedupe_key, now, now, client, timeout_s),
            )
        return self.get_job(job_id), True

    def get_job(self, job_id: str) -> Job | None:
        row = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return None if row is None else _job(row)

    def claim_job(self, owner: str) -> Job | None:
        """The next queued job by the fair rule (module docstring), now running under `owner`; None when none is queued."""
        now = time.time()
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM jobs AS j WHERE state='queued' ORDER BY "
                "COALESCE((SELECT MAX(claimed) FROM jobs AS k WHERE k.client IS j.client), 0), created, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state='running', lease_owner=?, heartbeat=?, attempts=attempts+1, "
                "progress=0, stage='claimed', updated=?, claimed=? WHERE id=? AND state='queued'",
                (owner, now, now, now, row["id"]),
            )
        return self.get_job(row["id"])

    def heartbeat(self, job_id: str, owner: str, progress: float | None = None, stage: str | None = None) -> bool:
        """Renew the lease (and report progress); False when the lease was lost."""
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET heartbeat=?, updated=?, progress=COALESCE(?, progress), stage=COALESCE(?, stage) "
                "WHERE id=? AND lease_owner=? AND state='running'",
                (now, now, progress, stage, job_id, owner),
            )
            return cur.rowcount == 1

    def finish_job(self, job_id: str, owner: str, result: dict) -> bool:
        """Mark done, only while `owner` still holds the lease (a re-queued job's old worker cannot)."""
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET state='done', result=?, progress=1, stage='done', completions=completions+1, "
                "lease_owner=NULL, updated=? WHERE id=? AND lease_owner=? AND state='running'",
                (json.dumps(result, sort_keys=True), now, job_id, owner),
            )
            return cur.rowcount == 1

    def fail_job(self, job_id: str, owner: str, error: str) -> bool:
        now = time.time()
        with self._write() as db:
            cur = db.execute(
                "UPDATE jobs SET state='failed', error=?, stage='failed', lease_owner=NULL, updated=? "
                "WHERE id=? AND lease_owner=? AND state='running'",
                (error, now, job_id, owner),
            )
            return cur.rowcount == 1

    def requeue_dead(self, is_dead: Callable[[Job], bool], max_attempts: int) -> list[str]:
        """Re-queue running jobs whose owner `is_dead` (or fail them after max_attempts claims)."""
        now = time.time()
        changed = []
        with self._write() as db:
            for row in db.execute("SELECT * FROM jobs WHERE state='running'").fetchall():
                job = _job(row)
                if not is_dead(job):
                    continue
                if job.attempts >= max_attempts:
                    db.execute(
                        "UPDATE jobs SET state='failed', lease_owner=NULL, stage='failed', updated=?, error=?, note=? "
                        "WHERE id=? AND state='running' AND lease_owner IS ?",
                        (now, f"its worker died {job.attempts} times (last: {job.lease_owner}); giving up",
                         f"worker {job.lease_owner} died", job.id, job.lease_owner),
                    )
                else:
                    db.execute(
                        "UPDATE jobs SET state='queued', lease_owner=NULL, heartbeat=NULL, requeues=requeues+1, "
                        "progress=0, stage='re-queued', updated=?, note=? WHERE id=? AND state='running' AND lease_owner IS ?",
                        (now, f"re-queued: worker {job.lease_owner} died", job.id, job.lease_owner),
                    )
                changed.append(job.id)
        return changed

    def cancel_job(self, job_id: str, reason: str) -> Job | None:
        """Mark a queued or running job failed with `reason`; the job as it was (its lease owner is
        the worker to stop), or None when it had finished already."""
        now = time.time()
        with self._write() as db:
            row = db.execute("SELECT * FROM jobs WHERE id=? AND state IN ('queued','running')", (job_id,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='failed', error=?, stage='failed', lease_owner=NULL, updated=? WHERE id=?",
                       (reason, now, job_id))
        return _job(row)

    def expire_jobs(self, max_run_s: float, now: float | None = None) -> list[Job]:
        """Fail the running jobs claimed longer ago than their limit: the request's timeout_s where it asked for
        one below max_run_s, else max_run_s (the server's). The jobs as they were (to stop their workers)."""
        now = time.time() if now is None else now
        with self._write() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state='running' AND claimed < ? - MIN(COALESCE(timeout_s, ?), ?)",
                              (now, max_run_s, max_run_s)).fetchall()
            for row in rows:
                if row["timeout_s"] is not None and row["timeout_s"] < max_run_s:
                    reason = (f"timed out: ran over its request's timeout_s of {row['timeout_s']:g} s; ask for less work "
                              f"(smaller solver_settings, fewer calibration tokens) or a longer timeout_s (up to {max_run_s:g})")
                else:
                    reason = (f"timed out: ran over the server's job limit of {max_run_s:g} s; ask for less work "
                              "(smaller solver_settings, fewer calibration tokens) or raise `bitalloc serve --job-timeout`")
                db.execute("UPDATE jobs SET state='failed', error=?, stage='failed', lease_owner=NULL, updated=? "
                           "WHERE id=? AND state='running'", (reason, now, row["id"]))
        return [_job(r) for r in rows]

    # ---- profiles and plans ------------------------------------------------------------------

    def put_profile(self, record: ProfileRecord) -> bool:
        """Insert; False when a profile with this id exists already (ids are content keys)."""
        with self._write() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO profiles (id, model_source, model_hash, architecture, meta, created, job_id) "
                "VALUES (?,?,?,?,?,?,?)",
                (record.id, record.model_source, record.model_hash, record.architecture,
                 json.dumps(record.meta, sort_keys=True), record.created, record.job_id),
            )
            return cur.rowcount == 1

    def get_profile(self, profile_id: str) -> ProfileRecord | None:
        row = self._one("SELECT * FROM profiles WHERE id=?", (profile_id,))
        if row is None:
            return None
        return ProfileRecord(id=row["id"], model_source=row["model_source"], model_hash=row["model_hash"],
                             architecture=row["architecture"], meta=json.loads(row["meta"]), created=row["created"],
                             job_id=row["job_id"])

    def forget_profile(self, profile_id: str) -> None:
        """Drop a profile's row (its files failed their checks), so the next request for it recomputes it."""
        with self._write() as db:
            db.execute("DELETE FROM profiles WHERE id=?", (profile_id,))

    def put_plan(self, record: PlanRecord) -> bool:
        """Insert; False when a plan with this id exists already (same profile and settings)."""
        with self._write() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO plans (id, profile_id, model_source, model_hash, budget, solver, request, plan, created) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (record.id, record.profile_id, record.model_source, record.model_hash, record.budget, record.solver,
                 json.dumps(record.request, sort_keys=True), record.plan_json, record.created),
            )
            return cur.rowcount == 1

    def get_plan(self, plan_id: str) -> PlanRecord | None:
        row = self._one("SELECT * FROM plans WHERE id=?", (plan_id,))
        return None if row is None else _plan(row)

    def list_plans(self, model: str | None = None, limit: int = 100) -> list[PlanRecord]:
        """Plans oldest first; `model` matches the model source or its content hash."""
        if model is None:
            rows = self._conn().execute("SELECT * FROM plans ORDER BY seq LIMIT ?", (limit,)).fetchall()
        else:
            rows = self._conn().execute(
                "SELECT * FROM plans WHERE model_source=? OR model_hash=? ORDER BY seq LIMIT ?", (model, model, limit)
            ).fetchall()
        return [_plan(r) for r in rows]


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on one connection."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"], kind=row["kind"], state=row["state"], request=json.loads(row["request"]),
        dedupe_key=row["dedupe_key"], progress=row["progress"], stage=row["stage"], error=row["error"],
        result=None if row["result"] is None else json.loads(row["result"]), attempts=row["attempts"],
        requeues=row["requeues"], completions=row["completions"], lease_owner=row["lease_owner"],
        heartbeat=row["heartbeat"], created=row["created"], updated=row["updated"], note=row["note"],
        client=row["client"], claimed=row["claimed"], timeout_s=row["timeout_s"],
    )


def _plan(row: sqlite3.Row) -> PlanRecord:
    return PlanRecord(seq=row["seq"], id=row["id"], profile_id=row["profile_id"], model_source=row["model_source"],
                      model_hash=row["model_hash"], budget=row["budget"], solver=row["solver"],
                      request=json.loads(row["request"]), plan_json=row["plan"], created=row["created"])
