"""The one alignment implementation: 5-point similarity transform onto the ArcFace 112x112 template."""

from __future__ import annotations

import cv2
import numpy as np

#: ArcFace 112x112 template: left eye, right eye, nose tip, left mouth corner, right mouth corner
#: (image coordinates; "left" = smaller x). The +8 x-shift of the 112-wide template is already applied.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ALIGNED_SIZE = 112
#: Bumped whenever the template, transform or warp changes, so caches keyed on it are invalidated.
ALIGNMENT_VERSION = 1


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` onto ``dst``.

    Umeyama (1991), the estimator insightface's ``norm_crop`` uses through scikit-image; returns 2x3.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(dim)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    if np.linalg.matrix_rank(cov) == 0:
        raise ValueError("degenerate landmarks: all points coincide")
    rot = u @ np.diag(d) @ vt
    var_src = src_c.var(axis=0).sum()
    scale = (s * d).sum() / var_src
    t = dst_mean - scale * rot @ src_mean
    return np.hstack([scale * rot, t[:, None]])


def estimate_alignment(landmarks: np.ndarray) -> np.ndarray:
    """The 2x3 matrix mapping image landmarks [5,2] onto the ArcFace template."""
    return similarity_transform(np.asarray(landmarks, dtype=np.float64).reshape(5, 2), ARCFACE_TEMPLATE)


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """Warp ``image`` (HxWx3, any channel order, kept as is) to a ``size``x``size`` aligned face crop."""
    matrix = estimate_alignment(landmarks)
    if size != ALIGNED_SIZE:
        matrix = matrix * (size / ALIGNED_SIZE)
    return cv2.warpAffine(image, matrix, (size, size), borderValue=0.0)


def as_aligned(image: np.ndarray) -> np.ndarray:
    """Treat ``image`` as an already aligned face: resize to 112x112 when it is not that size."""
    if image.shape[:2] == (ALIGNED_SIZE, ALIGNED_SIZE):
        return image
    interp = cv2.INTER_AREA if min(image.shape[:2]) > ALIGNED_SIZE else cv2.INTER_LINEAR
    return cv2.resize(image, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=interp)
