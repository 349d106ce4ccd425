"""The one pixel normalisation: aligned RGB uint8 crops -> float32 NCHW model input."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from crfiqa.service.align import ALIGNED_SIZE


@dataclass(frozen=True)
class InputSpec:
    """How a face model wants its pixels: size, channel order, ``(x - mean) / std`` and memory layout.
    A ``size`` other than the aligned 112 means: the whole aligned 112 crop resized (bilinear) to it."""

    size: int = ALIGNED_SIZE
    colour: str = "RGB"
    mean: float = 127.5
    std: float = 127.5
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.colour not in ("RGB", "BGR"):
            raise ValueError(f"colour must be RGB or BGR, not {self.colour!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        if self.std <= 0:
            raise ValueError("std must be positive")


#: The CR-FIQA / ArcFace contract: RGB, (x - 127.5) / 127.5, 112x112. Training, export, service and
#: evaluation all import this one constant.
QUALITY_INPUT = InputSpec()


def to_blob(crops: np.ndarray | list[np.ndarray], spec: InputSpec = QUALITY_INPUT) -> np.ndarray:
    """Stack RGB uint8 crops [N,H,W,3] into a float32 blob (``spec.layout``) normalised as ``spec`` says."""
    batch = np.asarray(crops) if not isinstance(crops, list) else np.stack(crops)
    if batch.ndim == 3:
        batch = batch[None]
    if spec.size != ALIGNED_SIZE and batch.ndim == 4 and batch.shape[1:] == (ALIGNED_SIZE, ALIGNED_SIZE, 3):
        batch = np.stack([cv2.resize(c, (spec.size, spec.size), interpolation=cv2.INTER_LINEAR) for c in batch])
    if batch.ndim != 4 or batch.shape[3] != 3 or batch.shape[1:3] != (spec.size, spec.size):
        raise ValueError(f"expected crops of shape [N,{spec.size},{spec.size},3], got {batch.shape}")
    if spec.colour == "BGR":
        batch = batch[..., ::-1]
    if spec.layout == "NHWC":
        blob = batch.astype(np.float32)
    else:
        blob = batch.transpose(0, 3, 1, 2).astype(np.float32)  # one copy: NHWC uint8 -> NCHW float32
    blob -= np.float32(spec.mean)
    blob *= np.float32(1.0 / spec.std)
    return blob
