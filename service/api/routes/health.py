"""Probes and scrapes: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from crfiqa.service.api import errors
from crfiqa.service.api.deps import ServiceDep, authenticate_metrics
from crfiqa.service.api.schemas import Health, Readiness

router = APIRouter(tags=["operations"])
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """Liveness: the process answers (never refused by the in-flight limit)."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses=errors.responses(503))
async def readyz(service: ServiceDep) -> Readiness:
    """Readiness: 200 once the models are loaded and warmed up and while inference is not stalled, else 503."""
    service.check_ready()
    return Readiness(status="ready")


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(authenticate_metrics)],
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}, **errors.responses(401)})
async def metrics(service: ServiceDep) -> PlainTextResponse:
    """Prometheus text format (an API key is required only with CRFIQA_METRICS_REQUIRE_KEY=true)."""
    return PlainTextResponse(service.metrics.render(), media_type=PROMETHEUS_TEXT)
