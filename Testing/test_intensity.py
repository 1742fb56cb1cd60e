"""Intensity normalisers: [-1, 1] outputs, exact inverses inside the clip range, config checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gem3d.intensity import make_normaliser

CONFIGS = [{"kind": "percentile", "low": 0.5, "high": 99.5}, {"kind": "minmax"},
           {"kind": "ct_window", "low": -1000, "high": 1000}]


def mri_like(seed=0):
    """Zero background around a positive, skewed foreground with a few bright outliers."""
    rng = np.random.default_rng(seed)
    volume = np.zeros((6, 20, 20), np.float32)
    volume[1:5, 4:16, 4:16] = rng.gamma(4.0, 50.0, size=(4, 12, 12))
    volume[2, 8, 8] = 5000.0
    return volume


def ct_like(seed=0):
    return np.random.default_rng(seed).uniform(-1024, 1500, size=(5, 16, 16)).astype(np.float32)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["kind"])
def test_forward_is_in_range_and_inverse_is_exact_inside_the_clip_range(cfg):
    normaliser = make_normaliser(cfg)
    x = ct_like() if cfg["kind"] == "ct_window" else mri_like()
    params = json.loads(json.dumps(normaliser.fit(x)))  # params survive a JSON round trip
    y = normaliser.forward(x, params)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.min() >= -1.0 and y.max() <= 1.0
    low, high = normaliser.bounds(params)
    inside = (x >= low) & (x <= high)
    assert inside.mean() > 0.2
    back = normaliser.inverse(y, params)
    np.testing.assert_allclose(back[inside], x[inside], rtol=1e-4, atol=1e-6 * (high - low))
    np.testing.assert_allclose(back[~inside], np.clip(x[~inside], low, high), atol=1e-6 * (high - low))


def test_minmax_uses_the_volume_extremes():
    x = mri_like()
    normaliser = make_normaliser({"kind": "minmax"})
    params = normaliser.fit(x)
    assert params == {"low": 0.0, "high": 5000.0}
    y = normaliser.forward(x, params)
    assert y.min() == -1.0 and y.max() == 1.0


def test_percentile_clips_outliers_using_the_foreground_only():
    x = mri_like()
    params = make_normaliser({"kind": "percentile", "low": 0.5, "high": 99.5}).fit(x)
    foreground = x[x > 0]
    assert params["low"] == pytest.approx(np.percentile(foreground, 0.5))
    assert params["high"] == pytest.approx(np.percentile(foreground, 99.5))
    assert params["low"] > 0  # the zero background (about 80% of voxels) does not pull the low end down
    assert params["high"] < 5000.0  # the outlier is clipped


def test_ct_window_is_fixed_hounsfield():
    normaliser = make_normaliser({"kind": "ct_window", "low": -1000, "high": 1000})
    assert normaliser.fit(ct_like()) == {}
    y = normaliser.forward(np.array([-1000.0, 0.0, 1000.0, -3000.0, 3000.0, 500.0]), {})
    np.testing.assert_allclose(y, [-1, 0, 1, -1, 1, 0.5], atol=1e-7)
    synthetic = np.array([-1.0, -0.5, 0.0, 0.25, 1.0, 1.3], np.float32)  # a decoder may overshoot
    np.testing.assert_allclose(normaliser.inverse(synthetic, {}), [-1000, -500, 0, 250, 1000, 1000], atol=1e-3)


def test_same_volume_different_windows_differ():
    x = ct_like()
    narrow = make_normaliser({"kind": "ct_window", "low": -160, "high": 240})
    wide = make_normaliser({"kind": "ct_window", "low": -1000, "high": 1000})
    assert narrow.forward(np.array([40.0]), {})[0] == pytest.approx(0.0)
    assert not np.allclose(narrow.forward(x, {}), wide.forward(x, {}))


@pytest.mark.parametrize("cfg,message", [
    ({"kind": "zscore"}, "kind"),
    ("minmax", "kind"),
    ({"kind": "ct_window", "low": -1000}, "keys"),
    ({"kind": "minmax", "low": 0}, "keys"),
    ({"kind": "ct_window", "low": 1000, "high": -1000}, "below"),
    ({"kind": "ct_window", "low": "-1000", "high": 1000}, "finite number"),
    ({"kind": "percentile", "low": 0.5, "high": float("nan")}, "finite number"),
    ({"kind": "percentile", "low": -1, "high": 99}, "within"),
    ({"kind": "percentile", "low": 1, "high": 101}, "within"),
])
def test_invalid_configs_raise_a_clear_error(cfg, message):
    with pytest.raises(ValueError, match=message):
        make_normaliser(cfg)


def test_constant_volume_and_missing_params_raise():
    with pytest.raises(ValueError, match="no intensity range"):
        make_normaliser({"kind": "minmax"}).fit(np.full((2, 3, 3), 7.0))
    with pytest.raises(ValueError, match="no intensity range"):
        make_normaliser({"kind": "percentile", "low": 1, "high": 99}).fit(np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="params"):
        make_normaliser({"kind": "minmax"}).forward(np.zeros(3), {})
