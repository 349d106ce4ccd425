"""Quality components in the spirit of ISO/IEC 29794-5 (OFIQ): why a face scores low, not only how low.

One pure function of what the pipeline's ``prepare`` already has — the decoded RGB image, a detection and its
aligned 112x112 crop — so components never run a second detector, aligner or model. Photometric measures are
taken on the aligned crop inside a fixed face ellipse (the crop is aligned, so a fixed region is the face);
noise and JPEG blockiness need native pixels and read a small patch of the input image. Definitions, units,
score mappings and known limits: docs/components.md.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from crfiqa.service.align import ALIGNED_SIZE
from crfiqa.service.results import Component, Detection

#: Every component, in the order of CSV columns and docs/components.md.
COMPONENT_NAMES: tuple[str, ...] = (
    "inter_eye_distance", "yaw", "pitch", "roll", "sharpness", "luminance_mean", "under_exposure",
    "over_exposure", "dynamic_range", "contrast", "noise", "compression", "illumination_uniformity",
    "face_size", "margins",
)

# -- fixed regions of the aligned crop -------------------------------------------------------------------------
# The face ellipse covers brows to chin and cheek to cheek of the ArcFace template (eyes at y~52, mouth at
# y~92), leaving out the corners where hair and background are.
_yy, _xx = np.mgrid[0:ALIGNED_SIZE, 0:ALIGNED_SIZE]
FACE_MASK = ((_xx - 56.0) / 34.0) ** 2 + ((_yy - 68.0) / 40.0) ** 2 <= 1.0
# Left and right halves of the face (image left/right), without the 6 px strip around the nose line that
# belongs to both; only the cheek/eye zones, not the forehead hair line.
_HALF_ROWS = (_yy >= 40) & (_yy <= 100)
LEFT_MASK = FACE_MASK & _HALF_ROWS & (_xx < 53)
RIGHT_MASK = FACE_MASK & _HALF_ROWS & (_xx > 58)
_ROWS = slice(28, 108)  # bounding rows/columns of FACE_MASK: the sharpness window
_COLS = slice(22, 91)

# -- thresholds ------------------------------------------------------------------------------------------------
DARK_LEVEL = 25  # luma <= 25 is an under-exposed pixel (OFIQ's dark range 0..25)
BRIGHT_LEVEL = 247  # luma >= 247 is an over-exposed pixel (OFIQ's light range 247..255)
PATCH = 128  # largest side of the native-pixel patch read for noise and blockiness: bounds the cost
BLOCK = 8  # JPEG block size
#: Room each side of the face needs for a portrait, as multiples of the inter-eye distance (left/right, from
#: each eye to its border) and of T = eye midpoint to mouth midpoint (above/below the eye line).
MARGIN_NEEDS = {"left": 0.9, "right": 0.9, "top": 1.4, "bottom": 1.8}

# -- head pose -------------------------------------------------------------------------------------------------
# A mean 3D face for the 5 landmarks (mm), in the camera's axes (x right, y down, z away from the camera), so a
# frontal face has R = I. x/y: the median SCRFD-500M landmarks of 220 aligned LFW training faces in ArcFace
# template pixels (left/right symmetrised), scaled to a 63 mm inter-eye distance; the ArcFace template itself
# puts the nose 1.1 px higher than SCRFD does, which reads as 5-7 deg of pitch. Depths: typical
# anthropometric offsets behind the nose tip (eyes 22 mm, mouth corners 20 mm).
_LAYOUT = np.array([[-18.44, 52.30], [18.44, 52.30], [0.0, 72.86], [-14.97, 91.20], [14.97, 91.20]])
_MM = 63.0 / (2 * 18.44)
FACE_3D = np.column_stack([_LAYOUT[:, 0] * _MM, (_LAYOUT[:, 1] - _LAYOUT[2, 1]) * _MM,
                           [22.0, 22.0, 0.0, 20.0, 20.0]])
_FACE_PINV = np.linalg.pinv(FACE_3D - FACE_3D.mean(axis=0))  # [3, 5]: least squares onto the centred model


def _sigmoid(x: float, x0: float, w: float) -> float:
    """The logistic ``1 / (1 + exp(-(x - x0) / w))`` (OFIQ's sigmoid mapping)."""
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, (x - x0) / w))))


def _clip100(v: float) -> float:
    """Clip a score to [0, 100]."""
    return max(0.0, min(100.0, v))


def head_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 5 landmarks: the scaled-orthographic camera that best maps
    ``FACE_3D`` onto them (least squares, then the nearest rotation), decomposed as Rz(roll) Ry(yaw) Rx(pitch).

    A closed form rather than cv2.solvePnP: with five points solvePnP has no DLT start, its SQPNP/EPNP
    solutions flip pitch between two minima on some faces, and it costs 0.3-4 ms a face here against ~30 us;
    at face distances the perspective it models changes the angles by well under a degree."""
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    x = pts - pts.mean(axis=0)
    m = (_FACE_PINV @ x).T  # [2, 3]: centred image points = m @ centred model points
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    r12 = u @ vt  # the two orthonormal rows closest to m
    (a0, a1, a2), (b0, b1, b2) = r12
    rot = np.array([r12[0], r12[1], [a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0]])
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, -rot[2, 0]))))
    pitch = math.degrees(math.atan2(rot[2, 1], rot[2, 2]))
    roll = math.degrees(math.atan2(rot[1, 0], rot[0, 0]))
    # Sign conventions (docs/components.md): yaw > 0 = nose towards the image's right; pitch > 0 = chin up
    # (nose towards the top of the image); roll > 0 = face rotated clockwise in the image.
    return -yaw, -pitch, roll


def blur_effect(grey: np.ndarray) -> float:
    """Crété-Roffet et al. (2007) no-reference blur in [0, 1] (0 = sharp): how much of the image's local
    variation survives a further 9-pixel box blur, the larger of the horizontal and vertical values."""
    g = grey.astype(np.float32)
    out = 0.0
    for axis, ksize in ((0, (1, 9)), (1, (9, 1))):
        blurred = cv2.blur(g, ksize)
        d_img = np.abs(np.diff(g, axis=axis))
        d_blur = np.abs(np.diff(blurred, axis=axis))
        s_img = float(d_img.sum())
        if s_img <= 0:
            return 1.0  # a flat patch has no detail at all
        s_lost = float(np.maximum(d_img - d_blur, 0).sum())
        out = max(out, (s_img - s_lost) / s_img)
    return out


def noise_sigma(grey: np.ndarray) -> float:
    """Immerkær (1996) fast noise estimate: standard deviation of additive Gaussian noise, in grey levels."""
    if min(grey.shape) < 3:
        return 0.0
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
    r = cv2.filter2D(grey.astype(np.float32), -1, kernel)[1:-1, 1:-1]
    return float(math.sqrt(math.pi / 2.0) * np.abs(r).mean() / 6.0)


def blockiness(grey: np.ndarray) -> float:
    """JPEG blocking: mean absolute luma step across 8x8 block boundaries divided by the mean step elsewhere
    (1 = no blocking). ``grey`` must start on the image's 8-pixel grid."""
    g = grey.astype(np.float32)
    ratios = []
    for axis in (1, 0):
        d = np.abs(np.diff(g, axis=axis))
        n = d.shape[axis]
        if n < 2 * BLOCK:
            continue
        on = d[:, BLOCK - 1::BLOCK] if axis == 1 else d[BLOCK - 1::BLOCK, :]
        total, n_on = float(d.sum()), on.size
        n_off = d.size - n_on
        off = (total - float(on.sum())) / n_off
        ratios.append(float(on.mean()) / off if off > 1e-6 else 1.0)
    return float(np.mean(ratios)) if ratios else 1.0


def _face_patch(rgb: np.ndarray, bbox: np.ndarray, grid: int = 1) -> np.ndarray:
    """The grey central part of the face box at native resolution (at most PATCH x PATCH pixels), its origin
    snapped to a multiple of ``grid``."""
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in bbox)
    # The central 60% of the box: skin, eyes, nose, mouth; little hair or background.
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    half_w = min(0.3 * (x2 - x1), PATCH / 2.0)
    half_h = min(0.3 * (y2 - y1), PATCH / 2.0)
    left = max(0, int(cx - half_w) // grid * grid)
    top = max(0, int(cy - half_h) // grid * grid)
    right = min(w, math.ceil(cx + half_w))
    bottom = min(h, math.ceil(cy + half_h))
    patch = rgb[top:bottom, left:right]
    if patch.size == 0:
        return np.zeros((0, 0), np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(patch), cv2.COLOR_RGB2GRAY)


def face_components(rgb: np.ndarray, detection: Detection, crop: np.ndarray) -> dict[str, Component]:
    """All components of one face: ``rgb`` the whole input image (HxWx3 RGB uint8), ``detection`` the face
    in it, ``crop`` its aligned 112x112 RGB crop."""
    h, w = rgb.shape[:2]
    lm = np.asarray(detection.landmarks, dtype=np.float64).reshape(5, 2)
    out: dict[str, Component] = {}

    # Geometry: from the 5 landmarks, in input pixels.
    ied = float(np.linalg.norm(lm[1] - lm[0]))
    out["inter_eye_distance"] = Component(ied, "px", 100.0 * _sigmoid(ied, 70.0, 20.0))
    yaw, pitch, roll = head_pose(lm)
    for name, angle in (("yaw", yaw), ("pitch", pitch), ("roll", roll)):
        out[name] = Component(angle, "deg", 100.0 * math.cos(math.radians(angle)) ** 2)

    # Photometry: the aligned crop's luma inside the face ellipse.
    luma = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    face = luma[FACE_MASK]
    hist = np.bincount(face, minlength=256).astype(np.float64) / face.size
    mean = float(face.mean()) / 255.0
    out["sharpness"] = _sharpness(luma)
    out["luminance_mean"] = Component(mean, "fraction", 100.0 * _sigmoid(mean, 0.2, 0.05)
                                      * (1.0 - _sigmoid(mean, 0.8, 0.05)))
    dark = float(hist[:DARK_LEVEL + 1].sum())
    bright = float(hist[BRIGHT_LEVEL:].sum())
    out["under_exposure"] = Component(dark, "fraction", _clip100(1.0 / (dark + 0.01)))
    out["over_exposure"] = Component(bright, "fraction", _clip100(1.0 / (bright + 0.01)))
    nz = hist[hist > 0]
    entropy = float(-(nz * np.log2(nz)).sum())
    out["dynamic_range"] = Component(entropy, "bits", _clip100(12.5 * entropy))
    std = float(face.std()) / 255.0
    var60 = 60.0 * std * std
    out["contrast"] = Component(std, "fraction", 100.0 * math.sin(math.pi * var60 / (var60 + 1.0)))
    out["illumination_uniformity"] = _uniformity(luma)

    # Native pixels: noise and JPEG blocking are destroyed by the alignment warp, so they read the input.
    patch = _face_patch(rgb, detection.bbox, BLOCK)
    sigma = noise_sigma(patch)
    out["noise"] = Component(sigma, "grey levels", 100.0 * math.exp(-max(sigma - 1.0, 0.0) / 4.0))
    block = blockiness(patch)
    out["compression"] = Component(block, "ratio", _clip100(100.0 * (2.0 - block) / 0.8))

    # Framing: the face in the whole image.
    box_height = float(detection.bbox[3] - detection.bbox[1])
    out["face_size"] = Component(box_height / h if h else 0.0, "fraction", None)
    out["margins"] = _margins(lm, w, h)
    return {name: out[name] for name in COMPONENT_NAMES}


def _sharpness(luma: np.ndarray) -> Component:
    """1 - blur effect of the face window of the aligned crop; score linear from 0.30 (0) to 0.55 (100)."""
    sharp = 1.0 - blur_effect(luma[_ROWS, _COLS])
    return Component(sharp, "index", _clip100(100.0 * (sharp - 0.30) / 0.25))


def _uniformity(luma: np.ndarray) -> Component:
    """Intersection of the left and right face halves' 32-bin luma histograms (1 = same lighting)."""
    left = np.bincount(luma[LEFT_MASK] >> 3, minlength=32).astype(np.float64)
    right = np.bincount(luma[RIGHT_MASK] >> 3, minlength=32).astype(np.float64)
    inter = float(np.minimum(left / left.sum(), right / right.sum()).sum())
    return Component(inter, "fraction", 100.0 * inter ** 0.3)


def _margins(lm: np.ndarray, width: int, height: int) -> Component:
    """The tightest side's room over what a portrait needs (MARGIN_NEEDS); >= 1 = every side has room."""
    left_eye, right_eye = (lm[0], lm[1]) if lm[0, 0] <= lm[1, 0] else (lm[1], lm[0])
    ied = max(float(np.linalg.norm(right_eye - left_eye)), 1e-3)
    eye_mid = (lm[0] + lm[1]) / 2.0
    t = max(float(np.linalg.norm((lm[3] + lm[4]) / 2.0 - eye_mid)), 1e-3)
    room = {"left": left_eye[0] / ied, "right": (width - right_eye[0]) / ied,
            "top": eye_mid[1] / t, "bottom": (height - eye_mid[1]) / t}
    ratio = min(float(room[side]) / need for side, need in MARGIN_NEEDS.items())
    return Component(ratio, "ratio", 100.0 * _sigmoid(ratio, 1.0, 0.1))


def weakest(components: dict[str, Component]) -> tuple[str, Component] | None:
    """The component with the lowest score (None when no component has a score)."""
    scored = [(name, c) for name, c in components.items() if c.score is not None]
    return min(scored, key=lambda item: item[1].score or 0.0) if scored else None
