"""Mask edits: geometry of each edit, provenance of random values, the paper preset, the CLI."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from gem3d import mask_edits as edits
from gem3d.cli import main
from gem3d.volume import Geometry, Volume


def _rotation(degrees):
    return np.reshape(sitk.Euler3DTransform((0, 0, 0), *np.radians(degrees)).GetMatrix(), (3, 3))


IDENTITY = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
OBLIQUE = Geometry((1.2, 0.9, 2.5), (10.0, -20.0, 30.0), _rotation((20, 10, -15)))


def _mask(geometry=OBLIQUE, shape=(30, 60, 50), centre=(14, 25, 20), radii=(4, 8, 6)):
    """An ellipsoidal lesion (label 2) with an off-centre core (label 1), indices (z, y, x)."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = sum(((a - c) / s) ** 2 for a, c, s in zip((z, y, x), centre, radii))
    array = np.where(r < 1, 2, 0).astype(np.uint8)
    array[(r < 0.3) & (x > centre[2])] = 1
    return Volume(array, geometry)


def _volume(mask):
    return int(np.count_nonzero(mask.array))


@pytest.mark.parametrize("axis", ["x", "y", "z", "LR", "AP", "SI"])
def test_flip_twice_is_the_original(axis):
    mask = _mask()
    once = edits.flip(mask, axis)
    assert not np.array_equal(once.array, mask.array)
    assert np.array_equal(edits.flip(once, axis).array, mask.array)
    assert once.geometry == mask.geometry


def test_physical_flip_axis_follows_the_direction_matrix():
    permuted = Geometry((1, 1, 1), (0, 0, 0), np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]))
    mask = _mask(permuted)                   # index i runs along AP, j along SI, k along LR
    assert np.array_equal(edits.flip(mask, "LR").array, np.flip(mask.array, 0))
    assert np.array_equal(edits.flip(mask, "AP").array, np.flip(mask.array, 2))
    assert np.array_equal(edits.flip(mask, "SI").array, np.flip(mask.array, 1))
    with pytest.raises(ValueError, match="LR, AP, SI"):
        edits.flip(mask, "up")


@pytest.mark.parametrize("geometry", [IDENTITY, OBLIQUE], ids=["identity", "oblique"])
def test_translate_moves_the_centroid_by_the_requested_mm(geometry):
    mask = _mask(geometry)
    mm = np.array([6.0, -4.0, 5.0])
    moved = edits.translate(mask, mm)
    shift = edits.centroid_mm(moved) - edits.centroid_mm(mask)
    assert np.linalg.norm(shift - mm) <= max(geometry.spacing)
    assert abs(_volume(moved) - _volume(mask)) <= 0.02 * _volume(mask)
    assert moved.geometry == mask.geometry


def test_voxels_moved_out_are_dropped_and_counted():
    array = np.zeros((10, 10, 10), np.uint8)
    array[4:6, 4:6, 6:10] = 3                                   # 16 voxels, x = 6..9
    mask = Volume(array, IDENTITY)
    with pytest.warns(edits.LesionClippedWarning, match="12 of 16"):
        moved = edits.translate(mask, (3, 0, 0))
    assert np.array_equal(np.argwhere(moved.array)[:, 2], [9] * 4)


def test_rotation_by_zero_is_identity_and_rotation_keeps_volume():
    mask = _mask()
    assert np.array_equal(edits.rotate(mask, (0, 0, 0)).array, mask.array)
    turned = edits.rotate(mask, (10, 20, 30))
    assert not np.array_equal(turned.array, mask.array)
    assert abs(_volume(turned) / _volume(mask) - 1) < 0.1
    assert np.linalg.norm(edits.centroid_mm(turned) - edits.centroid_mm(mask)) <= max(OBLIQUE.spacing)


def test_rotation_turns_about_the_physical_axis_in_the_right_sense():
    array = np.zeros((20, 40, 40), np.uint8)
    array[8:12, 18:22, 18:22] = 2                               # body around index (20, 20, 10)
    array[9:11, 19:21, 27:29] = 1                               # marker 8 mm along +x
    mask = Volume(array, Geometry((1, 1, 1), (5, 6, 7), np.eye(3)))
    center = mask.geometry.index_to_physical((19.5, 19.5, 9.5))
    turned = edits.rotate(mask, (0, 0, 90), center=center)
    marker = edits.centroid_mm(turned, labels=[1]) - center
    assert np.allclose(marker, (0, 8, 0), atol=1.0)             # +x turns into +y about +z


def test_scale_two_multiplies_volume_by_eight():
    mask = _mask()
    grown = edits.scale(mask, 2)
    assert 8 * 0.8 < _volume(grown) / _volume(mask) < 8 * 1.2
    assert np.linalg.norm(edits.centroid_mm(grown) - edits.centroid_mm(mask)) <= max(OBLIQUE.spacing)
    with pytest.raises(ValueError, match="positive"):
        edits.scale(mask, 0)


def _distance_to_centre(mask):
    return np.linalg.norm(np.argwhere(mask.array).mean(0) - (np.asarray(mask.shape) - 1) / 2)


def test_move_toward_center():
    mask = _mask(centre=(8, 12, 10))
    before = _distance_to_centre(mask)
    assert _distance_to_centre(edits.move_toward_center(mask, 60, fraction=1.0)) <= 1.0
    capped = edits.move_toward_center(mask, max_px=5, fraction=1.0)
    assert before - 6 <= _distance_to_centre(capped) <= before - 4
    random = edits.move_toward_center(mask, rng=np.random.default_rng(0))
    assert _distance_to_centre(random) < before
    assert np.array_equal(random.array, edits.move_toward_center(mask, rng=np.random.default_rng(0)).array)


def test_copy_lesion_lands_at_the_same_physical_position_on_another_grid():
    source = _mask(OBLIQUE)
    target_geometry = Geometry((0.8, 0.8, 1.5), (-10.0, -40.0, 10.0), _rotation((0, 0, 5)))
    target = Volume(np.zeros((60, 110, 110), np.int16), target_geometry)
    target.array[2:4, 2:4, 2:4] = 4
    pasted = edits.copy_lesion(target, source)
    assert np.linalg.norm(edits.centroid_mm(pasted, [1, 2]) - edits.centroid_mm(source)) <= 1.5
    assert np.count_nonzero(pasted.array == 4) == 8                 # what was there stays
    shifted = edits.copy_lesion(target, source, labels=[1], offset_mm=(5, 0, 0))
    delta = edits.centroid_mm(shifted, [1]) - edits.centroid_mm(source, [1])
    assert np.allclose(delta, (5, 0, 0), atol=1.5)
    assert pasted.array.dtype == np.int16 and pasted.geometry == target_geometry


def test_relabel():
    mask = _mask()
    ones, twos = np.count_nonzero(mask.array == 1), np.count_nonzero(mask.array == 2)
    swapped = edits.relabel(mask, {"1": 2, 2: 1})
    assert np.count_nonzero(swapped.array == 1) == twos and np.count_nonzero(swapped.array == 2) == ones
    with pytest.raises(ValueError, match="does not fit"):
        edits.relabel(mask, {1: 300})


def test_apply_edits_records_drawn_values_and_replays_them():
    mask = _mask(centre=(8, 12, 10))
    specs = [{"op": "rotate", "max_degrees": 2.5}, {"op": "move_toward_center", "max_px": 60},
             {"op": "translate", "mm": (1, 2, 3)}]
    edited, applied = edits.apply_edits(mask, specs, rng=np.random.default_rng(1))
    again, applied_again = edits.apply_edits(mask, specs, rng=np.random.default_rng(1))
    _, other = edits.apply_edits(mask, specs, rng=np.random.default_rng(2))
    assert applied == applied_again and applied[1]["fraction"] != other[1]["fraction"]
    assert [s["op"] for s in applied] == ["rotate", "move_toward_center", "translate"]
    assert all(abs(d) <= 2.5 for d in applied[0]["degrees"]) and 0 <= applied[1]["fraction"] <= 1
    assert applied[2]["mm"] == [1, 2, 3]
    json.dumps(applied)
    assert np.array_equal(edited.array, again.array)
    assert np.array_equal(edits.apply_edits(mask, applied)[0].array, edited.array)


def test_apply_edits_rejects_unknown_ops_and_fields_and_resolves_sources():
    mask = _mask()
    with pytest.raises(ValueError, match="valid ops: flip, rotate, translate"):
        edits.apply_edits(mask, [{"op": "shear"}])
    with pytest.raises(ValueError, match="unknown fields"):
        edits.apply_edits(mask, [{"op": "translate", "millimetres": [1, 0, 0]}])
    with pytest.raises(ValueError, match="source 'other'"):
        edits.apply_edits(mask, [{"op": "copy_lesion", "source": "other"}])
    empty = mask.with_array(np.zeros_like(mask.array))
    pasted, _ = edits.apply_edits(empty, [{"op": "copy_lesion", "source": "other"}], sources={"other": mask})
    assert np.array_equal(pasted.array, mask.array)
    with pytest.raises(ValueError, match="no voxels with labels"):
        edits.rotate(mask, (1, 0, 0), labels=[7])


def test_paper_augmentation_bounds():
    rng = np.random.default_rng(0)
    draws = [edits.paper_augmentation(rng) for _ in range(300)]
    flips = sum(d[0]["op"] == "flip" for d in draws)
    assert 0.4 < flips / len(draws) < 0.6
    for specs in draws:
        rotate, move = specs[-2], specs[-1]
        assert rotate["op"] == "rotate" and all(-2.5 <= v <= 2.5 for v in rotate["degrees"])
        assert move == {"op": "move_toward_center", "max_px": 60, "fraction": move["fraction"]}
        assert 0 <= move["fraction"] <= 1
        assert specs[0] == {"op": "flip", "axis": "LR"} or len(specs) == 2
    assert max(abs(v) for d in draws for v in d[-2]["degrees"]) > 2.3
    seeded = [edits.paper_augmentation(np.random.default_rng(5)) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert [s["op"] for s in edits.paper_augmentation(rng, "abdomen")] == ["rotate"]


def test_cli_edit_mask_writes_sidecar_replays_and_protects_input(tmp_path):
    source = tmp_path / "mask.nii.gz"
    mask = _mask()
    sitk.WriteImage(mask.to_sitk(), str(source))
    before = source.read_bytes()
    out = tmp_path / "edited.nii.gz"
    args = ["edit-mask", "--mask", str(source), "--out", str(out), "--translate", "5", "0", "0",
            "--relabel", "1:4", "--augment", "paper", "--seed", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    edited = Volume.from_sitk(sitk.ReadImage(str(out)))
    assert edited.geometry.allclose(mask.geometry) and set(np.unique(edited.array)) == {0, 2, 4}
    sidecar = json.loads((tmp_path / "edited.json").read_text())
    ops = [s["op"] for s in sidecar["edits"]]
    assert ops[:2] == ["translate", "relabel"] and ops[-2:] == ["rotate", "move_toward_center"]
    assert sidecar["seed"] == 3
    replay = tmp_path / "replay.nii.gz"
    rerun = CliRunner().invoke(main, ["edit-mask", "--mask", str(source), "--out", str(replay),
                                      "--edits", str(tmp_path / "edited.json")])
    assert rerun.exit_code == 0, rerun.output
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(replay))), edited.array)
    exists = CliRunner().invoke(main, args)
    assert exists.exit_code != 0 and "exists" in exists.output
    assert CliRunner().invoke(main, args + ["--overwrite"]).exit_code == 0
    refused = CliRunner().invoke(main, ["edit-mask", "--mask", str(source), "--out", str(source),
                                        "--flip", "LR"])
    assert refused.exit_code != 0 and "would overwrite an input" in refused.output
    bad = CliRunner().invoke(main, ["edit-mask", "--mask", str(source), "--out", str(out),
                                    "--relabel", "1-4"])
    assert bad.exit_code == 2 and "A:B" in bad.output
    assert source.read_bytes() == before
