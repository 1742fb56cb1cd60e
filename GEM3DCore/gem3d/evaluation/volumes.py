"""What the metrics compare: dataset cases as axial-first arrays on a [0, 1] scale, and
synthetic cases matched with the real case they were made from.

- Orientation: the model's axial view (`gem3d.grid.ModelGrid`: slices toward superior),
  whatever the file's index order, so "axial slice pairs" and coronal/sagittal planes mean
  the same thing for every dataset.
- Intensity: a real volume's [p0.5, p99.5] maps to [0, 1], clipped (robust to the odd hot
  voxel, works for MR units and HU alike). A paired synthetic volume uses its real
  partner's range, so a brightness or contrast error counts; an unpaired one its own.
- Pairing: a synthetic case ``<case>`` or ``<case>_synNN`` (as `gem3d enhance` names them)
  pairs with real case ``<case>``.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from gem3d.datasets import Case
from gem3d.grid import ModelGrid
from gem3d.io import read_volume
from gem3d.volume import Volume

SYNTHETIC_SUFFIX = re.compile(r"_syn\d+$")
FOREGROUND = 0.05  # a voxel above this (on the [0, 1] scale) is foreground


def axial_view(volume: Volume) -> np.ndarray:
    """The array reordered to (slice, row, col) of the model's axial view (no resampling)."""
    return ModelGrid.fit(volume.geometry, volume.shape, max(volume.shape)).reorient(volume.array)


def unit_range(array: np.ndarray) -> Tuple[float, float]:
    low, high = (float(v) for v in np.percentile(array, [0.5, 99.5]))
    if high <= low:
        low, high = float(array.min()), float(array.max())
    return low, (high if high > low else low + 1.0)


def to_unit(array: np.ndarray, value_range: Tuple[float, float]) -> np.ndarray:
    low, high = value_range
    return np.clip((np.asarray(array, np.float32) - low) / (high - low), 0.0, 1.0).astype(np.float32)


def source_id(case_id: str) -> str:
    return SYNTHETIC_SUFFIX.sub("", case_id)


def read_case(case: Case) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(image, mask or None), axial-first, image in its file's units (float32)."""
    image = read_volume(case.image, case.channel)
    mask = read_volume(case.mask) if case.mask is not None else None
    if mask is not None and mask.shape != image.shape:
        raise ValueError(f"{case.case_id}: mask shape {mask.shape} differs from image shape {image.shape}")
    return (axial_view(image).astype(np.float32),
            None if mask is None else np.round(axial_view(mask)).astype(np.int16))


def read_unit_case(case: Case) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """`read_case` with the image on its own [0, 1] scale (`unit_range`)."""
    image, mask = read_case(case)
    return to_unit(image, unit_range(image)), mask


def pair_cases(real: List[Case], synthetic: List[Case]) -> List[Tuple[Case, Case]]:
    """(synthetic, real) for every synthetic case; a case without a real partner is an error."""
    by_id: Dict[str, Case] = {c.case_id: c for c in real}
    pairs, orphans = [], []
    for case in synthetic:
        partner = by_id.get(case.case_id) or by_id.get(source_id(case.case_id))
        if partner is None:
            orphans.append(case.case_id)
        else:
            pairs.append((case, partner))
    if orphans:
        raise ValueError(f"--paired: {len(orphans)} synthetic case(s) have no real case of the same id "
                         f"(e.g. {orphans[:3]}; <case>_synNN pairs with <case>)")
    return pairs
