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
``stripe_ratio``: stripe index (`stripe_index`: power of differences along z over in-plane
ones, pooled over volumes) of the synthetic volumes over the real ones' (1 = as striped as
real scans; horizontal stripes in coronal/sagittal views push it up). ``stripe_ratio_coherent``:
the same after `coherent_view` (each slice smoothed in-plane), so only bands that span a row of
a coronal/sagittal view count, not pixel noise that differs from slice to slice.
Foreground: either voxel of a pair above 0.05. Voxel samples are thinned to at most
`MAX_SAMPLES` per volume (evenly strided, so deterministic).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

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


def stripe_profile(volume: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per slice pair z: (sum of squared differences along z, sum of squared in-plane
    differences, mean of x and y) over voxels foreground in both slices. Horizontal stripes in
    coronal and sagittal views are differences along z that the in-plane ones do not match."""
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3 or min(volume.shape) < 2:
        raise ValueError(f"stripe index needs a (z, y, x) volume at least 2 voxels wide, got {volume.shape}")
    v = volume[:, :-1, :-1]
    keep = (v[1:] > FOREGROUND) & (v[:-1] > FOREGROUND)
    dz = np.diff(v, axis=0)
    dxy = (np.diff(volume, axis=2)[:-1, :-1] ** 2 + np.diff(volume, axis=1)[:-1, :, :-1] ** 2) / 2
    return (dz ** 2 * keep).sum(axis=(1, 2)), (dxy * keep).sum(axis=(1, 2))


COHERENT_SIGMA = 2.0  # px: in-plane detail finer than this is not a band across a row


def coherent_view(volume: np.ndarray) -> np.ndarray:
    """Each axial slice of a (z, y, x) volume smoothed in-plane (Gaussian, `COHERENT_SIGMA` px)."""
    return ndimage.gaussian_filter(np.asarray(volume, dtype=np.float64), (0, COHERENT_SIGMA, COHERENT_SIGMA))


def pooled_stripe_index(profiles: Sequence[Tuple[np.ndarray, np.ndarray]]) -> float:
    """`stripe_index` of several volumes (or parts of them) together, from their
    `stripe_profile`s: summed power along z over summed in-plane power; NaN without in-plane
    texture."""
    along_z = sum(float(z.sum()) for z, _ in profiles)
    in_plane = sum(float(p.sum()) for _, p in profiles)
    return along_z / in_plane if in_plane > 0 else float("nan")


def stripe_index(volume: np.ndarray) -> float:
    """Power of the differences along z over the in-plane ones (`stripe_profile`): 1 for
    isotropic texture or noise, larger when slices jump. Contrast cancels out, so a blurred or
    low-contrast volume is compared fairly with a real one."""
    index = pooled_stripe_index([stripe_profile(volume)])
    if np.isnan(index):
        raise ValueError("stripe index: the volume has no foreground texture (no voxel pair above "
                         f"{FOREGROUND} that varies in-plane)")
    return index


def stripe_ratio(real: np.ndarray, synthetic: np.ndarray) -> float:
    """`stripe_index` of ``synthetic`` over that of ``real`` (1: as striped as the real scan)."""
    return stripe_index(synthetic) / stripe_index(real)


class ConsistencyStats:
    """Collects the distributions of real and synthetic volumes; `distances()` compares them."""

    def __init__(self):
        self.samples: Dict[str, Dict[str, List[np.ndarray]]] = {
            side: {m: [] for m in MEASURES} for side in ("real", "synthetic")}
        self.seam_max: Dict[str, List[float]] = {"real": [], "synthetic": []}
        self.stripe: Dict[str, Dict[str, np.ndarray]] = {
            kind: {"real": np.zeros(2), "synthetic": np.zeros(2)} for kind in ("", "_coherent")}

    def add(self, side: str, volume: np.ndarray) -> None:
        volume = np.asarray(volume, dtype=np.float32)
        s = self.samples[side]
        s["isd"].append(_thin(interslice_differences(volume)))
        s["grad_coronal"].append(_thin(plane_gradients(volume, "coronal")))
        s["grad_sagittal"].append(_thin(plane_gradients(volume, "sagittal")))
        profile = seam_profile(volume)
        s["seam"].append(profile.astype(np.float64))
        self.seam_max[side].append(float(profile.max()) if len(profile) else 0.0)
        self.stripe[""][side] += [part.sum() for part in stripe_profile(volume)]
        self.stripe["_coherent"][side] += [part.sum() for part in stripe_profile(coherent_view(volume))]

    def distances(self) -> Dict[str, float]:
        out = {}
        for m in MEASURES:
            real, synthetic = (np.concatenate(self.samples[side][m]) for side in ("real", "synthetic"))
            if len(real) == 0 or len(synthetic) == 0:
                raise ValueError(f"consistency: no foreground voxels to compare for {m!r}")
            out[f"{m}_w1"] = float(wasserstein_distance(real, synthetic))
        out["seam_max_real"] = float(np.mean(self.seam_max["real"]))
        out["seam_max_synthetic"] = float(np.mean(self.seam_max["synthetic"]))
        for kind, sums in self.stripe.items():
            (zs, ps), (zr, pr) = sums["synthetic"], sums["real"]
            if ps > 0 and pr > 0 and zr > 0:           # undefined for volumes without texture
                out["stripe_ratio" + kind] = float((zs / ps) / (zr / pr))
        return out
