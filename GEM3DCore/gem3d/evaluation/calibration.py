"""A per-class linear intensity map fitted on a few voxels: the contrast-calibrated baseline.

Why: GEM-3D sees its informed slice and the mask-only baseline does not, so part of GEM-3D's
gain may be the slice's contrast alone. Fitting ``y = a_c x + b_c`` per class ``c`` on the
informed slice's voxels only and applying it to the whole baseline volume gives the baseline
that contrast and nothing else; if the gain were only contrast, this baseline would close it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

MIN_VOXELS = 3  # a class with fewer fitting voxels gets the fit over all of them


def linear_fit(x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    """Least-squares (a, b) of y = a x + b; a constant x gives (0, mean y)."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.size == 0:
        raise ValueError("no voxels to fit the intensity map on")
    if np.ptp(x) <= 1e-12 * max(1.0, float(np.abs(x).max())):
        return 0.0, float(y.mean())
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def fit_per_class(x: np.ndarray, y: np.ndarray, classes: np.ndarray,
                  where: np.ndarray) -> Dict[int, Tuple[float, float]]:
    """(a, b) for every class in ``classes``, fitted on the voxels ``where`` of that class (a
    constant x there: its mean y). A class with fewer than MIN_VOXELS there (absent from the
    informed slice, say) gets the fit over all of ``where``."""
    x, y, classes, where = (np.asarray(v) for v in (x, y, classes, where))
    if not (x.shape == y.shape == classes.shape == where.shape):
        raise ValueError(f"x, y, classes and where must have one shape, got {x.shape}, {y.shape}, "
                         f"{classes.shape}, {where.shape}")
    overall = linear_fit(x[where], y[where])
    out = {}
    for c in np.unique(classes):
        inside = where & (classes == c)
        out[int(c)] = linear_fit(x[inside], y[inside]) if inside.sum() >= MIN_VOXELS else overall
    return out


def apply_per_class(x: np.ndarray, classes: np.ndarray, coefficients: Dict[int, Tuple[float, float]]) -> np.ndarray:
    """Each class's map applied to its voxels."""
    out = np.empty(np.shape(x), np.float32)
    for c, (a, b) in coefficients.items():
        inside = classes == c
        out[inside] = a * np.asarray(x)[inside] + b
    return out


def intensity_classes(x: np.ndarray, labels: np.ndarray, bins: int = 4) -> np.ndarray:
    """Classes that hold no anatomy the mask-only model lacks: each lesion label its own class
    (both models get the mask), healthy voxels binned by quantiles of ``x`` itself (classes
    -1 .. -bins, darkest first), so the map is a piecewise-linear contrast change of ``x``."""
    x, labels = np.asarray(x), np.asarray(labels)
    healthy = labels == 0
    edges = np.quantile(x[healthy], np.linspace(0, 1, bins + 1)[1:-1]) if healthy.any() else []
    return np.where(healthy, -1 - np.searchsorted(edges, x, side="right"), labels).astype(np.int64)
