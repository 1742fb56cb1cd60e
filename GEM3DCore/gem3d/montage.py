"""PNG montages: rows of volumes, columns of axial / coronal / sagittal planes.

Planes are cut through one physical point and drawn with their physical aspect
ratio (anisotropic voxels are stretched accordingly), in the model's view of
the scan (axial slices, superior up in coronal/sagittal). A mask given as
`contours` is drawn as one-pixel coloured outlines over every image row, so the
labels are seen on the anatomy. Pillow only.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from gem3d.grid import ModelGrid
from gem3d.volume import Volume

LABEL_COLOURS = {1: (230, 60, 50), 2: (250, 210, 60), 3: (80, 200, 120), 4: (60, 120, 240), -1: (40, 40, 40)}
PLANES = ("axial", "coronal", "sagittal")


def to_grey(plane: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    low, high = window
    return (np.clip((plane - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def to_colour(plane: np.ndarray) -> np.ndarray:
    rgb = np.zeros(plane.shape + (3,), dtype=np.uint8)
    for value, colour in LABEL_COLOURS.items():
        rgb[plane == value] = colour
    return rgb


def outline(labels: np.ndarray) -> np.ndarray:
    """Label values on the boundary of each labelled region (0 elsewhere): a pixel whose
    4-neighbours are not all of its own label."""
    padded = np.pad(labels, 1, mode="edge")
    same = np.ones(labels.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        same &= padded[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] == labels
    return np.where(same, 0, labels)


def _planes(array: np.ndarray, centre: Sequence[int]) -> List[np.ndarray]:
    """Axial (y, x), coronal and sagittal (z flipped so superior is up) of an axial-ordered array."""
    z, y, x = centre
    return [array[z], array[::-1, y, :], array[::-1, :, x]]


def montage(rows: Sequence[Tuple[str, Volume, str]], centre_index: Optional[Sequence[int]] = None,
            panel: int = 160, window: Optional[Tuple[float, float]] = None,
            contours: Optional[Volume] = None) -> Image.Image:
    """rows: (title, volume, "image" | "label"); all volumes on the grid of the first one.

    centre_index: (z, y, x) of the cut in the first volume's array (default: its middle).
    contours: a label volume (same grid) outlined over every "image" row."""
    reference = rows[0][1]
    grid = ModelGrid.fit(reference.geometry, reference.shape, max(reference.shape[1:]))
    spacing = np.asarray(reference.geometry.spacing)[[2 - a for a in grid.order]]
    if centre_index is None:
        centre_index = [s // 2 for s in reference.shape]
    centre = [reference.shape[axis] - 1 - centre_index[axis] if flip else centre_index[axis]
              for axis, flip in zip(grid.order, grid.flips)]
    aspects = [(spacing[1], spacing[2]), (spacing[0], spacing[2]), (spacing[0], spacing[1])]
    title_h = 18
    sheet = Image.new("RGB", (120 + panel * 3, title_h + panel * len(rows)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(PLANES):
        draw.text((120 + c * panel + 4, 2), name, fill=(255, 255, 255))
    if contours is not None and contours.shape != reference.shape:
        raise ValueError(f"montage contours: shape {contours.shape} differs from {reference.shape}")
    outlines = _planes(grid.reorient(contours.array), centre) if contours is not None else None
    for r, (title, volume, kind) in enumerate(rows):
        if volume.shape != reference.shape:
            raise ValueError(f"montage row {title!r}: shape {volume.shape} differs from {reference.shape}")
        array = grid.reorient(volume.array)
        if kind == "image":
            lo, hi = window or tuple(np.percentile(array, [1, 99.5]))
        for c, (plane, (sy, sx)) in enumerate(zip(_planes(array, centre), aspects)):
            rgb = to_colour(plane) if kind == "label" else np.repeat(
                to_grey(plane, (lo, hi))[..., None], 3, axis=2)
            h_mm, w_mm = plane.shape[0] * sy, plane.shape[1] * sx
            scale = panel / max(h_mm, w_mm)
            size = (max(1, int(round(w_mm * scale))), max(1, int(round(h_mm * scale))))
            tile = Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.NEAREST if kind == "label"
                                                                      else Image.BILINEAR)
            if outlines is not None and kind == "image":    # outline at display resolution: crisp lines
                labels = Image.fromarray(outlines[c].astype(np.int32)).resize(size, Image.NEAREST)
                edge = outline(np.asarray(labels))
                pixels = np.asarray(tile).copy()
                pixels[edge != 0] = to_colour(edge)[edge != 0]
                tile = Image.fromarray(pixels)
            sheet.paste(tile, (120 + c * panel + (panel - size[0]) // 2,
                               title_h + r * panel + (panel - size[1]) // 2))
        draw.text((4, title_h + r * panel + panel // 2 - 6), title, fill=(255, 255, 255))
    return sheet
