"""``POST /v1/quality``: the quality of every face in one or more images."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from crfiqa.service.api import errors
from crfiqa.service.api.deps import Authenticated, ServiceDep
from crfiqa.service.api.parsing import BODY_DOC, Upload, read_request
from crfiqa.service.api.schemas import (
    ErrorOut,
    FaceOut,
    ImageOut,
    ModelOut,
    Options,
    QualityResponse,
    Timing,
)
from crfiqa.service.results import ImageResult

router = APIRouter(tags=["quality"])

@router.post("/v1/quality", response_model=QualityResponse, response_model_exclude_none=True,
             responses=errors.responses(401, 408, 413, 415, 422, 429, 503), openapi_extra=BODY_DOC,
             dependencies=[Authenticated])
async def quality(request: Request, service: ServiceDep, query: Annotated[Options, Query()]) -> QualityResponse:
    """Score the quality of every face in one or more images: multipart field `images` (options as query
    parameters), or a JSON body with base64 images (its option fields override the query's). A bad image
    is an `error` result; the others are scored."""
    t0 = time.perf_counter()
    service.check_ready()
    settings = service.settings
    parsed = await read_request(request, query, settings.max_images_per_request, service.processes,
                                settings.json_process_bytes)
    t1 = time.perf_counter()
    scored = await service.score(parsed.uploads, parsed.options)
    q = service.pipeline.models()["quality"]
    ms = 1000.0
    return QualityResponse(
        model=ModelOut(name=q["name"], version=q["version"], provider=q["provider"]),
        results=[image_out(u, r, parsed.options.return_landmarks) for u, r in zip(parsed.uploads, scored.results)],
        timing_ms=Timing(read=round(ms * (t1 - t0), 3), prepare=round(ms * scored.prepare_s, 3),
                         quality=round(ms * scored.quality_s, 3), total=round(ms * (time.perf_counter() - t0), 3)))


def image_out(upload: Upload, result: ImageResult, landmarks: bool) -> ImageOut:
    """The typed result of one image (faces in the same JSON form as ``crfiqa score``)."""
    d: dict[str, Any] = result.to_dict(key="id", landmarks=landmarks)
    return ImageOut(id=upload.id, filename=upload.filename, status=d["status"], width=result.width,
                    height=result.height, error=ErrorOut(**d["error"]) if "error" in d else None,
                    faces=[FaceOut.model_validate(f) for f in d["faces"]])
