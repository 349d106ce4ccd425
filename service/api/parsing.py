"""Request parsing, in one place: the images of a multipart or JSON body and the effective options.

Pure functions where possible (``parse_json``, ``decode_data``) so they can be fuzzed without a server."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from crfiqa.service.api.errors import RequestError, describe
from crfiqa.service.api.schemas import EXAMPLE_PNG, Options, QualityRequest
from crfiqa.service.errors import CrfiqaError

MAX_FORM_FIELDS = 100

#: The OpenAPI ``requestBody`` of what ``read_request`` reads (``openapi_extra`` of a route that calls it):
#: ``QualityRequest`` is put into the components and ``maxItems`` set from the settings by ``openapi.build``.
BODY_DOC = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {
        "schema": {"type": "object", "required": ["images"], "properties": {"images": {
            "type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
            "description": "one or more image files (JPEG, PNG, WebP, BMP, TIFF, GIF, PGM); options are query "
                           "parameters"}}},
        "encoding": {"images": {"contentType": "application/octet-stream, image/*"}}},
    "application/json": {"schema": {"$ref": "#/components/schemas/QualityRequest"},
                         "example": {"images": [{"data": EXAMPLE_PNG, "id": "face-1"}], "aligned": True}},
}}}


@dataclass(frozen=True)
class Upload:
    """One image of a request: its result ``id``, the bytes or base64 text, the multipart file name, and
    the error that already stopped it (bad base64 found while parsing)."""

    id: str
    data: bytes | str
    filename: str | None = None
    error: CrfiqaError | None = None


@dataclass(frozen=True)
class Parsed:
    """A parsed request: its images and the options (body fields over query parameters)."""

    uploads: list[Upload]
    options: Options


def decode_data(data: bytes | str) -> bytes:
    """The bytes of an upload: multipart bytes as they are, JSON base64 text decoded (``invalid_base64``)."""
    if isinstance(data, bytes):
        return data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CrfiqaError("image data is not valid base64", code="invalid_base64") from exc


def _check_count(n: int, limit: int) -> None:
    if n > limit:
        raise RequestError(f"{n} images; the limit is {limit}", code="too_many_images")


def parse_json(body: bytes, query: Options, limit: int) -> Parsed:
    """A JSON body: validated ``QualityRequest``; the options it sets override the query's."""
    try:
        req = QualityRequest.model_validate_json(body, context={"max_images": limit})
    except ValidationError as exc:
        counted = [e for e in exc.errors() if e["type"] == "too_many_images"]
        if counted:
            raise RequestError(counted[0]["msg"], code="too_many_images") from exc
        raise RequestError(describe(exc.errors()), code="validation_error") from exc
    opts = query.model_copy(update={k: getattr(req, k) for k in Options.model_fields if k in req.model_fields_set})
    uploads = [Upload(img.id if img.id is not None else f"image{i}", img.data) for i, img in enumerate(req.images)]
    return Parsed(uploads, opts)


def parse_json_decoded(body: bytes, query: Options, limit: int) -> Parsed:
    """``parse_json`` plus the base64 decoding of every image: the whole CPU cost of a JSON body, in one call
    that a worker process can run (its result and errors pickle)."""
    parsed = parse_json(body, query, limit)
    uploads = []
    for u in parsed.uploads:
        try:
            uploads.append(Upload(u.id, decode_data(u.data)))
        except CrfiqaError as exc:
            uploads.append(Upload(u.id, b"", error=exc))
    return Parsed(uploads, parsed.options)


async def parse_multipart(request: Request, query: Options, limit: int) -> Parsed:
    """A multipart body: every ``images`` field must be a file; options come from the query."""
    try:
        form = await request.form(max_files=limit + 1, max_fields=MAX_FORM_FIELDS)
    except (CrfiqaError, ClientDisconnect):
        raise  # the body limit, raised while streaming; a client gone mid-upload (Observe ends it quietly)
    except Exception as exc:  # starlette raises its own errors on malformed multipart bodies
        if "Too many files" in str(exc):  # its max_files stops the read early: the same code as the count
            raise RequestError(f"more than {limit} file parts (images and any other file fields); the limit is "
                               f"{limit} images", code="too_many_images") from exc
        raise RequestError(f"malformed multipart body: {exc}", code="validation_error") from exc
    try:
        files = form.getlist("images")
        if not files:
            raise RequestError("images: at least one file is required in field 'images'", code="validation_error")
        _check_count(len(files), limit)
        uploads: list[Upload] = []
        for i, f in enumerate(files):
            if not isinstance(f, UploadFile):
                raise RequestError("images: every 'images' field must be a file upload", code="validation_error")
            name = f.filename or f"image{i}"
            uploads.append(Upload(name, await f.read(), filename=f.filename or None))
        return Parsed(uploads, query)
    finally:
        await form.close()


async def read_request(request: Request, query: Options, limit: int,
                       processes: Callable[[], Executor] | None, process_bytes: int) -> Parsed:
    """The request's images and options, by content type. A JSON body of ``process_bytes`` or more is parsed
    and base64-decoded in a worker process: pydantic and binascii hold the GIL, so a thread would still stall
    the event loop; a small one is parsed here, cheaper than any hand-off."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await parse_multipart(request, query, limit)
    if ctype == "application/json":
        body = await request.body()
        if processes is not None and 0 < process_bytes <= len(body):
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(processes(), parse_json_decoded, body, query, limit)
            except BrokenProcessPool as exc:  # killed (the OOM killer?) while parsing: the next call gets a new one
                raise RequestError("the JSON parsing process exited while parsing this body; retry",
                                   code="parser_unavailable", retry_after_s=1.0) from exc
        return parse_json(body, query, limit)
    raise RequestError(f"content type {ctype or '(none)'} not supported: use multipart/form-data or "
                       "application/json", code="unsupported_media_type")
