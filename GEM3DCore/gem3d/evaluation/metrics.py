"""Paired fidelity on axial slice pairs: PSNR, SSIM, MS-SSIM (GEM-3D's Table 2 protocol:
the synthetic volume against the true one, slice by slice, then averaged).

Inputs are axial-first volumes on the same [0, 1] scale (`volumes.py`), so data_range = 1.
- PSNR per slice pair, capped at `PSNR_CAP` dB: an identical pair (e.g. empty background
  slices in both) would otherwise be +inf and make the volume mean infinite.
- SSIM: the standard Gaussian window (11 taps, sigma 1.5).
- MS-SSIM: the standard 5 scales need slices wider than (11 - 1) * 2^4 = 160 px; GEM-3D's
  CPU-sized slices are 32-128 px, so the window is 7 taps (sigma 1.0) and the number of
  scales is the largest s <= 5 with min(H, W) > 6 * 2^(s - 1) (32 px: 3, 64 px: 4,
  >= 97 px: 5), with the first s standard weights renormalised to sum to 1; negative
  contrast terms are clipped (torchmetrics ``normalize="relu"``). Values are therefore
  comparable only between slices of the same size.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                           peak_signal_noise_ratio, structural_similarity_index_measure)

PSNR_CAP = 100.0
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL, MS_SSIM_SIGMA = 7, 1.0


def ms_ssim_scales(height: int, width: int) -> int:
    scales = 0
    while scales < len(MS_SSIM_BETAS) and min(height, width) > (MS_SSIM_KERNEL - 1) * 2 ** scales:
        scales += 1
    if scales == 0:
        raise ValueError(f"slices of {height} x {width} px are too small for MS-SSIM (need > {MS_SSIM_KERNEL - 1} px)")
    return scales


def ms_ssim_betas(height: int, width: int) -> Tuple[float, ...]:
    betas = np.asarray(MS_SSIM_BETAS[:ms_ssim_scales(height, width)])
    return tuple(float(b) for b in betas / betas.sum())


def slice_metrics(real: np.ndarray, synthetic: np.ndarray) -> Dict[str, np.ndarray]:
    """Per axial slice pair: {"psnr", "ssim", "ms_ssim"}, each of shape (z,)."""
    if real.shape != synthetic.shape or real.ndim != 3:
        raise ValueError(f"paired volumes must be (z, y, x) of one shape, got {real.shape} and {synthetic.shape}")
    target = torch.from_numpy(np.ascontiguousarray(real, dtype=np.float32))[:, None]
    preds = torch.from_numpy(np.ascontiguousarray(synthetic, dtype=np.float32))[:, None]
    psnr = peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")
    ms = multiscale_structural_similarity_index_measure(
        preds, target, data_range=1.0, kernel_size=MS_SSIM_KERNEL, sigma=MS_SSIM_SIGMA,
        betas=ms_ssim_betas(*real.shape[1:]), normalize="relu", reduction="none")
    return {"psnr": np.minimum(psnr.double().numpy(), PSNR_CAP), "ssim": ssim.double().numpy(),
            "ms_ssim": ms.double().numpy()}


def paired_metrics(real: np.ndarray, synthetic: np.ndarray) -> Dict[str, float]:
    """Volume-level means of the slice-pair metrics."""
    return {k: float(v.mean()) for k, v in slice_metrics(real, synthetic).items()}
