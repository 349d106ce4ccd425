"""YuNet (OpenCV Zoo) adapter through ``cv2.FaceDetectorYN``."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from crfiqa.service.detect.base import Detector, DetectorSettings
from crfiqa.service.errors import ModelError
from crfiqa.service.registry import DetectorSpec
from crfiqa.service.results import Detection

NMS_THRESHOLD = 0.3  # OpenCV Zoo's setting for YuNet
TOP_K = 5000


class YuNet(Detector):
    """YuNet: BGR 0-255 input; images larger than the largest input size are downscaled for speed."""

    def __init__(self, path: Path, settings: DetectorSettings, spec: DetectorSpec | None = None) -> None:
        spec = spec or DetectorSpec()
        super().__init__(settings, spec)
        # cv2.FaceDetectorYN feeds raw pixels in the image's channel order: nothing else is configurable.
        if (spec.mean or 0.0) != 0.0 or (1.0 if spec.std is None else spec.std) != 1.0:
            raise ModelError(f"{path}: YuNet takes raw 0-255 pixels; the manifest says mean={spec.mean}, "
                             f"std={spec.std}", code="bad_manifest")
        self.rgb_input = spec.colour == "RGB"
        self.path = str(path)
        self._local = threading.local()  # FaceDetectorYN keeps per-call state: one instance per thread

    def _net(self, score_threshold: float) -> cv2.FaceDetectorYN:
        """This thread's detector instance."""
        net = getattr(self._local, "net", None)
        if net is None:
            net = cv2.FaceDetectorYN.create(self.path, "", (320, 320), score_threshold, NMS_THRESHOLD, TOP_K)
            self._local.net = net
        net.setScoreThreshold(score_threshold)
        return net

    def _detect(self, rgb: np.ndarray, s: DetectorSettings) -> list[Detection]:
        """Run at the network scale of ``input_shape`` (FaceDetectorYN pads to its stride itself)."""
        h, w = rgb.shape[:2]
        scale = self.input_shape(h, w, s)[0]
        image = rgb if self.rgb_input else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        if scale != 1.0:
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        net = self._net(s.score_threshold)
        net.setInputSize((image.shape[1], image.shape[0]))
        _, faces = net.detect(image)
        if faces is None:
            return []
        out = []
        for row in faces:
            x, y, bw, bh = row[:4] / scale
            # YuNet's landmark order (right eye, left eye, nose, right/left mouth corner, from the
            # subject's view) is image-left first, the ArcFace template's order.
            out.append(Detection(bbox=np.array([x, y, x + bw, y + bh], dtype=np.float32),
                                 landmarks=(row[4:14].reshape(5, 2) / scale).astype(np.float32),
                                 score=float(row[14])))
        return out
