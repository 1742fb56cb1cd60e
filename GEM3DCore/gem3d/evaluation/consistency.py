"""Volumetric consistency: do synthetic volumes change between slices the way real ones do?

A window-by-window sampler can leave seams (a jump at a window border) or flicker (every
slice a little different), which axial-slice metrics cannot see. Three distributions are
compared between real and synthetic volumes (axial-first, [0, 1] scale) with the
Wasserstein-1 distance (in intensity units, 0 = identical distributions):

- ``isd``: inter-slice differences |x[z+1] - x[z]| of foreground voxel pairs;
- ``grad_coronal`` / ``grad_sagittal``: gradient magnitudes of coronal (z, x) and sagittal
  (z, y) planes, which mix the slice direction with an in-plane one;
- ``seam``: the per-slice-pair profile d(z) = mean foreground |x[z+1] - x[z]| divided by
  the volume's median d: a seam is one pair with a large ratio, flicker a wide spread.
``seam_max_*`` (mean over volumes of max_z d(z) / median d) needs no reference at all.
``stripe_ratio``: stripe power (`stripe_power`) of the synthetic volumes over the real ones'
(1 = as striped as real scans; horizontal stripes in coronal/sagittal views push it up).
Foreground: either voxel of a pair above 0.05. Voxel samples are thinned to at most
`MAX_SAMPLES` per volume (evenly strided, so deterministic).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
from scipy import ndimage
from scipy.stats import wasserstein_distance

from gem3d.evaluation.volumes import FOREGROUND

MAX_SAMPLES = 200_000
MEASURES = ("isd", "grad_coronal", "grad_sagittal", "seam")


def _thin(values: np.ndarray) -> np.ndarray:
    values = values.ravel()
    step = max(1, int(np.ceil(len(values) / MAX_SAMPLES)))
    return values[::step].astype(np.float64)


def _slice_pairs(volume: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(|x[z+1] - x[z]|, whether either voxel of the pair is foreground)."""
    return np.abs(np.diff(volume, axis=0)), np.maximum(volume[1:], volume[:-1]) > FOREGROUND


def interslice_differences(volume: np.ndarray) -> np.ndarray:
    """|x[z+1] - x[z]| of the pairs with a foreground voxel (a flat array)."""
    diff, keep = _slice_pairs(volume)
    return diff[keep]


def plane_gradients(volume: np.ndarray, plane: str) -> np.ndarray:
    """Forward-difference gradient magnitudes of coronal (slice, x) or sagittal (slice, y)
    planes at foreground voxels."""
    if plane not in ("coronal", "sagittal"):
        raise ValueError(f"plane must be 'coronal' or 'sagittal', got {plane!r}")
    dz = np.diff(volume, axis=0)[:, :-1, :-1]
    if plane == "coronal":
        din = np.diff(volume, axis=2)[:-1, :-1, :]
    else:
        din = np.diff(volume, axis=1)[:-1, :, :-1]
    v = volume[:-1, :-1, :-1]
    return np.hypot(dz, din)[v > FOREGROUND]


def seam_profile(volume: np.ndarray) -> np.ndarray:
    """d(z) / median(d) for each slice pair z (pairs without foreground are left out)."""
    diff, keep = _slice_pairs(volume)
    counts = keep.sum(axis=(1, 2))
    d = (diff * keep).sum(axis=(1, 2))[counts > 0] / counts[counts > 0]
    median = np.median(d) if len(d) else 0.0
    return d / median if median > 0 else np.zeros_like(d)


STRIPE_SIGMA = 2.0  # in-plane Gaussian (voxels) that averages voxel noise out of the profiles


def stripe_power(volume: np.ndarray, sigma: float = STRIPE_SIGMA) -> float:
    """Mean squared slice-to-slice difference of the in-plane-smoothed volume over foreground
    pairs: the power of the jumps along z seen in coronal and sagittal profiles. Smoothing keeps
    what is coherent across a slice (a stripe: the whole slice a little brighter) and removes
    independent voxel noise, which every slice of a real scan has too."""
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3 or volume.shape[0] < 2:
        raise ValueError(f"stripe power needs a (z, y, x) volume of at least 2 slices, got {volume.shape}")
    smooth = ndimage.gaussian_filter(volume, (0, sigma, sigma), mode="nearest")
    _, keep = _slice_pairs(volume)
    if not keep.any():
        raise ValueError("stripe power: the volume has no foreground voxels")
    return float(np.mean(np.diff(smooth, axis=0)[keep] ** 2))


def stripe_ratio(real: np.ndarray, synthetic: np.ndarray) -> float:
    """`stripe_power` of ``synthetic`` over that of ``real`` (same [0, 1] scale)."""
    return stripe_power(synthetic) / stripe_power(real)


class ConsistencyStats:
    """Collects the distributions of real and synthetic volumes; `distances()` compares them."""

    def __init__(self):
        self.samples: Dict[str, Dict[str, List[np.ndarray]]] = {
            side: {m: [] for m in MEASURES} for side in ("real", "synthetic")}
        self.seam_max: Dict[str, List[float]] = {"real": [], "synthetic": []}
        self.stripe: Dict[str, List[float]] = {"real": [], "synthetic": []}

    def add(self, side: str, volume: np.ndarray) -> None:
        volume = np.asarray(volume, dtype=np.float32)
        s = self.samples[side]
        s["isd"].append(_thin(interslice_differences(volume)))
        s["grad_coronal"].append(_thin(plane_gradients(volume, "coronal")))
        s["grad_sagittal"].append(_thin(plane_gradients(volume, "sagittal")))
        profile = seam_profile(volume)
        s["seam"].append(profile.astype(np.float64))
        self.seam_max[side].append(float(profile.max()) if len(profile) else 0.0)
        self.stripe[side].append(stripe_power(volume))

    def distances(self) -> Dict[str, float]:
        out = {}
        for m in MEASURES:
            real, synthetic = (np.concatenate(self.samples[side][m]) for side in ("real", "synthetic"))
            if len(real) == 0 or len(synthetic) == 0:
                raise ValueError(f"consistency: no foreground voxels to compare for {m!r}")
            out[f"{m}_w1"] = float(wasserstein_distance(real, synthetic))
        out["seam_max_real"] = float(np.mean(self.seam_max["real"]))
        out["seam_max_synthetic"] = float(np.mean(self.seam_max["synthetic"]))
        out["stripe_ratio"] = float(np.mean(self.stripe["synthetic"]) / np.mean(self.stripe["real"]))
        return out
