"""Write the engine's `window` events into an output array as they arrive.

The array is typically a view of a Slicer volume node's voxels (slicer.util.arrayFromVolume);
`on_modified` is then slicer.util.arrayFromVolumeModified, so that views refresh per window.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np


class ArraySink:
    def __init__(self, array: np.ndarray, on_modified: Optional[Callable[[], None]] = None):
        if array.ndim != 3:
            raise ValueError(f"the output array must be 3D (z, y, x), got shape {array.shape}")
        self.array = array
        self.on_modified = on_modified
        self.axis: Optional[int] = None
        self._filled = None
        self.windows = 0

    def check_started(self, shape: Sequence[int], axis: int) -> None:
        """Validate a `started` event against the output array."""
        if tuple(int(s) for s in shape) != tuple(self.array.shape):
            raise ValueError(f"the engine works on a grid of shape {tuple(shape)}, but the output "
                             f"volume has shape {self.array.shape}")
        self._set_axis(int(axis))

    def _set_axis(self, axis: int) -> None:
        if axis not in (0, 1, 2):
            raise ValueError(f"window axis must be 0, 1 or 2, got {axis}")
        if self.axis != axis:
            self.axis = axis
            self._filled = np.zeros(self.array.shape[axis], dtype=bool)

    def apply(self, axis: int, start: int, stop: int, slab: np.ndarray) -> None:
        """out[(slice(None),) * axis + (slice(start, stop),)] = slab, after checking the extent."""
        self._set_axis(int(axis))
        length = self.array.shape[self.axis]
        if not (0 <= start < stop <= length):
            raise ValueError(f"window [{start}, {stop}) is outside the output's {length} slices "
                             f"along axis {self.axis}")
        expected = list(self.array.shape)
        expected[self.axis] = stop - start
        if tuple(slab.shape) != tuple(expected):
            raise ValueError(f"window slab has shape {tuple(slab.shape)}, expected {tuple(expected)}")
        index = (slice(None),) * self.axis + (slice(start, stop),)
        self.array[index] = slab
        self._filled[start:stop] = True
        self.windows += 1
        if self.on_modified is not None:
            self.on_modified()

    def apply_event(self, event: dict) -> np.ndarray:
        """Apply a `window` event (its slab in-band, `gem3d.events`); returns the slab."""
        slab = np.asarray(event["slab"])
        self.apply(int(event["axis"]), int(event["start"]), int(event["stop"]), slab)
        return slab

    @property
    def filled_fraction(self) -> float:
        """Fraction of slices (along the window axis) written at least once."""
        if self._filled is None:
            return 0.0
        return float(self._filled.mean())

    @property
    def complete(self) -> bool:
        return self._filled is not None and bool(self._filled.all())
