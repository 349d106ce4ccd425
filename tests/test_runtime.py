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


def test_prelu_rewrite_is_exact_on_the_shipped_model_and_its_source() -> None:
    """On the CPU every PRelu of crfiqa_mbf and w600k_mbf (all slopes <= 1) runs as Max(x, x * slope): no PRelu
    is left, and both outputs equal the file opened as is bit for bit on real aligned LFW faces and on inputs
    far outside the normalised range (negative activations everywhere)."""
    import onnx

    from crfiqa.service.runtime import prelu_as_max
    from tests.helpers import SHARED_MODELS

    path, blob, _ = _quality_blob(Pipeline(), 6)
    wild = np.random.default_rng(0).uniform(-4, 4, (3, 3, 112, 112)).astype(np.float32)
    for model in (path, str(SHARED_MODELS / "fr" / "insightface_w600k_mbf.onnx")):
        rewritten = prelu_as_max(model)
        assert rewritten is not None
        ops = [n.op_type for n in onnx.load_from_string(rewritten).graph.node]
        prelus = [n.op_type for n in onnx.load(model).graph.node].count("PRelu")
        assert prelus > 0 and "PRelu" not in ops and ops.count("Max") == prelus
        fast, plain = create_session(model, CPU, 1), create_session(model, CPU, 1, cpu_rewrite=False)
        name = plain.get_inputs()[0].name
        for x in (blob, wild):
            for a, b in zip(fast.run(None, {name: x}), plain.run(None, {name: x}), strict=True):
                assert np.array_equal(a, b)


def test_prelu_with_a_slope_above_one_is_left_as_prelu(tmp_path) -> None:
    """Max(x, x * slope) is PRelu only for slopes <= 1: a node with a slope of 2 stays PRelu; one with slopes
    of -0.5 and 0.25 is rewritten and computes PRelu's values."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from crfiqa.service.runtime import prelu_as_max

    def model(slopes: list[float]) -> str:
        s = numpy_helper.from_array(np.array(slopes, np.float32).reshape(2, 1, 1), "slope")
        graph = helper.make_graph([helper.make_node("PRelu", ["x", "slope"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2, 2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])], [s])
        path = tmp_path / f"prelu{len(list(tmp_path.iterdir()))}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        return str(path)

    x = np.array([-2, -1, 1, 2, -3, 0, 3, -0.5], np.float32).reshape(1, 2, 2, 2)
    for slopes, rewritten in (([0.5, 2.0], False), ([-0.5, 0.25], True)):
        path = model(slopes)
        assert (prelu_as_max(path) is not None) == rewritten
        s = np.array(slopes, np.float32).reshape(1, 2, 1, 1)
        (y,) = create_session(path, CPU, 1).run(None, {"x": x})
        assert np.array_equal(y, np.where(x >= 0, x, x * s))
