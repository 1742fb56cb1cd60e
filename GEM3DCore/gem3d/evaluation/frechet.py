"""Frechet distances between real and synthetic slices, per plane (FID-A / FID-C / FID-S).

GEM-3D reports FID on axial, coronal and sagittal slices: axial FID measures slice
quality, coronal and sagittal FIDs also see seams and flicker between slices. Planes are
taken evenly spaced inside each volume's foreground bounding box (edge planes of pure
background would otherwise dominate), resized to the extractor's square input without
keeping the aspect ratio (real and synthetic are treated alike, so this cancels out).

FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64; the trace of the
matrix square root is the sum of the square roots of the eigenvalues of S_a S_b (real and
non-negative for covariance matrices; round-off is clipped), as torchmetrics computes it.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from gem3d.evaluation.volumes import FOREGROUND

PLANES = ("axial", "coronal", "sagittal")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"a Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)).sum()
    return float(max(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * root_trace, 0.0))


def plane_indices(volume: np.ndarray, axis: int, count: int) -> np.ndarray:
    """`count` indices along `axis`, evenly spaced over the foreground's extent (all if fewer)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero((volume > FOREGROUND).any(axis=other))[0]
    lo, hi = (present[0], present[-1]) if len(present) else (0, volume.shape[axis] - 1)
    if hi - lo + 1 <= count:
        return np.arange(lo, hi + 1)
    return np.unique(np.linspace(lo, hi, count).round().astype(int))


def planes(volume: np.ndarray, plane: str, count: int) -> np.ndarray:
    """Slices (k, H, W) of an axial-first volume (z, y, x): axial (y, x), coronal (z, x),
    sagittal (z, y)."""
    axis = PLANES.index(plane)
    return np.moveaxis(volume, axis, 0)[plane_indices(volume, axis, count)]


@torch.no_grad()
def extract(extractor: torch.nn.Module, slices: np.ndarray, batch: int = 64) -> np.ndarray:
    """Features (k, D) of slices (k, H, W) in [0, 1]."""
    device = next(extractor.parameters()).device
    out = []
    for i in range(0, len(slices), batch):
        x = torch.from_numpy(np.ascontiguousarray(slices[i:i + batch], dtype=np.float32))[:, None]
        out.append(extractor(x.to(device)).double().cpu().numpy())
    return np.concatenate(out)


class FrechetPlanes:
    """Collects per-plane features of two sets of volumes, then gives FID-A/C/S."""

    def __init__(self, extractor: torch.nn.Module, planes_per_volume: int = 32):
        self.extractor, self.count = extractor, planes_per_volume
        self.features: Dict[str, Dict[str, List[np.ndarray]]] = {
            side: {p: [] for p in PLANES} for side in ("real", "synthetic")}

    def add(self, side: str, volume: np.ndarray) -> None:
        for plane in PLANES:
            self.features[side][plane].append(extract(self.extractor, planes(volume, plane, self.count)))

    def distances(self) -> Dict[str, float]:
        return {p: frechet_distance(np.concatenate(self.features["real"][p]),
                                    np.concatenate(self.features["synthetic"][p])) for p in PLANES}
