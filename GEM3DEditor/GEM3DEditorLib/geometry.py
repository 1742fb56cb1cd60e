"""Slicer's volume geometry (IJK-to-RAS matrix) <-> gem3d's Geometry (spacing/origin/direction, LPS).

Slicer's scene is RAS; gem3d, ITK and the files are LPS: x and y change sign. Arrays are the
same in both: Slicer's arrayFromVolume is indexed (k, j, i) = gem3d's (z, y, x). When data goes
through files (NRRD, NIfTI) Slicer's readers and writers convert, and nothing here is needed;
these functions serve the in-memory paths (mask edits on a segment, slice navigation). Which axis
is axial and slice positions are gem3d's rules (gem3d.grid), applied to a Slicer matrix here.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def spacing_origin_direction_lps(ijk_to_ras) -> Tuple[Tuple[float, float, float],
                                                      Tuple[float, float, float], np.ndarray]:
    """(spacing (x, y, z), origin LPS, direction LPS with index axes as columns)."""
    m = np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"the IJK-to-RAS matrix has a zero column: {m[:3, :3].tolist()}")
    direction = RAS_FROM_LPS @ (m[:3, :3] / spacing)
    origin = RAS_FROM_LPS @ m[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), direction


def geometry_from_ijk_to_ras(ijk_to_ras):
    """gem3d.Geometry of a Slicer volume (imports gem3d)."""
    from gem3d.volume import Geometry

    spacing, origin, direction = spacing_origin_direction_lps(ijk_to_ras)
    return Geometry(spacing, origin, direction)


def ijk_to_ras_from_geometry(geometry) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a gem3d.Geometry."""
    m = np.eye(4)
    m[:3, :3] = RAS_FROM_LPS @ np.asarray(geometry.direction) @ np.diag(geometry.spacing)
    m[:3, 3] = RAS_FROM_LPS @ np.asarray(geometry.origin)
    return m


def axial_axis(ijk_to_ras, shape: Sequence[int]):
    """gem3d's AxialAxis (the one rule for which array axis is axial and which way it runs) of a
    Slicer volume with this IJK-to-RAS matrix and (k, j, i) shape."""
    from gem3d.grid import AxialAxis

    return AxialAxis.of(geometry_from_ijk_to_ras(ijk_to_ras), shape)


def slice_index_at(ijk_to_ras, point_ras: Sequence[float], axis: int, count: int) -> int:
    """Index along array `axis` of the slice through a RAS point (clipped into the volume)."""
    ras_to_ijk = np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4))
    ijk = ras_to_ijk @ np.append(np.asarray(point_ras, dtype=np.float64), 1.0)
    return int(np.clip(int(np.floor(ijk[2 - axis] + 0.5)), 0, count - 1))


def slice_center_ras(ijk_to_ras, shape: Sequence[int], axis: int, index: int) -> np.ndarray:
    """RAS point at the centre of slice `index` along array `axis` of a (k, j, i) array."""
    ijk = np.array([(shape[2] - 1) / 2.0, (shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0, 1.0])
    ijk[2 - axis] = index
    return (np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4) @ ijk)[:3]
