"""Request and response models; their field descriptions are the OpenAPI documentation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    """Per-request processing options (query parameters for multipart, body fields for JSON)."""

    model_config = ConfigDict(extra="forbid")

    aligned: bool = Field(False, description="inputs are aligned 112x112 faces (others are resized): skip detection")
    max_faces: int | None = Field(None, ge=0, le=1000, description="keep at most this many faces per image, best first (0 = all)")
    min_face_size: float | None = Field(None, ge=0, le=100_000, description="drop faces whose shorter box side is smaller, pixels")
    det_threshold: float | None = Field(None, ge=0.0, le=1.0, description="detection score threshold, 0-1")
    return_landmarks: bool = Field(True, description="include the 5 landmarks of each face")
    select: Literal["center", "largest", "score"] | None = Field(
        None, description="keep one face per image: box centre nearest the image centre, largest box, or "
                          "highest detection score (default: all faces)")


class ImageIn(BaseModel):
    """One image of a JSON request."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(..., description="the encoded image file (JPEG, PNG, WebP, BMP, TIFF, GIF, PGM), base64")
    id: str | None = Field(None, max_length=256, description="caller's identifier, echoed in the result")


class QualityRequest(Options):
    """JSON body of ``POST /v1/quality``."""

    images: list[ImageIn] = Field(..., min_length=1, description="images to score")


class ErrorOut(BaseModel):
    """A typed error: stable ``code`` and a message for people."""

    code: str = Field(..., description="stable machine-readable code, e.g. corrupt_image, too_many_pixels")
    message: str = Field(..., description="what went wrong")


class QualityOut(BaseModel):
    """Quality of one face."""

    raw: float = Field(..., description="the quality model's output, unbounded; higher = more useful for recognition")
    score: float = Field(..., ge=0, le=100, description="raw mapped to 0-100 by the model's calibrated logistic")


class FaceOut(BaseModel):
    """One face."""

    bbox: list[float] = Field(..., min_length=4, max_length=4, description="x1, y1, x2, y2 in image pixels")
    det_score: float = Field(..., ge=0, le=1, description="detector confidence, 0-1 (1 in aligned mode)")
    landmarks: list[list[float]] | None = Field(
        None, description="5 points [x, y] in image pixels: left eye, right eye, nose, left and right mouth corner")
    quality: QualityOut


class ImageOut(BaseModel):
    """The result for one image: ``ok`` with its faces (maybe none), or ``error``."""

    id: str | None = Field(None, description="the image's id (JSON requests)")
    filename: str | None = Field(None, description="the uploaded file name (multipart requests)")
    status: Literal["ok", "error"]
    error: ErrorOut | None = None
    faces: list[FaceOut] = Field(default_factory=list, description="faces by detection score, best first")


class ModelOut(BaseModel):
    """A model in use."""

    name: str
    version: str
    provider: str = Field(..., description="ONNX Runtime execution provider running it")


class QualityResponse(BaseModel):
    """Response of ``POST /v1/quality``."""

    model: ModelOut
    results: list[ImageOut]
    timing_ms: dict[str, float] = Field(
        ..., description="milliseconds: decode, detect, align (summed over images), quality (batched), total")


class ErrorResponse(BaseModel):
    """A whole-request error (401, 413, 415, 422, 503)."""

    error: ErrorOut
