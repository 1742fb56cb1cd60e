"""Training windows and slices on the model grid: counts, coverage, positions, padding, seeds."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gem3d.intensity import make_normaliser
from gem3d.volume import Geometry, Volume
from gem3d.training.examples import PreparedCase, SliceDataset, WindowDataset, prepare_case

S = 8


def case(case_id, z, seed=0):
    """Slice k of the image holds k / 100 plus small noise, so slices can be recognised."""
    rng = np.random.default_rng(seed)
    image = np.arange(z, dtype=np.float32)[:, None, None] / 100 + rng.uniform(0, 1e-3, (z, S, S))
    mask = rng.integers(0, 4, (z, S, S))
    return PreparedCase(case_id, image.astype(np.float32), mask)


def slice_of(item_image):
    """Recognise slice numbers from an (n, 1, S, S) or (1, S, S) image."""
    return np.floor(item_image.reshape(-1, S * S).mean(1).numpy() * 100 + 1e-3).astype(int)


def test_window_counts_starts_and_coverage():
    cases = [case("a", 20), case("b", 16), case("c", 23)]
    assert len(WindowDataset(cases, 16)) == 5 + 1 + 8
    data = WindowDataset(cases, 16, stride=4)
    starts = {}
    for case_index, start in data.index:
        starts.setdefault(case_index, []).append(start)
    assert starts == {0: [0, 4], 1: [0], 2: [0, 4, 7]}  # the last full window is always there
    for case_index, c in enumerate(cases):
        covered = set()
        for item in range(len(data)):
            if data.index[item][0] == case_index:
                covered.update(slice_of(data[item]["image"]).tolist())
        assert covered == set(range(c.n_slices))
    assert len(WindowDataset(cases, 1)) == 20 + 16 + 23  # window length is a parameter


def test_item_fields_slices_and_positions():
    cases = [case("a", 11), case("b", 7, seed=1)]
    data = WindowDataset(cases, 4)
    for item in range(len(data)):
        x = data[item]
        c = cases[x["case_index"]]
        start = x["start"]
        assert x["image"].shape == (4, 1, S, S) and x["image"].dtype == torch.float32
        assert x["mask"].shape == (4, S, S) and x["mask"].dtype == torch.int64
        assert x["informed"].shape == (1, S, S)
        assert x["positions"].dtype == torch.float32 and x["valid"].all()
        assert np.array_equal(x["image"][:, 0].numpy(), c.image[start:start + 4])
        assert np.array_equal(x["mask"].numpy(), c.mask[start:start + 4])
        np.testing.assert_allclose(x["positions"].numpy(), np.arange(start, start + 4) / (c.n_slices - 1))
    assert data[0]["positions"][0] == 0.0 and data[len(data) - 1]["positions"][-1] == 1.0


def test_informed_slice_is_one_of_the_window_slices_and_varies():
    data = WindowDataset([case("a", 30)], 6)
    drawn = []
    for epoch in range(4):
        data.set_epoch(epoch)
        for item in range(len(data)):
            x = data[item]
            assert 0 <= x["informed_index"] < 6
            assert torch.equal(x["informed"], x["image"][x["informed_index"]])
            drawn.append(x["informed_index"])
    assert set(drawn) == set(range(6))


def test_informed_slices_are_reproducible_by_seed_and_epoch_in_any_order():
    cases = [case("a", 15), case("b", 9)]

    def draws(seed, epoch, order):
        data = WindowDataset(cases, 5, seed=seed)
        data.set_epoch(epoch)
        return {item: data[item]["informed_index"] for item in order}

    items = list(range(len(WindowDataset(cases, 5))))
    reference = draws(0, 0, items)
    assert draws(0, 0, items[::-1]) == reference
    assert draws(1, 0, items) != reference
    assert draws(0, 1, items) != reference


def test_short_case_is_padded_by_repeating_its_last_slice():
    data = WindowDataset([case("short", 5), case("long", 9)], 8)
    assert [start for _, start in data.index] == [0, 0, 1]
    x = data[0]
    assert x["valid"].tolist() == [True] * 5 + [False] * 3
    assert slice_of(x["image"]).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    np.testing.assert_allclose(x["positions"].numpy(), [0, 0.25, 0.5, 0.75, 1, 1, 1, 1])
    for epoch in range(20):
        data.set_epoch(epoch)
        assert data[0]["informed_index"] < 5  # never a padded copy
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=3)))
    assert batch["image"].shape == (3, 8, 1, S, S) and batch["valid"].shape == (3, 8)


def test_short_case_can_be_refused():
    with pytest.raises(ValueError, match=r"case short has 5 slices, fewer than the window length 8"):
        WindowDataset([case("long", 9), case("short", 5)], 8, short_cases="refuse")
    assert len(WindowDataset([case("long", 9)], 8, short_cases="refuse")) == 2


@pytest.mark.parametrize("kwargs,message", [({"window_length": 0}, "window_length"),
                                            ({"window_length": 4, "stride": 0}, "stride"),
                                            ({"window_length": 4, "short_cases": "drop"}, "short_cases")])
def test_invalid_dataset_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WindowDataset([case("a", 9)], **kwargs)


def test_slice_dataset_lists_every_slice_once_with_its_position():
    cases = [case("a", 6), case("b", 3, seed=1)]
    data = SliceDataset(cases)
    assert len(data) == 9
    seen = set()
    for item in range(len(data)):
        x = data[item]
        c = cases[x["case_index"]]
        assert x["image"].shape == (1, S, S) and x["mask"].dtype == torch.int64
        assert np.array_equal(x["image"][0].numpy(), c.image[x["slice"]])
        assert x["position"].item() == pytest.approx(x["slice"] / (c.n_slices - 1))
        seen.add((x["case_index"], x["slice"]))
    assert seen == {(0, z) for z in range(6)} | {(1, z) for z in range(3)}


def sagittal_case(labels=(0, 1, 2, 4)):
    """Sagittal: i -> posterior (12 x 1 mm), j -> inferior (11 slices), k -> right (4 x 2 mm)."""
    geometry = Geometry((1.0, 1.0, 2.0), (10.0, 0.0, -5.0), np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float))
    k, j, i = np.meshgrid(np.arange(4), np.arange(11), np.arange(12), indexing="ij")
    image = (100 + 3 * i + 5 * j + 7 * k).astype(np.float32)
    mask = np.random.default_rng(5).choice(labels, size=image.shape).astype(np.uint8)
    return Volume(image, geometry), Volume(mask, geometry)


def test_prepare_case_puts_image_and_labels_on_the_model_grid():
    image, mask = sagittal_case()
    normaliser = make_normaliser({"kind": "minmax"})
    prepared = prepare_case(image, mask, 16, normaliser, remap={1: 1, 2: 2, 4: 3}, case_id="sag01")
    assert prepared.image.shape == prepared.mask.shape == (11, 16, 16)  # j (S-I) is the slice axis
    assert prepared.image.dtype == np.float32 and prepared.mask.dtype == np.int64
    assert prepared.image.min() == -1.0 and prepared.image.max() <= 1.0
    assert set(np.unique(prepared.mask)) == {0, 1, 2, 3}
    assert prepared.intensity == normaliser.fit(image.array) == {"low": 100.0, "high": 204.0}
    expected = prepared.grid.to_model(np.where(mask.array == 4, 3, mask.array), "label")
    assert np.array_equal(prepared.mask, expected)
    # columns (8 mm, patient right-left) are padded to the 12 mm field of view: background
    data_columns = np.nonzero((prepared.image > -1.0).any(axis=(0, 1)))[0]
    assert np.array_equal(data_columns, np.arange(2, 13))  # 8 mm / 0.75 mm = 10.7 model pixels
    assert np.all(prepared.image[:, :, :2] == -1.0) and np.all(prepared.mask[:, :, :2] == 0)
    back = normaliser.inverse(prepared.grid.from_model(prepared.image), prepared.intensity)
    assert np.abs(back - image.array).max() < 0.02 * 104


def test_prepare_case_rejects_unknown_labels_and_mismatched_grids():
    image, mask = sagittal_case(labels=(0, 1, 5))
    with pytest.raises(ValueError, match=r"case sag02: mask has labels \[5\]"):
        prepare_case(image, mask, 16, make_normaliser({"kind": "minmax"}), {1: 1, 2: 2}, case_id="sag02")
    moved = Volume(mask.array, Geometry(mask.geometry.spacing, (0.0, 0.0, 0.0), mask.geometry.direction))
    with pytest.raises(ValueError, match="case sag03: mask grid"):
        prepare_case(image, moved, 16, make_normaliser({"kind": "minmax"}), case_id="sag03")
