"""ONNX Runtime sessions: a lone call runs on the many-thread solo session, overlapping calls on the shared one,
and both give the same scores."""

from __future__ import annotations

import threading

import numpy as np

from crfiqa.service.pipeline import Pipeline
from crfiqa.service.preprocess import to_blob
from crfiqa.service.registry import resolve
from crfiqa.service.runtime import SoloSession, create_session, images_in_flight
from tests.helpers import lfw_dev_images

CPU = ("CPUExecutionProvider",)


def _quality_blob(pipe: Pipeline, n: int) -> tuple[str, np.ndarray, str]:
    """The default quality model's path, an input blob of ``n`` real aligned LFW faces and its output name."""
    path, entry = resolve(pipe.quality_name, "quality", pipe.manifest)
    crops = Pipeline.batch_crops([pipe.prepare(p) for p in lfw_dev_images(n)])
    assert len(crops) == n
    return str(path), to_blob(crops, entry.input), entry.outputs.get("quality", "quality")


def test_lone_calls_take_the_solo_session_and_overlapping_calls_the_shared_one() -> None:
    path, blob, output = _quality_blob(Pipeline(), 4)
    assert np.ptp(blob.reshape(4, -1).mean(axis=1)) > 0  # four different faces
    session = create_session(path, CPU, intra_op_threads=1, solo_threads=2)
    assert isinstance(session, SoloSession)
    name = session.get_inputs()[0].name
    alone = [session.run([output], {name: blob[i:i + 1]})[0] for i in range(4)]
    assert (session.solo_calls, session.shared_calls) == (4, 0)

    # Two threads calling at once: each call that starts while the other thread's runs takes the shared one.
    results: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def loop(k: int) -> None:
        for i in range(12):
            results[k].append(session.run([output], {name: blob[i % 4:i % 4 + 1]})[0])

    threads = [threading.Thread(target=loop, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert session.shared_calls > 0 and session.solo_calls + session.shared_calls == 4 + 24
    # Thread counts change only the order of float sums: the scores agree to float32 precision.
    plain = create_session(path, CPU, intra_op_threads=1)
    for i in range(4):
        ref = plain.run([output], {name: blob[i:i + 1]})[0]
        np.testing.assert_allclose(alone[i], ref, atol=1e-5)
        for k in (0, 1):
            np.testing.assert_allclose(results[k][i], ref, atol=1e-5)


def test_declared_images_in_flight_keep_calls_off_the_solo_session() -> None:
    path, blob, output = _quality_blob(Pipeline(), 1)
    session = create_session(path, CPU, intra_op_threads=1, solo_threads=2)
    name = session.get_inputs()[0].name
    with images_in_flight(1):
        session.run([output], {name: blob})
    assert (session.solo_calls, session.shared_calls) == (1, 0)
    with images_in_flight(3):
        session.run([output], {name: blob})
    assert (session.solo_calls, session.shared_calls) == (1, 1)
    session.run([output], {name: blob})  # released again
    assert (session.solo_calls, session.shared_calls) == (2, 1)


def test_a_run_of_many_images_never_takes_the_solo_sessions_and_one_image_does(make_pipeline) -> None:
    pipe: Pipeline = make_pipeline(solo_threads=2)
    many = list(pipe.run(lfw_dev_images(12)))
    det, quality = pipe.detector.session, pipe.quality.session
    assert len(many) == 12 and all(r.faces for r, _ in many)
    assert det.solo_calls == 0 and quality.solo_calls == 0 and det.shared_calls == 12
    (one, _), = pipe.run(lfw_dev_images(1))
    assert det.solo_calls == 1 and quality.solo_calls == 1
    assert abs(one.faces[0].quality.raw - many[0][0].faces[0].quality.raw) < 1e-5


def test_no_solo_session_unless_it_has_more_threads() -> None:
    path, _, _ = _quality_blob(Pipeline(), 1)
    assert not isinstance(create_session(path, CPU, intra_op_threads=2, solo_threads=2), SoloSession)
    assert not isinstance(create_session(path, CPU, intra_op_threads=1, solo_threads=0), SoloSession)
    assert not isinstance(create_session(path, CPU, intra_op_threads=0, solo_threads=2), SoloSession)  # all cores


def test_pipeline_models_use_the_solo_setting(make_pipeline) -> None:
    pipe: Pipeline = make_pipeline(solo_threads=2)
    assert isinstance(pipe.quality.session, SoloSession) and isinstance(pipe.detector.session, SoloSession)
    assert not isinstance(make_pipeline().quality.session, SoloSession)
