"""A 3D array that never travels without its physical geometry.

Conventions (those of SimpleITK/ITK, and of Slicer's files):
- ``array`` is indexed ``(z, y, x)`` (KJI);
- ``spacing`` and ``origin`` are given in ``(x, y, z)`` order, millimetres, LPS;
- ``direction`` is a 3x3 matrix whose *columns* are the physical directions of
  the index axes i (x), j (y), k (z).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

import numpy as np
import SimpleITK as sitk

GRID_TOLERANCE = 1e-3  # mm and direction cosines: file formats' float noise (NIfTI stores float32)


@dataclass(frozen=True)
class Geometry:
    """Where voxels are in space: spacing, origin and direction (LPS, mm)."""

    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers, got {self.spacing}")
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", direction)

    def __eq__(self, other) -> bool:
        return isinstance(other, Geometry) and self.spacing == other.spacing and \
            self.origin == other.origin and np.array_equal(self.direction, other.direction)

    def allclose(self, other: "Geometry", atol: float = GRID_TOLERANCE) -> bool:
        """Same geometry up to float noise of file formats."""
        return bool(np.allclose(self.spacing, other.spacing, atol=atol)
                    and np.allclose(self.origin, other.origin, atol=atol)
                    and np.allclose(self.direction, other.direction, atol=atol))

    def index_to_physical(self, ijk) -> np.ndarray:
        """Continuous index (x, y, z order) -> LPS point in mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return np.asarray(self.origin) + self.direction @ (np.asarray(self.spacing) * ijk)

    def physical_to_index(self, point) -> np.ndarray:
        """LPS point in mm -> continuous index (x, y, z order)."""
        offset = np.asarray(point, dtype=np.float64) - np.asarray(self.origin)
        return np.linalg.solve(self.direction, offset) / np.asarray(self.spacing)

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": self.direction.reshape(-1).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Geometry":
        return cls(d["spacing"], d["origin"], np.asarray(d["direction"]).reshape(3, 3))

    def describe(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        org = ", ".join(f"{o:.4g}" for o in self.origin)
        dirs = ", ".join(f"{d:.3g}" for d in self.direction.reshape(-1))
        return f"spacing=({sp}) origin=({org}) direction=({dirs})"


@dataclass
class Volume:
    """A (z, y, x) array plus its geometry."""

    array: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)

    def __post_init__(self):
        if self.array.ndim != 3:
            raise ValueError(f"a volume is 3D (z, y, x); got an array of shape {self.array.shape}")

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.array.shape)

    def same_grid(self, other: "Volume") -> bool:
        """The one grid-equality rule (dataset inspect, training and the engine): same shape, and
        geometry within `GRID_TOLERANCE`."""
        return self.shape == other.shape and self.geometry.allclose(other.geometry)

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same grid with other voxel values (e.g. a synthetic image or an edited mask)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.geometry)

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing(self.geometry.spacing)
        image.SetOrigin(self.geometry.origin)
        image.SetDirection(self.geometry.direction.reshape(-1).tolist())
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"expected a 3D scalar image, got {image.GetDimension()}D with "
                f"{image.GetNumberOfComponentsPerPixel()} component(s)")
        geometry = Geometry(image.GetSpacing(), image.GetOrigin(),
                            np.asarray(image.GetDirection()).reshape(3, 3))
        return cls(sitk.GetArrayFromImage(image), geometry)
