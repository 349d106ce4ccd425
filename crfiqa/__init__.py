"""crfiqa: face image quality assessment with CR-FIQA.

The public, torch-free API: ``Pipeline`` turns images into typed per-face quality results.
"""

from crfiqa.service.pipeline import Pipeline, PipelineSettings
from crfiqa.service.results import FaceResult, ImageResult, Quality

__all__ = ["Pipeline", "PipelineSettings", "FaceResult", "ImageResult", "Quality"]
__version__ = "0.1.0"
