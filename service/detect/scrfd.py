"""SCRFD (insightface) adapter: letterbox, one ONNX run, decode the 9 stride outputs, NMS.

Written here rather than taken from insightface because insightface pulls the CPU onnxruntime and
the non-headless OpenCV into a deployment (and so breaks the GPU install).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from crfiqa.service.detect.base import Detector, DetectorSettings, nms
from crfiqa.service.errors import ModelError
from crfiqa.service.results import Detection
from crfiqa.service.runtime import create_session, provider_in_use

STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
MEAN, STD = 127.5, 128.0  # SCRFD's own input normalisation (not the face models' 127.5)


@lru_cache(maxsize=32)
def _anchor_centres(height: int, width: int, stride: int) -> np.ndarray:
    """Anchor centres [H*W*2, 2] in input pixels for one stride, two anchors per cell."""
    ys, xs = np.mgrid[:height, :width]
    centres = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
    return np.repeat(centres, ANCHORS_PER_CELL, axis=0)


class SCRFD(Detector):
    """SCRFD with 5 keypoints, any input size divisible by 32."""

    def __init__(self, path: Path, settings: DetectorSettings, providers: Sequence[str],
                 intra_op_threads: int = 0) -> None:
        super().__init__(settings)
        self.session = create_session(path, providers, intra_op_threads)
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        if len(outputs) != 9:
            raise ModelError(f"{path}: SCRFD with keypoints has 9 outputs, this model has {len(outputs)}",
                             code="bad_model")
        self.output_names = [o.name for o in outputs]
        self.provider = provider_in_use(self.session)

    def _detect(self, rgb: np.ndarray, s: DetectorSettings) -> list[Detection]:
        """Letterbox to ``input_size`` (top-left, zero pad), run, decode, NMS, map back."""
        size = max(32, int(round(s.input_size / 32)) * 32)
        h, w = rgb.shape[:2]
        scale = size / max(h, w)
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        canvas = np.zeros((size, size, 3), dtype=np.uint8)
        canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        blob = canvas.transpose(2, 0, 1)[None].astype(np.float32)
        blob -= MEAN
        blob *= 1.0 / STD
        outs = self.session.run(self.output_names, {self.input_name: blob})
        boxes, kps, scores = self._decode(outs, size, s.score_threshold)
        if scores.size == 0:
            return []
        keep = nms(boxes, scores, s.nms_threshold)
        boxes, kps, scores = boxes[keep] / scale, kps[keep] / scale, scores[keep]
        return [Detection(bbox=b.astype(np.float32), landmarks=k.astype(np.float32), score=float(s))
                for b, k, s in zip(boxes, kps, scores)]

    @staticmethod
    def _decode(outs: list[np.ndarray], size: int, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distances x stride from anchor centres -> boxes [n,4], keypoints [n,5,2], scores [n]."""
        all_boxes, all_kps, all_scores = [], [], []
        n = len(STRIDES)
        for i, stride in enumerate(STRIDES):
            scores = outs[i].reshape(-1)
            pos = np.nonzero(scores >= threshold)[0]
            if pos.size == 0:
                continue
            centres = _anchor_centres(size // stride, size // stride, stride)[pos]
            dist = outs[i + n].reshape(-1, 4)[pos] * stride
            kps = outs[i + 2 * n].reshape(-1, 10)[pos].reshape(-1, 5, 2) * stride
            all_boxes.append(np.hstack([centres - dist[:, :2], centres + dist[:, 2:]]))
            all_kps.append(kps + centres[:, None, :])
            all_scores.append(scores[pos])
        if not all_scores:
            return np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros(0)
        return np.vstack(all_boxes), np.vstack(all_kps), np.concatenate(all_scores)
