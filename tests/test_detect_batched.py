"""Batched SCRFD (the GPU path): the rewritten graph keeps a batch axis, and batched = per-image detections."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from crfiqa.service.detect import DetectorSettings
from crfiqa.service.detect.batched import BatchedSCRFD, batch_axis_model
from crfiqa.service.errors import ModelError
from crfiqa.service.imaging import read_image
from crfiqa.service.registry import resolve
from tests.helpers import SAMPLES, SHARED_MODELS, build_channel_quality_model, lfw_dev_images

CPU = ("CPUExecutionProvider",)


@pytest.fixture(scope="module", params=["scrfd_500m", "scrfd_2.5g"])
def detectors(request, pipeline):
    """(per-image SCRFD as the pipeline builds it, BatchedSCRFD on the same file and settings)."""
    path, entry = resolve(request.param, "detector", directory=SHARED_MODELS)
    single = pipeline.detector if request.param == pipeline.detector_name else None
    if single is None:
        from crfiqa.service.detect import create_detector

        single = create_detector(path, entry, pipeline.detector.settings, CPU)
    return single, BatchedSCRFD(path, single.settings, CPU, 0, entry.detector)


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.abs(x.bbox - y.bbox).max() <= 1e-2 and np.abs(x.landmarks - y.landmarks).max() <= 1e-2
        assert abs(x.score - y.score) <= 1e-4


def test_rewritten_outputs_are_per_image_slices_of_the_original() -> None:
    path = SHARED_MODELS / "det" / "scrfd_500m.onnx"
    model = batch_axis_model(onnx.load(str(path)))
    original = ort.InferenceSession(str(path), providers=list(CPU))
    batched = ort.InferenceSession(model.SerializeToString(), providers=list(CPU))
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 160, 224)).astype(np.float32)
    outs = batched.run(None, {"input.1": x})
    for i in range(3):
        for one, many in zip(original.run(None, {"input.1": x[i:i + 1]}), outs):
            assert many.shape == (3, *one.shape)
            np.testing.assert_allclose(many[i], one, atol=1e-5)


def test_batched_equals_per_image_on_lfw(detectors) -> None:
    single, batched = detectors
    images = [read_image(p).rgb for p in lfw_dev_images(20)]
    got = batched.detect_batch(images)
    want = [single.detect(rgb) for rgb in images]
    assert sum(len(w) for w in want) >= 20  # every image has its subject, some have more faces
    for g, w in zip(got, want):
        _same(g, w)


def test_batched_with_a_fixed_input_size_and_the_precropped_retry(detectors) -> None:
    single, batched = detectors
    fixed = DetectorSettings(input_size=640)
    images = [read_image(p).rgb for p in lfw_dev_images(4)] + [read_image(SAMPLES / "t1.jpg").rgb]
    for g, w in zip(batched.detect_batch(images, fixed), [single.detect(i, fixed) for i in images]):
        _same(g, w)
    aligned = read_image(SAMPLES / "Tom_Hanks_54745.png").rgb  # found only by the padded retry at 640
    want = single.detect(aligned, fixed)
    assert len(want) == 1
    _same(batched.detect_batch([aligned, aligned], fixed)[1], want)


def test_batch_of_mixed_shapes_is_refused(detectors) -> None:
    _, batched = detectors
    images = [read_image(lfw_dev_images(1)[0]).rgb, read_image(SAMPLES / "t1.jpg").rgb]
    with pytest.raises(ValueError, match="one network input shape"):
        batched.detect_batch(images)
    assert batched.detect_batch([]) == []


def test_rewrite_refuses_a_graph_that_is_not_scrfd(tmp_path) -> None:
    with pytest.raises(ModelError, match="SCRFD head"):
        batch_axis_model(onnx.load(str(build_channel_quality_model(tmp_path / "q.onnx"))))
