"""Mask edits on Slicer segments, through gem3d.mask_edits.

gem3d's edits work in LPS physical space (mm, degrees about the L, P, S axes); the module's
fields are in Slicer's RAS, so translations and rotations are converted here. Segments that
move together (a tumour's necrosis, oedema and enhancing part) are edited as one rigid lesion:
random values are drawn once, and every segment is moved about the same centre.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def translate_ras(mm_ras: Sequence[float]) -> dict:
    """A translation given in RAS mm, as gem3d's LPS spec."""
    dx, dy, dz = (float(v) for v in mm_ras)
    return {"op": "translate", "mm": [-dx, -dy, dz]}


def rotate_ras(degrees_ras: Sequence[float]) -> dict:
    """Rotation angles about the R, A, S axes, as gem3d's spec about L, P, S: with P = diag(-1, -1, 1),
    P Rx(a) P = Rx(-a), P Ry(b) P = Ry(-b), P Rz(c) P = Rz(c), whatever the composition order."""
    rx, ry, rz = (float(v) for v in degrees_ras)
    return {"op": "rotate", "degrees": [-rx, -ry, rz]}


def paper_augmentation(modality: str, rng: np.random.Generator) -> List[dict]:
    """One draw of the paper's augmentation (gem3d.mask_edits.paper_augmentation): brain MRI
    flip/rotate/move toward the centre, CT rotation only."""
    from gem3d.mask_edits import paper_augmentation as draw

    return draw(rng, "abdomen" if (modality or "").lower() == "ct" else "brain")


def apply_to_segments(arrays: Dict[str, np.ndarray], geometry, specs: List[dict],
                      seed: Optional[int] = None) -> Tuple[Dict[str, np.ndarray], List[dict], List[str]]:
    """Edit binary segment arrays (same grid) as one lesion.

    The specs are resolved on the union of the segments (values left open are drawn once);
    each segment is then moved by replaying them on the union with that segment marked, so
    all segments share the union's centre and overlaps between segments are kept.
    Returns (new arrays, applied specs, warnings such as voxels pushed out of the volume).
    """
    from gem3d.mask_edits import apply_edits
    from gem3d.volume import Volume

    if not arrays:
        raise ValueError("no segment to edit")
    union = np.zeros(np.shape(next(iter(arrays.values()))), dtype=np.uint8)
    for array in arrays.values():
        union[np.asarray(array) > 0] = 1
    if not union.any():
        raise ValueError("the segments to edit are empty")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, applied = apply_edits(Volume(union, geometry), specs, rng=np.random.default_rng(seed))
        result = {}
        for key, array in arrays.items():
            marked = union.copy()
            marked[np.asarray(array) > 0] = 2
            edited, _ = apply_edits(Volume(marked, geometry), applied)
            result[key] = (np.asarray(edited.array) == 2).astype(np.asarray(array).dtype)
    messages = sorted({str(w.message) for w in caught})
    return result, applied, messages
