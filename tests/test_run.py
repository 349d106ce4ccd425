"""Pipeline.run: prepare overlaps scoring, several batches score at once, results come back in input order."""

from __future__ import annotations

import threading

import numpy as np

from crfiqa.service.pipeline import Pipeline
from tests.helpers import SAMPLES, lfw_dev_images


def test_run_scores_batches_concurrently_in_input_order(make_pipeline) -> None:
    pipe: Pipeline = make_pipeline(batch_size=4, decode_workers=2, score_workers=2)
    paths = lfw_dev_images(30)
    sources = [*paths[:10], ("broken.jpg", b"not an image"), SAMPLES / "t1.jpg", *paths[10:]]
    threads: set[str] = set()
    score = pipe.score

    def spy(crops: np.ndarray) -> np.ndarray:
        threads.add(threading.current_thread().name)
        return score(crops)

    pipe.score = spy  # type: ignore[method-assign]  # records which threads score; the real model runs
    got = list(pipe.run(sources))
    assert [r.source for r, _ in got] == [str(s) if not isinstance(s, tuple) else s[0] for s in sources]
    assert got[10][0].error is not None and got[10][0].error.code == "unsupported_format"
    assert len(got[11][0].faces) == 6
    assert len(threads) == 2 and all(t.startswith("crfiqa-score") for t in threads)
    # Each image's scores equal scoring that image alone (no face is paired with another image's score).
    for result, prepared in got[:4] + got[11:14]:
        alone = pipe.score(prepared.crops)
        assert np.allclose([f.quality.raw for f in result.faces], alone, atol=1e-5)


def test_landmarks_that_cannot_be_aligned_are_a_typed_error_of_their_image(pipeline) -> None:
    """Coincident landmarks admit no similarity transform: that image gets ``align_error``, nothing raises."""
    import numpy as np

    from crfiqa.service.pipeline import Options, Prepared
    from crfiqa.service.results import Detection

    prepared = Prepared("flat.png")
    prepared.image = pipeline.decode(SAMPLES / "t1.jpg")
    flat = Detection(np.array([10.0, 10.0, 60.0, 60.0]), np.full((5, 2), 30.0), 0.9)
    pipeline._faces(prepared, Options(), [flat])
    assert prepared.error is not None and prepared.error.code == "align_error" and "coincide" in prepared.error.message

