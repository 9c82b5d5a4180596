"""The HTTP API: FastAPI routes over a Store, a WorkerPool and the planning functions in work.py.

Every route but /healthz needs `Authorization: Bearer <token>`. Every error is a 4xx/5xx with a
JSON body {"error": ..., "detail": ...}. Handlers are plain functions, so FastAPI runs them on its
thread pool: planning from a stored profile (the solver, well under a second) never blocks the
event loop, and profiling always runs in the worker processes.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import sys
import zipfile
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from .. import exports
from ..errors import BadInputError, BitallocError, BudgetInfeasibleError
from ..io import atomic_write_bytes, atomic_write_text, canonical_json
from ..plan import Plan
from ..targets import resolve_formats
from .jobs import WorkerPool
from .limits import ServiceLimits
from .schemas import (CalibrationIn, ConstraintsIn, ErrorOut, JobOut, OptionsIn, PlanHistory, PlanHistoryItem, PlanIn, PlanRow,
                      PlanOut, PlanResponse, ProfileIn, ProfileOut, ProfileResponse)
from .sources import ProfileSpec, SourceRules, checked_model_source, checked_path, file_sha256, model_fingerprint
from .store import DONE, Job, PlanRecord, ProfileRecord, Store
from .work import PlanSpec, check_plan_spec, plan_from_stored
from .wording import HTTP_WORDING, http_text

DEFAULT_MAX_BODY_BYTES = 64 * 1024
_ERRORS = {400: "bad input", 401: "unauthorized", 404: "not found", 405: "method not allowed", 409: "conflict",
           413: "request too large", 422: "budget infeasible", 500: "internal error"}


class ApiError(HTTPException):
    pass


def create_app(store: Store, token: str, rules: SourceRules = SourceRules(), pool: WorkerPool | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, limits: ServiceLimits = ServiceLimits()) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if pool is not None:
            requeued = pool.start()
            if requeued:
                print(f"bitalloc serve: re-queued {len(requeued)} job(s) left running by a dead process: "
                      f"{', '.join(requeued)}", file=sys.stderr, flush=True)
        yield
        if pool is not None:
            pool.stop()

    app = FastAPI(title="bitalloc", version=_version(), lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description="Mixed-precision bit allocation for LLM weights, as a service.")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description="BITALLOC_TOKEN, or the token printed at server start")

    def authorized(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise ApiError(401, "send 'Authorization: Bearer <token>' with the server's token "
                                "(BITALLOC_TOKEN, or the one printed at start)", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]
    foldable = getattr(pool, "ray", None) is None  # Ray workers never hold the whole model: default_quantizer

    def client_of(request: Request) -> str:
        """Whose job this is, for the fair queue: the X-Bitalloc-Client header, else the peer address."""
        named = request.headers.get("x-bitalloc-client", "").strip()
        return named[:128] if named else (request.client.host if request.client else "unknown")
    errors = {code: {"model": ErrorOut} for code in (400, 401, 404, 413, 422)}
    _install_error_handlers(app)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.post("/v1/profiles", dependencies=auth, response_model=ProfileResponse, status_code=202, tags=["profiles"],
              responses={**errors, 200: {"model": ProfileResponse, "description": "the profile was stored before"}})
    def post_profile(body: ProfileIn, client: str = Depends(client_of)) -> JSONResponse:
        """Profile a model on calibration text in a worker process; the same request returns the same profile."""
        timeout_s = limits.request_timeout(body.timeout_s)
        spec = _profile_spec(body.model, body.calibration, body.options, body.include_lm_head, body.include_embeddings,
                             rules, body.quantizer, foldable)
        profile = store.get_profile(spec.profile_id)
        if profile is not None:
            job = store.get_job(profile.job_id) if profile.job_id else None
            out = ProfileResponse(profile_id=profile.id, state=DONE, job=_job_out(job) if job else None,
                                  profile=_profile_out(profile))
            return JSONResponse(out.model_dump(mode="json"), status_code=200)
        job, _ = store.create_job("profile", {"profile": spec.to_dict()}, dedupe_key=f"profile:{spec.profile_id}",
                                  client=client, timeout_s=timeout_s)
        out = ProfileResponse(profile_id=spec.profile_id, state=job.state, job=_job_out(job), profile=None)
        return JSONResponse(out.model_dump(mode="json"), status_code=202)

    @app.get("/v1/profiles/{profile_id}", dependencies=auth, response_model=ProfileOut, responses=errors,
             tags=["profiles"])
    def get_profile(profile_id: str) -> ProfileOut:
        profile = store.get_profile(profile_id)
        if profile is None:
            raise ApiError(404, f"no profile {profile_id!r}; POST /v1/profiles makes one (its job says when it is stored)")
        return _profile_out(profile)

    @app.post("/v1/plans", dependencies=auth, response_model=PlanResponse, tags=["plans"],
              responses={**errors, 202: {"model": PlanResponse, "description": "a job makes the plan (see job)"}})
    def post_plan(body: PlanIn, client: str = Depends(client_of)) -> JSONResponse:
        """A plan at once when the profile is stored, otherwise a job that profiles and then plans."""
        timeout_s = limits.request_timeout(body.timeout_s)  # checked even when no job is needed: one answer per request
        if body.profile_id is not None:
            profile_id, families = body.profile_id, _families(body.formats, body.target)
            if store.get_profile(profile_id) is None:
                raise ApiError(404, f"no profile {profile_id!r}; POST /v1/profiles first, or send model + calibration")
            _check_profile_quantizer(store.get_profile(profile_id), body.quantizer)
            spec_dict = None
        else:
            options = body.options or OptionsIn(formats=body.formats, target=body.target)
            if body.options is not None and (body.formats is not None or body.target is not None):
                raise BadInputError("give formats/target either in options (the profile's grid) or at the top level, not both")
            spec = _profile_spec(body.model, body.calibration or CalibrationIn(), options, body.include_lm_head,
                                 body.include_embeddings, rules, body.quantizer, foldable)
            profile_id, families, spec_dict = spec.profile_id, None, spec.to_dict()
        plan_spec = _plan_spec(body, families, limits)
        plan_id = plan_spec.plan_id(profile_id)
        if (existing := store.get_plan(plan_id)) is not None:
            return _plan_response(plan_id, profile_id, None, existing)
        if store.get_profile(profile_id) is not None and not plan_spec.needs_model:
            try:
                record = plan_from_stored(store, profile_id, plan_spec)
            except KeyError:
                raise ApiError(404, f"no profile {profile_id!r}") from None
            return _plan_response(plan_id, profile_id, None, record)
        if spec_dict is None:  # a stored profile and a solver that needs the model's weights
            spec_dict = store.get_profile(profile_id).meta["spec"]
        job, _ = store.create_job("plan", {"profile": spec_dict, "plan": plan_spec.to_dict()}, dedupe_key=f"plan:{plan_id}",
                                  client=client, timeout_s=timeout_s)
        return _plan_response(plan_id, profile_id, job, None)

    @app.get("/v1/jobs/{job_id}", dependencies=auth, response_model=JobOut, responses=errors, tags=["jobs"])
    def get_job(job_id: str) -> JobOut:
        job = store.get_job(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}; job ids come from POST /v1/profiles or /v1/plans")
        return _job_out(job)

    @app.delete("/v1/jobs/{job_id}", dependencies=auth, response_model=JobOut,
                responses={**errors, 409: {"model": ErrorOut}}, tags=["jobs"])
    def cancel_job(job_id: str) -> JobOut:
        """Cancel a queued or running job: it is marked failed ("cancelled") and its worker is replaced."""
        before = store.cancel_job(job_id, f"cancelled by a client (DELETE /v1/jobs/{job_id})")
        if before is None:
            job = store.get_job(job_id)
            if job is None:
                raise ApiError(404, f"no job {job_id!r}; job ids come from POST /v1/profiles or /v1/plans")
            raise ApiError(409, f"job {job_id} has finished ({job.state}); only queued or running jobs can be cancelled")
        if before.state == "running" and pool is not None:
            pool.stop_owner(before.lease_owner)
        return _job_out(store.get_job(job_id))

    @app.get("/v1/plans", dependencies=auth, response_model=PlanHistory, responses=errors, tags=["plans"])
    def list_plans(model: str | None = Query(None, max_length=4096, description="model source or content hash"),
                   limit: int = Query(100, ge=1, le=10000)) -> PlanHistory:
        """Plans made so far, oldest first (one entry per distinct plan id)."""
        if model is not None and model.startswith("/"):
            model = str(Path(model).resolve())  # the store keeps resolved paths
        return PlanHistory(plans=[_history_item(r) for r in store.list_plans(model, limit)])

    @app.get("/v1/plans/{plan_id}", dependencies=auth, response_model=PlanOut, responses=errors, tags=["plans"])
    def get_plan(plan_id: str) -> PlanOut:
        return _plan_out(_plan_or_404(store, plan_id))

    @app.get("/v1/plans/{plan_id}/export", dependencies=auth, responses={**errors, 200: {"content": {
        "application/octet-stream": {}, "application/zip": {}}}}, tags=["plans"])
    def export(plan_id: str, to: str = Query(..., max_length=64, description="export target, e.g. gguf, compressed-tensors")):
        """The plan in a serving stack's form: the one file the exporter writes, or a zip of several."""
        record = _plan_or_404(store, plan_id)
        targets = exports.available_exports()
        if to not in targets:
            raise BadInputError(f"unknown export target {to!r}; available: {', '.join(targets) or 'none on this server'}")
        return _export(store, record, to)

    return app


# ---- request -> specs ------------------------------------------------------------------------------


def _check_profile_quantizer(profile, quantizer: str | None) -> None:
    """A plan request naming a quantizer must name the stored profile's: its table holds that one's errors."""
    from ..config import KEYLESS_QUANTIZER, check_table_quantizer

    # records stored before the quantizer was a setting hold rtn tables
    check_table_quantizer(profile.meta["spec"].get("quantizer", KEYLESS_QUANTIZER), quantizer, f"profile {profile.id}",
                          "drop quantizer, or POST /v1/profiles with this quantizer and plan from that profile")


def _profile_spec(model: str, calibration: CalibrationIn, options: OptionsIn, include_lm_head: bool,
                  include_embeddings: bool, rules: SourceRules, quantizer: str | None = None,
                  foldable: bool = True) -> ProfileSpec:
    from ..api import bitalloc_version
    from ..config import check_quantizer, default_quantizer
    from ..options import default_options
    from ..profile.store import numerics_fingerprint

    from ..calibration import BUILTIN_CALIBRATION, builtin_text, text_sha256

    source = checked_model_source(model, rules)
    if calibration.path is None:  # the built-in set, keyed by its text like any file
        calib_path, calib_sha256 = f"builtin:{BUILTIN_CALIBRATION}", text_sha256(builtin_text())
    else:
        calib_path = checked_path(calibration.path, "calibration path", rules)
        if not calib_path.is_file():
            raise BadInputError(f"calibration path {calibration.path!r} is not a file; pass a UTF-8 text file")
        calib_sha256 = file_sha256(calib_path)
    if calibration.tokens < calibration.seq_len:
        raise BadInputError(f"calibration tokens ({calibration.tokens}) must be at least seq_len ({calibration.seq_len})")
    try:
        grid = default_options(bits=options.bits, group_sizes=[None if g == "ch" else g for g in options.group_sizes],
                               include_keep=options.keep, formats=resolve_formats(options.formats, options.target))
    except ValueError as e:  # an option the formats cannot represent, e.g. bits 9
        raise BadInputError(f"options: {e}; e.g. bits [2, 3, 4, 8], group_sizes [32, 64, \"ch\"]") from None
    if quantizer is not None:
        check_quantizer(quantizer)
    if not grid:
        raise BadInputError("options: no candidate options left (keep false and formats ['keep']); add a format family")
    return ProfileSpec(source=source, model=model_fingerprint(source), calib_path=str(calib_path),
                       calib_sha256=calib_sha256, seq_len=calibration.seq_len,
                       calib_tokens=calibration.tokens, seed=calibration.seed, options=[o.to_dict() for o in grid],
                       include_lm_head=include_lm_head, include_embeddings=include_embeddings,
                       code={"bitalloc": bitalloc_version(), "numerics": numerics_fingerprint()},
                       quantizer=quantizer or default_quantizer(grid, foldable))


def _families(formats: list[str] | None, target: str | None) -> tuple[str, ...] | None:
    if formats is None and target is None:
        return None
    return tuple(resolve_formats(formats, target))


def _plan_spec(body: PlanIn, families: tuple[str, ...] | None, limits: ServiceLimits) -> PlanSpec:
    from ..constraints import Constraints

    c: ConstraintsIn = body.constraints
    if c.min_bits is not None and c.max_bits is not None and c.min_bits > c.max_bits:
        raise BadInputError(f"constraints.min_bits ({c.min_bits}) is above max_bits ({c.max_bits})")
    spec = PlanSpec(budget=body.budget.strip(), solver=body.solver, solver_settings=tuple(sorted(body.solver_settings.items())),
                    error_model=body.error_model, seed=body.seed,
                    constraints=Constraints(min_bits=c.min_bits, max_bits=c.max_bits, pins=tuple(c.pins),
                                            allow=tuple(c.allow), ties=tuple(c.ties)),
                    families=families, budget_scope=body.budget_scope)
    check_plan_spec(spec)
    limits.check_solver_settings(spec.solver, body.solver_settings)
    return spec


# ---- responses --------------------------------------------------------------------------------------


def _job_out(job: Job) -> JobOut:
    result = job.result or {}
    request = job.request
    profile_id = result.get("profile_id") or ProfileSpec.from_dict(request["profile"]).profile_id
    plan_id = result.get("plan_id")
    if plan_id is None and job.kind == "plan":
        plan_id = PlanSpec.from_dict(request["plan"]).plan_id(profile_id)
    return JobOut(id=job.id, kind=job.kind, state=job.state, progress=job.progress, stage=job.stage, error=job.error,
                  attempts=job.attempts, requeues=job.requeues, timeout_s=job.timeout_s, note=job.note, created=job.created,
                  updated=job.updated, profile_id=profile_id, plan_id=plan_id)


def _profile_out(p: ProfileRecord) -> ProfileOut:
    return ProfileOut(id=p.id, model_source=p.model_source, model_hash=p.model_hash, architecture=p.architecture,
                      modules=len(p.meta["modules"]), options=p.meta["options"],
                      calibration=p.meta["calibration"]["settings"], created=p.created)


def _row(r: PlanRecord) -> dict:
    """The PlanRow fields of a stored plan."""
    return {name: getattr(r, name) for name in PlanRow.model_fields}


def _plan_out(r: PlanRecord) -> PlanOut:
    return PlanOut(**_row(r), plan=json.loads(r.plan_json))


def _history_item(r: PlanRecord) -> PlanHistoryItem:
    return PlanHistoryItem(**_row(r), summary=json.loads(r.plan_json)["summary"])


def _plan_response(plan_id: str, profile_id: str, job: Job | None, record: PlanRecord | None) -> JSONResponse:
    state = DONE if record is not None else job.state
    out = PlanResponse(plan_id=plan_id, profile_id=profile_id, state=state, job=None if job is None else _job_out(job),
                       plan=None if record is None else _plan_out(record))
    return JSONResponse(out.model_dump(mode="json"), status_code=200 if record is not None else 202)


def _plan_or_404(store: Store, plan_id: str) -> PlanRecord:
    record = store.get_plan(plan_id)
    if record is None:
        raise ApiError(404, f"no plan {plan_id!r}; GET /v1/plans lists the stored plans")
    return record


def _export(store: Store, record: PlanRecord, target: str):
    folder = store.root / "exports" / record.id / target
    done = folder / ".export.json"
    if not done.is_file():  # export once per plan and target; the marker is written last
        result = exports.export_plan(Plan.from_json(record.plan_json, origin=record.id), target, folder / "out",
                                     wording=HTTP_WORDING)
        files = sorted(Path(f).resolve() for f in result.files)
        atomic_write_text(done, canonical_json({"files": [str(f.relative_to(folder / "out")) for f in files],
                                                "unsupported": result.unsupported, "notes": result.notes}))
    info = json.loads(done.read_text())
    header = {"X-Bitalloc-Export": json.dumps(info, ensure_ascii=True)}
    if len(info["files"]) == 1:
        path = folder / "out" / info["files"][0]
        return FileResponse(path, filename=path.name, media_type="application/octet-stream", headers=header)
    archive = folder / f"{record.id}-{target}.zip"
    if not archive.is_file():
        import io

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name in info["files"]:
                z.write(folder / "out" / name, arcname=name)
        atomic_write_bytes(archive, buf.getvalue())
    return FileResponse(archive, filename=archive.name, media_type="application/zip", headers=header)


# ---- errors and limits -------------------------------------------------------------------------------


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": _ERRORS.get(status, "error"), "detail": detail}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
        return _error(400, "; ".join(parts) + " (see GET /openapi.json for the request schema)")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.method} {request.url.path}; see GET /openapi.json"
        return _error(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(BudgetInfeasibleError)
    async def infeasible(request: Request, exc: BudgetInfeasibleError) -> JSONResponse:
        return _error(422, http_text(exc))

    @app.exception_handler(BitallocError)
    async def bad_input(request: Request, exc: BitallocError) -> JSONResponse:
        return _error(400 if isinstance(exc, BadInputError) else 500, http_text(exc))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # still JSON, so clients parse one shape; the traceback goes to the server log
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
        return _error(500, f"{type(exc).__name__}: {exc}")


class _TooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reader passes it through instead of calling it a parse error."""


class BodyLimit:
    """ASGI middleware: refuse request bodies over max_bytes (by Content-Length, or while streaming)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body over {self.max_bytes} bytes; send less (profiles and plans need a few hundred bytes)"
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _error(413, message)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, message)
            return msg

        await self.app(scope, limited, send)


def _version() -> str:
    from ..api import bitalloc_version

    return bitalloc_version()


# ---- running it ---------------------------------------------------------------------------------------


def serve(host: str = "127.0.0.1", port: int = 8000, store_path: str | Path | None = None, workers: int = 1,
          allowed_roots: list[str] | tuple[str, ...] = (), allow_hub: bool = False,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, limits: ServiceLimits = ServiceLimits(), ray=None) -> None:
    """Run the API under uvicorn until interrupted; jobs, profiles and plans persist in the store.

    ray: a config.RaySpec: profile jobs compute their statistics and table rows on that Ray cluster."""
    import uvicorn

    from .store import SQLiteStore

    if workers < 1:
        raise BadInputError(f"--workers must be at least 1, got {workers}")
    token = os.environ.get("BITALLOC_TOKEN")
    if not token:
        token = secrets.token_urlsafe(32)
        print(f"bitalloc serve: no BITALLOC_TOKEN set; this run's token is {token}", file=sys.stderr, flush=True)
    store = SQLiteStore(store_path or default_store_dir())
    rules = SourceRules.of(list(allowed_roots), allow_hub)
    app = create_app(store, token, rules, WorkerPool(store, workers, rules=rules, limits=limits, ray=ray), max_body_bytes, limits)
    print(f"bitalloc serve: http://{host}:{port} (store {store.root}, {workers} worker(s), job timeout {limits.job_timeout_s:g} s, "
          f"roots: {', '.join(map(str, rules.allowed_roots)) or 'any'}, hub: {'on' if allow_hub else 'off'}"
          + (f", ray: {ray.address} x {ray.workers} workers" if ray is not None else "") + ")",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def default_store_dir() -> Path:
    return Path(os.environ.get("BITALLOC_STORE", Path.home() / ".local" / "share" / "bitalloc" / "service"))
