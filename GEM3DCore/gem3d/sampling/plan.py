"""Where the windows of a volume go, and in which order they are sampled.

The first window starts at ``floor(p * Z)`` (clamped so it fits); then windows go up
(increasing z) and down, each overlapping the previous one by ``overlap`` slices.  The last
window of a direction ends exactly at the volume edge, so it may overlap more: every
already generated slice inside a window is a known frame.  The informed slice of a window
is the generated slice next to its new region.  (The reference code misplaces the overlap
of the last window; here it follows the same rule as every other window.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import zip_longest
from typing import List, Optional, Tuple


@dataclass(frozen=True)
class Window:
    """Slices ``start:stop``; ``known``: indices within the window that are already
    generated; ``informed_index``: absolute z of the informed slice (None: the caller's)."""

    start: int
    stop: int
    direction: str
    known: Tuple[int, ...] = ()
    informed_index: Optional[int] = None


@dataclass(frozen=True)
class WindowPlan:
    """The windows of a volume of ``Z`` slices, sampled ``n`` at a time."""

    Z: int
    n: int
    overlap: int
    first: Window
    up: Tuple[Window, ...]
    down: Tuple[Window, ...]

    @property
    def rounds(self) -> List[Tuple[Window, ...]]:
        """Execution order: the first window, then up and down in lock-step (batchable)."""
        pairs = zip_longest(self.up, self.down)
        return [(self.first,)] + [tuple(w for w in pair if w is not None) for pair in pairs]

    @property
    def windows(self) -> List[Window]:
        return [w for group in self.rounds for w in group]


def plan_windows(Z: int, n: int, start_p: float, overlap: int = 1) -> WindowPlan:
    """Plan the windows for ``Z`` slices, window length ``n``, start position ``start_p``."""
    if Z < n:
        raise ValueError(f"the volume has {Z} slices, fewer than the window length {n}")
    if not 0.0 <= start_p <= 1.0:
        raise ValueError(f"start position must be in [0, 1], got {start_p}")
    if not 1 <= overlap < n:
        raise ValueError(f"overlap must be in 1..{n - 1} for windows of {n} slices, got {overlap}")
    s0 = min(math.floor(start_p * Z), Z - n)
    first = Window(s0, s0 + n, "first")

    up, prev = [], first
    while prev.stop < Z:
        start = min(prev.stop - overlap, Z - n)
        prev = Window(start, start + n, "up", tuple(range(prev.stop - start)), prev.stop - 1)
        up.append(prev)

    down, prev = [], first
    while prev.start > 0:
        start = max(prev.start + overlap - n, 0)
        prev = Window(start, start + n, "down", tuple(range(prev.start - start, n)), prev.start)
        down.append(prev)

    return WindowPlan(Z, n, overlap, first, tuple(up), tuple(down))
