"""Augmentations of aligned RGB uint8 crops; each draws from the ``random.Random`` it is given."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from crfiqa.evaluation.degradations import TEMPLATE_EYE_PX, TRAIN_SPEC, apply_chain, draw_chain

Augment = Callable[[np.ndarray, random.Random], np.ndarray]


def horizontal_flip(crop: np.ndarray, rng: random.Random) -> np.ndarray:
    """Mirror with probability 0.5 (the paper's only augmentation)."""
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def degrade(crop: np.ndarray, rng: random.Random, p: float = 0.5) -> np.ndarray:
    """With probability ``p``, a random chain of realistic degradations (resolution, blur, compression,
    noise, exposure, occlusion, misalignment): CR computed on the degraded sample then spans the range
    that deep-funnelled LFW alone does not."""
    if rng.random() >= p:
        return crop
    return apply_chain(crop, draw_chain(rng, TEMPLATE_EYE_PX, TRAIN_SPEC))


def always_degrade(crop: np.ndarray, rng: random.Random) -> np.ndarray:
    """A random degradation chain on every crop (the degraded copies of ``mode: closed_form``)."""
    return degrade(crop, rng, p=1.0)


AUGMENTATIONS: dict[str, Augment] = {"flip": horizontal_flip, "degrade": degrade, "always_degrade": always_degrade}


def build_augmentations(names: list[str]) -> list[Augment]:
    """Augmentations by name, in order."""
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentations {unknown}; known: {', '.join(AUGMENTATIONS)}")
    return [AUGMENTATIONS[n] for n in names]
