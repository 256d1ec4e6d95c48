"""The HTTP layer of the teacher service: FastAPI routes that translate requests into `JobService` calls
and errors into one JSON shape, `{"error": "<one line naming the problem>"}`. Nothing here scores,
stores or schedules; see `teacher_server.jobs` (state) and `teacher_server.worker` (teacher processes).

Every `/v1/` request passes `_Gate` first, a pure ASGI middleware that authenticates from the headers
and caps the body before the route (or FastAPI's body parsing) reads a byte of it.

Status codes: 400 a request that names something wrong (unknown teacher or dataset, k above max_k,
invalid samples, a filter value that is none of the accepted ones, a JSON body that is not UTF-8), 401 no
or unknown token, 403 a read token asking to write or a team touching another team's job, 404 unknown job
or route, 409 cancelling a job that already ended, 413 a body over `max_json_bytes`/`max_upload_bytes` or
a dataset decoding to more than `max_decoded_bytes`, 422 a body that does not match the schema (strict
types: `"k": true` or `"all_positions": "yes"` is refused, not converted), 429 a team past its queue
limit, 500 a stored shard that is missing or damaged, 504 a `/v1/topk` that the teacher did not answer in
time, 503 a teacher that cannot answer (its model failed to load).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from datastore.chat import DecodedTooLarge, InvalidDataset
from datastore.errors import UserError
from datastore.table import CorruptShard
from teacher_server import metrics
from teacher_server.auth import Authenticator, AuthError, Principal
from teacher_server.config import ServiceConfig
from teacher_server.jobs import JobEnded, JobService, QueueFull, UploadTooLarge

# ------------------------------------------------------------------------------------------ schemas


class ErrorBody(BaseModel):
    error: str


class JobRequest(BaseModel):
    # strict: a JSON `true` is no k, a string no boolean (lax mode would make them 1 and True)
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset: str = Field(min_length=1, max_length=64, description="dataset id from POST /v1/datasets")
    teacher: str = Field(min_length=1, max_length=64)
    k: int = Field(10, ge=1, le=1024, description="top-k entries per position (at most the teacher's max_k)")
    chat_template: str | None = Field(None, max_length=64, description="'model' or a shared template name")
    max_length: int | None = Field(None, ge=2, description="tokens per sample (default: the teacher's)")
    all_positions: bool = False


class TopKRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    teacher: str = Field(min_length=1, max_length=64)
    samples: list[dict[str, Any]] = Field(min_length=1, description="samples as in a dataset line")
    k: int = Field(10, ge=1, le=1024)
    chat_template: str | None = Field(None, max_length=64)
    max_length: int | None = Field(None, ge=2)
    all_positions: bool = False


class DatasetOut(BaseModel):
    id: str
    format: str
    samples: int
    skipped: int
    bytes: int
    problems: list[str] = []


class JobOut(BaseModel):
    id: str
    state: str
    teacher: str
    team: str
    dataset: str
    k: int
    chat_template: str
    max_length: int
    all_positions: bool
    samples_done: int
    samples_scored: int  # of samples_done, those this job's last run scored (the rest were already stored)
    samples_total: int
    tokens: int
    tokens_per_s: float
    run_seconds: float
    eta_s: float | None
    truncated: int
    logits_id: str | None
    uri: str | None
    errors: list[str]
    attempts: int
    created: float
    started: float | None
    finished: float | None
    existing: bool = False
    #: on a submission only: the team's earlier done job for these settings whose logits dataset is no
    #: longer in the store; this new job computes it again (`note` says so in words)
    replaces: str | None = None
    note: str | None = None


class TopKSample(BaseModel):
    id: str
    input_ids: list[int]
    positions: list[int]
    targets: list[str]
    topk_ids: list[list[int]]
    topk_tokens: list[list[str]]
    topk_logprobs: list[list[float]]
    gold_logprob: list[float]


class TopKOut(BaseModel):
    teacher: str
    k: int
    results: list[TopKSample]


ERRORS = {s: {"model": ErrorBody} for s in (400, 401, 403, 404, 413, 422)}
#: the content types whose bodies FastAPI parses as JSON (besides anything ending in +json)
_JSON_TYPES = ("application/json",)


# ------------------------------------------------------------------------------------------ middleware


class _CountErrors:
    """Pure ASGI middleware: counts error responses for /metrics without touching request bodies."""

    def __init__(self, app, counter: metrics.HttpErrors):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.counter.add(message["status"])
            await send(message)

        return await self.app(scope, receive, counting_send)


#: the key of the ASGI scope under which `_Gate` leaves the authenticated `Principal`
PRINCIPAL = "logitfuse.principal"
UPLOAD_ROUTE = "/v1/datasets"


class _Gate:
    """Pure ASGI middleware in front of every `/v1/` route: authentication from the `Authorization`
    header and the body-size limits, decided before any of the body is read.

    * no or unknown token: 401; a token without the scope the method needs (GET/HEAD: read, anything
      else: write): 403. Either answer is sent without reading the body; uvicorn then closes the
      connection, so a client streaming hundreds of megabytes costs the server nothing.
    * `Content-Length` above the route's limit (`max_upload_bytes` for `POST /v1/datasets`, which
      streams its body to disk itself, `max_json_bytes` for every other route): 413 at once.
    * the JSON routes' bodies are read here, at most `max_json_bytes` of them (413 past it, also for
      chunked bodies without a length), and handed on; the upload route's body is left to the route.
    """

    def __init__(self, app, auth: Authenticator, max_json_bytes: int, max_upload_bytes: int):
        self.app, self.auth = app, auth
        self.max_json_bytes, self.max_upload_bytes = max_json_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        method = scope["method"]
        try:
            scope[PRINCIPAL] = self.auth.require(headers.get("authorization"),
                                                 "read" if method in ("GET", "HEAD", "OPTIONS") else "write")
        except AuthError as e:
            extra = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
            return await _error(e.status, e.message, {**extra, "Connection": "close"})(scope, receive, send)
        upload = method == "POST" and scope["path"].rstrip("/") == UPLOAD_ROUTE
        limit, key = (self.max_upload_bytes, "max_upload_bytes") if upload else (self.max_json_bytes, "max_json_bytes")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            if int(declared) <= DRAIN_BYTES:  # read and drop it: a close with unread bytes resets the
                await _drain(receive)  # connection, and the client may never see the 413
            return await self._too_large(f"of {declared} bytes", limit, key)(scope, receive, send)
        if upload or method in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                return await self._too_large("(sent without a Content-Length)", limit, key)(scope, receive, send)
            if not message.get("more_body", False):
                break
        if body and _is_json(headers.get("content-type", "")):
            try:
                body.decode(json.detect_encoding(bytes(body[:4])))
            except UnicodeDecodeError as e:
                return await _error(400, f"body: not UTF-8 JSON (byte 0x{body[e.start]:02x} at offset {e.start} is "
                                         f"invalid); send a JSON object encoded as UTF-8")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    def _too_large(size: str, limit: int, key: str) -> JSONResponse:
        """413 naming the limit in bytes and its config key; `size` tells what the body was ("of N bytes")."""
        return _error(413, f"request body {size} exceeds the limit of {limit} bytes ({key})",
                      {"Connection": "close"})


#: a body refused for its declared size is still read (and dropped, a chunk at a time) up to this many
#: bytes before the 413 goes out, so that the client reads the answer instead of a connection reset
DRAIN_BYTES = 8 * 2**20


async def _drain(receive) -> None:
    """Read the request body to its end, keeping none of it."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _error(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _is_json(content_type: str) -> bool:
    """Whether FastAPI parses a body of this Content-Type as JSON (application/json, anything+json)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media in _JSON_TYPES or media.endswith("+json")


_JSON_NAMES = {"list": "an array", "str": "a string", "bytes": "bytes", "int": "a number", "float": "a number",
               "bool": "a boolean", "NoneType": "null"}


def _validation_message(exc: RequestValidationError, content_type: str | None = None) -> str:
    """One line naming the fields that do not match the schema (the first three). A body that is not a
    JSON object says what is expected: a JSON object, with `Content-Type: application/json` when the
    request sent another type (its body was then not parsed as JSON at all)."""
    parts = []
    for err in exc.errors()[:3]:
        loc = tuple(err.get("loc", ()))
        if loc == ("body",) and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            if content_type and content_type.strip() and not _is_json(content_type):
                parts.append(f"body: expected a JSON object sent with Content-Type: application/json, got "
                             f"Content-Type: {content_type.split(';', 1)[0].strip()}")
            else:
                got = type(err.get("input")).__name__
                parts.append(f"body: expected a JSON object, got {_JSON_NAMES.get(got, got)}")
            continue
        where = ".".join(str(p) for p in loc if p != "body") or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


# ------------------------------------------------------------------------------------------ app

#: seconds a `/v1/topk` request may wait for its teacher's turn and answer (then 504)
TOPK_TIMEOUT_S = 300.0


def create_app(config: ServiceConfig, start_workers: bool = True) -> FastAPI:
    """The FastAPI app of one service; `start_workers=False` gives the API alone (no teacher processes)."""
    from teacher_server.worker import Supervisor, TeacherUnavailable

    service = JobService(config)
    supervisor = Supervisor(config, service.db) if start_workers else None
    service.supervisor = supervisor
    auth = Authenticator(config.tokens)
    http_errors = metrics.HttpErrors()
    bearer = HTTPBearer(auto_error=False, description="team token from teachers.yaml (sha256 stored)")
    # Threads of their own, so that neither route can starve the other or the shared pool that the
    # plain `def` routes run in: /healthz always finds a thread; /v1/topk requests, which wait for a
    # teacher that answers one at a time, queue here (asynchronously) instead of holding pool threads.
    health_threads = anyio.CapacityLimiter(2)
    topk_threads = {t.name: anyio.CapacityLimiter(1) for t in config.teachers}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.datasets.start()
        if supervisor is not None:
            supervisor.start()
        yield
        if supervisor is not None:
            await run_in_threadpool(supervisor.stop)
        service.datasets.close()

    app = FastAPI(
        title="logitfuse teacher service",
        version="1",
        description="Top-k logit extraction jobs over uploaded datasets, for knowledge fusion (FuseLLM/FuseChat).",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(_Gate, auth=auth, max_json_bytes=config.max_json_bytes,
                       max_upload_bytes=config.max_upload_bytes)
    app.add_middleware(_CountErrors, counter=http_errors)  # outermost: counts the gate's answers too

    def _principal(request: Request, creds: HTTPAuthorizationCredentials | None, scope: str) -> Principal:
        # `_Gate` has authenticated every /v1/ request already; `bearer` documents the scheme in OpenAPI
        found = request.scope.get(PRINCIPAL)
        if found is None:
            found = auth.principal(f"Bearer {creds.credentials}" if creds is not None else None)
        if not found.can(scope):
            raise AuthError(403, f"team {found.team!r} has a {found.scope} token; this request needs a {scope} token")
        return found

    def reader(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        return _principal(request, creds, "read")

    def writer(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        return _principal(request, creds, "write")

    # -------------------------------------------------------------- errors

    @app.exception_handler(UserError)
    async def _user_error(_req: Request, exc: UserError):
        if isinstance(exc, CorruptShard):  # the store is damaged, not the request: the operators' to fix
            return _error(500, f"stored shard {os.path.basename(exc.path)}: {exc.problem} (the service's operators: "
                               "`logitfuse store verify`)")
        return _error(400, str(exc))

    @app.exception_handler(LookupError)
    async def _lookup_error(_req: Request, exc: LookupError):
        return _error(404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(AuthError)
    async def _auth_error(_req: Request, exc: AuthError):
        return _error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    @app.exception_handler(UploadTooLarge)
    async def _too_large(_req: Request, exc: UploadTooLarge):
        return _error(413, str(exc), {"Connection": "close"})

    @app.exception_handler(DecodedTooLarge)
    async def _decoded_too_large(_req: Request, exc: DecodedTooLarge):
        return _error(413, str(exc))

    @app.exception_handler(InvalidDataset)
    async def _invalid_dataset(_req: Request, exc: InvalidDataset):
        return _error(400, str(exc), problems=[str(p) for p in exc.problems], invalid=exc.count)

    @app.exception_handler(QueueFull)
    async def _queue_full(_req: Request, exc: QueueFull):
        return _error(429, str(exc), {"Retry-After": "30"})

    @app.exception_handler(JobEnded)
    async def _job_ended(_req: Request, exc: JobEnded):
        return _error(409, str(exc), state=exc.job.state)

    @app.exception_handler(TeacherUnavailable)
    async def _unavailable(_req: Request, exc: TeacherUnavailable):
        return _error(503, str(exc))

    @app.exception_handler(TimeoutError)
    async def _timeout(_req: Request, exc: TimeoutError):
        return _error(504, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(req: Request, exc: RequestValidationError):
        return _error(422, _validation_message(exc, req.headers.get("content-type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception):
        traceback.print_exception(exc, file=sys.stderr)
        return _error(500, f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    # -------------------------------------------------------------- routes

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict:
        workers = await anyio.to_thread.run_sync(service.db.workers, limiter=health_threads)
        return {"status": "ok", "teachers": {t.name: workers.get(t.name, {}).get("state", "stopped")
                                             for t in config.teachers}}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def get_metrics() -> str:
        resident = supervisor.resident() if supervisor is not None else []
        return metrics.render(service.db, [t.name for t in config.teachers], resident, http_errors)

    @app.get("/v1/teachers", tags=["teachers"], responses=ERRORS)
    def teachers(_p: Principal = Depends(reader)) -> list[dict]:
        return service.teachers()

    @app.post(
        "/v1/datasets", tags=["datasets"], status_code=201, response_model=DatasetOut,
        responses={**ERRORS, 413: {"model": ErrorBody}},
        openapi_extra={"requestBody": {"required": True, "description": "a JSONL or Parquet dataset file",
                                       "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def upload_dataset(request: Request, skip_invalid: bool = False,
                             uri: str | None = Query(None, max_length=1000, description=(
                                 "instead of a body: a dataset file in the store (s3://... or a path under the "
                                 "store directory), copied by the server")),
                             _p: Principal = Depends(writer)):
        """Stream a JSONL or Parquet dataset to the server; it is validated as `logitfuse extract` does."""
        # the token and a declared Content-Length above max_upload_bytes were checked by `_Gate`
        chunks = service.datasets.read_store_file(uri, config.store) if uri else request.stream()
        rec, problems = await service.datasets.ingest(chunks, config.max_upload_bytes, skip_invalid)
        return {**rec.public(), "problems": problems}

    @app.get("/v1/datasets/{dataset_id}", tags=["datasets"], response_model=DatasetOut, responses=ERRORS)
    def get_dataset(dataset_id: str = PathParam(max_length=64), _p: Principal = Depends(reader)):
        rec = service.db.dataset(dataset_id)
        if rec is None:
            raise LookupError(f"unknown dataset id {dataset_id!r}")
        return rec.public()

    @app.post("/v1/jobs", tags=["jobs"], status_code=201, response_model=JobOut,
              responses={**ERRORS, 429: {"model": ErrorBody},
                         200: {"model": JobOut, "description": "the team's existing job for these settings"}})
    def create_job(req: JobRequest, p: Principal = Depends(writer)):
        """Queue an extraction job; the same dataset, teacher and settings return the existing job."""
        job, created = service.submit(req.dataset, req.teacher, req.k, req.chat_template, req.max_length,
                                      req.all_positions, p.team)
        body = {**job.public(), "existing": not created}
        if job.replaces:
            body["replaces"] = job.replaces
            body["note"] = (f"job {job.replaces} with these settings is done, but its logits dataset is no longer "
                            f"in the store; queued job {job.id} to compute it again")
        return JSONResponse(body, status_code=201 if created else 200)

    @app.get("/v1/jobs", tags=["jobs"], response_model=list[JobOut], responses=ERRORS)
    def list_jobs(state: str | None = Query(None, max_length=32, description="queued, running, done, failed "
                                                                               "or cancelled"),
                  teacher: str | None = None, limit: int = 100, p: Principal = Depends(reader)):
        """The team's recent jobs (every team's for an admin token); 400 for an unknown `state`."""
        return [j.public() for j in service.jobs(p, state, teacher, max(1, min(limit, 1000)))]

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=ERRORS)
    def get_job(job_id: str = PathParam(max_length=64), p: Principal = Depends(reader)):
        return service.job(job_id, p).public()

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut,
                responses={**ERRORS, 409: {"model": ErrorBody, "description": "the job already ended"}})
    def cancel_job(job_id: str = PathParam(max_length=64), p: Principal = Depends(writer)):
        """Cancel a queued or running job of the team (committed shards stay; resubmitting resumes them).
        A running job stops within a few seconds: its worker watches for the cancellation while scoring.
        A job that already ended (done, failed, cancelled) is left as it is: 409 naming its state."""
        return service.cancel(job_id, p).public()

    @app.get("/v1/jobs/{job_id}/manifest", tags=["jobs"], responses=ERRORS)
    def job_manifest(job_id: str = PathParam(max_length=64), p: Principal = Depends(reader)) -> dict:
        """The manifest of the job's logits dataset (as committed so far, from its Delta log)."""
        from datastore.catalog import dataset_kind
        from datastore.reader import load_logits_manifest

        job = service.job(job_id, p)
        if not job.uri:
            raise LookupError(f"job {job_id} has no logits dataset yet (state {job.state})")
        if dataset_kind(job.uri) is None:
            raise LookupError(f"job {job_id}: no logits dataset at {job.uri} yet")
        return load_logits_manifest(job.uri).model_dump(mode="json")

    _store_routes(app, config.store, reader)

    @app.post("/v1/topk", tags=["teachers"], response_model=TopKOut, responses={**ERRORS, 503: {"model": ErrorBody}, 504: {"model": ErrorBody}})
    async def topk(req: TopKRequest, _p: Principal = Depends(writer)):
        """Score a few samples synchronously (at most `max_topk_samples`; longer ones are refused, not cut)."""
        from datastore.chat import parse_record

        service.check_settings(req.teacher, req.k, req.chat_template, req.max_length)
        for i, rec in enumerate(req.samples):
            try:
                parse_record(rec)
            except ValueError as e:
                raise UserError(f"samples[{i}]: {e}") from None
        def score():
            return service.topk(req.teacher, req.samples, req.k, req.chat_template, req.max_length,
                                req.all_positions, timeout=TOPK_TIMEOUT_S)

        with anyio.fail_after(TOPK_TIMEOUT_S):  # waiting for the teacher's turn counts too
            results = await anyio.to_thread.run_sync(score, limiter=topk_threads[req.teacher])
        return {"teacher": req.teacher, "k": req.k, "results": results}

    from teacher_server.dashboard import mount_dashboard

    mount_dashboard(app, service, auth)
    return app


def _shard_error(file: str, exc: Exception) -> str:
    """The one line that ends a samples stream whose shard `file` failed to read, verify or decode."""
    if isinstance(exc, CorruptShard):
        return (f"stored shard {os.path.basename(exc.path)}: {exc.problem}; the stream ends here (the service's "
                f"operators: `logitfuse store verify`)")
    if not isinstance(exc, UserError):
        traceback.print_exception(exc, file=sys.stderr)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"stored shard {file}: cannot be read ({text}); the stream ends here"


def _store_routes(app: FastAPI, store: str, reader) -> None:
    """The store's catalog and its logits, for a team with a read token but no store credentials:
    ``GET /v1/logits`` (the catalog of `datastore.catalog`, filters teacher / dataset / kind),
    ``GET /v1/logits/{id}`` (one entry with its shards), ``GET /v1/logits/{id}/samples`` (every sample
    as NDJSON, streamed shard by shard, each shard verified first) and ``GET /v1/logits/{id}/samples/
    {sample_id}`` (one sample, `datastore.catalog.sample_to_json`). The stream checks every shard file's
    presence and size first (500 before it starts); a shard that then fails to verify or decode ends it
    with one line `{"error": ...}` naming the shard."""
    from fastapi.responses import StreamingResponse

    from datastore import catalog
    from datastore import fs as store_fs

    def _uri(logits_id: str) -> str:
        entry = catalog.find(store, logits_id, "logits")
        if entry["status"] != "ok":
            raise UserError(f"logits dataset {logits_id} is broken: {entry['error']}")
        return entry["uri"]

    @app.get("/v1/logits", tags=["store"], responses=ERRORS)
    def list_logits(teacher: str | None = Query(None, max_length=200), dataset: str | None = Query(None, max_length=64),
                    kind: str | None = Query(None, max_length=16), _p: Principal = Depends(reader)) -> list[dict]:
        """Every dataset of the store (logits and targets; ``kind`` narrows), broken ones with their error."""
        return catalog.catalog(store, kind=kind, teacher=teacher, dataset=dataset, missing_ok=True)

    @app.get("/v1/logits/{logits_id}", tags=["store"], responses=ERRORS)
    def get_logits(logits_id: str = PathParam(max_length=64), _p: Principal = Depends(reader)) -> dict:
        """One logits dataset's catalog entry plus its shards (file, rows, bytes, sha256, positions)."""
        from datastore.reader import load_logits_manifest

        entry = catalog.find(store, logits_id, "logits")
        if entry["status"] == "ok":
            m = load_logits_manifest(entry["uri"])
            entry["shards_list"] = [s.model_dump(include={"file", "rows", "bytes", "sha256", "positions", "tokens"})
                                    for s in m.shards]
            entry["encoding"] = m.encoding
        return entry

    @app.get("/v1/logits/{logits_id}/samples", tags=["store"], responses=ERRORS)
    def stream_samples(logits_id: str = PathParam(max_length=64), _p: Principal = Depends(reader)):
        """Every sample of the dataset as NDJSON (one JSON object per line), streamed shard by shard."""
        from datastore.reader import LogitsReader

        uri = _uri(logits_id)
        r = LogitsReader(uri)
        _check_shard_files(uri, r.manifest.shards)  # a missing or truncated shard: 500 before the stream starts

        def lines():
            for shard in r.manifest.shards:
                try:
                    samples = r.read_shard(shard)  # the whole shard verified and decoded before its first line
                except Exception as e:  # noqa: BLE001 - the 200 is sent: end the stream with one error line
                    yield (json.dumps({"error": _shard_error(shard.file, e)}) + "\n").encode()
                    return
                for sample in samples:
                    yield (json.dumps(catalog.sample_to_json(sample)) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/v1/logits/{logits_id}/samples/{sample_id}", tags=["store"], responses=ERRORS)
    def get_sample(logits_id: str = PathParam(max_length=64), sample_id: str = PathParam(max_length=512),
                   _p: Principal = Depends(reader)) -> dict:
        """One sample by id (only the shard that holds it is read)."""
        from datastore.reader import LogitsReader

        try:
            return catalog.sample_to_json(LogitsReader(_uri(logits_id)).get(sample_id))
        except KeyError:
            raise LookupError(f"logits dataset {logits_id} has no sample {sample_id!r}") from None

    def _check_shard_files(uri: str, shards) -> None:
        """Raise `CorruptShard` (500) for the first shard whose file is missing or not the size the
        dataset's log records: file info only, no reading or hashing."""
        import pyarrow.fs as pafs

        filesystem, root = store_fs.resolve(uri)
        for shard in shards:
            path = store_fs.join(root, shard.file)
            info = filesystem.get_file_info(path)
            if info.type != pafs.FileType.File:
                raise CorruptShard(path, "shard listed in the dataset log is missing")
            if shard.bytes and info.size != shard.bytes:
                raise CorruptShard(path, f"shard is {info.size} bytes, the dataset log records {shard.bytes} "
                                         f"(truncated or replaced)")
