"""Training data on the model grid: windows of n consecutive slices, and single slices.

A case is prepared once (reoriented, resampled to S x S, normalised to [-1, 1]); the
datasets only index into the prepared arrays. Randomness (the informed slice) comes from
a generator seeded by (seed, epoch, item), so an item is the same whatever the worker or
the order it is drawn in; call ``set_epoch`` to draw new informed slices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from gem3d.grid import ModelGrid, slice_position
from gem3d.intensity import Normaliser
from gem3d.volume import Volume

SHORT_CASES = ("pad", "refuse")


@dataclass
class PreparedCase:
    """One case on the model grid: image (Z, S, S) float32 in [-1, 1], mask (Z, S, S) int64."""

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    grid: Optional[ModelGrid] = None
    intensity: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.int64)
        if self.image.ndim != 3 or self.image.shape != self.mask.shape or \
                self.image.shape[1] != self.image.shape[2] or self.image.shape[0] < 1:
            raise ValueError(f"case {self.case_id}: image {self.image.shape} and mask "
                             f"{self.mask.shape} must both be (Z, S, S) with Z >= 1")

    @property
    def n_slices(self) -> int:
        return self.image.shape[0]


def _remap_labels(mask: np.ndarray, remap: Optional[Mapping[int, int]], case_id: str) -> np.ndarray:
    """Integer labels, mapped through ``remap`` (source value -> model label; 0 is background)."""
    values = np.unique(mask)
    if not np.all(values == np.round(values)):
        raise ValueError(f"case {case_id}: mask has non-integer values {values[values != np.round(values)][:5]}")
    mask = mask.astype(np.int64)
    if remap is None:
        return mask
    unknown = sorted(int(v) for v in values if v != 0 and int(v) not in remap)
    if unknown:
        raise ValueError(f"case {case_id}: mask has labels {unknown} that the label map "
                         f"{dict(remap)} does not know")
    lookup = {0: 0, **{int(k): int(v) for k, v in remap.items()}}
    out = np.zeros_like(mask)
    for source in values:
        out[mask == source] = lookup[int(source)]
    return out


def prepare_case(image: Volume, mask: Volume, size: int, normaliser: Normaliser,
                 remap: Optional[Mapping[int, int]] = None, case_id: str = "case") -> PreparedCase:
    """Put an image and its mask on the model grid; the image is normalised before resampling
    and padded with -1 (the normalised floor, i.e. background)."""
    if not image.same_grid(mask):
        raise ValueError(f"case {case_id}: mask grid ({mask.shape}, {mask.geometry.describe()}) differs "
                         f"from the image grid ({image.shape}, {image.geometry.describe()})")
    grid = ModelGrid.fit(image.geometry, image.shape, size)
    params = normaliser.fit(image.array)
    labels = _remap_labels(np.asarray(mask.array), remap, case_id)
    return PreparedCase(case_id,
                        grid.to_model(normaliser.forward(image.array, params), "image", pad_value=-1.0),
                        grid.to_model(labels, "label", pad_value=0),
                        grid, params)


def _positions(slices: np.ndarray, n_slices: int) -> np.ndarray:
    return np.asarray(slice_position(slices, n_slices), dtype=np.float32)


class WindowDataset(torch.utils.data.Dataset):
    """Windows of ``window_length`` consecutive slices over all cases (stage-2 training).

    Window starts run from 0 in steps of ``stride``, plus the last full window, so every
    slice is covered. A case shorter than the window is padded by repeating its last slice
    (``valid`` marks the real slices; the padded slices carry the repeated slice's
    position) or refused with a ValueError.
    """

    def __init__(self, cases: Sequence[PreparedCase], window_length: int, stride: int = 1,
                 short_cases: str = "pad", seed: int = 0):
        if int(window_length) != window_length or window_length < 1:
            raise ValueError(f"window_length must be a positive integer, got {window_length}")
        if int(stride) != stride or stride < 1:
            raise ValueError(f"stride must be a positive integer, got {stride}")
        if short_cases not in SHORT_CASES:
            raise ValueError(f"short_cases must be one of {SHORT_CASES}, got {short_cases!r}")
        self.cases: List[PreparedCase] = list(cases)
        self.window_length, self.stride, self.seed, self.epoch = int(window_length), int(stride), seed, 0
        self.index: List[tuple] = []
        n = self.window_length
        for case_index, case in enumerate(self.cases):
            z = case.n_slices
            if z < n and short_cases == "refuse":
                raise ValueError(f"case {case.case_id} has {z} slices, fewer than the window length {n}")
            starts = list(range(0, max(z - n, 0) + 1, self.stride))
            if starts[-1] != max(z - n, 0):
                starts.append(z - n)
            self.index.extend((case_index, start) for start in starts)

    def set_epoch(self, epoch: int):
        """New informed slices for a new epoch (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def draw(self, item: int) -> Tuple[int, np.ndarray, np.ndarray, int]:
        """(case index, slice indices, which are real (not padding), informed index) of window
        `item` this epoch, without copying any voxels (latent training reuses the draw)."""
        case_index, start = self.index[item]
        z = self.cases[case_index].n_slices
        slices = start + np.arange(self.window_length)
        valid = slices < z
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch, item]).generate_state(1)[0]))
        informed_index = int(torch.randint(int(valid.sum()), (1,), generator=generator))
        return case_index, np.minimum(slices, z - 1), valid, informed_index

    def __getitem__(self, item: int) -> dict:
        case_index, slices, valid, informed_index = self.draw(item)
        case = self.cases[case_index]
        start, z = self.index[item][1], case.n_slices
        image = torch.from_numpy(case.image[slices])  # fancy indexing: a copy
        return {
            "image": image[:, None],
            "mask": torch.from_numpy(case.mask[slices]),
            "informed": image[informed_index][None].clone(),
            "informed_index": informed_index,
            "positions": torch.from_numpy(_positions(slices, z)),
            "valid": torch.from_numpy(valid),
            "case_index": case_index,
            "start": int(start),
        }


class SliceDataset(torch.utils.data.Dataset):
    """Every slice of every case, with its position (VAE and 2D slice-model training)."""

    def __init__(self, cases: Sequence[PreparedCase]):
        self.cases: List[PreparedCase] = list(cases)
        self.index = [(c, z) for c, case in enumerate(self.cases) for z in range(case.n_slices)]

    def __len__(self) -> int:
        return len(self.index)

    def position(self, item: int) -> torch.Tensor:
        case_index, z = self.index[item]
        return torch.tensor(_positions(np.asarray(z), self.cases[case_index].n_slices))

    def __getitem__(self, item: int) -> dict:
        case_index, z = self.index[item]
        case = self.cases[case_index]
        return {
            "image": torch.from_numpy(case.image[z][None].copy()),
            "mask": torch.from_numpy(case.mask[z].copy()),
            "position": self.position(item),
            "case_index": case_index,
            "slice": z,
        }
