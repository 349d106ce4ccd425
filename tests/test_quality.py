"""Quality scoring: the input contract (RGB, normalisation), batching, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from crfiqa.service.facemodel import calibrate
from crfiqa.service.imaging import read_image
from crfiqa.service.preprocess import QUALITY_INPUT, InputSpec, to_blob
from crfiqa.service.registry import Calibration
from tests.helpers import SAMPLES, expected_channel_quality, lfw_dev_images


def test_blob_is_rgb_nchw_normalised() -> None:
    crop = np.zeros((112, 112, 3), np.uint8)
    crop[..., 0] = 255  # pure red
    blob = to_blob(crop)
    assert blob.shape == (1, 3, 112, 112) and blob.dtype == np.float32
    assert np.allclose(blob[0, 0], 1.0) and np.allclose(blob[0, 1:], -1.0)
    bgr = to_blob(crop, InputSpec(colour="BGR", mean=0, std=1))
    assert np.allclose(bgr[0, 2], 255.0) and np.allclose(bgr[0, 0], 0.0)


def test_blob_rejects_wrong_size() -> None:
    with pytest.raises(ValueError):
        to_blob(np.zeros((1, 100, 112, 3), np.uint8), QUALITY_INPUT)


def test_colour_order_reaches_the_model_as_rgb(make_pipeline, channel_model) -> None:
    """A model whose output depends on channel order gets exactly the RGB contract (t1.jpg is in colour)."""
    pipe = make_pipeline(quality=str(channel_model))
    (result, prepared), = pipe.run([SAMPLES / "t1.jpg"])
    crops = prepared.crops
    assert len(result.faces) == 6
    rgb = read_image(SAMPLES / "t1.jpg").rgb
    assert rgb[..., 0].mean() > rgb[..., 2].mean() + 5  # warm photo: red dominates blue
    for face, crop in zip(result.faces, crops):
        assert face.quality.raw == pytest.approx(expected_channel_quality(crop), abs=1e-5)
        swapped = expected_channel_quality(crop[..., ::-1])
        assert abs(face.quality.raw - swapped) > 1e-3  # the test can tell BGR from RGB


@pytest.mark.parametrize("model", ["mbf_norm", "channel"])
def test_batched_equals_one_by_one(make_pipeline, channel_model, model: str) -> None:
    pipe = make_pipeline(quality=str(channel_model) if model == "channel" else model)
    crops = np.concatenate([p.crops for _, p in pipe.run(lfw_dev_images(12), score=False)])
    assert len(crops) >= 12
    batched = pipe.quality.predict(crops)
    single = np.concatenate([pipe.quality.predict(c[None]) for c in crops])
    assert np.abs(batched - single).max() <= 1e-5 * max(1.0, np.abs(single).max())


def test_calibration_is_monotone_and_centred() -> None:
    cal = Calibration(centre=20.0, scale=2.0)
    raw = np.array([-1e9, 10.0, 20.0, 30.0, 1e9])
    s = calibrate(raw, cal)
    assert s[2] == pytest.approx(50.0) and (np.diff(s) > 0).all() and s[0] >= 0 and s[-1] <= 100


def test_sharp_face_beats_blurred_copy(make_pipeline) -> None:
    """The default model ranks a face above the same face blurred and downscaled."""
    import cv2

    pipe = make_pipeline()
    rgb = read_image(SAMPLES / "Tom_Hanks_54745.png").rgb
    small = cv2.resize(cv2.GaussianBlur(rgb, (0, 0), 2.0), (16, 16), interpolation=cv2.INTER_AREA)
    degraded = cv2.resize(small, (112, 112), interpolation=cv2.INTER_LINEAR)
    raw = pipe.score(np.stack([rgb, degraded]))
    assert raw[0] > raw[1]


def test_fixed_batch_recognition_model_runs_batches(make_pipeline) -> None:
    """SFace's graph has batch 1: a batch of crops is fed in chunks and equals one-by-one."""
    from crfiqa.service.facemodel import RecognitionModel
    from crfiqa.service.registry import resolve

    pipe = make_pipeline()
    path, entry = resolve("sface_2021dec", "recognition", pipe.manifest, pipe.settings.models_dir)
    model = RecognitionModel(path, entry, ("CPUExecutionProvider",))
    assert model.fixed_batch == 1
    crops = np.concatenate([p.crops for _, p in pipe.run([SAMPLES / "t1.jpg"], score=False)])
    batched = model.embed(crops)
    # The reference runs the graph directly, one crop at a time: independent of FaceModel's chunking.
    direct = np.concatenate([model.session.run(None, {model.input_name: to_blob(c[None], entry.input)})[0]
                             for c in crops])
    assert batched.shape == (6, 128) and np.abs(batched - direct).max() <= 1e-5
    order = np.array([3, 0, 5, 1, 4, 2])
    assert np.abs(model.embed(crops[order]) - batched[order]).max() <= 1e-5
