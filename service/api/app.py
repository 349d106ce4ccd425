"""The FastAPI application: ``create_app(settings)`` builds it; models load in ``lifespan``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from crfiqa.service.api.batching import DynamicBatcher
from crfiqa.service.api.logs import request_id
from crfiqa.service.api.metrics import Metrics
from crfiqa.service.api.schemas import ErrorResponse, Options, QualityRequest, QualityResponse
from crfiqa.service.errors import CrfiqaError
from crfiqa.service.pipeline import Options as PipelineOptions
from crfiqa.service.pipeline import Pipeline, Prepared
from crfiqa.service.results import ImageResult
from crfiqa.service.settings import Settings

log = logging.getLogger("crfiqa.api")

#: HTTP status of each whole-request error code; per-image errors stay inside a 200 response.
STATUS = {"unauthorized": 401, "too_many_images": 413, "body_too_large": 413, "unsupported_media_type": 415,
          "validation_error": 422, "queue_full": 503, "not_ready": 503}
ENDPOINTS = frozenset({"/v1/quality", "/v1/models", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})
RETRY_AFTER_S = "1"


class RequestError(CrfiqaError):
    """An error that fails the whole request; its ``code`` picks the status from ``STATUS``."""


class Service:
    """Models, thread pools and the batcher of one app instance."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.pipeline = Pipeline(settings.pipeline_settings())
        self.workers = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="crfiqa-prep")
        self.inference = ThreadPoolExecutor(1, thread_name_prefix="crfiqa-quality")
        self.batcher = DynamicBatcher(
            self._infer, self.inference, settings.max_batch_size, settings.max_queue_delay_ms / 1000,
            settings.max_queue_size, on_batch=self.metrics.batch_size.observe, on_depth=self.metrics.queue_depth.set)
        self.ready = False

    def load(self) -> None:
        """Verify (sha256) and open both models; raises a clear ``ModelError`` when one is missing or wrong.

        Opening a model through the pipeline resolves and verifies it, so each file is hashed once."""
        for role, info in self.pipeline.models().items():
            self.metrics.model_info.labels(info["name"], info["version"], info["provider"], role).set(1)

    def warm_up(self) -> None:
        """Run every batch size the batcher can form (the CUDA arena grows to the largest seen) and the detector."""
        sizes = sorted({min(2 ** k, self.settings.max_batch_size) for k in range(11)})
        crops = np.zeros((self.settings.max_batch_size, 112, 112, 3), np.uint8)
        blank = np.zeros((self.settings.det_size, self.settings.det_size, 3), np.uint8)
        for _ in range(self.settings.warmup_rounds):
            self.pipeline.detect(blank)
            for n in sizes:
                self._infer(crops[:n])

    def _infer(self, crops: np.ndarray) -> np.ndarray:
        """Quality model on one batch (runs in the inference thread)."""
        t = time.perf_counter()
        raw = self.pipeline.score(crops)
        self.metrics.stage_duration.labels("quality").observe(time.perf_counter() - t)
        return raw

    def prepare(self, name: str, data: bytes | str, opts: Options) -> Prepared:
        """The pipeline's prepare stage for one request image (base64 decoded first); never raises."""
        if isinstance(data, str):
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                return Prepared(name, error=CrfiqaError("image data is not valid base64", code="invalid_base64"))
        return self.pipeline.prepare((name, data), self._options(opts))

    def _options(self, opts: Options) -> PipelineOptions:
        """The pipeline options of a request's query/body options."""
        if opts.aligned:
            return PipelineOptions(aligned=True)
        det = self.pipeline.detection_settings(max_faces=opts.max_faces, min_face_size=opts.min_face_size,
                                               score_threshold=opts.det_threshold)
        return PipelineOptions(select=opts.select, detection=det)

    async def score(self, items: list[tuple[str, bytes | str]], opts: Options) -> tuple[list[ImageResult], dict]:
        """Prepare images in parallel worker threads, score all their faces through the batcher, finish each."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        prepared = await asyncio.gather(*(loop.run_in_executor(self.workers, self.prepare, n, d, opts)
                                          for n, d in items))
        counts = [len(p.crops) for p in prepared]
        t1 = time.perf_counter()
        error: CrfiqaError | None = None
        raw = np.zeros(0)
        if sum(counts):
            try:
                raw = await self.batcher.submit(np.concatenate([p.crops for p in prepared if len(p.crops)]))
            except CrfiqaError as exc:
                error = exc
        t2 = time.perf_counter()
        offsets = np.cumsum([0, *counts])
        results = [self.pipeline.finish(p, None if error else raw[a:b], error=error)
                   for p, a, b in zip(prepared, offsets[:-1], offsets[1:])]
        m = self.metrics
        for p, r in zip(prepared, results):
            for stage, seconds in p.timings.items():
                m.stage_duration.labels(stage).observe(seconds)
            if r.error is not None:
                m.errors.labels(r.error.code).inc()
                continue
            m.faces_per_image.observe(len(r.faces))
            for face in r.faces:
                if face.quality is not None:
                    m.quality_score.observe(face.quality.score)
        timing = {"prepare": round(1000 * (t1 - t0), 3), "quality": round(1000 * (t2 - t1), 3)}
        return results, timing


def _key_ok(request: Request, keys: list[str]) -> bool:
    """Constant-time check of ``X-API-Key`` or ``Authorization: Bearer`` against every configured key."""
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None:
        return False
    ok = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


def get_service(request: Request) -> Service:
    """The app's Service."""
    return request.app.state.service


def require_key(request: Request) -> None:
    """Refuse requests without a valid API key when keys are configured."""
    keys = request.app.state.service.settings.key_list
    if keys and not _key_ok(request, keys):
        raise RequestError("missing or invalid API key (header X-API-Key or Authorization: Bearer)",
                           code="unauthorized")


ServiceDep = Annotated[Service, Depends(get_service)]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = Service(settings)
        app.state.service = service
        try:
            await asyncio.get_running_loop().run_in_executor(None, service.load)  # fails fast on a bad model
        except CrfiqaError as exc:
            log.error("startup failed: %s: %s", exc.code, exc.message)
            raise
        service.batcher.start()
        warm = asyncio.get_running_loop().create_task(_warm(service))
        log.info("models loaded", extra={"detector": service.pipeline.detector_name,
                                         "quality": service.pipeline.quality_name})
        yield
        warm.cancel()
        await service.batcher.stop()
        service.workers.shutdown(wait=True)
        service.inference.shutdown(wait=True)
        log.info("stopped")

    app = FastAPI(title="crfiqa", version=_version(), lifespan=lifespan,
                  description="Face image quality assessment (CR-FIQA): quality of every face in an image, "
                              "as its utility to face recognition.")
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_Observe)

    @app.exception_handler(CrfiqaError)
    async def _crfiqa_error(request: Request, exc: CrfiqaError) -> JSONResponse:
        status = STATUS.get(exc.code, 500)
        headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
        if hasattr(request.app.state, "service"):
            request.app.state.service.metrics.errors.labels(exc.code).inc()
        return JSONResponse({"error": exc.to_dict()}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await _crfiqa_error(request, RequestError(_describe(exc.errors()), code="validation_error"))

    _routes(app, settings)
    return app


async def _warm(service: Service) -> None:
    """Warm up off the event loop, then mark the service ready."""
    try:
        await asyncio.get_running_loop().run_in_executor(service.inference, service.warm_up)
    except Exception:
        log.exception("warm-up failed; the service stays not ready")
        return
    service.ready = True
    service.metrics.ready.set(1)
    log.info("ready")


def _describe(errors: list) -> str:
    """One line naming each invalid field."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                     for e in errors)


def _version() -> str:
    from crfiqa import __version__

    return __version__


ERRORS = {s: {"model": ErrorResponse} for s in (401, 413, 415, 422, 503)}
BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "one or more image files"}}}},
            "application/json": {"schema": QualityRequest.model_json_schema(ref_template="#/components/schemas/{model}")},
        },
    }
}


def _routes(app: FastAPI, settings: Settings) -> None:
    """Register the endpoints."""

    @app.post("/v1/quality", response_model=QualityResponse, responses=ERRORS, openapi_extra=BODY_DOC,
              dependencies=[Depends(require_key)], response_model_exclude_none=True)
    async def quality(
        request: Request, service: ServiceDep,
        aligned: Annotated[bool, Query(description="inputs are aligned 112x112 faces: skip detection")] = False,
        max_faces: Annotated[int | None, Query(ge=0, le=1000, description="at most this many faces per image (0 = all)")] = None,
        min_face_size: Annotated[float | None, Query(ge=0, description="minimum shorter box side, pixels")] = None,
        det_threshold: Annotated[float | None, Query(ge=0, le=1, description="detection score threshold, 0-1")] = None,
        return_landmarks: Annotated[bool, Query(description="include the 5 landmarks")] = True,
        select: Annotated[Literal["center", "largest", "score"] | None,
                          Query(description="keep one face per image: center, largest or score (default: all)")] = None,
    ) -> JSONResponse:
        """Score the quality of every face in one or more images (multipart field `images`, or JSON base64)."""
        if not service.ready:
            raise RequestError("models are still warming up", code="not_ready")
        t0 = time.perf_counter()
        opts = Options(aligned=aligned, max_faces=max_faces, min_face_size=min_face_size,
                       det_threshold=det_threshold, return_landmarks=return_landmarks, select=select)
        items, key, opts = await _read_images(request, opts, settings.max_images_per_request)
        results, timing = await service.score(items, opts)
        timing["total"] = round(1000 * (time.perf_counter() - t0), 3)
        q = service.pipeline.models()["quality"]
        body = {"model": {"name": q["name"], "version": q["version"], "provider": q["provider"]},
                "results": [r.to_dict(key=key, landmarks=opts.return_landmarks) for r in results],
                "timing_ms": timing}
        return JSONResponse(body)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models(service: ServiceDep) -> dict:
        """The detector and quality model in use: manifest data and execution provider."""
        return service.pipeline.models()

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(service: ServiceDep) -> JSONResponse:
        """Readiness: 200 once the models are loaded and a warm-up inference succeeded, else 503."""
        if not service.ready:
            raise RequestError("models are still warming up", code="not_ready")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", response_class=Response)
    async def metrics(request: Request, service: ServiceDep) -> Response:
        """Prometheus text format (API key required only with CRFIQA_METRICS_REQUIRE_KEY=true)."""
        if settings.metrics_require_key:
            require_key(request)
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _read_images(request: Request, opts: Options, limit: int) -> tuple[list[tuple[str, bytes | str]], str, Options]:
    """The request's images as (name, bytes-or-base64) pairs, the result key, and the effective options."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=limit + 1, max_fields=100)
        except CrfiqaError:
            raise
        except Exception as exc:  # starlette raises its own errors on malformed multipart bodies
            raise RequestError(f"malformed multipart body: {exc}", code="validation_error") from exc
        files = form.getlist("images")
        if not files:
            raise RequestError("images: at least one file is required in field 'images'", code="validation_error")
        if len(files) > limit:
            raise RequestError(f"{len(files)} images; the limit is {limit}", code="too_many_images")
        if not all(isinstance(f, UploadFile) for f in files):
            raise RequestError("images: every 'images' field must be a file upload", code="validation_error")
        items = [(f.filename or f"image{i}", await f.read()) for i, f in enumerate(files)]
        return items, "filename", opts
    if ctype == "application/json":
        body = await request.body()
        try:
            req = QualityRequest.model_validate_json(body)
        except ValidationError as exc:
            raise RequestError(_describe(exc.errors()), code="validation_error") from exc
        if len(req.images) > limit:
            raise RequestError(f"{len(req.images)} images; the limit is {limit}", code="too_many_images")
        merged = opts.model_copy(update={k: getattr(req, k) for k in Options.model_fields if k in req.model_fields_set})
        items = [(img.id if img.id is not None else f"image{i}", img.data) for i, img in enumerate(req.images)]
        return items, "id", merged
    raise RequestError(f"content type {ctype or '(none)'} not supported: use multipart/form-data or application/json",
                       code="unsupported_media_type")


class _BodyLimit:
    """Refuse bodies over ``max_bytes``: at once by Content-Length, or while streaming a chunked body."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = JSONResponse({"error": {"code": "body_too_large",
                                               "message": f"body over the limit of {self.max_bytes} bytes"}},
                                    status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise RequestError(f"body over the limit of {self.max_bytes} bytes", code="body_too_large")
            return message

        await self.app(scope, limited, send)


class _Observe:
    """Request id (X-Request-ID in and out), access log and request metrics for every HTTP request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
        token = request_id.set(rid)
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            service = getattr(scope["app"].state, "service", None) if "app" in scope else None
            if service is not None:
                service.metrics.requests.labels(endpoint, str(status["code"])).inc()
                service.metrics.request_duration.labels(endpoint).observe(elapsed)
            log.info("request", extra={"method": scope.get("method"), "path": path, "status": status["code"],
                                       "duration_ms": round(1000 * elapsed, 2)})
            request_id.reset(token)
