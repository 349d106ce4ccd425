"""``GET /v1/models``: the models in use."""

from __future__ import annotations

from fastapi import APIRouter

from crfiqa.service.api import errors
from crfiqa.service.api.deps import Authenticated, ServiceDep
from crfiqa.service.api.schemas import ModelsResponse

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelsResponse, responses=errors.responses(401, 429),
            dependencies=[Authenticated])
async def models(service: ServiceDep) -> ModelsResponse:
    """The detector and quality model in use: manifest data and execution provider."""
    return ModelsResponse.model_validate(service.pipeline.models())
