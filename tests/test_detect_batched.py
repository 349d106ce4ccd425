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


def test_pipeline_batch_detection_gives_the_per_image_results(make_pipeline, pipeline) -> None:
    """The GPU path (forced on here): ``run`` detects a chunk of images per network call, one call per input
    shape, and gives the per-image pipeline's faces and scores; a broken image stays a typed error."""
    batched = make_pipeline(batch_detection=True)
    assert batched.batch_detection and hasattr(batched.detector, "detect_many")
    assert not pipeline.batch_detection  # on a CPU the default is one image per call
    sources = [*lfw_dev_images(12), ("broken.jpg", b"not an image"), SAMPLES / "t1.jpg", *lfw_dev_images(40)[30:]]
    got = list(batched.run(sources))
    want = list(pipeline.run(sources))
    assert len(got) == len(want) == len(sources)
    for (g, _), (w, _) in zip(got, want):
        assert g.source == w.source and (g.error is None) == (w.error is None)
        assert len(g.faces) == len(w.faces)
        for a, b in zip(g.faces, w.faces):
            assert np.abs(a.detection.bbox - b.detection.bbox).max() <= 1e-2
            assert abs(a.quality.raw - b.quality.raw) <= 1e-4
    # One chunk (24 images < batch 32) went through one prepare_many: its detection time is shared equally.
    shares = {gp.timings["detect"] for _, gp in got if "detect" in gp.timings}
    assert len(shares) == 1 and len({p.timings["detect"] for _, p in want if "detect" in p.timings}) > 1
    assert got[12][0].error.code == "unsupported_format"
    assert len(got[13][0].faces) == 6  # t1.jpg: another input shape in the same chunk


def test_pipeline_batch_detection_with_a_detector_that_cannot_batch(make_pipeline) -> None:
    yunet = make_pipeline(detector="yunet_2023mar", batch_detection=True)
    per_image = make_pipeline(detector="yunet_2023mar", batch_detection=False)
    sources = lfw_dev_images(6)
    got = [r for r, _ in yunet.run(sources)]
    want = [r for r, _ in per_image.run(sources)]
    assert [len(r.faces) for r in got] == [len(r.faces) for r in want] and all(r.faces for r in got)


def test_service_batch_detection_answers_as_the_pipeline(tmp_path, pipeline) -> None:
    """CRFIQA_BATCH_DETECTION=true (the GPU path, forced on a CPU): a request's images are detected together;
    the answers equal the per-image pipeline's, and a broken image keeps its typed error and its place."""
    import httpx

    from tests.server import Server

    images = [*lfw_dev_images(3), SAMPLES / "t1.jpg"]
    srv = Server(env={"CRFIQA_BATCH_DETECTION": "true", "CRFIQA_WARMUP_ROUNDS": "1", "CRFIQA_LOG_LEVEL": "debug"},
                 log=tmp_path / "log")
    try:
        srv.wait_ready()
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images[:2]]
        files += [("images", ("broken.jpg", b"not an image", "image/jpeg"))]
        files += [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in images[2:]]
        r = httpx.post(srv.url + "/v1/quality", files=files, timeout=60)
        log = srv.log()
    finally:
        srv.stop()
    # The request's five images went through one prepare_many (the broken one failed there, in its place).
    assert any('"batched detection"' in line and '"images": 5' in line for line in log.splitlines()), log[-2000:]
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["ok", "ok", "error", "ok", "ok"]
    assert results[2]["error"]["code"] == "unsupported_format"
    want = [res for res, _ in pipeline.run(images)]
    for got, exp in zip([x for x in results if x["status"] == "ok"], want):
        assert len(got["faces"]) == len(exp.faces)
        for a, b in zip(got["faces"], exp.faces):
            assert a["quality"]["raw"] == pytest.approx(b.quality.raw, abs=1e-4)
