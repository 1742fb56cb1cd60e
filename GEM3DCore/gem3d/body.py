"""The outside-body label: masks carry -1 where the scan shows no body.

The official models are trained on nnU-Net-preprocessed masks in which voxels
outside the image's non-zero region are -1, so the mask condition also gives
the body outline. At inference the outline comes from the reference scan,
whatever lesion the user draws.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

OUTSIDE = -1


def body_region(image: np.ndarray) -> np.ndarray:
    """Voxels of the body in a normalised image ([-1, 1], background at -1):
    above the background level, holes filled slice by slice (dark ventricles and
    air in the bowel stay inside)."""
    if image.ndim != 3:
        raise ValueError(f"body_region: expected a (z, y, x) image, got shape {image.shape}")
    foreground = image > -1.0 + 0.05
    return np.stack([ndimage.binary_fill_holes(s) for s in foreground])


def with_outside_label(mask: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The mask with OUTSIDE where `image` shows no body; labels inside the body are kept."""
    if mask.shape != image.shape:
        raise ValueError(f"mask {mask.shape} and image {image.shape} are not on the same grid")
    out = mask.astype(np.int64, copy=True)
    out[(~body_region(image)) & (out == 0)] = OUTSIDE
    return out
