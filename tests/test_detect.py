"""Detection on real images with every staged detector."""

from __future__ import annotations

import numpy as np
import pytest

from crfiqa.service.detect import DetectorSettings
from crfiqa.service.imaging import read_image
from tests.helpers import SAMPLES

DETECTORS = ["scrfd_500m", "scrfd_2.5g", "yunet_2023mar"]


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return read_image(SAMPLES / "t1.jpg").rgb


@pytest.mark.parametrize("name", DETECTORS)
def test_t1_has_six_faces(make_pipeline, t1: np.ndarray, name: str) -> None:
    faces = make_pipeline(detector=name).detect(t1)
    assert len(faces) == 6
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.5
    for f in faces:
        x1, y1, x2, y2 = f.bbox
        assert 0 <= x1 < x2 <= t1.shape[1] + 5 and 0 <= y1 < y2 <= t1.shape[0] + 5
        # Landmarks inside the box, left eye left of right eye, eyes above the mouth corners.
        lm = f.landmarks
        assert (lm[:, 0] >= x1 - 5).all() and (lm[:, 0] <= x2 + 5).all()
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0] and lm[:2, 1].max() < lm[3:, 1].min()


@pytest.mark.parametrize("name", DETECTORS)
def test_detectors_agree_on_face_positions(make_pipeline, t1: np.ndarray, name: str) -> None:
    ref = sorted(tuple(f.landmarks[2].round(-1)) for f in make_pipeline(detector="scrfd_2.5g").detect(t1))
    got = make_pipeline(detector=name).detect(t1)
    for f in got:
        nose = f.landmarks[2]
        assert min(np.hypot(*(nose - np.array(r))) for r in ref) < 15


@pytest.mark.parametrize("name", DETECTORS)
def test_precropped_face_is_found(make_pipeline, name: str) -> None:
    """SCRFD misses a 112 px crop at 640 input; the padded retry finds it."""
    crop = read_image(SAMPLES / "Tom_Hanks_54745.png").rgb
    faces = make_pipeline(detector=name).detect(crop)
    assert len(faces) == 1
    assert np.abs(faces[0].landmarks[0] - [38.3, 51.7]).max() < 8  # close to the template's left eye


def test_max_faces_and_min_size(make_pipeline, t1: np.ndarray) -> None:
    pipe = make_pipeline()
    assert len(pipe.detect(t1, DetectorSettings(max_faces=2))) == 2
    sides = sorted(min(f.bbox[2] - f.bbox[0], f.bbox[3] - f.bbox[1]) for f in pipe.detect(t1))
    kept = pipe.detect(t1, DetectorSettings(min_face_size=float(sides[2]) + 0.01))
    assert len(kept) == 3


def test_threshold_filters(make_pipeline, t1: np.ndarray) -> None:
    assert make_pipeline().detect(t1, DetectorSettings(score_threshold=0.99)) == []


def test_blank_image_has_no_faces(pipeline) -> None:
    assert pipeline.detect(np.full((480, 640, 3), 128, np.uint8)) == []
