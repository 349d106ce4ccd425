"""Test helpers: locate ../shared, build small ONNX models of the quality contract, match detections."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from crfiqa.service.results import Detection

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CRFIQA_SHARED", REPO.parent / "shared"))
SHARED_MODELS = SHARED / "models"
SAMPLES = SHARED / "data" / "samples"
LFW = SHARED / "data" / "lfw"

#: Per-channel weights of the test quality model, in input channel order (R, G, B).
CHANNEL_WEIGHTS = np.array([1.0, -0.5, 0.25], dtype=np.float32)


def build_channel_quality_model(path: Path) -> Path:
    """An ONNX model of the quality contract whose output depends on channel order.

    quality = mean over pixels of sum_c w_c * x_c (x = the normalised input), embedding = per-channel means.
    """
    weight = numpy_helper.from_array(CHANNEL_WEIGHTS.reshape(1, 3, 1, 1), name="w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["embedding"], axis=1),
        helper.make_node("Conv", ["input", "w"], ["weighted"]),
        helper.make_node("GlobalAveragePool", ["weighted"], ["wgap"]),
        helper.make_node("Flatten", ["wgap"], ["quality"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "channel_quality",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def expected_channel_quality(rgb_crop: np.ndarray) -> float:
    """What ``build_channel_quality_model`` must output for an RGB uint8 crop under the contract."""
    x = (rgb_crop.astype(np.float64) - 127.5) / 127.5
    return float((x.mean(axis=(0, 1)) * CHANNEL_WEIGHTS).sum())


def lfw_dev_images(n: int) -> list[Path]:
    """The first ``n`` LFW dev images in a stable order."""
    return sorted((LFW / "images").rglob("*.jpg"))[:n]


def match_faces(ref: list[Detection], got: list[Detection]) -> list[float | None]:
    """For each reference face, the largest landmark coordinate difference (px) to its nearest detection
    (None: no detection within half the reference box width)."""
    out: list[float | None] = []
    for f in ref:
        d = [float(np.abs(g.landmarks - f.landmarks).max()) for g in got]
        out.append(min(d) if d and min(d) < 0.5 * (f.bbox[2] - f.bbox[0]) else None)
    return out


def hostile_images() -> dict[str, bytes]:
    """Malformed files on which Pillow raises untyped errors (not OSError/ValueError), by name: a DDS with
    no pixel-format flags (NotImplementedError when every plugin is tried) and a TIFF whose StripOffsets tag
    has the type ASCII (TypeError inside ``load``)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "DDS")
    dds = bytearray(buf.getvalue())
    dds[80:84] = bytes(4)  # DDS_PIXELFORMAT.dwFlags
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    tiff = bytearray(buf.getvalue())
    (ifd,) = struct.unpack("<I", tiff[4:8])
    (entries,) = struct.unpack("<H", tiff[ifd:ifd + 2])
    for k in range(entries):
        at = ifd + 2 + 12 * k
        if struct.unpack("<H", tiff[at:at + 2])[0] == 273:  # StripOffsets: LONG -> ASCII
            tiff[at + 2:at + 4] = struct.pack("<H", 2)
    return {"bad_flags.dds": bytes(dds), "ascii_strips.tif": bytes(tiff)}
