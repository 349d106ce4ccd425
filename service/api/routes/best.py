"""``POST /v1/best``: group the faces of several images into identities; each identity's best face.

The images go through the same stages as ``POST /v1/quality`` (``Service.score``: prepare in the worker
threads, the batched quality model, finish) with components; the identity embeddings come from the
recognition adapter on the same aligned crops, and ``bestshot.group`` forms the identities."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from crfiqa.service.api import errors
from crfiqa.service.api.deps import Authenticated, ServiceDep
from crfiqa.service.api.parsing import BODY_DOC, read_request
from crfiqa.service.api.routes.quality import image_out
from crfiqa.service.api.schemas import ComponentOut, ImageOut, ModelOut, Options, QualityOut
from crfiqa.service.bestshot import (
    DEFAULT_EMBEDDER,
    Identity,
    default_threshold,
    embed,
    group,
    unembedded,
)

router = APIRouter(tags=["best"])


class ShotOut(BaseModel):
    """One face of one image."""

    id: str = Field(..., description="the image's id (as in `POST /v1/quality` results)")
    image: int = Field(..., ge=0, description="the image's position in the request (ids may repeat: "
                                             "browsers send every file as `blob`)")
    face: int = Field(..., ge=0, description="index of the face in that image's faces")
    bbox: list[float] = Field(..., min_length=4, max_length=4, description="x1, y1, x2, y2 in image pixels")
    quality: QualityOut
    components: dict[str, ComponentOut] | None = Field(None, description="the face's quality components")


class IdentityOut(BaseModel):
    """One person: how many faces, the best one and the runner-up."""

    identity: int = Field(..., ge=0, description="index, identities ordered by count")
    count: int = Field(..., ge=1, description="faces of this identity over all images")
    best: ShotOut
    runner_up: ShotOut | None = Field(None, description="the second-best face (absent when count is 1)")


class EmbedderOut(BaseModel):
    """The identity embeddings used."""

    name: str
    threshold: float = Field(..., description="cosine similarity at which a face joins an identity")


class BestResponse(BaseModel):
    """Response of ``POST /v1/best``."""

    model: ModelOut = Field(..., description="the quality model that scored the faces")
    embedder: EmbedderOut
    identities: list[IdentityOut] = Field(..., description="most faces first")
    errors: list[ImageOut] = Field(default_factory=list, description="images that could not be processed")
    timing_ms: float = Field(..., ge=0, description="wall-clock milliseconds of the whole request")


def _identity(ident: Identity, k: int, position: dict[int, int]) -> dict:
    """An identity's JSON with each shot's image position."""
    out = ident.to_dict(k, key="id")
    for role, shot in zip(("best", "runner_up"), ident.shots):
        out[role]["image"] = position[id(shot)]
    return out


@router.post("/v1/best", response_model=BestResponse, response_model_exclude_none=True,
             responses=errors.responses(401, 408, 413, 415, 422, 429, 503), openapi_extra=BODY_DOC,
             dependencies=[Authenticated])
async def best(request: Request, service: ServiceDep, query: Annotated[Options, Query()]) -> BestResponse:
    """Group the faces of several images (a burst, frames of a video) into identities by w600k_mbf embedding
    similarity and return each identity's best face by quality, with its components and the runner-up. The
    body is that of `POST /v1/quality`; a bad image is listed in `errors`, the others are used."""
    t0 = time.perf_counter()
    service.check_ready()
    parsed = await read_request(request, query, service.settings.max_images_per_request, service.processes,
                                service.settings.json_process_bytes)
    loop = asyncio.get_running_loop()
    embedder = await loop.run_in_executor(service.workers, service.embedder)  # before scoring: it may be missing
    opts = parsed.options.model_copy(update={"components": True})
    scored = await service.score(parsed.uploads, opts)
    pending, position = [], {}  # position: id(shot) -> the image's index in the request
    for i, (r, p) in enumerate(zip(scored.results, scored.prepared)):
        if r.ok:
            for pair in unembedded(r, p, r.source):
                pending.append(pair)
                position[id(pair[0])] = i
    shots = await loop.run_in_executor(service.workers, lambda: embed(embedder, pending))
    threshold = default_threshold(DEFAULT_EMBEDDER)
    identities = group(shots, threshold)
    q = service.pipeline.models()["quality"]
    return BestResponse(
        model=ModelOut(name=q["name"], version=q["version"], provider=q["provider"]),
        embedder=EmbedderOut(name=DEFAULT_EMBEDDER, threshold=threshold),
        identities=[IdentityOut.model_validate(_identity(ident, k, position)) for k, ident in enumerate(identities)],
        errors=[image_out(u, r, opts.return_landmarks) for u, r in zip(parsed.uploads, scored.results) if not r.ok],
        timing_ms=round(1000.0 * (time.perf_counter() - t0), 3))
