"""crfiqa: face image quality assessment with CR-FIQA.

The public, torch-free API: ``Pipeline().assess(image)`` turns an image into a typed per-face ``ImageResult``.
Attributes load on first use (module ``__getattr__``), so ``import crfiqa.evaluation.metrics`` imports NumPy only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pipeline": "crfiqa.service.pipeline",
    "PipelineSettings": "crfiqa.service.pipeline",
    "Options": "crfiqa.service.pipeline",
    "Prepared": "crfiqa.service.pipeline",
    "FaceResult": "crfiqa.service.results",
    "ImageResult": "crfiqa.service.results",
    "Quality": "crfiqa.service.results",
    "CrfiqaError": "crfiqa.service.errors",
}
__all__ = ["CrfiqaError", "FaceResult", "ImageResult", "Options", "Pipeline", "PipelineSettings", "Prepared",
           "Quality", "__version__"]

if TYPE_CHECKING:
    from crfiqa.service.errors import CrfiqaError
    from crfiqa.service.pipeline import Options, Pipeline, PipelineSettings, Prepared
    from crfiqa.service.results import FaceResult, ImageResult, Quality


def __getattr__(name: str) -> Any:
    """Import the public names lazily."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'crfiqa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
