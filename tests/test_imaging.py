"""Decoding: every supported format, EXIF, odd pixel formats, and every error class."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crfiqa.service.errors import DecodeError, LimitError
from crfiqa.service.imaging import decode_image, list_images, mirror_paths, read_image
from tests.helpers import SAMPLES, hostile_images


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gradient() -> Image.Image:
    """A 64x48 RGB image with distinct channels (R varies with x, G with y, B constant)."""
    x = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    y = np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[:, None], (1, 64))
    return Image.fromarray(np.dstack([x, y, np.full_like(x, 40)]))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "JPEG", "GIF", "PPM"])
def test_formats_decode_to_rgb8(gradient: Image.Image, fmt: str) -> None:
    kw = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    img = decode_image(_encode(gradient, fmt, **kw))
    assert img.rgb.shape == (48, 64, 3) and img.rgb.dtype == np.uint8 and img.rgb.flags.c_contiguous
    tol = {"JPEG": 12, "GIF": 40}.get(fmt, 0)
    assert np.abs(img.rgb.astype(int) - np.asarray(gradient, dtype=int)).mean() <= tol
    # Channel order kept: red grows left to right, green top to bottom.
    assert img.rgb[24, -1, 0] > img.rgb[24, 0, 0] + 100 and img.rgb[-1, 32, 1] > img.rgb[0, 32, 1] + 100


def test_pgm_grayscale_becomes_three_channels() -> None:
    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    img = decode_image(_encode(gray, "PPM"))  # Pillow writes mode L as binary PGM (P5)
    assert img.rgb.shape == (16, 16, 3)
    assert np.array_equal(img.rgb[..., 0], img.rgb[..., 2]) and img.rgb[15, 15, 1] == 255


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue())
    assert tuple(img.rgb[4, 4]) == (255, 0, 0)


def test_sixteen_bit_scaled_not_clipped() -> None:
    arr = np.full((10, 10), 32768, dtype=np.uint16)
    img = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert img.rgb.shape == (10, 10, 3) and 126 <= int(img.rgb[0, 0, 0]) <= 129


def test_sixteen_bit_is_monotonic_whatever_the_content() -> None:
    """A 16-bit mode is scaled by its range, not by what the image holds: 255 and 256 are both near black
    (a content rule made 255 white and 256 black), 12-bit data in 16 bits stays dark."""
    decoded = [int(decode_image(_encode(Image.fromarray(np.full((4, 4), v, np.uint16)), "PNG")).rgb[0, 0, 0])
               for v in (0, 255, 256, 4095, 65535)]
    assert decoded == sorted(decoded) and decoded[0] == 0 and decoded[-1] == 255
    assert decoded[1] <= 2 and decoded[2] <= 2 and decoded[3] == 16


def test_sixteen_bit_decode_holds_no_float_copy() -> None:
    """16-bit pixels go to 8 bits by table lookup: at peak the arrays held are the 16-bit read and the output
    (a float32 copy of the photo doubled that peak)."""
    import tracemalloc

    arr = np.random.default_rng(0).integers(0, 65536, (1500, 1500)).astype(np.uint16)
    data = _encode(Image.fromarray(arr), "PNG")
    tracemalloc.start()
    try:
        img = decode_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    want = np.floor(arr.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert np.array_equal(img.rgb[..., 0], want) and np.array_equal(img.rgb[..., 2], want)
    assert peak < 1.6 * img.rgb.nbytes, peak / img.rgb.nbytes


@pytest.mark.parametrize("name", sorted(hostile_images()))
def test_hostile_files_are_typed_errors(name: str) -> None:
    """Pillow raises NotImplementedError, TypeError, ... on some malformed files: still a DecodeError."""
    with pytest.raises(DecodeError) as e:
        decode_image(hostile_images()[name])
    assert e.value.code in ("unsupported_format", "corrupt_image")


def test_valid_file_of_an_unsupported_format_is_refused() -> None:
    with pytest.raises(DecodeError) as e:
        decode_image(_encode(Image.new("RGB", (8, 8)), "DDS"))
    assert e.value.code == "unsupported_format"


def test_alpha_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under full transparency must not leak through
    img = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(img.rgb[0, 0]) == (255, 255, 255)


def test_exif_orientation_applied(gradient: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img = decode_image(_encode(gradient, "JPEG", exif=exif, quality=95))
    assert img.rgb.shape == (64, 48, 3)
    # Clockwise on display: the stored image's bottom-left corner becomes the top-left one.
    expected = np.rot90(np.asarray(gradient), k=-1).astype(int)
    assert np.abs(img.rgb.astype(int) - expected).mean() < 3
    assert np.abs(img.rgb.astype(int) - np.rot90(np.asarray(gradient), k=1)).mean() > 30  # the wrong way fails


def test_empty_input() -> None:
    with pytest.raises(DecodeError) as e:
        decode_image(b"")
    assert e.value.code == "empty_input"


def test_garbage_input() -> None:
    with pytest.raises(DecodeError) as e:
        decode_image(b"this is not an image at all" * 10)
    assert e.value.code == "unsupported_format"


def test_truncated_jpeg_is_an_error() -> None:
    data = (SAMPLES / "t1.jpg").read_bytes()
    with pytest.raises(DecodeError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.code == "corrupt_image"


def test_byte_limit() -> None:
    with pytest.raises(LimitError) as e:
        decode_image((SAMPLES / "t1.jpg").read_bytes(), max_bytes=1000)
    assert e.value.code == "too_many_bytes"


def test_pixel_limit_stops_decompression_bomb() -> None:
    bomb = _encode(Image.new("L", (12000, 12000)), "PNG")  # ~140 kB of zeros, 144 Mpx
    assert len(bomb) < 1_000_000
    with pytest.raises(LimitError) as e:
        decode_image(bomb, max_pixels=40_000_000)
    assert e.value.code == "too_many_pixels"


def test_unreadable_path(tmp_path) -> None:
    with pytest.raises(DecodeError) as e:
        read_image(tmp_path / "missing.jpg")
    assert e.value.code == "unreadable"


def test_list_images_recurses_and_filters(tmp_path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/x.jpg", "a/b/y.PNG", "a/notes.txt", "z.webp"]:
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images([tmp_path])]
    assert found == ["a/b/y.PNG", "a/x.jpg", "z.webp"]


def test_list_images_names_each_file_once_in_argument_order(tmp_path, monkeypatch) -> None:
    """A file named relatively and absolutely, or through d/../d, is listed once; ``link/../a.jpg`` where
    ``link`` points elsewhere is another file (the system resolves ".." after the link) and is kept."""
    (tmp_path / "d").mkdir()
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    for name in ["d/b.jpg", "d/a.jpg", "c.jpg", "a.jpg", "elsewhere/a.jpg"]:
        (tmp_path / name).write_bytes(name.encode())
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "sub", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    found = list_images(["c.jpg", tmp_path / "d", "d/../d/a.jpg", tmp_path / "c.jpg", "a.jpg", "link/../a.jpg"])
    assert [str(p) for p in found] == ["c.jpg", str(tmp_path / "d" / "a.jpg"), str(tmp_path / "d" / "b.jpg"),
                                       "a.jpg", "link/../a.jpg"]
    assert Path("link/../a.jpg").read_bytes() == b"elsewhere/a.jpg"


def test_mirror_paths_never_give_two_files_one_name(tmp_path) -> None:
    names = ["a/x.jpg", "a/x.png", "a/x.jpg.png", "a/x.jpg~2", "b/y.jpg", "b/y.jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    out = [p.as_posix() for p in mirror_paths([tmp_path / n for n in names])]
    assert out == ["a/x.jpg", "a/x.png", "a/x.jpg~2", "a/x.jpg~2~2", "b/y", "b/y"]


def test_linked_identity_folders_are_followed_once(tmp_path) -> None:
    """A dataset of symlinked identity folders (``Path.rglob`` skips them) is walked, a link loop ends, and
    every listing (images, the all-vs-all protocol, best-shot inputs, degrade) sees the same files."""
    from crfiqa.evaluation.degrade import degrade_dataset
    from crfiqa.evaluation.protocols import all_vs_all
    from crfiqa.service.bestshot import expand

    store = tmp_path / "store" / "bob"
    store.mkdir(parents=True)
    for name in ["1.jpg", "2.jpg"]:
        (store / name).write_bytes((SAMPLES / "t1.jpg").read_bytes())
    src = tmp_path / "src"
    (src / "ann").mkdir(parents=True)
    (src / "ann" / "a.jpg").write_bytes((SAMPLES / "t1.jpg").read_bytes())
    (src / "bob").symlink_to(store, target_is_directory=True)
    (src / "ann" / "loop").symlink_to(src, target_is_directory=True)  # a cycle: entered once
    want = ["ann/a.jpg", "bob/1.jpg", "bob/2.jpg"]
    assert [p.relative_to(src).as_posix() for p in list_images([src])] == want
    proto = all_vs_all(src)
    assert proto.names == want and proto.identities == ["ann", "bob", "bob"] and int(proto.genuine.sum()) == 1
    assert [Path(path).relative_to(src).as_posix() for path, _, _ in expand([src])] == want
    degrade_dataset(src, tmp_path / "out", seed=1, fraction=0.0)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.jpg")) == want
