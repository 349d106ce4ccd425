"""Decode image bytes of any supported format into an 8-bit RGB array, with limits and typed errors.

Pillow is used rather than ``cv2.imdecode`` because OpenCV half-decodes a truncated JPEG without an
error, ignores EXIF orientation in ``imdecode`` and reads no GIF; Pillow raises on all three.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from crfiqa.service.errors import CrfiqaError, DecodeError, LimitError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm", ".pbm", ".pnm"}
)
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM", "MPO"})
#: The Pillow openers tried on input bytes: MPO (multi-picture JPEG) has none of its own, JPEG's opens it.
_OPENERS = sorted(SUPPORTED_FORMATS - {"MPO"})
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class DecodedImage:
    """An image ready for detection: ``rgb`` is HxWx3 uint8, C-contiguous, EXIF orientation applied."""

    rgb: np.ndarray
    format: str

    @property
    def height(self) -> int:
        """Height in pixels."""
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """Width in pixels."""
        return int(self.rgb.shape[1])


def decode_image(
    data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode ``data`` into RGB uint8, raising ``DecodeError``/``LimitError`` with a stable code."""
    if not data:
        raise DecodeError("empty input: 0 bytes", code="empty_input")
    if len(data) > max_bytes:
        raise LimitError(f"input is {len(data)} bytes, over the limit of {max_bytes}", code="too_many_bytes")
    try:
        with warnings.catch_warnings():
            # The pixel limit below is ours; Pillow's bomb warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only the supported formats' parsers see the bytes: Pillow otherwise tries every plugin it has,
            # and a malformed DDS, AVIF or SPIDER file raises NotImplementedError, RuntimeError, ...
            image = Image.open(io.BytesIO(data), formats=_OPENERS)
    except Image.DecompressionBombError as exc:
        raise LimitError(str(exc), code="too_many_pixels") from exc
    except MemoryError:
        raise
    except Exception as exc:  # a parser meeting hostile bytes may raise any type: all mean "not an image"
        raise DecodeError("not a decodable image (unknown or unsupported format)", code="unsupported_format") from exc
    with image:
        if image.format not in SUPPORTED_FORMATS:
            raise DecodeError(f"unsupported image format {image.format}", code="unsupported_format")
        if image.width * image.height > max_pixels:
            raise LimitError(
                f"image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                f"over the limit of {max_pixels}",
                code="too_many_pixels",
            )
        if image.width == 0 or image.height == 0:
            raise DecodeError("image has no pixels", code="corrupt_image")
        try:
            image.load()  # GIF/TIFF/WebP animations: the first frame is the one loaded.
            fmt = image.format
            ImageOps.exif_transpose(image, in_place=True)  # in place: a copy would be a third full-size buffer
            rgb = _to_rgb8(image)
        except MemoryError:
            raise
        except Exception as exc:  # e.g. TypeError from a TIFF whose StripOffsets tag has the type ASCII
            raise DecodeError(f"corrupt or truncated {image.format} image: {exc}", code="corrupt_image") from exc
    return DecodedImage(rgb=rgb, format=fmt or "")


def read_image(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode a file; a missing or unreadable file is a ``DecodeError`` (code ``unreadable``)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise LimitError(f"{path} is {size} bytes, over the limit of {max_bytes}", code="too_many_bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise DecodeError(f"cannot read {path}: {exc.strerror or exc}", code="unreadable") from exc
    return decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)


#: 16-bit value -> 8-bit value, rounded: (v * 255 / 65535) to the nearest integer.
_SIXTEEN_BIT = np.floor(np.arange(65536, dtype=np.float64) * (255.0 / 65535.0) + 0.5).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """HxW uint8 -> HxWx3 (contiguous)."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """Normalise any Pillow mode (grayscale, palette, 16-bit, alpha, CMYK) to HxWx3 uint8 RGB."""
    if image.mode.startswith("I;16"):
        # Pillow's own convert("L") clips 16-bit values at 255; scale the full range instead. A 16-bit mode
        # says its range (0-65535, so the mapping is monotonic whatever the content). A table lookup reads
        # the pixels once into 8 bits, without a float copy of the photo.
        return _gray_to_rgb(_SIXTEEN_BIT[np.asarray(image)])
    if image.mode in ("I", "F"):
        # 32-bit "I" and "F" do not say their range: read as 8-bit when they fit, as 16-bit otherwise, "F" in
        # 0-1 as unit floats.
        arr = np.array(image, dtype=np.float32)  # a writable copy: scaled in place below
        peak = arr.max(initial=0)
        top = 1.0 if image.mode == "F" and peak <= 1.0 else 65535.0 if peak > 255 else 255.0
        arr *= 255.0 / top
        arr += 0.5
        return _gray_to_rgb(np.clip(arr, 0, 255, out=arr).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels hold arbitrary colours: composite onto white rather than expose them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def is_utf8_name(name: str) -> bool:
    """Whether a file name is valid UTF-8 (Python keeps the bytes of one that is not as lone surrogates,
    which OpenCV crashes on and Arrow refuses)."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def write_image(path: Path, rgb: np.ndarray, params: Sequence[int] = ()) -> None:
    """Encode an RGB uint8 image by ``path``'s suffix and write it (folders made); ``CrfiqaError`` when it
    cannot be. Encoded in memory and written by Python: ``cv2.imwrite`` returns False unchecked, and
    crashes the process (SIGSEGV) on a file name that is not valid UTF-8."""
    import cv2

    ok, encoded = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(params))
    if not ok:
        raise CrfiqaError(f"{path}: OpenCV cannot encode a {rgb.shape[1]}x{rgb.shape[0]} image as "
                          f"{path.suffix}", code="write_error")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded.tobytes())
    except OSError as exc:
        raise CrfiqaError(f"cannot write {path}: {exc.strerror or exc}", code="write_error") from exc


def walk_files(root: str | Path) -> list[Path]:
    """Every file below ``root``, sorted, following symlinked folders (a dataset of linked identity folders is
    common; ``Path.rglob`` skips them silently) and entering each real folder once (a link loop ends)."""
    found: list[Path] = []
    entered: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in entered:
            dirs[:] = []
            continue
        entered.add(real)
        found += [Path(folder, f) for f in files if os.path.isfile(os.path.join(folder, f))]
    return sorted(found)


def list_images(paths: Iterable[str | Path], extensions: Collection[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Expand files and directories (recursively, ``extensions`` only; named files whatever their suffix) into
    a list in argument order, each folder sorted, each file once (``a.jpg a.jpg``, ``dir dir/a.jpg``)."""
    out: list[Path] = []
    seen: set[str] = set()
    for p in map(Path, paths):
        found = [q for q in walk_files(p) if q.suffix.lower() in extensions] if p.is_dir() else [p]
        for q in found:
            # a.jpg, ./a.jpg and d/../a.jpg are one file (the folder resolved, so ".." through a link goes where
            # the system goes); two links to one file stay two names, as listed.
            key = os.path.join(os.path.realpath(q.parent), q.name)
            if key not in seen:
                seen.add(key)
                out.append(q)
    return out


def mirror_paths(paths: list[Path]) -> list[Path]:
    """Relative output paths that keep inputs apart: each input's path below the inputs' common folder,
    without its suffix (``a/img.jpg``, ``b/img.png`` -> ``a/img``, ``b/img``); two inputs that would still
    meet (``img.jpg``, ``img.png``) keep their suffix in the name (``img.jpg``, ``img.png``)."""
    if not paths:
        return []
    # Names follow the paths as given (a symlinked identity folder keeps its own name); resolve() only tells
    # the same file named twice.
    absolute = [Path(os.path.abspath(p)) for p in paths]
    real = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([p.parent for p in absolute]))
    rel = [p.relative_to(common) for p in absolute]
    stems = [r.with_suffix("") for r in rel]
    counts = Counter(stem for stem, _ in set(zip(stems, real)))  # distinct files: one named twice is one
    named = [s if counts[s] == 1 else r for s, r in zip(stems, rel)]
    # A kept suffix can still meet another input's stem (x.jpg, x.png and x.jpg.png): number the later ones.
    # The same file named twice keeps one name (its outputs are the same).
    taken: dict[Path, Path] = {}
    out = []
    for path, name in zip(real, named):
        candidate, k = name, 1
        while taken.get(candidate, path) != path:
            k += 1
            candidate = name.with_name(f"{name.name}~{k}")
        taken[candidate] = path
        out.append(candidate)
    return out
