"""Where the windows of a volume go, and in which order they are sampled.

The first window starts at a given slice (`start_slice`: ``floor(p * Z)`` for a start position
p, clamped so the window fits); then windows go up
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


def start_slice(position: float, Z: int, n: int) -> int:
    """The first slice of the first window for a start position in [0, 1]."""
    if not 0.0 <= position <= 1.0:
        raise ValueError(f"start position must be in [0, 1], got {position}")
    return max(min(math.floor(position * Z), Z - n), 0)


def plan_windows(Z: int, n: int, start: int, overlap: int = 1, chain_informed: bool = True) -> WindowPlan:
    """Plan the windows for ``Z`` slices, windows of ``n`` slices, the first one at slice ``start``.
    ``chain_informed``: each later window is informed by its neighbour's generated overlap slice
    (the paper); False: every window by the caller's informed slice."""
    if Z < n:
        raise ValueError(f"the volume has {Z} slices, fewer than the window length {n}")
    if isinstance(start, bool) or int(start) != start or not 0 <= start <= Z - n:
        raise ValueError(f"the first window's start slice must be an integer in 0..{Z - n}, got {start}")
    if not 1 <= overlap < n:
        raise ValueError(f"overlap must be in 1..{n - 1} for windows of {n} slices, got {overlap}")
    s0 = int(start)
    first = Window(s0, s0 + n, "first")

    up, prev = [], first
    while prev.stop < Z:
        start = min(prev.stop - overlap, Z - n)
        prev = Window(start, start + n, "up", tuple(range(prev.stop - start)),
                      prev.stop - 1 if chain_informed else None)
        up.append(prev)

    down, prev = [], first
    while prev.start > 0:
        start = max(prev.start + overlap - n, 0)
        prev = Window(start, start + n, "down", tuple(range(prev.start - start, n)),
                      prev.start if chain_informed else None)
        down.append(prev)

    return WindowPlan(Z, n, overlap, first, tuple(up), tuple(down))
