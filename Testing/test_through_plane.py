"""The stripe fix (gem3d.through_plane): the z filter, its streaming form, its calibration, and
where the product takes it from (the bundle's config, training, the pipeline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from gem3d.config import Config, from_dict, to_dict
from gem3d.evaluation.consistency import stripe_index
from gem3d.sampling import plan_windows
from gem3d.through_plane import MAX_A, ThroughPlane, calibrate, smooth


def textured(seed: int, shape=(24, 48, 48), sigma=2.0) -> np.ndarray:
    """An isotropic texture in [-1, 1] (the model's range) with a foreground everywhere."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return (0.2 + 0.5 * field / np.abs(field).max()).astype(np.float32)


def per_slice_decoded(volume: np.ndarray, seed: int) -> np.ndarray:
    """What a 2D decoder does to a volume: errors smooth in-plane but independent from one slice
    to the next (so the result is striped along z)."""
    errors = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(volume.shape), (0, 2.0, 2.0))
    return (volume + 0.01 * errors / errors.std()).astype(np.float32)


def test_smooth_is_the_three_tap_filter_with_edge_slices_repeated():
    volume = np.random.default_rng(0).standard_normal((9, 5, 4)).astype(np.float32)
    for a in (0.0, 0.1, 0.25):
        expected = ndimage.convolve1d(volume.astype(np.float64), [a, 1 - 2 * a, a], axis=0, mode="nearest")
        np.testing.assert_allclose(smooth(volume, a), expected, atol=1e-6)
    assert smooth(volume, 0.0) is not None and np.array_equal(smooth(volume, 0.0), volume)


@pytest.mark.parametrize("n, overlap, start", [(8, 1, 9), (8, 2, 0), (8, 3, 16), (6, 1, 4), (24, 1, 0)])
def test_streamed_windows_end_as_the_whole_volume_smoothed(n, overlap, start):
    """Windows in the plan's order, last write wins (as every sink assembles them): the result
    is the whole volume smoothed at once, though each window saw only the slices decoded so far."""
    volume = np.random.default_rng(1).standard_normal((24, 6, 6)).astype(np.float32)
    plan = plan_windows(24, n, start, overlap)
    streamer, assembled = ThroughPlane(24, 0.15), np.full_like(volume, np.nan)
    for window in plan.windows:
        assembled[window.start:window.stop] = streamer.add(window.start, window.stop,
                                                           volume[window.start:window.stop])
    np.testing.assert_allclose(assembled, smooth(volume, 0.15), atol=1e-6)


def test_a_window_sent_before_its_neighbour_uses_its_own_edge_slice():
    volume = np.arange(12, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    first = ThroughPlane(12, 0.25).add(4, 8, volume[4:8])
    np.testing.assert_allclose(first[:, 0, 0], [4.25, 5.0, 6.0, 6.75])   # 3 and 8 not decoded yet


def test_the_filter_strength_is_range_checked():
    for bad in (-0.01, MAX_A + 0.01, float("nan")):
        with pytest.raises(ValueError, match="through-plane"):
            ThroughPlane(4, bad)


def test_calibration_finds_no_filter_for_a_perfect_decoder_and_removes_stripes_of_a_2d_one():
    real = [textured(seed) for seed in range(3)]
    assert calibrate(real, real) == 0.0
    decoded = [per_slice_decoded(v, seed) for seed, v in enumerate(real)]
    a = calibrate(decoded, real)
    assert 0.1 <= a < MAX_A

    def gap(volumes):
        return abs(np.log(np.mean([stripe_index((v + 1) / 2) for v in volumes]) /
                          np.mean([stripe_index((v + 1) / 2) for v in real])))
    before, after = gap(decoded), gap([smooth(v, a) for v in decoded])
    assert before > 0.15 and after < before / 10


def test_calibration_of_volumes_without_texture_is_no_filter():
    flat = [np.full((6, 8, 8), -1.0, np.float32)]
    assert calibrate(flat, flat) == 0.0


def test_the_bundle_config_keeps_the_filter_and_refuses_one_out_of_range():
    data = to_dict(Config())
    assert data["vae"]["through_plane"] == 0.0                # bundles made before it: no filter
    data["vae"]["through_plane"] = 0.1625
    assert from_dict(json.loads(json.dumps(data))).vae.through_plane == 0.1625
    for bad in (0.3, -0.1, float("nan"), "a lot"):
        data["vae"]["through_plane"] = bad
        with pytest.raises(ValueError, match="vae.through_plane"):
            from_dict(data)


def test_the_product_streams_windows_smoothed_with_the_bundles_filter(tmp_path):
    """The shipped demo bundle carries its calibrated filter; the windows sent assemble to the
    written volume, which is less striped than the same run without the filter."""
    from gem3d import phantom
    from gem3d.bundle_format import DEMO_BUNDLE
    from gem3d.engine import Engine
    from gem3d.evaluation.volumes import axial_view, to_unit, unit_range
    from gem3d.io import provenance_path, read_volume
    from gem3d.pipeline import Switches
    from gem3d.request import GenerateRequest

    phantom.write_dataset(tmp_path / "data", "brain", cases=1, size=64, slices=24, seed=2)
    engine = Engine(DEMO_BUNDLE, device="cpu")
    assert engine.bundle.config.vae.through_plane == pytest.approx(0.1625)
    reference = read_volume(tmp_path / "data" / "imagesTr" / "brain_000_0000.nii.gz")
    scale = unit_range(axial_view(reference))
    index, recorded = {}, {}
    for name, switches in (("product", Switches()), ("off", Switches(through_plane=0.0))):
        out = tmp_path / f"{name}.nii.gz"
        request = GenerateRequest(reference=str(tmp_path / "data" / "imagesTr" / "brain_000_0000.nii.gz"),
                                  mask=str(tmp_path / "data" / "labelsTr" / "brain_000.nii.gz"),
                                  out=str(out), start=0.5, steps=4, seed=2)
        events = list(engine.generate(request, switches=switches))
        assert events[-1]["event"] == "finished", events[-1]
        written = read_volume(out)
        assembled = np.full(written.shape, np.nan, np.float32)
        for w in (e for e in events if e["event"] == "window"):
            where = [slice(None)] * 3
            where[w["axis"]] = slice(w["start"], w["stop"])
            assembled[tuple(where)] = w["slab"]
        np.testing.assert_allclose(assembled, written.array, atol=1e-4)
        recorded[name] = json.loads(provenance_path(out).read_text())["through_plane_filter"]
        index[name] = stripe_index(to_unit(axial_view(written), scale))
    assert recorded == {"product": pytest.approx(0.1625), "off": 0.0}
    assert index["product"] < 0.9 * index["off"], index


def test_bundle_calibrate_gives_an_older_bundle_the_filter_its_training_gave(tmp_path):
    """The demo bundle as a bundle made before the fix (filter 0), calibrated on the first 8 of
    its own training phantoms: a copy with the 0.1625 the shipped bundle carries; the input is
    left as it was, and the command refuses to write over it or over an existing folder."""
    import shutil

    from click.testing import CliRunner

    from gem3d import phantom
    from gem3d.bundle import load_bundle
    from gem3d.bundle_format import DEMO_BUNDLE
    from gem3d.cli import main

    older = tmp_path / "older"
    shutil.copytree(DEMO_BUNDLE, older)
    info = json.loads((older / "bundle.json").read_text())
    info["config"]["vae"]["through_plane"] = 0.0
    (older / "bundle.json").write_text(json.dumps(info))
    before = (older / "bundle.json").read_bytes()
    phantom.write_dataset(tmp_path / "data", "brain", cases=8, size=64, slices=32, seed=1)
    runner = CliRunner()
    args = ["bundle", "calibrate", str(older), "--dataset", str(tmp_path / "data"), "--device", "cpu"]
    result = runner.invoke(main, args + ["--out", str(tmp_path / "calibrated")])
    assert result.exit_code == 0, result.output
    assert "a = 0.1625 (was 0)" in result.output
    calibrated = load_bundle(tmp_path / "calibrated")
    assert calibrated.config.vae.through_plane == pytest.approx(0.1625)
    assert "bundle calibrate" in calibrated.info["provenance"]["notes"]["through_plane"]
    assert (older / "bundle.json").read_bytes() == before
    for out, message in ((older, "the bundle itself"), (tmp_path / "calibrated", "exists")):
        result = runner.invoke(main, args + ["--out", str(out)])
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert (older / "bundle.json").read_bytes() == before
