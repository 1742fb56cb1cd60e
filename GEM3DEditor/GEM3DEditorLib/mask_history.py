"""Undo/redo of mask edits in bounded memory.

A step is the edit spec plus the arrays it changed, as they were before (one array per segment
ID: an edit may move several segments together). Binary masks (the usual case) are stored
bit-packed, 8 voxels per byte. When the steps exceed `max_bytes` or `max_steps`, the oldest are
forgotten.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np


@dataclass
class _Packed:
    shape: Tuple[int, ...]
    dtype: np.dtype
    binary: bool
    data: np.ndarray

    @classmethod
    def pack(cls, array: np.ndarray) -> "_Packed":
        array = np.asarray(array)
        binary = array.dtype == bool or (array.size > 0 and array.min() >= 0 and array.max() <= 1)
        data = np.packbits(array.astype(bool).ravel()) if binary else array.copy()
        return cls(array.shape, array.dtype, bool(binary), data)

    def unpack(self) -> np.ndarray:
        if not self.binary:
            return self.data.copy()
        count = int(np.prod(self.shape))
        return np.unpackbits(self.data, count=count).reshape(self.shape).astype(self.dtype)


@dataclass
class _Step:
    spec: dict
    states: Dict[str, _Packed]

    @property
    def nbytes(self) -> int:
        return sum(int(p.data.nbytes) for p in self.states.values())

    def unpack(self) -> Dict[str, np.ndarray]:
        return {key: packed.unpack() for key, packed in self.states.items()}


class MaskHistory:
    """`record(before, spec)` before an edit changes the arrays in `before` ({segment ID: array});
    `undo(get_current)` / `redo(get_current)` return ({segment ID: array to restore}, spec) or None;
    `get_current(segment ID)` gives the array as it is now (to redo / undo back to)."""

    def __init__(self, max_bytes: int = 256 * 2 ** 20, max_steps: int = 50):
        self.max_bytes = int(max_bytes)
        self.max_steps = int(max_steps)
        self._undo: List[_Step] = []
        self._redo: List[_Step] = []

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def nbytes(self) -> int:
        return sum(step.nbytes for step in self._undo + self._redo)

    def applied_specs(self) -> List[dict]:
        """The edits currently in effect, oldest first (for provenance)."""
        return [dict(step.spec) for step in self._undo]

    def record(self, before: Dict[str, np.ndarray], spec: dict) -> bool:
        """Remember the arrays before an edit. False when this step alone exceeds the memory bound
        (the history is then emptied: older steps cannot be undone past an unrecorded one)."""
        self._redo.clear()
        step = _Step(dict(spec), {key: _Packed.pack(a) for key, a in before.items()})
        if step.nbytes > self.max_bytes:
            self._undo.clear()
            return False
        self._undo.append(step)
        self._trim()
        return True

    def undo(self, get_current: Callable[[str], np.ndarray]
             ) -> Optional[Tuple[Dict[str, np.ndarray], dict]]:
        return self._move(self._undo, self._redo, get_current)

    def redo(self, get_current: Callable[[str], np.ndarray]
             ) -> Optional[Tuple[Dict[str, np.ndarray], dict]]:
        return self._move(self._redo, self._undo, get_current)

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()

    def _move(self, source: List[_Step], target: List[_Step], get_current):
        if not source:
            return None
        step = source.pop()
        target.append(_Step(step.spec, {key: _Packed.pack(get_current(key)) for key in step.states}))
        self._trim()
        return step.unpack(), dict(step.spec)

    def _trim(self) -> None:
        for stack in (self._redo, self._undo):
            while stack and (len(stack) > self.max_steps or self.nbytes > self.max_bytes):
                stack.pop(0)
