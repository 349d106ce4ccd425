"""The composition root: ``create_app(settings)`` wires the Service, middlewares, error handlers and routers;
models load in ``lifespan``, warm-up runs in the background, then the service is ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from crfiqa.service.api import errors, openapi
from crfiqa.service.api.middleware import BodyLimit, InFlightLimit, Observe
from crfiqa.service.api.routes import ROUTERS
from crfiqa.service.api.service import Service
from crfiqa.service.errors import CrfiqaError
from crfiqa.service.settings import Settings

log = logging.getLogger("crfiqa.api")
DESCRIPTION = ("Face image quality assessment (CR-FIQA): quality of every face in an image, as its utility to "
               "face recognition. Whole-request errors are `{\"error\": {\"code\", \"message\"}}`; a bad image "
               "is an `error` result inside a 200 response.")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            service = Service(settings)
            app.state.service = service
            await loop.run_in_executor(None, service.load)  # fails fast on a bad model or keys file
        except CrfiqaError as exc:
            log.error("startup failed: %s: %s", exc.code, exc.message)
            raise
        service.batcher.start()
        tasks = [loop.create_task(service.warm()), loop.create_task(service.watch())]
        with contextlib.suppress(NotImplementedError, RuntimeError):  # SIGHUP: re-read the keys file
            loop.add_signal_handler(signal.SIGHUP, service.keys.reload)
        log.info("models loaded", extra={"detector": service.pipeline.detector_name,
                                         "quality": service.pipeline.quality_name})
        yield
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        for task in tasks:
            task.cancel()
        await service.batcher.stop(timeout_s=settings.inference_timeout_s)  # a stuck batch: give up, answered
        service.close()
        log.info("stopped")

    app = FastAPI(title="crfiqa", version=_version(), lifespan=lifespan, description=DESCRIPTION)
    # Added innermost first: Observe sees every response (preflights and the limits' refusals included); CORS
    # wraps the in-flight limit, so a browser can read an `overloaded` 503's Retry-After.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       min_rate=settings.body_min_rate, grace_s=settings.body_grace_s)
    app.add_middleware(InFlightLimit, limit=settings.limit_concurrency)
    if settings.cors_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_list, allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "Retry-After"])
    app.add_middleware(Observe)
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    keys_enabled = bool(settings.key_list) or settings.api_keys_file is not None
    app.openapi = lambda: openapi.build(app, settings, keys_enabled)  # type: ignore[method-assign]
    return app


def _version() -> str:
    from crfiqa import __version__

    return __version__
