"""The slice autoencoder: a diffusers AutoencoderKL, grey slices in and out.

An RGB VAE (the official kl-f8) sees grey slices repeated to 3 channels and
gives back the channel mean. Encoding/decoding walks N in chunks so a whole
volume's slices never sit in the VAE at once.
"""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import AutoencoderKL

from gem3d.config import Config


def build_vae(cfg: Config) -> AutoencoderKL:
    v = cfg.vae
    blocks = len(v.block_out_channels)
    return AutoencoderKL(
        in_channels=v.in_channels, out_channels=v.out_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(v.block_out_channels), layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups,
        sample_size=v.sample_size, scaling_factor=v.scale,
    )


def encode_slices(vae: AutoencoderKL, x: torch.Tensor, scale: float, chunk_size: int = 16,
                  sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(N, C, H, W) slices in [-1, 1] -> (N, latent, H/f, W/f) scaled latents.

    The posterior mean by default (deterministic conditioning); `sample=True`
    draws from the posterior as the official training code does.
    """
    want = vae.config.in_channels
    if x.ndim != 4 or x.shape[1] not in (1, want):
        raise ValueError(f"encode_slices: expected (N, 1 or {want}, H, W), got {tuple(x.shape)}")
    x = x.expand(-1, want, -1, -1)
    parts = []
    for part in x.split(chunk_size):
        dist = vae.encode(part).latent_dist
        parts.append(dist.sample(generator) if sample else dist.mean)
    return torch.cat(parts) * scale


def decode_latents(vae: AutoencoderKL, z: torch.Tensor, scale: float, chunk_size: int = 16,
                   channel: Optional[int] = None) -> torch.Tensor:
    """(N, latent, h, w) scaled latents -> (N, 1, h*f, w*f) grey slices. RGB VAEs: the channel
    mean, or `channel` alone (the official scripts keep channel 0; gem3d.conventions)."""
    if z.ndim != 4 or z.shape[1] != vae.config.latent_channels:
        raise ValueError(f"decode_latents: expected (N, {vae.config.latent_channels}, h, w), "
                         f"got {tuple(z.shape)}")
    x = torch.cat([vae.decode(part / scale).sample for part in z.split(chunk_size)])
    if x.shape[1] != 3:
        return x
    return x.mean(dim=1, keepdim=True) if channel is None else x[:, channel:channel + 1]
