"""SCRFD (insightface) adapter: resize and pad to the network shape, one ONNX run, decode the 9 stride
outputs, NMS.

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
from crfiqa.service.registry import DetectorSpec
from crfiqa.service.results import Detection
from crfiqa.service.runtime import create_session, onnxruntime, provider_in_use

STRIDES = (8, 16, 32)
ANCHORS_PER_CELL = 2
#: insightface's SCRFD input (RGB, (x - 127.5) / 128: not the face models' 127.5), used where the
#: manifest declares nothing.
DEFAULT_SPEC = DetectorSpec(size=640, colour="RGB", mean=127.5, std=128.0)


@lru_cache(maxsize=32)
def _anchor_centres(height: int, width: int, stride: int) -> np.ndarray:
    """Anchor centres [H*W*2, 2] in input pixels for one stride, two anchors per cell."""
    ys, xs = np.mgrid[:height, :width]
    centres = (np.stack([xs, ys], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
    return np.repeat(centres, ANCHORS_PER_CELL, axis=0)


class SCRFD(Detector):
    """SCRFD with 5 keypoints, any input height and width divisible by 32."""

    def __init__(self, path: Path, settings: DetectorSettings, providers: Sequence[str],
                 intra_op_threads: int = 0, spec: DetectorSpec | None = None, *, solo_threads: int = 0) -> None:
        spec = spec or DetectorSpec()
        super().__init__(settings, spec)
        self.bgr = (spec.colour or DEFAULT_SPEC.colour) == "BGR"
        self.mean = DEFAULT_SPEC.mean if spec.mean is None else spec.mean
        self.std = DEFAULT_SPEC.std if spec.std is None else spec.std
        self.session = create_session(path, providers, intra_op_threads, solo_threads)
        self.input_name = self.session.get_inputs()[0].name
        outputs = self.session.get_outputs()
        if len(outputs) != 9:
            raise ModelError(f"{path}: SCRFD with keypoints has 9 outputs, this model has {len(outputs)}",
                             code="bad_model")
        self.output_names = [o.name for o in outputs]
        self.provider = provider_in_use(self.session)
        # The graph declares its outputs' shapes for 640x640, so ORT warns (9 lines on stderr) on every run
        # at another size, past the session's log level; runs log errors only.
        self.run_options = onnxruntime().RunOptions()
        self.run_options.log_severity_level = 3

    def _detect(self, rgb: np.ndarray, s: DetectorSettings) -> list[Detection]:
        """Resize by the input scale, zero-pad bottom/right to the network shape, run, decode, NMS, map back."""
        blob, scale, net_h, net_w = self._blob(rgb, s)
        outs = self.session.run(self.output_names, {self.input_name: blob}, self.run_options)
        return self._postprocess(outs, scale, net_h, net_w, s)

    def _blob(self, rgb: np.ndarray, s: DetectorSettings) -> tuple[np.ndarray, float, int, int]:
        """The network input [1,3,H,W] for an image, its resize scale and the network height and width
        (split from ``_detect`` so the batched detector, service/detect/batched.py, stacks the same blobs)."""
        h, w = rgb.shape[:2]
        scale, net_h, net_w = self.input_shape(h, w, s)
        nh, nw = min(net_h, max(1, round(h * scale))), min(net_w, max(1, round(w * scale)))
        canvas = np.zeros((net_h, net_w, 3), dtype=np.uint8)
        canvas[:nh, :nw] = rgb if (nh, nw) == (h, w) else cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
        if self.bgr:
            canvas = canvas[..., ::-1]
        blob = canvas.transpose(2, 0, 1)[None].astype(np.float32)
        blob -= np.float32(self.mean)
        blob *= np.float32(1.0 / self.std)
        return blob, scale, net_h, net_w

    def _postprocess(self, outs: list[np.ndarray], scale: float, net_h: int, net_w: int,
                     s: DetectorSettings) -> list[Detection]:
        """One image's 9 outputs -> detections in image coordinates (decode, NMS, undo the scale)."""
        boxes, kps, scores = self._decode(outs, net_h, net_w, s.score_threshold)
        if scores.size == 0:
            return []
        keep = nms(boxes, scores, s.nms_threshold)
        boxes, kps, scores = boxes[keep] / scale, kps[keep] / scale, scores[keep]
        return [Detection(bbox=b.astype(np.float32), landmarks=k.astype(np.float32), score=float(s))
                for b, k, s in zip(boxes, kps, scores)]

    @staticmethod
    def _decode(outs: list[np.ndarray], height: int, width: int,
                threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distances x stride from anchor centres -> boxes [n,4], keypoints [n,5,2], scores [n]."""
        all_boxes, all_kps, all_scores = [], [], []
        n = len(STRIDES)
        for i, stride in enumerate(STRIDES):
            scores = outs[i].reshape(-1)
            pos = np.nonzero(scores >= threshold)[0]
            if pos.size == 0:
                continue
            centres = _anchor_centres(height // stride, width // stride, stride)[pos]
            dist = outs[i + n].reshape(-1, 4)[pos] * stride
            kps = outs[i + 2 * n].reshape(-1, 10)[pos].reshape(-1, 5, 2) * stride
            all_boxes.append(np.hstack([centres - dist[:, :2], centres + dist[:, 2:]]))
            all_kps.append(kps + centres[:, None, :])
            all_scores.append(scores[pos])
        if not all_scores:
            return np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros(0)
        return np.vstack(all_boxes), np.vstack(all_kps), np.concatenate(all_scores)
