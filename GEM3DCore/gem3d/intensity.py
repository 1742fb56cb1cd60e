"""Intensity normalisation to [-1, 1] and back to the input's units.

Every normaliser clips to an intensity range [low, high] and maps it linearly onto
[-1, 1], so the inverse is exact inside the range. The range is per volume for MRI
(``percentile``, ``minmax``: ``fit`` returns it as JSON-able params to keep with the
output) and fixed for CT (``ct_window``, in HU: ``fit`` returns no params). The config
dict is what model bundles store.
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np


class Normaliser:
    """Clip to [low, high] and map linearly onto [-1, 1]; subclasses say where the range comes from."""

    kind = ""

    def __init__(self, cfg: dict):
        self.config = dict(cfg)

    def fit(self, array: np.ndarray) -> Dict[str, float]:
        """Per-volume parameters (JSON-able) for ``forward`` and ``inverse``."""
        raise NotImplementedError

    def bounds(self, params: dict) -> Tuple[float, float]:
        try:
            low, high = float(params["low"]), float(params["high"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{self.kind} normaliser needs params with numeric 'low' and 'high' "
                             f"(from fit), got {params!r}") from None
        if not low < high:
            raise ValueError(f"{self.kind} normaliser: low ({low}) must be below high ({high})")
        return low, high

    def forward(self, array: np.ndarray, params: dict) -> np.ndarray:
        """Input units -> float32 in [-1, 1] (the final clip absorbs float32 rounding)."""
        low, high = self.bounds(params)
        x = np.asarray(array, dtype=np.float32)
        y = (x - np.float32(low)) * np.float32(2.0 / (high - low)) - np.float32(1.0)
        return np.clip(y, -1.0, 1.0).astype(np.float32, copy=False)

    def inverse(self, array: np.ndarray, params: dict) -> np.ndarray:
        """[-1, 1] -> input units (float32). Overshoot is clipped: it has no calibrated meaning."""
        low, high = self.bounds(params)
        y = np.clip(np.asarray(array, dtype=np.float32), -1.0, 1.0)
        x = (y + np.float32(1.0)) * np.float32((high - low) / 2.0) + np.float32(low)
        return np.clip(x, low, high).astype(np.float32, copy=False)


def _range_params(kind: str, low: float, high: float) -> Dict[str, float]:
    if not low < high:
        raise ValueError(f"{kind} normaliser: the volume has no intensity range to normalise "
                         f"(low = {low}, high = {high})")
    return {"low": float(low), "high": float(high)}


class PercentileNormaliser(Normaliser):
    """MRI: robust per-volume range, percentiles of the foreground (voxels above the minimum)."""

    kind = "percentile"

    def fit(self, array):
        array = np.asarray(array)
        foreground = array[array > array.min()]
        if foreground.size == 0:
            return _range_params(self.kind, float(array.min()), float(array.min()))
        low, high = np.percentile(foreground, [self.config["low"], self.config["high"]])
        return _range_params(self.kind, low, high)


class MinMaxNormaliser(Normaliser):
    """Per-volume min-max, as the official GEM-3D models were trained."""

    kind = "minmax"

    def fit(self, array):
        array = np.asarray(array)
        return _range_params(self.kind, array.min(), array.max())


class CTWindowNormaliser(Normaliser):
    """CT: a fixed HU window, the same for every volume."""

    kind = "ct_window"

    def fit(self, array):
        return {}

    def bounds(self, params):
        return float(self.config["low"]), float(self.config["high"])


_KINDS = {cls.kind: cls for cls in (PercentileNormaliser, MinMaxNormaliser, CTWindowNormaliser)}
_KEYS = {"percentile": ("low", "high"), "minmax": (), "ct_window": ("low", "high")}


def make_normaliser(cfg: dict) -> Normaliser:
    """A normaliser from its bundle config, e.g. ``{"kind": "ct_window", "low": -1000, "high": 1000}``."""
    if not isinstance(cfg, dict) or cfg.get("kind") not in _KINDS:
        raise ValueError(f"intensity config must be a dict with 'kind' one of {sorted(_KINDS)}, got {cfg!r}")
    kind = cfg["kind"]
    expected = set(_KEYS[kind])
    given = set(cfg) - {"kind"}
    if given != expected:
        raise ValueError(f"{kind} intensity config needs keys {sorted(expected)}, got {sorted(given)}")
    values = {}
    for key in expected:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"{kind} intensity config: {key!r} must be a finite number, got {value!r}")
        values[key] = float(value)
    if expected and not values["low"] < values["high"]:
        raise ValueError(f"{kind} intensity config: low ({values['low']}) must be below high ({values['high']})")
    if kind == "percentile" and not 0 <= values["low"] < values["high"] <= 100:
        raise ValueError(f"percentile intensity config: percentiles must be within [0, 100], got {values}")
    return _KINDS[kind](dict(cfg, **values))
