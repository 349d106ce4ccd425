"""Image degradations, shared by ``crfiqa degrade`` (evaluation sets) and training augmentation.

Each degradation takes an RGB uint8 image and its drawn parameters; ``draw_chain`` draws a random
chain from a ``random.Random`` so that a seed reproduces the exact output and the parameters can be
written down.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import cv2
import numpy as np


def resample(image: np.ndarray, factor: float) -> np.ndarray:
    """Downscale by ``factor`` (area) and back up (bilinear): lost resolution at the original size."""
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (defocus / motion-free)."""
    return cv2.GaussianBlur(image, (0, 0), sigma)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG compression round trip at ``quality`` (1-100)."""
    _, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def noise(image: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Additive Gaussian sensor noise of ``sigma`` grey levels."""
    rng = np.random.default_rng(seed)
    return np.clip(image.astype(np.float32) + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def exposure(image: np.ndarray, gain: float, gamma: float) -> np.ndarray:
    """Under/over-exposure: ``255 * (gain * x / 255) ** gamma``."""
    lut = np.clip(255.0 * np.clip(gain * np.arange(256) / 255.0, 0, 1) ** gamma, 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut)


def occlude(image: np.ndarray, x: float, y: float, w: float, h: float, value: int) -> np.ndarray:
    """A flat rectangle over part of the face (fractions of the image size)."""
    out = image.copy()
    H, W = image.shape[:2]
    out[int(y * H):int((y + h) * H), int(x * W):int((x + w) * W)] = value
    return out


def misalign(image: np.ndarray, angle: float, scale: float, dx: float, dy: float) -> np.ndarray:
    """A pose-like / misaligned crop: rotation (degrees), scale and shift (fractions) about the centre."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (dx * w, dy * h)
    return cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REFLECT)


@dataclass
class Step:
    """One drawn degradation and its parameters."""

    name: str
    params: dict = field(default_factory=dict)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Apply this step."""
        return OPS[self.name](image, **self.params)

    def describe(self) -> str:
        """``name(k=v,...)`` for logs and CSV files."""
        return f"{self.name}(" + ",".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in self.params.items()) + ")"


OPS = {"resample": resample, "blur": blur, "jpeg": jpeg, "noise": noise, "exposure": exposure,
       "occlude": occlude, "misalign": misalign}


@dataclass(frozen=True)
class ChainSpec:
    """Probabilities and ranges of a random degradation chain. ``eye_px`` bounds the resampling so
    that the inter-eye distance after downscaling falls in [eye_px_min, eye_px_max] pixels."""

    p_resample: float = 0.6
    eye_px_min: float = 3.0
    eye_px_max: float = 20.0
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 3.0)
    p_jpeg: float = 0.5
    jpeg_quality: tuple[int, int] = (5, 60)
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (2.0, 15.0)
    p_exposure: float = 0.0
    p_occlude: float = 0.0
    p_misalign: float = 0.0


#: For full images before detection (``crfiqa degrade``): resolution, blur, compression, noise.
EVAL_SPEC = ChainSpec()
#: For aligned training crops: the same, plus exposure, occlusion and pose-like misalignment.
TRAIN_SPEC = ChainSpec(p_resample=0.5, eye_px_min=4.0, eye_px_max=25.0, p_blur=0.35, p_jpeg=0.35, p_noise=0.25,
                       p_exposure=0.2, p_occlude=0.15, p_misalign=0.2)
#: The inter-eye distance of the ArcFace 112x112 template, pixels.
TEMPLATE_EYE_PX = 35.24


def draw_chain(rng: random.Random, eye_px: float, spec: ChainSpec = EVAL_SPEC) -> list[Step]:
    """A random chain of degradations (at least one) for an image whose eyes are ``eye_px`` apart."""
    steps: list[Step] = []
    while not steps:
        if rng.random() < spec.p_misalign:
            steps.append(Step("misalign", {"angle": rng.uniform(-20, 20), "scale": rng.uniform(0.85, 1.2),
                                           "dx": rng.uniform(-0.08, 0.08), "dy": rng.uniform(-0.08, 0.08)}))
        if rng.random() < spec.p_resample:
            target = rng.uniform(spec.eye_px_min, spec.eye_px_max)
            steps.append(Step("resample", {"factor": min(1.0, target / max(eye_px, 1.0))}))
        if rng.random() < spec.p_blur:
            steps.append(Step("blur", {"sigma": rng.uniform(*spec.blur_sigma)}))
        if rng.random() < spec.p_exposure:
            steps.append(Step("exposure", {"gain": rng.uniform(0.3, 2.0), "gamma": rng.uniform(0.6, 1.8)}))
        if rng.random() < spec.p_noise:
            steps.append(Step("noise", {"sigma": rng.uniform(*spec.noise_sigma), "seed": rng.randrange(2**31)}))
        if rng.random() < spec.p_occlude:
            w, h = rng.uniform(0.2, 0.6), rng.uniform(0.15, 0.4)
            steps.append(Step("occlude", {"x": rng.uniform(0, 1 - w), "y": rng.uniform(0, 1 - h), "w": w, "h": h,
                                          "value": rng.choice([0, 128, 255])}))
        if rng.random() < spec.p_jpeg:
            steps.append(Step("jpeg", {"quality": rng.randint(*spec.jpeg_quality)}))
    return steps


def apply_chain(image: np.ndarray, steps: list[Step]) -> np.ndarray:
    """Apply the steps in order."""
    for step in steps:
        image = step.apply(image)
    return np.ascontiguousarray(image)
