"""Through-plane smoothing of per-slice decoded volumes: the stripe fix.

The VAE decodes each axial slice on its own. It blurs a slice in-plane, but its errors are
independent from one slice to the next, so coronal and sagittal views show horizontal stripes
(BENCHMARKS.md section 7: the real scan's own VAE round trip is already 1.21x as striped as the
scan). A [a, 1 - 2a, a] filter along z after decoding gives the output the resolution along z
that the decoder gives it in-plane. ``a`` is a fact of the VAE, calibrated once after the VAE is
trained (`calibrate`: the a that makes decoded training volumes as smooth along z, for their
in-plane detail, as the volumes themselves) and kept in the bundle as ``config.vae.through_plane``
(0 = off, as in bundles made before it existed and imported official checkpoints).

`ThroughPlane` applies it while windows stream out: a window's slab is smoothed with whatever
neighbour slices are decoded so far (the slice itself stands in for one not decoded yet), and
windows overlap, so the slice at a window's far edge is sent again, with both neighbours, by
the next window: the last value sent for every slice is the fully smoothed one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from gem3d.evaluation.consistency import pooled_stripe_index, stripe_profile
from gem3d.models import decode_latents, encode_slices

MAX_A = 0.25                                   # [0.25, 0.5, 0.25]: the strongest filter kept positive
CALIBRATION_GRID = np.round(np.linspace(0.0, MAX_A, 21), 4)  # steps of 0.0125
CALIBRATION_CASES = 8                          # volumes enough to pool the index over


def smooth(volume: np.ndarray, a: float) -> np.ndarray:
    """[a, 1 - 2a, a] along axis 0 of a whole volume (`ThroughPlane` with one window)."""
    volume = np.asarray(volume, dtype=np.float32)
    return ThroughPlane(len(volume), a).add(0, len(volume), volume)


def calibrate(decoded: Sequence[np.ndarray], real: Sequence[np.ndarray]) -> float:
    """The filter strength a (on `CALIBRATION_GRID`) that brings the pooled stripe index of the
    ``decoded`` volumes closest to that of the ``real`` ones; both (Z, S, S) in [-1, 1], the
    model's intensity range. 0 when the real volumes have no in-plane texture to compare with."""
    def index(volumes) -> float:
        value = pooled_stripe_index([stripe_profile((np.asarray(v, np.float64) + 1.0) / 2.0) for v in volumes])
        return value if value > 0 else float("nan")           # no texture: nothing to compare

    target = index(real)
    if not np.isfinite(target):
        return 0.0
    errors = [abs(np.log(index([smooth(d, a) for d in decoded]) / target)) for a in CALIBRATION_GRID]
    return float(CALIBRATION_GRID[int(np.nanargmin(errors))]) if np.isfinite(errors).any() else 0.0


@torch.no_grad()
def calibrate_vae(vae, scale: float, volumes: Sequence[np.ndarray]) -> float:
    """`calibrate` on the VAE's slice-by-slice round trips of the first `CALIBRATION_CASES`
    ``volumes`` ((Z, S, S) in [-1, 1]): the filter strength this VAE needs."""
    real = list(volumes)[:CALIBRATION_CASES]
    device = next(vae.parameters()).device
    decoded = [decode_latents(vae, encode_slices(vae, torch.from_numpy(v)[:, None].to(device), scale), scale)
               [:, 0].clamp(-1, 1).float().cpu().numpy() for v in real]
    return calibrate(decoded, real)


class ThroughPlane:
    """Smooths a volume of ``n_slices`` decoded slices that arrives window by window."""

    def __init__(self, n_slices: int, a: float):
        if not 0.0 <= a <= MAX_A:
            raise ValueError(f"through-plane filter a must be in [0, {MAX_A}], got {a}")
        self.a = float(a)
        self._decoded: np.ndarray = np.zeros(0, np.float32)
        self._have = np.zeros(n_slices, bool)

    def add(self, start: int, stop: int, slices: np.ndarray) -> np.ndarray:
        """Record the decoded slices ``start:stop`` and return them smoothed with the neighbours
        decoded so far."""
        slices = np.asarray(slices, dtype=np.float32)
        if self.a == 0.0:
            return slices
        if self._decoded.size == 0:
            self._decoded = np.zeros((len(self._have),) + slices.shape[1:], np.float32)
        self._decoded[start:stop], self._have[start:stop] = slices, True
        below = self._decoded[start - 1] if start > 0 and self._have[start - 1] else slices[0]
        above = self._decoded[stop] if stop < len(self._have) and self._have[stop] else slices[-1]
        padded = np.concatenate([below[None], slices, above[None]])
        return (self.a * (padded[:-2] + padded[2:]) + (1.0 - 2.0 * self.a) * slices).astype(np.float32)
