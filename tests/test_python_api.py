"""The Python API as the README shows it: the README's example runs, and ``assess`` treats every input kind
(path, bytes, RGB array, BGR array) the same way."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest

from crfiqa import Options, Pipeline, PipelineSettings
from tests.helpers import REPO, SAMPLES, SHARED_MODELS


def test_readme_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, executed as written from the repository root."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Python API"):]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)[:1]
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("CRFIQA_MODELS_DIR", str(SHARED_MODELS))
    code = code.replace("../shared", str(SAMPLES.parents[1]))
    exec(compile(code, "README.md", "exec"), {})


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(PipelineSettings(models_dir=SHARED_MODELS, providers=("CPUExecutionProvider",)))


def test_assess_is_the_same_for_every_input_kind(pipe: Pipeline) -> None:
    path = SAMPLES / "t1.jpg"
    by_path = pipe.assess(path)
    assert by_path.ok and len(by_path.faces) == 6 and (by_path.width, by_path.height) == (1280, 886)
    raw = [f.quality.raw for f in by_path.faces]
    bgr = cv2.imread(str(path))
    for result in (pipe.assess(path.read_bytes()), pipe.assess(bgr, colour="BGR"),
                   pipe.assess(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), colour="RGB")):
        assert [f.quality.raw for f in result.faces] == pytest.approx(raw, abs=1e-6)
    # Stating the wrong order is a different image for the model (the test can tell the orders apart).
    wrong = pipe.assess(bgr, colour="RGB")
    assert np.abs(np.array([f.quality.raw for f in wrong.faces][:3]) - raw[:3]).max() > 1e-3


def test_assess_needs_the_channel_order_of_an_array(pipe: Pipeline) -> None:
    with pytest.raises(ValueError, match="colour"):
        pipe.assess(np.zeros((64, 64, 3), np.uint8))


def test_assess_reports_a_bad_image_as_a_typed_result(pipe: Pipeline) -> None:
    result = pipe.assess(b"not an image")
    assert not result.ok and result.error.code == "unsupported_format" and result.faces == []


def test_stages_compose_to_assess(pipe: Pipeline) -> None:
    """prepare -> score -> finish by hand gives exactly what assess gives."""
    prepared = pipe.prepare(SAMPLES / "t1.jpg", Options(select="largest"))
    assert prepared.error is None and prepared.crops.shape == (1, 112, 112, 3)
    by_hand = pipe.finish(prepared, pipe.score(prepared.crops))
    assert by_hand.to_dict() == pipe.assess(SAMPLES / "t1.jpg", Options(select="largest")).to_dict()
