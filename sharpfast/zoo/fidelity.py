"""Prompt fidelity for the digits model: does an image show the digit its prompt names?

The stand-in for the CLIP score of the paper: a scikit-learn support-vector classifier trained on
the 1797 real digits at 16x16 plus augmented copies (shifts, scales, rotations, stroke width, so
that it judges the shape, not the exact pixels of a training image). Deterministic; trained once
per process (a few seconds).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

AUGMENTED_COPIES = 3


@functools.lru_cache(maxsize=1)
def digit_classifier() -> Any:
    """An SVM trained on the digits data: the judge of which digit an image shows."""
    from sklearn.svm import SVC

    from .digits_data import augment, digit_images

    x, y = digit_images()
    g = torch.Generator().manual_seed(0)
    xs = [x] + [augment(x, g) for _ in range(AUGMENTED_COPIES)]
    feats = torch.cat(xs).reshape(-1, x[0].numel()).numpy()
    clf = SVC(C=10.0, gamma="scale")
    clf.fit(feats, np.tile(y, len(xs)))
    return clf


def predict_digits(images: torch.Tensor) -> np.ndarray:
    """Predicted digit of each image (N, 1, 16, 16) in [-1, 1]."""
    return digit_classifier().predict(images.detach().float().reshape(len(images), -1).cpu().numpy())


def fidelity(images: torch.Tensor, digits) -> np.ndarray:
    """1.0 where the image is classified as the prompted digit, else 0.0."""
    return (predict_digits(images) == np.asarray(digits).reshape(-1)).astype(np.float64)
