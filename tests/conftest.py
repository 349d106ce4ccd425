"""Shared fixtures: real models from ../shared, a tiny quality model, pipelines."""

from __future__ import annotations

from pathlib import Path

import pytest

from crfiqa.service.detect import DetectorSettings
from crfiqa.service.pipeline import Pipeline, PipelineSettings
from tests.helpers import SHARED, SHARED_MODELS, build_channel_quality_model


def pytest_configure(config: pytest.Config) -> None:
    """Fail early and clearly when ../shared is missing."""
    if not SHARED_MODELS.is_dir():
        raise pytest.UsageError(f"shared data not found at {SHARED} (set CRFIQA_SHARED)")


@pytest.fixture(scope="session")
def channel_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path to the channel-order-sensitive quality model."""
    return build_channel_quality_model(tmp_path_factory.mktemp("qm") / "channel_quality.onnx")


@pytest.fixture(scope="session")
def pipeline() -> Pipeline:
    """Default pipeline (scrfd_500m + mbf_norm) on the shared models, CPU."""
    return Pipeline(PipelineSettings(models_dir=SHARED_MODELS, providers=("CPUExecutionProvider",)))


@pytest.fixture(scope="session")
def make_pipeline():
    """Factory for pipelines with other models/settings on the shared models."""

    def make(**kw) -> Pipeline:
        det = kw.pop("detection", DetectorSettings())
        return Pipeline(PipelineSettings(models_dir=SHARED_MODELS, providers=("CPUExecutionProvider",),
                                         detection=det, **kw))

    return make
