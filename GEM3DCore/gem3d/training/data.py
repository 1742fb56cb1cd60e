"""Training data: dataset folder -> prepared cases -> latents cached once -> batches.

The diffusion stages never run the VAE: every slice and mask of the training set
is encoded once with the frozen VAE and kept in memory (`LatentCache`). Batches
come from `batches`, whose order depends only on (seed, epoch, rank), so a
resumed run continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DistributedSampler, default_collate

from gem3d.body import with_outside_label
from gem3d.bundle_format import cfg_intensity, cfg_label_map
from gem3d.config import Config
from gem3d.datasets import open_dataset
from gem3d.intensity import make_normaliser
from gem3d.io import read_volume
from gem3d.labels import LabelMap, UnknownLabelError
from gem3d.models import encode_masks, encode_slices
from gem3d.training.examples import PreparedCase, SliceDataset, WindowDataset, prepare_case


@dataclass
class TrainingSet:
    """The prepared (model-grid, normalised, labelled) cases of a dataset folder."""

    path: str
    format: str
    cases: List[PreparedCase]
    label_mapping: Dict[int, int]


def label_mapping(source: LabelMap, model: LabelMap, where: str) -> Dict[int, int]:
    """Dataset label value -> model label value, matched by name (BraTS 2023's enhancing 3
    becomes a BraTS-2021 model's 4); a model label the dataset cannot name is an error."""
    try:
        return {source.by_name(name): value for value, name in model.names.items()}
    except UnknownLabelError as err:
        raise ValueError(f"{where}: {err}; the model's labels are {model}") from None


def load_training_set(path, cfg: Config, limit: Optional[int] = None) -> TrainingSet:
    """Every labelled case of the dataset at `path` on the model grid (unlabelled cases are
    skipped), or the first `limit` of them."""
    dataset = open_dataset(path)
    mapping = label_mapping(dataset.label_map, cfg_label_map(cfg), str(path))
    normaliser = make_normaliser(cfg_intensity(cfg))
    cases = []
    for case in dataset.cases:
        if case.mask is None or (limit is not None and len(cases) >= limit):
            continue
        prepared = prepare_case(read_volume(case.image, case.channel), read_volume(case.mask),
                                cfg.data.slice_size, normaliser, mapping, case.case_id)
        if cfg.mask.outside_body:
            prepared.mask = with_outside_label(prepared.mask, prepared.image)
        cases.append(prepared)
    if not cases:
        raise ValueError(f"{path}: no labelled case to train on")
    return TrainingSet(str(path), dataset.format, cases, mapping)


@torch.no_grad()
def raw_latents(vae, cases: List[PreparedCase], device: torch.device) -> List[torch.Tensor]:
    """Unscaled posterior means (Z, C, h, w) of every case's slices, on the CPU."""
    vae.eval()
    return [encode_slices(vae, torch.from_numpy(c.image)[:, None].to(device), 1.0).cpu() for c in cases]


def latent_scale(latents: List[torch.Tensor]) -> float:
    """1 / std of the training latents (the SD convention), so the diffusion sees unit variance."""
    return float(1.0 / torch.cat([z.flatten() for z in latents]).std())


class LatentCache:
    """Scaled image latents and mask latents of every case, encoded once."""

    def __init__(self, cases: List[PreparedCase], vae, cfg: Config, device: torch.device,
                 raw: Optional[List[torch.Tensor]] = None):
        raw = raw_latents(vae, cases, device) if raw is None else raw
        self.cases = cases
        self.images = [z * cfg.vae.scale for z in raw]
        with torch.no_grad():
            self.masks = [encode_masks(torch.from_numpy(c.mask).to(device), cfg, vae).float().cpu()
                          for c in cases]


class LatentWindows(torch.utils.data.Dataset):
    """WindowDataset's windows (and its informed-slice draw) served from cached latents."""

    def __init__(self, cache: LatentCache, window: int, seed: int):
        self.cache = cache
        self.windows = WindowDataset(cache.cases, window, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.windows.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, item: int) -> dict:
        c, z, _, informed_index = self.windows.draw(item)
        latents = self.cache.images[c][z]
        return {"latent": latents, "mask": self.cache.masks[c][z], "informed": latents[informed_index]}


class LatentSlices(torch.utils.data.Dataset):
    """Every slice latent with its normalised height (slice-model training)."""

    def __init__(self, cache: LatentCache):
        self.cache = cache
        self.slices = SliceDataset(cache.cases)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, item: int) -> dict:
        c, z = self.slices.index[item]
        return {"latent": self.cache.images[c][z], "mask": self.cache.masks[c][z],
                "position": self.slices.position(item)}


def batches(dataset, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
            world: int = 1) -> Iterator[dict]:
    """Endless batches; the sampler's permutation comes from (seed, epoch), so starting at
    `start_step` skips exactly the batches a run that stopped there had consumed."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} training items are too few for batches of {batch_size} "
                         f"on {world} process(es)")
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        order = list(sampler)
        for b in range(skip, per_epoch):
            yield default_collate([dataset[i] for i in order[b * batch_size:(b + 1) * batch_size]])
        epoch, skip = epoch + 1, 0

