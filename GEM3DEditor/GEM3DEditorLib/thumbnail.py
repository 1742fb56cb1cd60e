"""A small greyscale preview of one slice, oriented like Slicer's views, as a PGM file.

PGM is read by Qt natively (QPixmap), so neither Pillow nor a numpy->QImage bridge is needed.
"""
from __future__ import annotations

import numpy as np


# (screen right, screen up) in RAS for views whose normal is R (sagittal), A (coronal), S (axial)
_SCREEN = {0: ((0, -1, 0), (0, 0, 1)), 1: ((-1, 0, 0), (0, 0, 1)), 2: ((-1, 0, 0), (0, 1, 0))}


def display_slice(array: np.ndarray, ijk_to_ras, axis: int, index: int) -> np.ndarray:
    """Slice `index` along array `axis` as Slicer's slice views show it: axial and coronal with
    patient right on the left, sagittal with anterior on the left; superior/anterior up."""
    m = np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)[:3, :3]
    dirs = m / np.linalg.norm(m, axis=0)  # RAS direction of i, j, k
    image = np.take(array, index, axis=axis)
    rows_axis, cols_axis = [a for a in (0, 1, 2) if a != axis]
    rows_dir, cols_dir = dirs[:, 2 - rows_axis], dirs[:, 2 - cols_axis]
    right, up = (np.asarray(v, dtype=np.float64)
                 for v in _SCREEN[int(np.argmax(np.abs(dirs[:, 2 - axis])))])
    if abs(rows_dir @ right) > abs(cols_dir @ right):
        image, rows_dir, cols_dir = image.T, cols_dir, rows_dir
    if cols_dir @ right < 0:
        image = image[:, ::-1]
    if rows_dir @ up > 0:
        image = image[::-1, :]
    return image


def to_uint8(image: np.ndarray, low_percentile: float = 1.0, high_percentile: float = 99.0) -> np.ndarray:
    finite = np.asarray(image, dtype=np.float64)
    values = finite[np.isfinite(finite)]
    if values.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    low, high = np.percentile(values, [low_percentile, high_percentile])
    if high <= low:
        high = low + 1.0
    scaled = (np.nan_to_num(finite, nan=low) - low) / (high - low)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def resize_nearest(image: np.ndarray, max_size: int, aspect: float = 1.0) -> np.ndarray:
    """Fit into max_size x max_size; `aspect` = pixel height / pixel width (physical)."""
    height, width = image.shape[0] * aspect, float(image.shape[1])
    scale = max_size / max(height, width)
    rows = max(1, int(round(height * scale)))
    cols = max(1, int(round(width * scale)))
    r = np.minimum((np.arange(rows) + 0.5) / rows * image.shape[0], image.shape[0] - 1).astype(int)
    c = np.minimum((np.arange(cols) + 0.5) / cols * image.shape[1], image.shape[1] - 1).astype(int)
    return image[np.ix_(r, c)]


def write_pgm(path: str, image: np.ndarray) -> str:
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"a PGM image is 2D, got shape {image.shape}")
    with open(path, "wb") as f:
        f.write(b"P5\n%d %d\n255\n" % (image.shape[1], image.shape[0]))
        f.write(image.tobytes())
    return path


def write_thumbnail(path: str, array: np.ndarray, ijk_to_ras, axis: int, index: int,
                    max_size: int = 128) -> str:
    """Preview of slice `index` of a (k, j, i) array written as PGM at `path`."""
    image = display_slice(array, ijk_to_ras, axis, index)
    return write_pgm(path, resize_nearest(to_uint8(image), max_size))
