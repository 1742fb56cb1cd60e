"""The model grid: LPS reorientation, square FOV, physical placement, exact way back."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.ndimage import convolve1d

from gem3d.grid import ModelGrid
from gem3d.volume import Geometry, Volume


def rotation(axis, degrees):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.radians(degrees)
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


# Sagittal acquisition: i -> posterior, j -> inferior, k -> patient right; then 20 deg oblique.
SAGITTAL = Geometry((0.8, 1.1, 3.3), (12.0, -40.0, 75.0),
                    rotation((1, 2, 3), 20) @ np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float))
SAGITTAL_SHAPE = (9, 17, 26)  # (k, j, i): 17 axial model slices, in-plane 26 x 0.8 mm by 9 x 3.3 mm
# Oblique axial with flipped rows/slices and isotropic, non-square in-plane pixels.
AXIAL = Geometry((0.9, 0.9, 2.5), (-5.0, 7.0, 30.0), rotation((2, -1, 1), 20) @ np.diag([1.0, -1.0, -1.0]))
AXIAL_SHAPE = (7, 20, 27)


def centres(geometry, shape):
    """Physical centres of all voxels, array (z, y, x, 3)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).T
    points = np.asarray(geometry.origin)[:, None] + geometry.direction @ (np.asarray(geometry.spacing)[:, None] * ijk)
    return points.T.reshape(*shape, 3)


def test_sagittal_oblique_becomes_axial_lps_and_keeps_obliqueness():
    grid = ModelGrid.fit(SAGITTAL, SAGITTAL_SHAPE, 32)
    assert (grid.axis, grid.flipped, grid.model_shape) == (1, True, (17, 32, 32))
    direction = grid.model_geometry.direction
    assert np.all(np.diag(direction) > 0.9)  # columns -> L, rows -> P, slices -> S
    for column in direction.T:  # each model axis is a reference axis, up to sign: no interpolation of obliqueness
        assert min(np.abs(SAGITTAL.direction.T @ column) - 1, key=abs) == pytest.approx(0, abs=1e-12)
    # slices keep their spacing, the square FOV is the larger extent (9 x 3.3 mm) over 32 pixels
    np.testing.assert_allclose(grid.model_geometry.spacing, (29.7 / 32, 29.7 / 32, 1.1))
    assert grid.model_to_reference_range(0, 5) == (12, 17)
    assert grid.model_to_reference_range(12, 17) == (0, 5)


@pytest.mark.parametrize("perm,signs", list(itertools.product(itertools.permutations(range(3)),
                                                              itertools.product((1, -1), repeat=3))))
def test_every_axis_aligned_orientation_maps_to_identity_and_places_voxels(perm, signs):
    direction = np.zeros((3, 3))
    for column, (row, sign) in enumerate(zip(perm, signs)):
        direction[row, column] = sign
    geometry = Geometry((1.2, 1.2, 1.2), (3.0, -2.0, 1.0), direction)
    shape = (4, 5, 6)
    labels = np.arange(1, 121, dtype=np.int32).reshape(shape)
    in_plane = [shape[2 - c] for c in range(3) if perm[c] != 2]  # index axes not along S-I
    grid = ModelGrid.fit(geometry, shape, max(in_plane))  # model pixels of 1.2 mm: exact lattice
    assert np.array_equal(grid.model_geometry.direction, np.eye(3))
    model = grid.to_model(labels, "label")
    # every reference voxel sits at its own physical place on the model grid
    placed = centres(grid.model_geometry, model.shape)[model > 0]
    expected = centres(geometry, shape).reshape(-1, 3)[model[model > 0] - 1]
    np.testing.assert_allclose(placed, expected, atol=1e-9)
    assert np.array_equal(np.sort(model[model > 0]), labels.ravel())
    assert np.array_equal(grid.from_model(model, "label"), labels)


def test_isotropic_in_plane_at_max_size_is_pure_reorientation_and_padding():
    grid = ModelGrid.fit(AXIAL, AXIAL_SHAPE, 27)
    assert (grid.axis, grid.flipped) == (0, True)
    rng = np.random.default_rng(0)
    image = rng.normal(size=AXIAL_SHAPE).astype(np.float32) * 100
    labels = rng.integers(0, 5, AXIAL_SHAPE).astype(np.uint8)
    model = grid.to_model(image, "image", pad_value=-1000.0)
    expected = np.pad(image[::-1, ::-1, :], ((0, 0), (3, 4), (0, 0)), constant_values=-1000.0)
    assert np.array_equal(model, expected)  # 7 pad rows: 3 before, 4 after (whole model pixels)
    model_labels = grid.to_model(labels, "label")
    assert model_labels.dtype == np.uint8
    assert np.array_equal(model_labels, np.pad(labels[::-1, ::-1, :], ((0, 0), (3, 4), (0, 0))))
    assert np.array_equal(grid.from_model(model, "image"), image)
    assert np.array_equal(grid.from_model(model_labels, "label"), labels)
    # a few voxel centres: model (z, r, c) is reference (Z-1-z, 19-(r-3), c)
    for z, r, c in [(0, 3, 0), (6, 22, 26), (3, 10, 13)]:
        np.testing.assert_allclose(grid.model_geometry.index_to_physical((c, r, z)),
                                   AXIAL.index_to_physical((c, 19 - (r - 3), 6 - z)), atol=1e-9)


def test_label_round_trip_is_exact_when_model_pixels_are_finer():
    labels = np.random.default_rng(1).integers(0, 6, SAGITTAL_SHAPE).astype(np.int16)
    fine = ModelGrid.fit(SAGITTAL, SAGITTAL_SHAPE, 40)  # 29.7 / 40 = 0.74 mm < 0.8 mm
    assert np.array_equal(fine.from_model(fine.to_model(labels, "label"), "label"), labels)
    coarse = ModelGrid.fit(SAGITTAL, SAGITTAL_SHAPE, 26)  # 1.14 mm: rows of 0.8 mm are merged
    assert not np.array_equal(coarse.from_model(coarse.to_model(labels, "label"), "label"), labels)


@pytest.mark.parametrize("size,shift_mm", [(64, 1e-4), (16, 0.05)])
def test_model_geometry_places_a_linear_ramp_where_it_was(size, shift_mm):
    """Model voxel values of a linear ramp equal the ramp at the model voxel's physical centre,
    away from the borders: exactly when upsampling (64); when downsampling (16: rows of
    0.8 mm -> 1.86 mm) the antialias triangle, sampled at whole pixels, moves the centroid
    by a few hundredths of a pixel."""
    slope, offset = np.array([0.7, -1.3, 0.4]), 5.0
    image = (centres(SAGITTAL, SAGITTAL_SHAPE) @ slope + offset).astype(np.float32)
    grid = ModelGrid.fit(SAGITTAL, SAGITTAL_SHAPE, size)
    model = grid.to_model(image, "image")
    points = centres(grid.model_geometry, model.shape).reshape(-1, 3)
    index = np.linalg.solve(SAGITTAL.direction, (points - SAGITTAL.origin).T).T / SAGITTAL.spacing
    assert np.allclose(index[:, 1], np.round(index[:, 1]), atol=1e-9)  # slices are not interpolated
    in_plane, n_in_plane = index[:, [0, 2]], np.array([SAGITTAL_SHAPE[2], SAGITTAL_SHAPE[0]])
    interior = np.all((in_plane >= 3) & (in_plane <= n_in_plane - 4), axis=1)  # filter taps all inside
    assert interior.sum() > 100
    error = np.abs(model.reshape(-1) - (points @ slope + offset))[interior]
    assert error.max() < np.linalg.norm(slope) * shift_mm + 1e-4


def test_image_round_trip_upsample_then_downsample_is_a_mild_blur():
    """Linear upsampling then antialiased (triangle) downsampling is, for large factors, the
    separable kernel [1/6, 2/3, 1/6] on the reference grid."""
    x = np.random.default_rng(4).normal(size=(2, 12, 12)).astype(np.float32)
    grid = ModelGrid.fit(Geometry(), x.shape, 192)
    kernel = np.array([1, 4, 1]) / 6
    blurred = convolve1d(convolve1d(x, kernel, axis=1), kernel, axis=2)
    back = grid.from_model(grid.to_model(x, "image"), "image")
    np.testing.assert_allclose(back[:, 1:-1, 1:-1], blurred[:, 1:-1, 1:-1], atol=5e-3)


def test_image_round_trip_error_on_a_smooth_oblique_volume():
    """Quantified on the oblique sagittal volume at S = 64 (both in-plane axes upsampled) with
    a blob of sigma 12 mm (3.6 of the 3.3 mm pixels): measured 4.4% of the range at the worst
    (edge) voxel, 1.9% inside, 1.5% on average."""
    points = centres(SAGITTAL, SAGITTAL_SHAPE)
    blob = np.exp(-np.sum((points - points.reshape(-1, 3).mean(0)) ** 2, -1) / (2 * 12.0 ** 2))
    image = (1000 * blob - 200).astype(np.float32)
    grid = ModelGrid.fit(SAGITTAL, SAGITTAL_SHAPE, 64)
    back = grid.from_model(grid.to_model(image, "image", pad_value=-200.0), "image")
    error = np.abs(back - image) / np.ptp(image)
    assert error.max() < 0.05 and error[1:-1, :, 1:-1].max() < 0.02 and error.mean() < 0.016


def test_slabs_fill_the_same_output_as_from_model():
    rng = np.random.default_rng(2)
    for geometry, shape in [(SAGITTAL, SAGITTAL_SHAPE), (AXIAL, AXIAL_SHAPE), (Geometry(), (6, 9, 5))]:
        grid = ModelGrid.fit(geometry, shape, 24)
        z = grid.n_slices
        cuts = [0, 1, z // 2, z - 1, z]
        for kind, model in [("image", rng.normal(size=grid.model_shape).astype(np.float32)),
                            ("label", rng.integers(0, 4, grid.model_shape))]:
            whole = grid.from_model(model, kind)
            out = np.full(shape, -7, dtype=whole.dtype)
            for z0, z1 in zip(cuts[:-1], cuts[1:]):
                start, stop = grid.model_to_reference_range(z0, z1)
                slab = grid.slab_from_model(model[z0:z1], z0, z1, kind)
                out[(slice(None),) * grid.axis + (slice(start, stop),)] = slab
            np.testing.assert_allclose(out, whole, rtol=0, atol=1e-6 if kind == "image" else 0)


def test_output_goes_back_in_the_reference_geometry():
    reference = Volume(np.zeros(SAGITTAL_SHAPE, np.float32), SAGITTAL)
    grid = ModelGrid.fit(reference.geometry, reference.shape, 32)
    out = reference.with_array(grid.from_model(np.ones(grid.model_shape, np.float32)))
    assert out.geometry == SAGITTAL and out.array.dtype == np.float32
    np.testing.assert_allclose(out.array, 1.0, atol=1e-6)


@pytest.mark.parametrize("size", [12, 33])
def test_resampling_matches_torch_interpolate_pixel_centres(size):
    x = np.random.default_rng(3).normal(size=(3, 20, 20)).astype(np.float32)
    grid = ModelGrid.fit(Geometry(), x.shape, size)
    torch_x = torch.from_numpy(x)[:, None]
    linear = torch.nn.functional.interpolate(torch_x, size=(size, size), mode="bilinear",
                                             align_corners=False, antialias=True)[:, 0].numpy()
    np.testing.assert_allclose(grid.to_model(x, "image"), linear, atol=1e-5)
    labels = np.arange(1200).reshape(3, 20, 20)
    nearest = torch.nn.functional.interpolate(torch.from_numpy(labels)[:, None].double(), size=(size, size),
                                              mode="nearest-exact")[:, 0].numpy()
    assert np.array_equal(grid.to_model(labels, "label"), nearest.astype(labels.dtype))


def test_padding_uses_the_callers_value_outside_the_reference():
    grid = ModelGrid.fit(AXIAL, AXIAL_SHAPE, 54)  # upsampled x2; rows padded by 14 model pixels
    model = grid.to_model(np.full(AXIAL_SHAPE, 40.0, np.float32), "image", pad_value=-1000.0)
    assert np.all(model[:, :7] == -1000.0) and np.all(model[:, 47:] == -1000.0)
    np.testing.assert_allclose(model[:, 7:47], 40.0, atol=1e-4)
    labels = grid.to_model(np.ones(AXIAL_SHAPE, np.int64), "label")
    assert labels[:, :7].sum() == 0 and np.all(labels[:, 7:47] == 1)


def test_invalid_inputs_raise():
    grid = ModelGrid.fit(AXIAL, AXIAL_SHAPE, 16)
    with pytest.raises(ValueError, match="does not match"):
        grid.to_model(np.zeros((7, 20, 26)))
    with pytest.raises(ValueError, match="kind"):
        grid.to_model(np.zeros(AXIAL_SHAPE), "mask")
    with pytest.raises(ValueError, match="outside"):
        grid.slab_from_model(np.zeros((2, 16, 16)), 6, 8)
    with pytest.raises(ValueError, match="must have shape"):
        grid.slab_from_model(np.zeros((2, 16, 16)), 0, 3)
    with pytest.raises(ValueError, match="singular"):
        ModelGrid.fit(Geometry(direction=np.diag([1.0, 1.0, 0.0])), AXIAL_SHAPE, 16)
    with pytest.raises(ValueError, match="positive integer"):
        ModelGrid.fit(AXIAL, AXIAL_SHAPE, 0)
