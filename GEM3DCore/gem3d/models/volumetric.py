"""Pseudo-3D ("volumetric") layers that stage 2 inserts into the 2D UNet.

The UNet runs on a window of n slices flattened to a batch `(b n) c h w`;
these layers mix information along the slice axis by viewing the features as
`(b h w) c n`. Each is an identity at initialisation (conv: centre tap = 1;
attention: zero output projection, residual), so the stage-2 model starts
exactly at the stage-1 model and only these layers are trained.

Names follow the official openaimodel_pseudo3D: a `*_tem` attribute next to
each spatial layer, the conv wrapped as `<name>_tem.temporal_conv`.
"""
from __future__ import annotations

from typing import List

import torch
from einops import rearrange
from torch import nn

TAG = "_tem"  # suffix of every inserted attribute (the official stage-2 optimiser selects 'tem')


def to_slice_axis(x: torch.Tensor, n: int) -> torch.Tensor:
    return rearrange(x, "(b n) c h w -> (b h w) c n", n=n)


def from_slice_axis(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return rearrange(x, "(b h w) c n -> (b n) c h w", h=h, w=w)


class TemporalConv(nn.Module):
    """1D convolution (k=3, zero padding) along the slice axis, identity at init."""

    def __init__(self, channels: int):
        super().__init__()
        self.temporal_conv = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        nn.init.dirac_(self.temporal_conv.weight)
        nn.init.zeros_(self.temporal_conv.bias)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        return from_slice_axis(self.temporal_conv(to_slice_axis(x, n)), h, w)


def temporal_qkv(channels: int) -> nn.Conv1d:
    return nn.Conv1d(channels, 3 * channels, 1)


def temporal_proj_out(channels: int) -> nn.Conv1d:
    """Zero-initialised so the residual temporal attention starts as the identity."""
    proj = nn.Conv1d(channels, channels, 1)
    nn.init.zeros_(proj.weight)
    nn.init.zeros_(proj.bias)
    return proj


def is_volumetric(name: str) -> bool:
    """Whether a parameter/state-dict key belongs to an inserted layer."""
    return any(part.endswith(TAG) or part == "temporal_conv" for part in name.split("."))


def volumetric_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Exactly the parameters stage 2 inserted (and trains)."""
    return [p for name, p in model.named_parameters() if is_volumetric(name)]
