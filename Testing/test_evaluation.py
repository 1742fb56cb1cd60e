"""Evaluation metrics against hand-computed cases, the RadImageNet layout, and `gem3d evaluate`."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import ndimage

from gem3d import phantom
from gem3d.cli import main
from gem3d.evaluation.adherence import PhantomBrainRule, dice, dice_scores
from gem3d.evaluation.consistency import (ConsistencyStats, coherent_view, interslice_differences, seam_profile,
                                         stripe_index, stripe_ratio)
from gem3d.evaluation.extractors import (RadImageNetResNet50, RandomConvExtractor, load_radimagenet,
                                         make_extractor)
from gem3d.evaluation.frechet import FrechetPlanes, frechet_distance, planes
from gem3d.evaluation.metrics import PSNR_CAP, ms_ssim_scales, paired_metrics
from gem3d.evaluation.segmenter import SliceSegmenter, train_segmenter
from gem3d.evaluation.volumes import axial_view, pair_cases, source_id, to_unit, unit_range
from gem3d.datasets import Case
from gem3d.volume import Geometry, Volume


def smooth_volume(seed: int, shape=(16, 32, 32), sigma=2.0) -> np.ndarray:
    """A textured volume in [0.2, 0.8] (smooth Gaussian noise)."""
    field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    return (0.5 + 0.3 * field / np.abs(field).max()).astype(np.float32)


# ---------------------------------------------------------------- paired metrics

def test_identical_volumes_score_perfectly():
    v = smooth_volume(0)
    scores = paired_metrics(v, v)
    assert scores["psnr"] == PSNR_CAP
    assert scores["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ms_ssim"] == pytest.approx(1.0, abs=1e-6)


def test_constant_offset_psnr_and_ssim_by_hand():
    real = np.zeros((4, 32, 32), np.float32)
    synthetic = np.full_like(real, 0.1)
    scores = paired_metrics(real, synthetic)
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-4)          # 10 log10(1 / 0.1^2)
    c1 = (0.01 * 1.0) ** 2                                          # SSIM luminance constant
    assert scores["ssim"] == pytest.approx(c1 / (0.1 ** 2 + c1), rel=1e-3)  # contrast term is 1


def test_noise_lowers_every_paired_metric():
    v = smooth_volume(1)
    noisy = np.clip(v + 0.05 * np.random.default_rng(2).standard_normal(v.shape), 0, 1).astype(np.float32)
    clean, worse = paired_metrics(v, v * 0.99), paired_metrics(v, noisy)
    assert worse["psnr"] < clean["psnr"] and worse["ssim"] < clean["ssim"] and worse["ms_ssim"] < clean["ms_ssim"]


@pytest.mark.parametrize("size, scales", [(8, 1), (32, 3), (64, 4), (96, 4), (97, 5), (512, 5)])
def test_ms_ssim_scales_fit_small_slices(size, scales):
    assert ms_ssim_scales(size, size) == scales


def test_ms_ssim_rejects_tiny_slices():
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_scales(6, 6)


# ---------------------------------------------------------------- Frechet distance

def test_frechet_identical_sets_is_zero():
    a = np.random.default_rng(0).standard_normal((200, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_of_a_shift_is_the_squared_shift():
    a = np.random.default_rng(1).standard_normal((300, 5))
    d = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + d) == pytest.approx(float(d @ d), rel=1e-6)   # 14.25


def test_frechet_of_a_scaling_is_the_trace():
    a = np.random.default_rng(2).standard_normal((300, 4))
    a -= a.mean(0)
    # cov(2a) = 4S: tr(S + 4S - 2 (4 S^2)^(1/2)) = tr(S), the means are equal (0)
    assert frechet_distance(a, 2 * a) == pytest.approx(float(np.trace(np.cov(a, rowvar=False))), rel=1e-6)


def test_frechet_needs_two_samples_and_one_dimension():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_planes_cut_the_three_orientations():
    v = np.zeros((10, 20, 30), np.float32)
    v[2:8, 5:15, 10:20] = 1
    assert planes(v, "axial", 100).shape == (6, 20, 30)        # only the foreground extent
    assert planes(v, "coronal", 4).shape == (4, 10, 30)
    assert planes(v, "sagittal", 100).shape == (10, 10, 20)


def test_default_extractor_is_fixed_and_separates_distributions():
    a, b = RandomConvExtractor(), make_extractor("default")
    x = torch.rand(3, 1, 40, 40)
    assert torch.equal(a(x), b(x)) and a(x).shape == (3, 240)
    shape = (12, 24, 24)
    fid, same, shifted = FrechetPlanes(a, 8), FrechetPlanes(a, 8), FrechetPlanes(a, 8)
    for seed in range(2):
        for stats in (fid, same, shifted):
            stats.add("real", smooth_volume(seed, shape))
        fid.add("synthetic", smooth_volume(seed, shape))
        same.add("synthetic", smooth_volume(10 + seed, shape))            # other samples, same process
        shifted.add("synthetic", smooth_volume(10 + seed, shape) + 0.15)  # brighter
    assert max(fid.distances().values()) == pytest.approx(0.0, abs=1e-8)
    near, far = same.distances(), shifted.distances()
    assert all(far[p] > 3 * near[p] for p in near), (near, far)


# ---------------------------------------------------------------- RadImageNet ResNet-50

PUBLISHED_SHAPES = {  # RadImageNet's PyTorch ResNet-50 checkpoint (torchvision children in `backbone`)
    "backbone.0.weight": (64, 3, 7, 7), "backbone.1.running_var": (64,),
    "backbone.4.0.conv1.weight": (64, 64, 1, 1), "backbone.4.0.conv2.weight": (64, 64, 3, 3),
    "backbone.4.0.downsample.0.weight": (256, 64, 1, 1), "backbone.5.0.conv2.weight": (128, 128, 3, 3),
    "backbone.5.0.downsample.0.weight": (512, 256, 1, 1), "backbone.6.5.conv3.weight": (1024, 256, 1, 1),
    "backbone.7.0.downsample.0.weight": (2048, 1024, 1, 1), "backbone.7.2.bn3.running_var": (2048,),
    "backbone.7.2.bn3.num_batches_tracked": (),
}


def test_radimagenet_layout_matches_the_published_checkpoint():
    state = RadImageNetResNet50().state_dict()
    for key, shape in PUBLISHED_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    # 53 convolutions (1 stem + 16 blocks x 3 + 4 downsamples), 53 batch norms x 5 tensors
    assert len(state) == 53 + 53 * 5
    assert sum(p.numel() for p in RadImageNetResNet50().parameters()) == 23_508_032  # ResNet-50 minus fc


def test_radimagenet_gives_2048_features_and_loads_torchvision_names(tmp_path):
    torch.manual_seed(0)
    model = RadImageNetResNet50().eval()
    x = torch.rand(2, 1, 48, 40)
    features = model(x)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    names = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
    renamed = {"module." + names[k.split(".")[1]] + k[len("backbone.") + 1:]: v
               for k, v in model.state_dict().items()}
    renamed["module.fc.weight"] = torch.zeros(1000, 2048)
    torch.save(renamed, tmp_path / "resnet50.pt")
    loaded = load_radimagenet(tmp_path / "resnet50.pt")
    assert torch.allclose(loaded(x), features)
    torch.save({**model.state_dict(), "backbone.0.bias": torch.zeros(64)}, tmp_path / "keras.pt")
    with pytest.raises(ValueError, match="1 unexpected"):
        load_radimagenet(tmp_path / "keras.pt")


# ---------------------------------------------------------------- consistency

def test_interslice_differences_of_a_ramp_by_hand():
    ramp = np.broadcast_to(0.1 + 0.02 * np.arange(10, dtype=np.float32)[:, None, None], (10, 8, 8)).copy()
    assert np.allclose(interslice_differences(ramp), 0.02)
    stats = ConsistencyStats()
    stats.add("real", ramp)
    stats.add("synthetic", 0.1 + 2 * (ramp - 0.1))           # slope 0.04
    assert stats.distances()["isd_w1"] == pytest.approx(0.02, abs=1e-6)


def test_a_seam_scores_worse_than_no_seam():
    real, other = smooth_volume(3), smooth_volume(4)
    seamed = other.copy()
    seamed[8:] += 0.15                                       # a window border that jumps
    clean, seam = ConsistencyStats(), ConsistencyStats()
    for stats, synthetic in ((clean, other), (seam, seamed)):
        stats.add("real", real)
        stats.add("synthetic", synthetic)
    a, b = clean.distances(), seam.distances()
    assert b["seam_w1"] > 2 * a["seam_w1"] and b["isd_w1"] > a["isd_w1"]
    assert b["seam_max_synthetic"] > 2 * a["seam_max_synthetic"]
    assert seam_profile(seamed).argmax() == 7                # the jump is between slices 7 and 8


def test_stripe_index_of_a_ramp_and_of_striped_slices_by_hand():
    """In-plane: a ramp of 0.01 per column, so (dx^2 + dy^2) / 2 = 5e-5 everywhere. Along z: a
    ramp of 0.01 per slice (dz^2 = 1e-4, index 2) or alternating +-0.05 slice offsets
    (dz^2 = 0.1^2, index 200)."""
    z = np.arange(13, dtype=np.float64)[:, None, None]
    columns = 0.3 + 0.01 * np.arange(32, dtype=np.float64)[None, None, :]
    smooth = np.broadcast_to(columns + 0.01 * z, (13, 32, 32))
    striped = np.broadcast_to(columns + np.where(z % 2 == 0, 0.05, -0.05), (13, 32, 32))
    assert stripe_index(smooth) == pytest.approx(2.0, rel=1e-9)
    assert stripe_index(striped) == pytest.approx(200.0, rel=1e-9)
    assert stripe_ratio(smooth, striped) == pytest.approx(100.0, rel=1e-9)
    assert stripe_ratio(smooth, 0.5 + 0.5 * smooth) == pytest.approx(1.0, rel=1e-9)   # contrast cancels


def test_stripe_index_of_isotropic_noise_is_one_and_slice_offsets_raise_it():
    rng = np.random.default_rng(6)
    noise = 0.5 + 0.05 * rng.standard_normal((16, 64, 64))
    assert stripe_index(noise) == pytest.approx(1.0, abs=0.03)
    striped = noise + np.where(np.arange(16)[:, None, None] % 2 == 0, 0.05, -0.05)
    assert stripe_index(striped) == pytest.approx(1 + 0.1 ** 2 / (2 * 0.05 ** 2), rel=0.05)   # 3
    stats = ConsistencyStats()
    stats.add("real", noise.astype(np.float32))
    stats.add("synthetic", striped.astype(np.float32))
    assert stats.distances()["stripe_ratio"] == pytest.approx(3.0, rel=0.05)


def test_the_coherent_stripe_ratio_sees_bands_across_rows_that_pixel_noise_hides():
    """Slice offsets of +-0.01 on noisy texture barely move the pixel-level ratio (1 + 0.02^2 /
    (2 * 0.05^2) = 1.08) but dominate once in-plane noise is smoothed away."""
    rng = np.random.default_rng(7)
    noise = 0.5 + 0.05 * rng.standard_normal((16, 64, 64))
    banded = noise + np.where(np.arange(16)[:, None, None] % 2 == 0, 0.01, -0.01)
    stats = ConsistencyStats()
    stats.add("real", noise.astype(np.float32))
    stats.add("synthetic", banded.astype(np.float32))
    ratios = stats.distances()
    assert ratios["stripe_ratio"] == pytest.approx(1.08, abs=0.03)
    assert ratios["stripe_ratio_coherent"] > 3
    assert stripe_index(coherent_view(banded)) > 3 * stripe_index(coherent_view(noise))


def test_stripe_index_rejects_a_volume_without_foreground():
    with pytest.raises(ValueError, match="no foreground"):
        stripe_index(np.zeros((4, 8, 8)))


# ---------------------------------------------------------------- mask adherence

def test_dice_of_known_overlaps():
    a, b = np.zeros(10, bool), np.zeros(10, bool)
    a[:4], b[2:6] = True, True
    assert dice(a, b) == 0.5                                 # 2 * 2 / (4 + 4)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    predicted, mask = np.array([0, 1, 1, 2, 4]), np.array([0, 1, 2, 2, 0])
    assert dice_scores(predicted, mask, [1, 2, 4]) == {"all": 2 * 3 / (4 + 3), "label_1": 2 / 3,
                                                       "label_2": 2 / 3, "label_4": 0.0}


@pytest.fixture(scope="module")
def brain_case():
    image, labels, truth = phantom.make_case("brain", seed=0, index=1, size=64, slices=32)
    return image, labels, truth


def test_phantom_rule_follows_the_painted_tumour(brain_case):
    image, labels, truth = brain_case
    rule = PhantomBrainRule()
    volume = to_unit(image.array, unit_range(image.array))
    assert dice(rule(volume) > 0, labels.array > 0) > 0.7
    healthy = phantom.render_case(truth, np.zeros_like(labels.array))   # same head, no tumour drawn
    assert dice(rule(to_unit(healthy, unit_range(healthy))) > 0, labels.array > 0) < 0.3


def test_segmenter_learns_and_round_trips(brain_case, tmp_path):
    image, labels, _ = brain_case
    volume = to_unit(image.array, unit_range(image.array))
    seg = train_segmenter([(volume, labels.array)], labels=(1, 2, 4), steps=60, batch=8, size=32)
    predicted = seg(volume)
    assert predicted.shape == volume.shape and set(np.unique(predicted)) <= {0, 1, 2, 4}
    assert dice(predicted > 0, labels.array > 0) > 0.6
    seg.save(tmp_path / "seg.safetensors")
    assert np.array_equal(SliceSegmenter.load(tmp_path / "seg.safetensors")(volume), predicted)


# ---------------------------------------------------------------- volumes and pairing

def test_axial_view_undoes_a_flipped_slice_axis():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    flipped = Volume(array, Geometry(direction=np.diag([1.0, 1.0, -1.0])))
    assert np.array_equal(axial_view(flipped), array[::-1])
    assert np.array_equal(axial_view(Volume(array, Geometry())), array)


def test_synthetic_ids_pair_with_their_source():
    assert source_id("brain_001_syn02") == "brain_001" and source_id("brain_001") == "brain_001"
    real = [Case("brain_000", None), Case("brain_001", None)]
    pairs = pair_cases(real, [Case("brain_001_syn00", None), Case("brain_000", None)])
    assert [(s.case_id, r.case_id) for s, r in pairs] == [("brain_001_syn00", "brain_001"),
                                                          ("brain_000", "brain_000")]
    with pytest.raises(ValueError, match="no real case"):
        pair_cases(real, [Case("liver_000_syn00", None)])


# ---------------------------------------------------------------- gem3d evaluate

def _synthetic_copy(real, out, shift=0.0, seam_at=None):
    """The real dataset renamed <case>_syn00, optionally brighter from slice `seam_at` on."""
    from gem3d.io import read_volume, write_volume

    for folder in ("imagesTr", "labelsTr"):
        (out / folder).mkdir(parents=True)
    for image in sorted((real / "imagesTr").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        volume = read_volume(image)
        array = volume.array.astype(np.float32)
        if seam_at is not None:
            array[seam_at:] += shift * float(array.max())
        write_volume(Volume(array, volume.geometry), out / "imagesTr" / f"{case}_syn00_0000.nii.gz")
        shutil.copy(real / "labelsTr" / f"{case}.nii.gz", out / "labelsTr" / f"{case}_syn00.nii.gz")
    shutil.copy(real / "dataset.json", out / "dataset.json")


def test_evaluate_command_writes_table_json_and_csv(tmp_path):
    real = tmp_path / "real"
    phantom.write_dataset(real, "brain", cases=3, size=32, slices=16, seed=0)
    same, seamed = tmp_path / "same", tmp_path / "seamed"
    _synthetic_copy(real, same)
    _synthetic_copy(real, seamed, shift=0.2, seam_at=8)
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", "--real", str(real), "--synthetic", str(same), "--paired",
                                  "--planes", "8", "--json", str(tmp_path / "same.json"),
                                  "--csv", str(tmp_path / "same.csv")])
    assert result.exit_code == 0, result.output
    assert "FID-A (axial)" in result.output and "MS-SSIM (3 scales)" in result.output
    report = json.loads((tmp_path / "same.json").read_text())
    assert report["paired"]["psnr"] == PSNR_CAP and report["paired"]["pairs"] == 3
    assert max(report["fid"].values()) == pytest.approx(0.0, abs=1e-6)
    assert report["adherence"]["segmenter"] == "phantom-brain-rule"          # auto: a brain phantom
    assert report["adherence"]["synthetic"] == report["adherence"]["real"]
    lines = (tmp_path / "same.csv").read_text().splitlines()
    assert lines[0] == "scope,case,metric,value" and "case,brain_000_syn00,psnr,100.0" in lines

    result = runner.invoke(main, ["evaluate", "--real", str(real), "--synthetic", str(seamed), "--paired",
                                  "--planes", "8", "--segmenter", "none", "--json", str(tmp_path / "seam.json")])
    assert result.exit_code == 0, result.output
    seam = json.loads((tmp_path / "seam.json").read_text())
    assert seam["paired"]["psnr"] < 60          # half the slices are exact (capped at 100 dB), half ~13 dB
    assert seam["consistency"]["seam_w1"] > 0.1
    assert min(seam["fid"].values()) > 0 and seam["adherence"] is None

    result = runner.invoke(main, ["evaluate", "--real", str(same), "--synthetic", str(real), "--paired"])
    assert result.exit_code != 0 and "no real case" in result.output


def test_segmenter_specs(tmp_path):
    from gem3d.evaluation.report import make_segmenter

    data = tmp_path / "brain"
    phantom.write_dataset(data, "brain", cases=2, size=32, slices=12, seed=0)
    assert make_segmenter("none", data) is None
    assert isinstance(make_segmenter("auto", data), PhantomBrainRule)
    assert make_segmenter("auto", tmp_path) is None                    # not a phantom dataset
    trained = make_segmenter("train:3", data)
    assert isinstance(trained, SliceSegmenter) and trained.labels == (1, 2, 4)
    with pytest.raises(ValueError, match="unknown segmenter"):
        make_segmenter("otsu", data)


# ---------------------------------------------------------------- contrast calibration

def test_per_class_fit_recovers_known_maps_from_one_slice_and_applies_them_everywhere():
    from gem3d.evaluation.calibration import apply_per_class, fit_per_class

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 8, 8))
    classes = rng.integers(0, 3, x.shape)
    classes[:, 0, 0] = 7                         # one voxel on the fitted slice, too few: the overall fit
    truth = {0: (2.0, 1.0), 1: (-0.5, 3.0), 2: (0.0, 0.25)}
    y = np.zeros_like(x)
    for c, (a, b) in truth.items():
        y[classes == c] = a * x[classes == c] + b
    where = np.zeros(x.shape, bool)
    where[2] = True                              # the "informed slice"
    coef = fit_per_class(x, y, classes, where)
    for c, (a, b) in truth.items():
        assert coef[c] == pytest.approx((a, b), abs=1e-9)
    overall = np.polyfit(x[where], y[where], 1)
    assert coef[7] == pytest.approx(tuple(overall), abs=1e-9)
    calibrated = apply_per_class(x, classes, coef)
    known = classes != 7
    np.testing.assert_allclose(calibrated[known], y[known], atol=1e-5)   # off the slice too


def test_per_class_fit_of_a_constant_input_is_its_mean_and_an_empty_fit_is_refused():
    from gem3d.evaluation.calibration import fit_per_class, linear_fit

    x, y = np.full(5, 3.0), np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert linear_fit(x, y) == (0.0, 3.0)
    classes, where = np.zeros(5, int), np.ones(5, bool)
    assert fit_per_class(x, y, classes, where) == {0: (0.0, 3.0)}
    with pytest.raises(ValueError, match="no voxels"):
        fit_per_class(x, y, classes, np.zeros(5, bool))
    with pytest.raises(ValueError, match="one shape"):
        fit_per_class(x, y[:4], classes, where)


def test_intensity_classes_keep_lesion_labels_and_bin_healthy_voxels_by_quantile():
    from gem3d.evaluation.calibration import intensity_classes

    x = np.arange(12, dtype=float)
    labels = np.array([0] * 8 + [1, 2, 4, 4])
    classes = intensity_classes(x, labels, bins=4)
    assert classes.tolist() == [-1, -1, -2, -2, -3, -3, -4, -4, 1, 2, 4, 4]


def test_per_class_fit_maps_a_class_constant_on_the_fitted_voxels_to_their_mean():
    from gem3d.evaluation.calibration import fit_per_class

    x = np.array([0.0, 0.0, 0.0, 1.0, 2.0, 3.0])          # class 0: constant x (background, say)
    y = np.array([1.0, 2.0, 3.0, 2.0, 4.0, 6.0])
    classes = np.array([0, 0, 0, 1, 1, 1])
    coef = fit_per_class(x, y, classes, np.ones(6, bool))
    assert coef[0] == (0.0, 2.0) and coef[1] == pytest.approx((2.0, 0.0))
