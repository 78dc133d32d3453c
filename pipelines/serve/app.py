"""The DreamCache Serve app: a thin FastAPI ingress in front of generator replicas (``serve_generator``).

    serve run infra/serve/serve-config.yaml             # or: serve deploy, or a RayService serveConfigV2
    dreamcache serve --model M --adapter A --caches URI  # a local Ray, http://127.0.0.1:8000/

The application builder is :func:`build_app` (``import_path: pipelines.serve:build_app``); its ``args`` are the
fields of :class:`pipelines.serve.settings.ServeSettings`.

HTTP API v1 (OpenAPI at /docs): ``POST /v1/subjects``, ``GET /v1/subjects`` (paged), ``GET`` and ``DELETE
/v1/subjects/{id}``, ``POST /v1/generate`` (JSON, PNG, or an event stream of its progress), ``POST /v1/grids``
(subjects x prompts x seeds, one NDJSON line per cell as it completes), ``GET /healthz``, and the web page at
``/``. The ingress validates, authenticates and routes: each generation (and each grid cell) goes to a generator
replica that holds the subject's cache (by multiplexed model id, or by subject affinity: ``routing.py``); its
answer names that replica in ``X-DreamCache-Replica``. Every request has a server-side deadline (504 after it,
and the replica stops the work between denoising steps); a full queue answers 503 with Retry-After.
"""

# No `from __future__ import annotations` here: the ingress class is pickled by value into its replica, where
# FastAPI would have to resolve string annotations (Request, GenerateRequest) against a trimmed globals dict.
import asyncio
import base64
import hmac
import json
import logging
import secrets
import signal
import time
from pathlib import Path
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

# Only light imports: the ingress runs no model, so it must not pay for torch and diffusers (seconds per replica).
from dreamcache import storage
from dreamcache.cache_info import CacheError
from dreamcache.cache_store import CacheStore, read_cache_info

from ..kernel.ray_runtime import init_ray
from .batching import outside_request
from .metrics import IngressMetrics
from .preflight import check_inputs
from .schema import (
    BATCH_JOB_HINT,
    MAX_GRID_CELLS,
    Failure,
    GenerateJob,
    GenerateRequest,
    GenerateResult,
    GridRequest,
    ModelInfo,
    Progress,
    SubjectFromUris,
    SubjectOutcome,
    Upload,
    check_image_uri,
    grid_too_large,
    validation_errors,
)
from .settings import ServeSettings, resolve_api_token

logger = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"
# Reachable without the bearer token: health checks, and the web page, which a browser loads without any header
# (it is static and holds no data; it asks for the token and sends it with every API call).
OPEN_PATHS = frozenset({"/healthz", "/"})
SMALL_BODY_BYTES = 1 * 2**20  # JSON requests other than subject uploads
TIMEOUT_HEADER = "X-DreamCache-Timeout"  # seconds; lowers (never raises) the server's deadline for one request
# The generator replica that answered (subjects and generate): shows where routing by subject sent a request.
REPLICA_HEADER = "X-DreamCache-Replica"
MAX_SUBJECTS_PAGE = 200  # GET /v1/subjects: each listed subject costs one ranged read of its cache's header
# Routes as the latency metric names them: a subject id in a path would make one series per subject.
_METRIC_ROUTES = frozenset({"/", "/healthz", "/docs", "/openapi.json", "/v1/subjects", "/v1/subjects/{subject_id}",
                            "/v1/generate", "/v1/grids"})


def build_app(args: ServeSettings):
    """Serve application builder (``import_path: pipelines.serve:build_app``). Serve validates the config's
    ``args`` into ServeSettings by this type hint; a Python caller may pass the args dict itself."""
    import ray

    from .generator import Generator  # torch and diffusers: imported where the app is built, not by the ingress

    settings = ServeSettings.model_validate(args)  # an instance passes through unchanged
    resolve_api_token(settings)  # an unreadable token file fails the deploy, not every request
    # `serve deploy` and KubeRay build the app without the CLI: the same one-line checks fail the deploy here,
    # instead of replicas that Serve restarts forever. The port and device are the CLI's (it binds them).
    check_inputs(settings, host="", port=0, local=False)
    has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    generator = Generator.options(**settings.generator_options(has_gpus)).bind(settings)
    return Ingress.options(**settings.ingress_options()).bind(generator, settings)


# -- error responses ---------------------------------------------------------------------------------------------
def error_response(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """A 422 names its field the way FastAPI's own validation errors do (``loc``: body, path or header first);
    other errors carry ``detail`` text and the field, if any."""
    if status == 422 and field:
        loc = field.split(".")
        if loc[0] not in ("body", "path", "header", "query"):
            loc.insert(0, "body")
        body: dict[str, Any] = {"detail": [{"loc": loc, "msg": message, "type": "value_error"}]}
    else:
        body = {"detail": message, **({"field": field} if field else {})}
    return JSONResponse(body, status_code=status, headers=headers)


def wants_events(accept: str | None) -> bool:
    """Whether the client asks for a server-sent event stream (``Accept: text/event-stream``)."""
    return any(part.split(";")[0].strip().lower() == "text/event-stream" for part in (accept or "").split(","))


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def route_label(method: str, path: str) -> str:
    if path.startswith("/v1/subjects/"):
        path = "/v1/subjects/{subject_id}"
    return f"{method} {path if path in _METRIC_ROUTES else 'other'}"


def prefers_png(accept: str | None) -> bool:
    """Whether the Accept header ranks image/png above JSON (a browser's */* gets JSON)."""
    weights: dict[str, float] = {}
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    quality = float(param[2:])
                except ValueError:
                    quality = 0.0
        weights[media.lower()] = max(weights.get(media.lower(), 0.0), quality)
    png = max(weights.get("image/png", 0.0), weights.get("image/*", 0.0))
    return png > 0 and png > weights.get("application/json", 0.0)


# -- ASGI guards: auth and body size, before any route runs --------------------------------------------------------
class Guard:
    """Bearer-token check (every path but OPEN_PATHS) and a request-body limit (413 before reading it all)."""

    def __init__(self, app, token: str | None, subject_body_bytes: int, metrics: IngressMetrics | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.subject_body_bytes = subject_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if self.metrics is None:
            return await self._guarded(scope, receive, send, path)
        started, status = time.perf_counter(), "cancelled"  # a client gone before the answer started

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, send_and_note, path)
        finally:
            self.metrics.latency.observe(time.perf_counter() - started,
                                         tags={"route": route_label(scope.get("method", ""), path), "status": status})

    async def _guarded(self, scope, receive, send, path: str) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token is not None and path not in OPEN_PATHS and not self._authorized(headers.get("authorization")):
            return await error_response(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})(
                scope, receive, send)
        limit = self.subject_body_bytes if path.startswith("/v1/subjects") else SMALL_BODY_BYTES
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await error_response(413, f"request body of {declared} bytes exceeds the limit of {limit}")(
                scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body that does not declare its length
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)

    def _authorized(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token)


_SUBJECT_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["subject_id", "images"],
                "properties": {"subject_id": {"type": "string"},
                               "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
            "application/json": {"schema": SubjectFromUris.model_json_schema()},
        },
    },
    "responses": {"201": {"description": "cached"}, "200": {"description": "already cached with the same images"},
                  "409": {"description": "the id is taken by other images"}, "413": {"description": "image too large"},
                  "415": {"description": "not an image"}},
}


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """Validates, authenticates and routes; no model here."""

    def __init__(self, generator, settings: ServeSettings) -> None:
        self.settings = settings
        self.token = resolve_api_token(self.settings)
        self.generator = generator
        self.page = PAGE.read_text(encoding="utf-8")
        self.store = CacheStore(self.settings.caches)  # listing and deleting need no replica
        self._model: ModelInfo | None = None

    def __serve_build_asgi_app__(self):
        settings = self.settings
        api = FastAPI(title="DreamCache", version="1",
                      description="Personalized image generation from cached subject features.")

        @api.exception_handler(RequestValidationError)
        async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
            # FastAPI's own handler echoes each bad value, and a NaN in it made the 422 fail as a 500.
            errors = validation_errors(list(exc.errors()))
            if request.url.path.endswith("/v1/grids") and (too_large := grid_too_large(errors)):
                return error_response(413, too_large)
            return JSONResponse({"detail": errors}, status_code=422)

        @api.get("/healthz", tags=["ops"])
        async def healthz() -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def page() -> HTMLResponse:
            return HTMLResponse(self.page)

        @api.post("/v1/subjects", status_code=201, tags=["subjects"], openapi_extra=_SUBJECT_BODY_DOC)
        async def create_subject(request: Request) -> Response:
            """Register a subject: multipart ``subject_id`` + ``images`` files, or JSON ``{subject_id, image_uris}``."""
            if request.headers.get("content-type", "").startswith("application/json"):
                parsed = await self._uploads_from_uris(await request.body())
            else:
                parsed = await self._uploads_from_form(request)
            if isinstance(parsed, Failure):
                return self._failure(parsed)
            subject_id, uploads = parsed
            outcome = await self._call(self._for_subject(subject_id).create_subject.remote(subject_id, uploads))
            if isinstance(outcome, Failure):
                return self._failure(outcome)
            assert isinstance(outcome, SubjectOutcome)
            return JSONResponse(outcome.metadata, status_code=201 if outcome.created else 200,
                                headers={REPLICA_HEADER: outcome.replica})

        @api.get("/v1/subjects/{subject_id}", tags=["subjects"])
        async def get_subject(subject_id: str) -> Response:
            try:
                storage.validate_id(subject_id)
            except storage.InvalidId as exc:
                return error_response(422, str(exc), "path.subject_id")
            # Routed like a generate request: the replica holding the subject answers from memory.
            outcome = await self._call(self._for_subject(subject_id).subject_info.remote(subject_id))
            if isinstance(outcome, Failure):
                return self._failure(outcome)
            assert isinstance(outcome, SubjectOutcome)
            return JSONResponse(outcome.metadata, headers={REPLICA_HEADER: outcome.replica})

        @api.get("/v1/subjects", tags=["subjects"])
        async def list_subjects(
                limit: int = Query(50, ge=1, le=MAX_SUBJECTS_PAGE),
                cursor: str | None = Query(None, max_length=128, description="next_cursor of the previous page"),
        ) -> Response:
            """The registered subjects (the cache store), in id order, a page at a time: id, number of
            references, size in bytes, created (when its cache was written, UTC)."""
            try:
                page, next_cursor = await asyncio.to_thread(self.store.page, limit, cursor)
            except storage.InvalidId as exc:
                return error_response(422, str(exc), "query.cursor")
            except storage.StorageError as exc:
                return error_response(503, f"the cache store is unavailable: {exc}",
                                      headers={"Retry-After": str(settings.retry_after_s)})
            listed = await asyncio.gather(*(asyncio.to_thread(self._listed, sid, obj) for sid, obj in page))
            return JSONResponse({"subjects": listed, "next_cursor": next_cursor})

        @api.delete("/v1/subjects/{subject_id}", tags=["subjects"],
                    responses={404: {"description": "no such subject"}})
        async def delete_subject(subject_id: str) -> Response:
            """Remove a subject: its cache from the store, then from every generator replica's memory. Repeating
            it changes nothing more (the repeat answers 404: the subject is unknown by then)."""
            try:
                uri = self.store.uri_for(subject_id)
            except storage.InvalidId as exc:
                return error_response(422, str(exc), "path.subject_id")
            try:
                stored = await asyncio.to_thread(storage.exists, uri)
                if stored:  # the store first: no replica can load it again after it forgot it
                    await asyncio.to_thread(storage.delete, uri)
            except storage.StorageError as exc:
                return self._failure(Failure(503, f"the cache store is unavailable: {exc}"))
            try:
                # Every replica, not the one routing would pick: any of them may hold the subject.
                held = await self.generator.broadcast("forget_subject", subject_id).results_async(
                    timeout_s=min(30.0, settings.request_timeout_s), return_exceptions=True)
            except TimeoutError:
                held = [TimeoutError("no answer")]
            unreached = [r for r in held if isinstance(r, BaseException)]
            if unreached:
                logger.warning("subject %s: %d replica(s) did not confirm forgetting it: %s", subject_id,
                               len(unreached), unreached[0])
                return self._failure(Failure(503, f"the subject's cache was {'deleted' if stored else 'not stored'}, "
                                                  f"but {len(unreached)} replica(s) did not confirm dropping it from "
                                                  "memory; repeat the DELETE"))
            cleared = sum(1 for r in held if r is True)
            if not stored and not cleared:
                return error_response(404, f"unknown subject {subject_id!r}")
            return JSONResponse({"subject_id": subject_id, "deleted": True, "replicas_cleared": cleared})

        @api.post("/v1/generate", tags=["generation"],
                  responses={200: {"content": {"image/png": {}, "text/event-stream": {}},
                                   "description": "JSON; one PNG with Accept: image/png; with Accept: "
                                                  "text/event-stream, events 'progress' {step, steps} then "
                                                  "'result' (the JSON answer) or 'error' {status, detail}"}})
        async def generate(body: GenerateRequest, request: Request) -> Response:
            """Images of a subject in a context. The same seed and parameters give the same image (bit-identical
            when computed alike; a request batched with others may differ by rounding, a level or two of 255)."""
            job = await self._job(body, request.headers.get(TIMEOUT_HEADER))
            if isinstance(job, Failure):
                return self._failure(job)
            accept = request.headers.get("accept")
            if wants_events(accept):
                return await self._event_stream(job)
            png = prefers_png(accept)
            if png and job.num_images != 1:
                return error_response(406, "Accept: image/png returns one image; ask for num_images=1 or accept JSON")
            outcome = await self._call(self._for_subject(job.subject_id).generate.remote(job), deadline=job.deadline)
            if isinstance(outcome, Failure):
                return self._failure(outcome)
            assert isinstance(outcome, GenerateResult)
            if png:
                return Response(outcome.pngs[0], media_type="image/png",
                                headers={"X-DreamCache-Seed": str(job.seed), "X-DreamCache-Subject": job.subject_id,
                                         REPLICA_HEADER: outcome.replica})
            return JSONResponse(result_body(job, outcome), headers={REPLICA_HEADER: outcome.replica})

        @api.post("/v1/grids", tags=["generation"], responses={
            200: {"content": {"application/x-ndjson": {}},
                  "description": "one JSON line per cell, in the order cells complete: subject_id, prompt_index, "
                                 "seed, replica, and png (base64) or error {status, detail}"},
            413: {"description": f"more cells than the limits (at most {MAX_GRID_CELLS}); {BATCH_JOB_HINT}"}})
        async def grid(body: GridRequest, request: Request) -> Response:
            """Every subject x prompt x seed, one image per cell, fanned out over the replicas holding each subject.
            A cell's image is the one POST /v1/generate gives for the same parameters; an unknown or unusable
            subject fails its own cells only."""
            if body.cells() > MAX_GRID_CELLS:
                return error_response(413, f"the grid has {body.cells()} cells, more than {MAX_GRID_CELLS}; "
                                           f"{BATCH_JOB_HINT}")
            jobs = await self._grid_jobs(body, request.headers.get(TIMEOUT_HEADER))
            if isinstance(jobs, Failure):
                return self._failure(jobs)
            return StreamingResponse(self._grid_lines(jobs), media_type="application/x-ndjson")

        return Guard(api, self.token, settings.max_request_bytes(), IngressMetrics())

    # -- helpers --------------------------------------------------------------------------------------------
    def _for_subject(self, subject_id: str, **options: Any):
        """The generator handle for a call about ``subject_id``, routed to a replica holding it: by multiplexed
        model id, or (subject_affinity) by the deployment's request router, which reads the subject from the
        call's first argument (routing.routing_key): every such call passes the subject id or its job first."""
        if self.settings.routing == "multiplexed":
            options["multiplexed_model_id"] = subject_id
        return self.generator.options(**options) if options else self.generator

    async def _call(self, response, deadline: float | None = None, awaitable=None):
        """Await a generator call (or ``awaitable``, e.g. a stream's next event) under the server-side deadline;
        overload and timeouts become Failures."""
        timeout = (deadline - time.time()) if deadline is not None else self.settings.request_timeout_s

        async def wait():
            return await (response if awaitable is None else awaitable)

        try:
            return await asyncio.wait_for(wait(), timeout=max(timeout, 0.001))
        except asyncio.TimeoutError:
            response.cancel()
            return Failure(504, f"no answer within the request's {max(timeout, 0):.3g} s timeout")
        except asyncio.CancelledError:  # the client went away (or its grid was closed): so goes the replica's work
            response.cancel()
            raise
        except BackPressureError:
            return Failure(503, "the generator replicas are at capacity; retry later")
        except (DeploymentUnavailableError, RayActorError) as exc:  # no replica yet, or one died mid-request
            return Failure(503, f"the generator is unavailable: {type(exc).__name__}")

    def _failure(self, failure: Failure) -> JSONResponse:
        headers = {"Retry-After": str(self.settings.retry_after_s)} if failure.status == 503 else None
        return error_response(failure.status, failure.message, failure.field, headers)

    async def _model_info(self) -> ModelInfo | Failure:
        if self._model is None:
            info = await self._call(self.generator.describe.remote())
            if isinstance(info, Failure):
                return info
            self._model = info
        return self._model

    def _deadline(self, timeout_header: str | None) -> float | Failure:
        timeout = self.settings.request_timeout_s
        if timeout_header is not None:  # a client with its own deadline: no GPU time after it gives up
            try:
                asked = float(timeout_header)
            except ValueError:
                asked = float("nan")
            if not asked > 0:
                return Failure(422, f"{TIMEOUT_HEADER} must be a number of seconds > 0, got {timeout_header!r}",
                               f"header.{TIMEOUT_HEADER}")
            timeout = min(timeout, asked)
        return time.time() + timeout

    async def _limits(self, timeout_header: str | None, height: int | None, width: int | None
                      ) -> tuple[float, dict[str, int]] | Failure:
        """A request's deadline and image sides, or the Failure that refuses them (one check for every route)."""
        deadline = self._deadline(timeout_header)
        if isinstance(deadline, Failure):
            return deadline
        sides = await self._sides(height, width)
        if isinstance(sides, Failure):
            return sides
        return deadline, sides

    async def _sides(self, height: int | None, width: int | None) -> dict[str, int] | Failure:
        model = await self._model_info()
        if isinstance(model, Failure):
            return model
        max_side = self.settings.max_side or 2 * model.default_resolution
        sides = {"height": height or model.default_resolution, "width": width or model.default_resolution}
        for name, value in sides.items():
            if not self.settings.min_side <= value <= max_side:
                return Failure(422, f"{name} must be between {self.settings.min_side} and {max_side} pixels "
                                    f"(a multiple of 8) for this model, got {value}", name)
        return sides

    async def _job(self, body: GenerateRequest, timeout_header: str | None) -> GenerateJob | Failure:
        try:
            storage.validate_id(body.subject_id)
        except storage.InvalidId as exc:
            return Failure(422, str(exc), "subject_id")
        limits = await self._limits(timeout_header, body.height, body.width)
        if isinstance(limits, Failure):
            return limits
        deadline, sides = limits
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return GenerateJob(body.subject_id, body.prompt, body.negative_prompt, body.num_images, body.steps,
                           body.guidance_scale, body.image_guidance_scale, body.guidance, seed, sides["height"],
                           sides["width"], deadline=deadline)

    async def _grid_jobs(self, body: GridRequest, timeout_header: str | None
                         ) -> list[tuple[dict[str, Any], GenerateJob]] | Failure:
        """One GenerateJob per cell (the same job /v1/generate makes of the same parameters, so the same image),
        each with its cell's coordinates."""
        for i, subject_id in enumerate(body.subject_ids):
            try:
                storage.validate_id(subject_id)
            except storage.InvalidId as exc:
                return Failure(422, str(exc), f"subject_ids.{i}")
        limits = await self._limits(timeout_header, body.height, body.width)
        if isinstance(limits, Failure):
            return limits
        deadline, sides = limits
        seeds = body.seeds if body.seeds is not None else [secrets.randbelow(2**31)]
        jobs = []
        for subject_id in body.subject_ids:
            for p, prompt in enumerate(body.prompts):
                negative = prompt.negative_prompt if prompt.negative_prompt is not None else body.negative_prompt
                scale = prompt.guidance_scale if prompt.guidance_scale is not None else body.guidance_scale
                image_scale = prompt.image_guidance_scale if prompt.image_guidance_scale is not None \
                    else body.image_guidance_scale
                for seed in seeds:
                    job = GenerateJob(subject_id, prompt.prompt, negative, 1, body.steps, scale, image_scale,
                                      body.guidance, seed, sides["height"], sides["width"], deadline=deadline)
                    jobs.append(({"subject_id": subject_id, "prompt_index": p, "seed": seed}, job))
        return jobs

    async def _grid_lines(self, jobs: list[tuple[dict[str, Any], GenerateJob]]) -> AsyncIterator[bytes]:
        """The grid's cells, all sent at once, each to a replica holding its subject (so the grid spreads over
        every replica that holds one of its subjects); a line per cell as it completes. At most
        ``grid_max_in_flight`` cells wait on the replicas at once: one grid must not fill their queues alone."""
        gate = asyncio.Semaphore(self.settings.grid_max_in_flight)

        async def send(job: GenerateJob):
            return await self._call(self._for_subject(job.subject_id).generate.remote(job), deadline=job.deadline)

        async def cell(coords: dict[str, Any], job: GenerateJob) -> bytes:
            async with gate:
                # Each cell its own Serve request: handle calls made in one request's context share its internal
                # request id, and a router that hands each chosen replica to the request it was chosen for (the
                # subject-affinity router; Serve's default is FIFO) matches pending requests by that id, so the
                # grid's concurrent cells would collide there and all but one wait forever (Ray 2.60).
                outcome = await outside_request(send(job))
            if isinstance(outcome, Failure):
                line = {**coords, "error": {"status": outcome.status, "detail": outcome.message}}
            else:
                assert isinstance(outcome, GenerateResult)
                line = {**coords, "replica": outcome.replica, "cache": outcome.cache,
                        "png": base64.b64encode(outcome.pngs[0]).decode("ascii")}
            return (json.dumps(line, separators=(",", ":")) + "\n").encode()

        tasks = [asyncio.ensure_future(cell(coords, job)) for coords, job in jobs]
        try:
            for done in asyncio.as_completed(tasks):
                yield await done
        finally:  # the client went away: the cells not yet answered are cancelled (and so is their work)
            for task in tasks:
                task.cancel()

    async def _event_stream(self, job: GenerateJob) -> Response:
        """POST /v1/generate as server-sent events. The first event (queued, or the request's failure) is awaited
        here, so that an unknown subject is still a plain 404, not a 200 stream that reports an error."""
        stream = self._for_subject(job.subject_id, stream=True).generate_events.remote(job)
        first = await self._call(stream, deadline=job.deadline, awaitable=stream.__anext__())
        if isinstance(first, Failure):
            stream.cancel()
            return self._failure(first)
        assert isinstance(first, Progress)

        async def events() -> AsyncIterator[bytes]:
            try:
                yield sse("progress", {"step": first.step, "steps": first.steps})
                async for event in stream:
                    if isinstance(event, Progress):
                        yield sse("progress", {"step": event.step, "steps": event.steps})
                    elif isinstance(event, Failure):
                        yield sse("error", {"status": event.status, "detail": event.message})
                        return
                    else:
                        assert isinstance(event, GenerateResult)
                        yield sse("result", result_body(job, event))
                        return
            except (RayActorError, DeploymentUnavailableError) as exc:
                yield sse("error", {"status": 503, "detail": f"the generator is unavailable: {type(exc).__name__}"})
            finally:  # also when the client disconnects: cancelling the stream stops the replica's work
                stream.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", REPLICA_HEADER: first.replica})

    def _listed(self, subject_id: str, obj: storage.ListedObject) -> dict[str, Any]:
        """One entry of GET /v1/subjects: a cache's header is read for its reference count (a ranged read)."""
        entry: dict[str, Any] = {
            "id": subject_id, "references": None, "size": obj.size,
            "created": datetime.fromtimestamp(obj.modified, timezone.utc).isoformat(timespec="seconds"),
        }
        try:
            entry["references"] = len(read_cache_info(self.store.uri_for(subject_id), obj.size).source_hashes)
        except (CacheError, storage.StorageError) as exc:  # listed anyway: an operator lists to find these
            entry["error"] = str(exc)
        except storage.InvalidId:
            entry["error"] = "not a valid subject id"
        return entry

    async def _uploads_from_form(self, request: Request) -> tuple[str, list[Upload]] | Failure:
        limit = self.settings.max_upload_bytes
        try:
            form = await request.form(max_files=self.settings.max_references, max_fields=16)
        except HTTPException as exc:
            if exc.status_code == 413:
                raise
            return Failure(422, f"malformed multipart form: {exc.detail}", "images")
        except Exception as exc:  # noqa: BLE001 - the parser raises assorted types for broken bodies
            return Failure(422, f"expected multipart/form-data with subject_id and images: {exc}", "images")
        subject_id = form.get("subject_id")
        if not isinstance(subject_id, str):
            return Failure(422, "subject_id is required (a form field)", "subject_id")
        try:
            storage.validate_id(subject_id)
        except storage.InvalidId as exc:
            return Failure(422, str(exc), "subject_id")
        files = form.getlist("images")
        if not files:
            return Failure(422, "at least one image file is required (form field 'images')", "images")
        uploads = []
        for i, item in enumerate(files):
            if not isinstance(item, UploadFile):
                return Failure(422, "'images' must be file uploads", f"images.{i}")
            data = await item.read(limit + 1)
            if len(data) > limit:
                return Failure(413, f"image {item.filename or i} exceeds the limit of {limit} bytes", f"images.{i}")
            uploads.append(Upload(f"images.{i}", item.filename or f"images[{i}]", data))
        return subject_id, uploads

    async def _uploads_from_uris(self, body: bytes) -> tuple[str, list[Upload]] | Failure:
        try:
            request = SubjectFromUris.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            return Failure(422, first["msg"], ".".join(map(str, first["loc"])) or "body")
        try:
            storage.validate_id(request.subject_id)
        except storage.InvalidId as exc:
            return Failure(422, str(exc), "subject_id")
        if len(request.image_uris) > self.settings.max_references:
            return Failure(422, f"at most {self.settings.max_references} images per subject", "image_uris")
        uploads = []
        for i, uri in enumerate(request.image_uris):
            upload = await asyncio.to_thread(read_image_uri, uri, f"image_uris.{i}", self.settings)
            if isinstance(upload, Failure):
                return upload
            uploads.append(upload)
        return request.subject_id, uploads


def result_body(job: GenerateJob, outcome: GenerateResult) -> dict[str, Any]:
    """The JSON answer of POST /v1/generate (also the 'result' event of its event stream)."""
    return {
        "subject_id": job.subject_id,
        "media_type": "image/png",
        "images": [base64.b64encode(png_bytes).decode("ascii") for png_bytes in outcome.pngs],
        "parameters": job.parameters(),
        "server": {"replica": outcome.replica, "cache": outcome.cache, "batch_images": outcome.batch_images,
                   "batch_subjects": outcome.batch_subjects, "seconds": round(outcome.seconds, 4)},
    }


def read_image_uri(uri: str, field: str, settings: ServeSettings) -> Upload | Failure:
    """A client-named reference image, read if it lies under an allowed prefix (settings.allowed_image_prefixes).

    A missing bucket, a missing key and a refused key all get the same 422 message: a different answer for each
    would let a client probe which buckets and objects exist where the server's credentials reach."""
    try:
        uri = check_image_uri(uri, settings.allowed_image_prefixes)
    except ValueError as exc:  # not under an allowed prefix, or not a URI
        return Failure(422, str(exc), field)
    try:
        size = storage.size(uri)
        if size > settings.max_upload_bytes:
            return Failure(413, f"{uri} is {size} bytes, over the limit of {settings.max_upload_bytes}", field)
        return Upload(field, uri, storage.read_bytes(uri))
    except (storage.ObjectNotFound, storage.PermissionDenied, storage.BucketNotFound):
        return Failure(422, "no readable image at this URI (no such object, or no access)", field)
    except storage.StorageError as exc:
        return Failure(503, f"cannot read {uri}: {exc}", field)


def _stop_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt


def run_local(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, ray_address: str | None = None,
              app_name: str = "dreamcache") -> None:
    """``dreamcache serve``: start (or join) Ray, run the app at http://host:port/ until interrupted."""
    resolve_api_token(settings)  # before Ray starts
    init_ray(address=ray_address)
    # The proxy's own timeout is a backstop behind the app's deadline (which answers 504 first).
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": settings.request_timeout_s + 30})
    signal.signal(signal.SIGTERM, _stop_on_signal)  # a service manager's stop shuts Serve down cleanly too
    try:
        serve.run(build_app(settings), name=app_name, route_prefix="/", blocking=False)
        print(f"DreamCache is serving at http://{host}:{port}/ (API docs at /docs); Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
