"""Request and response models; their field descriptions and examples are the OpenAPI documentation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

#: A 112x112 grey PNG, base64: the smallest valid aligned face for examples.
EXAMPLE_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAHAAAABwCAAAAADji6uXAAAASElEQVR42u3NMREAAAgEoNfkRreF5wAFqMmtjlAoFAqF"
               "QqFQKBQKhUKhUCgUCoVCoVAoFAqFQqFQKBQKhUKhUCgUCoVC4etwAYyiAWCrne1FAAAAAElFTkSuQmCC")


class Options(BaseModel):
    """Per-request processing options: query parameters (both request kinds) or JSON body fields (these win).

    The one place request options are declared: a new option is a new field here."""

    model_config = ConfigDict(extra="forbid")

    aligned: bool = Field(False, description="inputs are aligned 112x112 faces: skip detection (other sizes "
                                             "are refused with `not_aligned`)")
    max_faces: int | None = Field(None, ge=0, le=1000,
                                  description="keep at most this many faces per image, best first (0 = "
                                              "all, up to the server's CRFIQA_MAX_FACES_PER_IMAGE)")
    min_face_size: float | None = Field(None, ge=0, le=100_000,
                                        description="drop faces whose shorter box side is smaller, pixels")
    det_threshold: float | None = Field(None, ge=0.05, le=1.0, description="detection score threshold, 0.05-1 "
                                        "(lower thresholds only add noise: thousands of boxes on random pixels)")
    return_landmarks: bool = Field(True, description="include the 5 landmarks of each face")
    select: Literal["center", "largest", "score"] | None = Field(
        None, description="keep one face per image: box centre nearest the image centre, largest box, or "
                          "highest detection score (default: all faces)")
    components: bool = Field(False, description="add each face's quality components (pose, sharpness, "
                                                "exposure, ...; docs/components.md)")

    @field_validator("max_faces", mode="before")
    @classmethod
    def _integer(cls, v: object) -> object:
        """JSON Schema's integer: 2.0 is one, ``true`` is not (the JSON body is validated strictly)."""
        if isinstance(v, bool):
            raise ValueError("must be an integer, not a boolean")
        return int(v) if isinstance(v, float) and v.is_integer() else v


class ImageIn(BaseModel):
    """One image of a JSON request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    data: str = Field(..., description="the encoded image file (JPEG, PNG, WebP, BMP, TIFF, GIF, PGM), base64; "
                                       "data that is not base64 gives that image the error `invalid_base64`",
                      examples=[EXAMPLE_PNG])
    id: str | None = Field(None, max_length=256, description="caller's identifier, echoed as the result's `id` "
                                                             "(default `image<index>`)", examples=["face-1"])


class QualityRequest(Options):
    """JSON body of ``POST /v1/quality``: the images and, optionally, the options."""

    # Strict: JSON has types, so `false` is not a number (query strings are converted, the JSON body is not).
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"images": [{"data": EXAMPLE_PNG, "id": "face-1"}], "aligned": True}]})

    images: list[ImageIn] = Field(..., min_length=1, description="images to score (at most the server's "
                                                                 "CRFIQA_MAX_IMAGES_PER_REQUEST: `maxItems`)")

    @field_validator("images", mode="before")
    @classmethod
    def _count_first(cls, images: object, info: ValidationInfo) -> object:
        """Refuse more images than the context's ``max_images`` before validating any of them: a body of a
        million tiny entries would otherwise be validated whole (seconds, hundreds of MB) to be refused."""
        limit = (info.context or {}).get("max_images")
        if limit is not None and isinstance(images, list) and len(images) > limit:
            raise PydanticCustomError("too_many_images", "{n} images; the limit is {limit}",
                                      {"n": len(images), "limit": limit})
        return images


class ErrorOut(BaseModel):
    """A typed error: stable ``code`` and a message for people."""

    code: str = Field(..., description="stable machine-readable code, e.g. corrupt_image, too_many_pixels",
                      examples=["corrupt_image"])
    message: str = Field(..., description="what went wrong")


class ErrorResponse(BaseModel):
    """A whole-request error (401, 404, 405, 408, 413, 415, 422, 429, 503)."""

    error: ErrorOut


class QualityOut(BaseModel):
    """Quality of one face."""

    raw: float = Field(..., description="the quality model's output, unbounded; higher = more useful for recognition")
    score: float = Field(..., ge=0, le=100, description="raw mapped to 0-100 by the model's calibrated logistic")


class ComponentOut(BaseModel):
    """One quality component of a face (docs/components.md)."""

    value: float = Field(..., description="the native measure, in `unit`")
    unit: str = Field(..., description="px, deg, fraction, bits, ratio, index or grey levels")
    score: float | None = Field(None, ge=0, le=100, description="0-100, higher = better (absent where no "
                                                                "mapping is defined)")


class FaceOut(BaseModel):
    """One face."""

    bbox: list[float] = Field(..., min_length=4, max_length=4, description="x1, y1, x2, y2 in image pixels")
    det_score: float = Field(..., ge=0, le=1, description="detector confidence, 0-1 (1 in aligned mode)")
    landmarks: list[list[float]] | None = Field(
        None, description="5 points [x, y] in image pixels: left eye, right eye, nose, left and right mouth "
                          "corner (absent with return_landmarks=false)")
    quality: QualityOut = Field(..., description="the face's quality")
    components: dict[str, ComponentOut] | None = Field(None, description="quality components by name "
                                                                         "(with components=true)")


class ImageOut(BaseModel):
    """The result for one image: ``ok`` with its faces (maybe none), or ``error``."""

    id: str = Field(..., description="the image's name: its JSON `id`, or its multipart file name "
                                     "(default `image<index>`)")
    filename: str | None = Field(None, description="the uploaded file name (multipart requests only)")
    status: Literal["ok", "error"] = Field(..., description="`ok`: decoded and processed; `error`: see `error`")
    width: int = Field(..., ge=0, description="decoded image width, pixels (0 when it could not be decoded)")
    height: int = Field(..., ge=0, description="decoded image height, pixels (0 when it could not be decoded)")
    error: ErrorOut | None = Field(None, description="why this image has no result (status `error` only)")
    faces: list[FaceOut] = Field(default_factory=list, description="faces by detection score, best first")


class ModelOut(BaseModel):
    """A model in use."""

    name: str = Field(..., description="manifest name")
    version: str = Field(..., description="manifest version")
    provider: str = Field(..., description="ONNX Runtime execution provider running it")


class Timing(BaseModel):
    """Wall-clock milliseconds of this request's stages (not sums over threads)."""

    read: float = Field(..., ge=0, description="receiving and parsing the body")
    prepare: float = Field(..., ge=0, description="decode, detect and align of all images (in parallel)")
    quality: float = Field(..., ge=0, description="waiting for and running the batched quality model")
    total: float = Field(..., ge=0, description="the whole request")


class QualityResponse(BaseModel):
    """Response of ``POST /v1/quality``: one result per image, in request order."""

    model: ModelOut = Field(..., description="the quality model that scored the faces")
    results: list[ImageOut] = Field(..., description="one per input image, in order")
    timing_ms: Timing


class ModelInfo(BaseModel):
    """A model's manifest data and execution provider (more manifest fields may follow)."""

    model_config = ConfigDict(extra="allow")

    name: str
    role: Literal["detector", "quality", "recognition"]
    version: str
    provider: str = Field(..., description="ONNX Runtime execution provider running it")


class ModelsResponse(BaseModel):
    """Response of ``GET /v1/models``."""

    detector: ModelInfo
    quality: ModelInfo


class Health(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """Readiness: models loaded, warmed up, inference running."""

    status: Literal["ready"]
