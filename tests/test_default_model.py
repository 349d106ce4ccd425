"""The shipped default quality model: present, verified, the manifest default, and it ranks degradation."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from crfiqa.service.imaging import read_image
from crfiqa.service.pipeline import Options
from crfiqa.service.registry import PACKAGED_DIR, Manifest, resolve, sha256_file
from tests.helpers import lfw_dev_images


def test_default_model_is_packaged_and_verified() -> None:
    manifest = Manifest.load()
    name = manifest.defaults["quality"]
    entry = manifest.get(name, "quality")
    path, _ = resolve(name, "quality", manifest)
    assert path == PACKAGED_DIR / entry.file and sha256_file(path) == entry.sha256
    assert entry.size == path.stat().st_size
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert {o.name for o in session.get_outputs()} == {"quality", "embedding"}
    # The shipped graph is the optimised export: PReLU kept, BatchNorm folded (as fast as its source).
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "PRelu" in ops and not ops & {"BatchNormalization", "Where", "GreaterOrEqual"}, ops


def test_sharp_faces_beat_their_blurred_downscaled_copies(pipeline) -> None:
    """On dev images (identities never trained on), each sharp face outscores its degraded copy."""
    paths = lfw_dev_images(40)[::8]
    crops = np.concatenate([p.crops[:1] for _, p in pipeline.run(paths, Options(select="center"), score=False)])
    degraded = []
    for crop in crops:
        small = cv2.resize(cv2.GaussianBlur(crop, (0, 0), 1.5), (20, 20), interpolation=cv2.INTER_AREA)
        degraded.append(cv2.resize(small, (112, 112), interpolation=cv2.INTER_LINEAR))
    sharp = pipeline.score(crops)
    blurred = pipeline.score(np.stack(degraded))
    assert len(sharp) == 5
    assert (sharp > blurred).all(), list(zip(sharp, blurred))


def test_default_model_scores_a_dev_image_out_of_the_box(pipeline) -> None:
    (result, prepared), = pipeline.run([lfw_dev_images(1)[0]])
    assert result.ok and result.faces
    # Raw = the shipped graph on this crop, normalised here by hand; score = the manifest's logistic.
    entry = Manifest.load().get(pipeline.quality_name, "quality")
    blob = ((prepared.crops[:1].astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)
    session = ort.InferenceSession(str(PACKAGED_DIR / entry.file), providers=["CPUExecutionProvider"])
    raw = float(session.run(["quality"], {"input": blob})[0][0, 0])
    face = result.faces[0].quality
    assert face.raw == pytest.approx(raw, abs=1e-5)
    cal = entry.calibration
    assert face.score == pytest.approx(100 / (1 + np.exp(-(raw - cal.centre) / cal.scale)), abs=1e-3)
    assert pipeline.quality_name == Manifest.load().defaults["quality"]
    assert read_image(lfw_dev_images(1)[0]).rgb.shape == (250, 250, 3)
