"""The model grid: axial slices of S x S pixels, and the way back to the reference grid.

Reorientation is a pure axis permutation + flips of the array (no interpolation), so it
is exactly invertible and the scan keeps its obliqueness in the geometry (the model
geometry's direction columns are the reference's, permuted and signed). The model's
index axes point as close as possible to LPS (DICOMOrient "LPS"): slices toward
Superior, rows toward Posterior, columns toward patient Left; an axial model slice
therefore shows anterior on top and the patient's right on the left (radiological view).

In plane, the shorter physical extent is padded to a square field of view (the caller
gives the pad value) and the square is resampled to S x S; the slice axis is never
resampled. Resampling is one separable linear operator per in-plane axis, with pixel
centres as in ``torch.nn.functional.interpolate(align_corners=False)``: bilinear with
torch's antialias (triangle) filter when downsampling images, nearest for labels. Labels
round-trip exactly when model pixels are no larger than reference pixels; images come
back through a mild blur (about [1/6, 2/3, 1/6] for a large upsampling factor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np

from gem3d.volume import Geometry

KINDS = ("image", "label")


def slice_position(z: Union[int, np.ndarray], n_slices: int):
    """The normalised height of model slice ``z`` (0: most inferior, 1: most superior; 0 for a
    single slice): the position the slice model, the training windows and informed slices use."""
    return z / max(n_slices - 1, 1)


def position_slice(position: float, n_slices: int) -> int:
    """The model slice at normalised height ``position``: the inverse of `slice_position`."""
    return int(round(float(position) * (n_slices - 1)))


def _index_axes(direction: np.ndarray) -> Tuple[int, int, int]:
    """Index axes (0=i/x, 1=j/y, 2=k/z) closest to the model's slice (S-I), row (A-P) and
    column (R-L) axes."""
    slice_ax = int(np.argmax(np.abs(direction[2])))
    rest = [c for c in range(3) if c != slice_ax]
    row_ax = max(rest, key=lambda c: abs(direction[1, c]))
    col_ax = rest[0] if rest[1] == row_ax else rest[1]
    return slice_ax, row_ax, col_ax


@dataclass(frozen=True)
class AxialAxis:
    """The array axis of a scan whose index numbers its axial slices, and which way it runs.

    ``axis``: 0, 1 or 2 of the (z, y, x) array; ``flipped``: the index runs toward inferior,
    so model slice z (which runs toward superior) is array index ``n_slices - 1 - z``.
    """

    axis: int
    flipped: bool
    n_slices: int

    @classmethod
    def of(cls, geometry: Geometry, shape) -> "AxialAxis":
        slice_ax = _index_axes(geometry.direction)[0]
        return cls(2 - slice_ax, bool(geometry.direction[2, slice_ax] < 0), int(shape[2 - slice_ax]))

    def model_index(self, index: int) -> int:
        """The scan's own index along ``axis`` -> the model slice."""
        if not 0 <= index < self.n_slices:
            raise ValueError(f"slice {index} is outside the scan's {self.n_slices} slices "
                             f"(0..{self.n_slices - 1})")
        return self.n_slices - 1 - index if self.flipped else index

    def reference_index(self, z: int) -> int:
        """Model slice z -> the scan's own index along ``axis``."""
        return self.n_slices - 1 - z if self.flipped else z

    def position(self, index: int) -> float:
        """Normalised height of the scan's own slice ``index`` (see `slice_position`)."""
        return slice_position(self.model_index(index), self.n_slices)


class _PlaneAxis:
    """One in-plane axis: n reference pixels inside S model pixels.

    ``ratio`` is model spacing / reference spacing; ``pad_before`` is a whole number of
    model pixels, so a reference grid that already has the model spacing lands exactly on
    model pixels (labels then round-trip exactly). Model pixels centred inside the reference
    field of view carry reference data, the others are pad: a hard edge, so the way back,
    which reads only the former, gets no pad in the reference's edge pixels.
    """

    def __init__(self, n: int, spacing: float, fov: float, size: int):
        self.n, self.size = n, size
        self.ratio = fov / (size * spacing)
        total_pad = size * (1.0 - n * spacing / fov)
        self.pad_before = int(math.floor(total_pad / 2 + 1e-6))  # tolerate float noise
        centres = self.model_centres()
        self.inside = (centres >= -0.5) & (centres <= n - 0.5)
        if not self.inside.any():
            raise ValueError(f"the reference field of view ({n} x {spacing:.4g} mm) is narrower "
                             f"than one model pixel ({fov / size:.4g} mm)")

    def model_centres(self) -> np.ndarray:
        """Model pixel centres in reference index coordinates."""
        return (np.arange(self.size) + 0.5 - self.pad_before) * self.ratio - 0.5

    def reference_centres(self) -> np.ndarray:
        """Reference pixel centres in model index coordinates."""
        return (np.arange(self.n) + 0.5) / self.ratio + self.pad_before - 0.5

    def to_model_weights(self) -> np.ndarray:
        """(S, n) weights; rows of pad pixels are zero."""
        return _linear_weights(self.model_centres(), self.n, self.ratio) * self.inside[:, None]

    def to_model_indices(self) -> np.ndarray:
        """The reference pixel containing each model pixel centre, -1 for pad."""
        index = np.clip(np.floor(self.model_centres() + 0.5).astype(np.int64), 0, self.n - 1)
        return np.where(self.inside, index, -1)

    def from_model_weights(self) -> np.ndarray:
        """(n, S) weights over the data pixels of the model grid."""
        lo, hi = self._data_range()
        weights = np.zeros((self.n, self.size))
        weights[:, lo:hi] = _linear_weights(self.reference_centres() - lo, hi - lo, 1.0 / self.ratio)
        return weights

    def from_model_indices(self) -> np.ndarray:
        """The data pixel of the model grid nearest each reference pixel centre."""
        lo, hi = self._data_range()
        return np.clip(np.floor(self.reference_centres() + 0.5).astype(np.int64), lo, hi - 1)

    def _data_range(self):
        data = np.nonzero(self.inside)[0]
        return int(data[0]), int(data[-1]) + 1


def _linear_weights(centres: np.ndarray, n: int, ratio: float) -> np.ndarray:
    """(len(centres), n) bilinear weights with torch's antialias filter: a triangle of
    half-width max(ratio, 1) input pixels, renormalised over the input (edge clamping)."""
    support = max(ratio, 1.0)
    weights = np.clip(1.0 - np.abs(np.arange(n)[None, :] - centres[:, None]) / support, 0.0, None)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)


def _resample_image(array: np.ndarray, w_rows, w_cols) -> np.ndarray:
    """W_rows @ slice @ W_cols^T for every slice of (Z, rows, cols), in float32."""
    data = np.asarray(array, dtype=np.float32)
    return np.matmul(np.matmul(w_rows.astype(np.float32), data), w_cols.T.astype(np.float32))


def _resample_labels(array: np.ndarray, i_rows, i_cols, pad_value) -> np.ndarray:
    """Pick input pixels by index (-1: pad) along the last two axes of (Z, rows, cols)."""
    out = np.full((array.shape[0], len(i_rows), len(i_cols)), pad_value, dtype=array.dtype)
    r, c = np.nonzero(i_rows >= 0)[0], np.nonzero(i_cols >= 0)[0]
    out[:, r[:, None], c[None, :]] = array[:, i_rows[r][:, None], i_cols[c][None, :]]
    return out


class ModelGrid:
    """Plan from a reference grid to the model grid (Z, S, S) and back; see the module doc.

    ``order``: the reference array axes taken as model (slice, row, col); ``flips``: which
    of those run reversed. ``model_geometry`` places the model array in space.
    """

    def __init__(self, reference_shape, size, order, flips, rows, cols, model_geometry):
        self.reference_shape: Tuple[int, int, int] = tuple(reference_shape)
        self.size = size
        self.order: Tuple[int, int, int] = order
        self.flips: Tuple[bool, bool, bool] = flips
        self._rows: _PlaneAxis = rows
        self._cols: _PlaneAxis = cols
        self.model_geometry: Geometry = model_geometry

    @classmethod
    def fit(cls, volume_geometry: Geometry, shape, size: int) -> "ModelGrid":
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"reference shape must be 3 positive sizes (z, y, x), got {shape}")
        if int(size) != size or size < 1:
            raise ValueError(f"model slice size must be a positive integer, got {size}")
        size = int(size)
        direction = volume_geometry.direction
        if abs(np.linalg.det(direction)) < 1e-6:
            raise ValueError(f"direction matrix is singular: {volume_geometry.describe()}")
        index_axes = _index_axes(direction)
        slice_ax, row_ax, col_ax = index_axes
        flips = tuple(bool(direction[lps, c] < 0) for lps, c in zip((2, 1, 0), index_axes))
        order = tuple(2 - c for c in index_axes)

        spacing = volume_geometry.spacing
        first = [0.0, 0.0, 0.0]  # reference index (x, y, z) of the reoriented voxel 0
        for c, flip in zip(index_axes, flips):
            first[c] = shape[2 - c] - 1.0 if flip else 0.0
        columns = [(-1.0 if flip else 1.0) * direction[:, c] for c, flip in zip(index_axes, flips)]
        reoriented = Geometry((spacing[col_ax], spacing[row_ax], spacing[slice_ax]),
                              volume_geometry.index_to_physical(first),
                              np.stack(columns[::-1], axis=1))

        n_rows, n_cols = shape[order[1]], shape[order[2]]
        fov = max(n_rows * spacing[row_ax], n_cols * spacing[col_ax])
        rows = _PlaneAxis(n_rows, spacing[row_ax], fov, size)
        cols = _PlaneAxis(n_cols, spacing[col_ax], fov, size)
        origin = reoriented.index_to_physical((cols.model_centres()[0], rows.model_centres()[0], 0.0))
        model_geometry = Geometry((fov / size, fov / size, spacing[slice_ax]), origin,
                                  reoriented.direction)
        return cls(shape, size, order, flips, rows, cols, model_geometry)

    @property
    def axial(self) -> AxialAxis:
        return AxialAxis(self.order[0], self.flips[0], self.reference_shape[self.order[0]])

    @property
    def axis(self) -> int:
        """Reference array axis (0, 1, 2) that is the model's slice axis."""
        return self.axial.axis

    @property
    def flipped(self) -> bool:
        """Whether model slice z runs toward decreasing reference index along ``axis``."""
        return self.axial.flipped

    @property
    def n_slices(self) -> int:
        return self.axial.n_slices

    @property
    def model_shape(self) -> Tuple[int, int, int]:
        return (self.n_slices, self.size, self.size)

    def model_to_reference_range(self, z0: int, z1: int) -> Tuple[int, int]:
        """Model slices [z0, z1) as a [start, stop) range of reference indices along ``axis``."""
        self._check_range(z0, z1)
        return (self.n_slices - z1, self.n_slices - z0) if self.flipped else (z0, z1)

    def reorient(self, array: np.ndarray) -> np.ndarray:
        """Reference array (z, y, x) -> the model's axial view (slice, row, col), no resampling."""
        return np.flip(np.transpose(array, self.order), [a for a in range(3) if self.flips[a]])

    def to_model(self, array: np.ndarray, kind: str = "image", pad_value: float = 0.0) -> np.ndarray:
        """Reference array (z, y, x) -> model array (Z, S, S); float32 images, labels keep dtype."""
        _check_kind(kind)
        array = np.asarray(array)
        if array.shape != self.reference_shape:
            raise ValueError(f"array shape {array.shape} does not match the reference grid "
                             f"{self.reference_shape}")
        reoriented = self.reorient(array)
        rows, cols = self._rows, self._cols
        if kind == "label":
            return _resample_labels(reoriented, rows.to_model_indices(), cols.to_model_indices(), pad_value)
        out = _resample_image(reoriented, rows.to_model_weights(), cols.to_model_weights())
        if pad_value != 0:
            out[:, ~np.outer(rows.inside, cols.inside)] = pad_value
        return out

    def from_model(self, array: np.ndarray, kind: str = "image") -> np.ndarray:
        """Model array (Z, S, S) -> array in the reference layout (wrap it with the reference geometry)."""
        return self.slab_from_model(array, 0, self.n_slices, kind)

    def slab_from_model(self, slices: np.ndarray, z0: int, z1: int, kind: str = "image") -> np.ndarray:
        """Model slices [z0, z1) -> the reference slab ``model_to_reference_range(z0, z1)``.

        The slab has the reference shape except ``z1 - z0`` along ``axis``, so
        ``out[(slice(None),) * axis + (slice(start, stop),)] = slab`` fills the output.
        """
        _check_kind(kind)
        self._check_range(z0, z1)
        slices = np.asarray(slices)
        if slices.shape != (z1 - z0, self.size, self.size):
            raise ValueError(f"model slices [{z0}, {z1}) must have shape "
                             f"{(z1 - z0, self.size, self.size)}, got {slices.shape}")
        if kind == "label":
            plane = _resample_labels(slices, self._rows.from_model_indices(),
                                     self._cols.from_model_indices(), 0)
        else:
            plane = _resample_image(slices, self._rows.from_model_weights(), self._cols.from_model_weights())
        plane = np.flip(plane, [a for a in range(3) if self.flips[a]])
        return np.ascontiguousarray(np.transpose(plane, np.argsort(self.order)))

    def _check_range(self, z0: int, z1: int):
        if not 0 <= z0 < z1 <= self.n_slices:
            raise ValueError(f"model slice range [{z0}, {z1}) is outside [0, {self.n_slices})")


def _check_kind(kind: str):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
