"""A second degradation family for evaluation: ISO/IEC 29794-5 operators from ``ofiq-syngen`` (MIT) that
share no operator with the training augmentation of ``degradations.py`` (resampling, Gaussian blur, JPEG,
Gaussian noise, gain/gamma exposure, flat rectangles, rotation/scale/shift). A model trained with that
augmentation and evaluated on this family is tested on degradations it never saw."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import cv2
import numpy as np

#: (name, ofiq-syngen component, index of the operator in its registry list). Excluded on purpose,
#: because training applies the same operation: Gaussian blur, additive noise, JPEG, brightness and
#: over/under-exposure, resolution (inter-eye distance, head size), roll and crops/shifts, occlusions.
OPERATORS: tuple[tuple[str, str, int], ...] = (
    ("motion_blur", "Sharpness.scalar", 1),
    ("illumination_gradient", "IlluminationUniformity.scalar", 0),
    ("contrast", "LuminanceVariance.scalar", 0),
    ("dynamic_range", "DynamicRange.scalar", 0),
    ("colour_cast", "NaturalColour.scalar", 0),
    ("barrel_distortion", "RadialDistortion.scalar", 0),
    ("yaw", "HeadPoseYaw.scalar", 0),
    ("pitch", "HeadPosePitch.scalar", 0),
)
NAMES = tuple(name for name, _, _ in OPERATORS)
#: Whole-photo warps: stacked, their reflected borders turn a photo into a kaleidoscope without a face.
GEOMETRIC = ("barrel_distortion", "yaw", "pitch")


@dataclass(frozen=True)
class SyngenSpec:
    """Each operator is drawn with probability ``p`` (at least one per image, at most one geometric) at a
    severity in ``severity`` (``geometric_severity`` for the warps)."""

    p: float = 0.3
    severity: tuple[float, float] = (0.3, 0.9)
    geometric_severity: tuple[float, float] = (0.2, 0.7)


def draw_chain(rng: random.Random, spec: SyngenSpec = SyngenSpec()) -> list[dict]:
    """A random chain ``[{"name", "severity", "seed"}]`` (at least one step), in the fixed operator order."""
    steps: list[dict] = []
    while not steps:
        drawn = [name for name in NAMES if rng.random() < spec.p]
        warps = [n for n in drawn if n in GEOMETRIC]
        keep = rng.choice(warps) if warps else None
        for name in drawn:
            if name in GEOMETRIC and name != keep:
                continue
            lo, hi = spec.geometric_severity if name in GEOMETRIC else spec.severity
            steps.append({"name": name, "severity": round(rng.uniform(lo, hi), 4), "seed": rng.randrange(2**31)})
    return steps


def _operator(name: str):
    """The ofiq-syngen function behind ``name`` (imported late: only ``crfiqa degrade --family ofiq`` needs it)."""
    os.environ.setdefault("OFIQ_SYNGEN_OFFLINE", "1")  # never fetch assets at run time
    from ofiq_syngen.components import COMPONENT_REGISTRY

    component, index = next((c, i) for n, c, i in OPERATORS if n == name)
    return COMPONENT_REGISTRY[component][index].function


def apply_chain(rgb: np.ndarray, steps: list[dict]) -> np.ndarray:
    """Apply the steps to a whole RGB photo (ofiq-syngen works on BGR; no face context: its
    context-free paths, so no OFIQ models are needed)."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for step in steps:
        bgr = _operator(step["name"])(bgr, float(step["severity"]), int(step["seed"]), None)
        bgr = np.clip(bgr, 0, 255).astype(np.uint8) if bgr.dtype != np.uint8 else bgr
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
