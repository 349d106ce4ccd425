"""Face detectors behind one interface; ``create_detector`` routes a manifest entry to its adapter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from crfiqa.service.detect.base import Detector, DetectorSettings
from crfiqa.service.errors import ModelError
from crfiqa.service.registry import ModelEntry


def create_detector(path: Path, entry: ModelEntry, settings: DetectorSettings,
                    providers: Sequence[str] = ("CPUExecutionProvider",), intra_op_threads: int = 0,
                    batched: bool = False, solo_threads: int = 0) -> Detector:
    """Build the adapter for ``entry.family`` (``scrfd`` or ``yunet``); ``batched``: SCRFD that can also detect
    in many images with one network run (``detect_many``; the other families detect one image at a time);
    ``solo_threads``: see ``runtime.create_session``."""
    if entry.family == "scrfd":
        from crfiqa.service.detect.scrfd import SCRFD

        if batched:
            from crfiqa.service.detect.batched import BatchedSCRFD

            return BatchedSCRFD(path, settings, providers, intra_op_threads, entry.detector, solo_threads=solo_threads)

        return SCRFD(path, settings, providers, intra_op_threads, entry.detector, solo_threads=solo_threads)
    if entry.family == "yunet":
        from crfiqa.service.detect.yunet import YuNet

        return YuNet(path, settings, entry.detector)
    raise ModelError(f"{entry.name}: no detector adapter for family {entry.family!r}", code="unknown_model")


__all__ = ["Detector", "DetectorSettings", "create_detector"]
