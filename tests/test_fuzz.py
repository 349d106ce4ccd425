"""Bounded property-based fuzzing (hypothesis) of the image decoder and the request parsing: any input gives
a value or a typed error (CrfiqaError with a known code), never another exception."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from crfiqa.service.api.errors import STATUS, RequestError
from crfiqa.service.api.parsing import decode_data, parse_json, parse_multipart
from crfiqa.service.api.schemas import Options
from crfiqa.service.errors import CrfiqaError
from crfiqa.service.imaging import decode_image
from tests.helpers import SAMPLES

FUZZ = settings(max_examples=150, deadline=None, database=None,  # no .hypothesis/ left in the checkout
                suppress_health_check=[HealthCheck.too_slow])
SEEDS = [(SAMPLES / name).read_bytes() for name in ("Tom_Hanks_54745.png", "t1.jpg")]
MAX_PIXELS = 4_000_000
DECODE_CODES = {"empty_input", "too_many_bytes", "too_many_pixels", "unsupported_format", "corrupt_image"}
LIMIT = 4


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A real PNG or JPEG, truncated, with bytes overwritten, inserted or its header kept and body replaced."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(max_size=64))
    return bytes(data)


def check_decoded(data: bytes) -> None:
    try:
        image = decode_image(data, max_bytes=2_000_000, max_pixels=MAX_PIXELS)
    except CrfiqaError as exc:
        assert exc.code in DECODE_CODES, exc.code
        return
    assert image.rgb.dtype == np.uint8 and image.rgb.shape == (image.height, image.width, 3)
    assert 0 < image.width * image.height <= MAX_PIXELS and image.rgb.flags.c_contiguous


@FUZZ
@given(st.binary(max_size=4096))
def test_decoder_on_random_bytes(data: bytes) -> None:
    check_decoded(data)


@FUZZ
@given(mutated_images())
def test_decoder_on_mutated_images(data: bytes) -> None:
    check_decoded(data)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                         max_size=5), max_leaves=20)
image_items = st.fixed_dictionaries({"data": st.text(max_size=40) | st.just(base64.b64encode(SEEDS[0]).decode())},
                                    optional={"id": st.text(max_size=300) | st.integers()})
requests = st.fixed_dictionaries({"images": st.lists(image_items, max_size=LIMIT + 2)},
                                 optional={k: json_values for k in Options.model_fields})


def check_parsed_json(body: bytes) -> None:
    try:
        parsed = parse_json(body, Options(), LIMIT)
    except RequestError as exc:
        assert exc.code in ("validation_error", "too_many_images") and STATUS[exc.code] == 422
        return
    assert 1 <= len(parsed.uploads) <= LIMIT
    for upload in parsed.uploads:
        assert isinstance(upload.id, str) and len(upload.id) <= 256
        try:
            assert isinstance(decode_data(upload.data), bytes)
        except CrfiqaError as exc:
            assert exc.code == "invalid_base64"


@FUZZ
@given(st.binary(max_size=512))
def test_json_parsing_on_random_bytes(body: bytes) -> None:
    check_parsed_json(body)


@FUZZ
@given(requests | json_values)
def test_json_parsing_on_request_like_documents(doc: object) -> None:
    check_parsed_json(json.dumps(doc).encode())


def multipart_request(body: bytes, boundary: str) -> Request:
    """A real Starlette request over ``body`` (the ASGI receive channel yields it in two chunks)."""
    chunks = [body[: len(body) // 2], body[len(body) // 2:]]

    async def receive() -> dict:
        return {"type": "http.request", "body": chunks.pop(0) if chunks else b"", "more_body": bool(chunks)}

    scope = {"type": "http", "method": "POST", "path": "/v1/quality", "headers": [
        (b"content-type", f"multipart/form-data; boundary={boundary}".encode())], "query_string": b""}
    return Request(scope, receive)


@st.composite
def multipart_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """Well-formed, half-formed and garbage multipart bodies."""
    boundary = draw(st.sampled_from(["b0und", "x" * 70, "a-b_c"]))
    parts = []
    for _ in range(draw(st.integers(0, LIMIT + 2))):
        name = draw(st.sampled_from(["images", "other", 'im"ages', ""]))
        filename = draw(st.none() | st.text(max_size=12))
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        payload = draw(st.binary(max_size=64) | st.sampled_from(SEEDS[:1]))
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + payload + b"\r\n")
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        i = draw(st.integers(0, len(body)))
        body = body[:i] + draw(st.binary(max_size=32)) + body[i:]
    return body, boundary


@FUZZ
@given(multipart_bodies())
def test_multipart_parsing(case: tuple[bytes, str]) -> None:
    body, boundary = case
    try:
        parsed = asyncio.run(parse_multipart(multipart_request(body, boundary), Options(), LIMIT))
    except RequestError as exc:
        assert exc.code in ("validation_error", "too_many_images"), exc.code
        return
    assert 1 <= len(parsed.uploads) <= LIMIT
    assert all(isinstance(u.data, bytes) and u.id for u in parsed.uploads)
