"""Alignment: the similarity transform, and parity with insightface's detector + norm_crop on LFW."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from crfiqa.service.align import ARCFACE_TEMPLATE, align_face, as_aligned, similarity_transform
from crfiqa.service.detect import DetectorSettings
from crfiqa.service.imaging import read_image
from tests.helpers import SHARED_MODELS, lfw_dev_images


def test_similarity_recovers_known_transform() -> None:
    angle, scale, t = 0.3, 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE
    dst = (scale * rot @ src.T).T + t
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-9) and np.allclose(m[:, 2], t, atol=1e-9)


def test_template_maps_to_itself() -> None:
    m = similarity_transform(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE)
    assert np.allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_degenerate_landmarks_raise() -> None:
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), ARCFACE_TEMPLATE)


def test_aligned_crop_puts_landmarks_on_template() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    landmarks = ARCFACE_TEMPLATE * 1.9 + [120, 60]
    crop = align_face(image, landmarks)
    assert crop.shape == (112, 112, 3)
    # The inverse mapping of a template point lands on the matching image landmark.
    m = similarity_transform(landmarks, ARCFACE_TEMPLATE)
    assert np.allclose(m[:, :2] @ landmarks[0] + m[:, 2], ARCFACE_TEMPLATE[0], atol=1e-6)


def test_as_aligned_resizes() -> None:
    assert as_aligned(np.zeros((224, 200, 3), np.uint8)).shape == (112, 112, 3)


@pytest.mark.slow
def test_parity_with_insightface_norm_crop(pipeline) -> None:
    """Our SCRFD decode + alignment vs insightface's SCRFD + norm_crop on 120 LFW dev images."""
    from insightface.model_zoo import scrfd  # the oracle is a dev dependency: missing = failure, not a skip
    from insightface.utils import face_align
    theirs = scrfd.SCRFD(model_file=str(SHARED_MODELS / "det" / "scrfd_500m.onnx"))
    theirs.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    diffs, compared = [], 0
    for path in lfw_dev_images(120):
        rgb = read_image(path).rgb
        ours = pipeline.detect(rgb, DetectorSettings(input_size=640))  # insightface's fixed 640 letterbox
        bboxes, kpss = theirs.detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), input_size=(640, 640))
        assert len(ours) == len(bboxes), path
        if not ours:
            continue
        best = int(np.argmax(bboxes[:, 4]))
        assert np.abs(ours[0].landmarks - kpss[best]).max() < 0.05, path
        ref = face_align.norm_crop(rgb, kpss[best])
        diffs.append(np.abs(align_face(rgb, ours[0].landmarks).astype(float) - ref.astype(float)).mean())
        compared += 1
    assert compared >= 100
    assert max(diffs) < 1.0, f"mean abs pixel diff up to {max(diffs):.3f}"
