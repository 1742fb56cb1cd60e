"""Mask adherence: does the synthetic image show the structures its conditioning mask asks for?

A segmenter reads the synthetic volume; Dice with the conditioning mask says how well the
generator followed the mask. Any callable ``segment(volume) -> labels`` (axial-first volume
on the [0, 1] scale in, integer labels of the same shape out) can serve:

- `PhantomBrainRule`: the intensity rule of `gem3d.phantom` FLAIR brains (tumour labels are
  painted at fixed intensities: edema ~2.4x, enhancing ~1.8x, necrosis ~0.8x the head's
  median, under a smooth bias field). No training, no ground truth needed, brains only.
- `gem3d.evaluation.segmenter.SliceSegmenter`: a small network trained on real data, for
  any dataset.
Run the same segmenter on the real volumes too: its Dice there is the ceiling that a
perfect generator would reach (the rule is far from perfect on small lesion sub-regions).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import numpy as np
from scipy import ndimage

Segmenter = Callable[[np.ndarray], np.ndarray]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (nothing asked, nothing drawn)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def dice_scores(predicted: np.ndarray, mask: np.ndarray, labels: Iterable[int]) -> Dict[str, float]:
    """Dice per label value (``label_<v>``) and of the union of all labels (``all``)."""
    out = {"all": dice(predicted > 0, mask > 0)}
    for value in labels:
        out[f"label_{int(value)}"] = dice(predicted == value, mask == value)
    return out


def _split_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a 1D sample (maximal between-class variance), over its quantiles."""
    values = np.sort(values)
    best_t, best_w = float(values[len(values) // 2]), -1.0
    for t in np.quantile(values, np.linspace(0.05, 0.95, 91)):
        low, high = values[values <= t], values[values > t]
        if len(low) and len(high):
            w = len(low) * len(high) * (high.mean() - low.mean()) ** 2
            if w > best_w:
                best_t, best_w = float(t), w
    return best_t


class PhantomBrainRule:
    """Tumour labels of a phantom FLAIR brain from intensities alone.

    1. Head: voxels above 0.08. 2. Bias field: normalised Gaussian smoothing (sigma = width/8)
    of normal-tissue voxels (0.6-1.45x the field, two passes from 0.5-1.6x the head median).
    3. r = lightly smoothed image / field; the tumour is the largest connected region with
    r > 1.3. 4. Inside it, Otsu's split of r: bright = edema, the rest = enhancing; voxels
    enclosed by enhancing = necrosis. Labels: BraTS values (1 necrosis, 2 edema, 4 enhancing).
    """

    name = "phantom-brain-rule"
    labels = (1, 2, 4)

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        v = np.asarray(volume, dtype=np.float32)
        out = np.zeros(v.shape, np.uint8)
        head = v > 0.08
        if not head.any():
            return out
        sigma = v.shape[-1] / 8
        median = float(np.median(v[head]))
        tissue = head & (v > 0.5 * median) & (v < 1.6 * median)
        for _ in range(2):
            weight = ndimage.gaussian_filter(tissue.astype(np.float32), sigma)
            field = np.maximum(ndimage.gaussian_filter(v * tissue, sigma) / np.maximum(weight, 1e-3), 1e-3)
            tissue = head & (v / field > 0.6) & (v / field < 1.45)
        r = ndimage.gaussian_filter(v, 0.7) / field
        candidate = head & (r > 1.3)
        regions, n = ndimage.label(candidate)
        if n == 0:
            return out
        tumour = regions == 1 + int(np.argmax(ndimage.sum(candidate, regions, range(1, n + 1))))
        bright = r > _split_threshold(r[tumour])
        out[tumour & bright] = 2
        out[tumour & ~bright] = 4
        enhancing = out == 4
        out[ndimage.binary_fill_holes(enhancing) & ~enhancing & (out == 0)] = 1
        return out
