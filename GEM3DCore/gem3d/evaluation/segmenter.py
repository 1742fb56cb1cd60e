"""A small 2D segmenter on axial slices: the downstream task of GEM-3D's Appendix E
(train on real vs synthetic data, test on real) and a learned mask-adherence judge.

Deliberately small (a two-level UNet, ~0.1 M parameters) so that several can be trained
in minutes on a CPU; it ranks training sets, it is no nnU-Net. Volumes come axial-first on
the [0, 1] scale; slices are resized to `size` x `size`, logits back to the slice's own size.
Loss: cross-entropy + soft Dice of the label classes (tumours are a few % of voxels).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.SiLU())


class TinyUNet(nn.Module):
    def __init__(self, classes: int, width: int = 16):
        super().__init__()
        self.enc1, self.enc2, self.mid = _block(1, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        self.dec2, self.dec1 = _block(6 * width, 2 * width), _block(3 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.avg_pool2d(e1, 2))
        m = self.mid(F.avg_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.head(d1)


class SliceSegmenter:
    """A trained TinyUNet with its label values; ``segmenter(volume) -> labels``."""

    name = "tiny-unet"

    def __init__(self, model: TinyUNet, labels: Sequence[int], size: int):
        self.model, self.labels, self.size = model.eval(), tuple(int(v) for v in labels), int(size)

    @torch.no_grad()
    def __call__(self, volume: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
        logits = self.model(_resize(x, self.size))
        logits = F.interpolate(logits, size=tuple(volume.shape[1:]), mode="bilinear", align_corners=False)
        values = np.array((0,) + self.labels, dtype=np.int16)
        return values[logits.argmax(1).numpy()]

    def save(self, path: Union[str, Path]) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(path),
                  metadata={"labels": ",".join(map(str, self.labels)), "size": str(self.size)})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SliceSegmenter":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "labels" not in meta:
            raise ValueError(f"{path}: not a gem3d segmenter (no label metadata)")
        labels = [int(v) for v in meta["labels"].split(",")]
        model = TinyUNet(len(labels) + 1)
        model.load_state_dict(load_file(str(path)))
        return cls(model, labels, int(meta["size"]))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _slices(cases: List[Tuple[np.ndarray, np.ndarray]], labels: Sequence[int], size: int):
    """All axial slices, resized: images (N, 1, S, S) and class indices (N, S, S)."""
    lookup = {int(v): i + 1 for i, v in enumerate(labels)}
    images, targets = [], []
    for image, mask in cases:
        classes = np.zeros(mask.shape, np.int64)
        for value, index in lookup.items():
            classes[mask == value] = index
        images.append(_resize(torch.from_numpy(np.ascontiguousarray(image, np.float32))[:, None], size))
        targets.append(F.interpolate(torch.from_numpy(classes)[:, None].float(), size=(size, size),
                                     mode="nearest")[:, 0].long())
    return torch.cat(images), torch.cat(targets)


def train_segmenter(cases: List[Tuple[np.ndarray, np.ndarray]], labels: Sequence[int], steps: int = 300,
                    batch: int = 16, size: int = 64, lr: float = 3e-3, seed: int = 0) -> SliceSegmenter:
    """Train on (volume, mask) pairs for `steps` batches of random slices (random flips)."""
    if not cases:
        raise ValueError("no training cases for the segmenter")
    images, targets = _slices(cases, labels, size)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyUNet(len(labels) + 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for _ in range(steps):
        index = torch.randint(len(images), (batch,), generator=generator)
        x, y = images[index], targets[index]
        if torch.rand((), generator=generator) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        logits = model(x)
        probs = logits.softmax(1)[:, 1:]
        onehot = F.one_hot(y, len(labels) + 1).permute(0, 3, 1, 2)[:, 1:].float()
        soft_dice = (2 * (probs * onehot).sum((0, 2, 3)) + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
        loss = F.cross_entropy(logits, y) + (1 - soft_dice).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return SliceSegmenter(model, labels, size)
