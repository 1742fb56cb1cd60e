"""Mask conditioning: label slices (N, H, W) -> latents (N, Cm, H/f, W/f).

"vae" (official): labels / max_label mapped to [-1, 1] (0 -> -1, max -> +1)
without clipping, so the nnU-Net outside-body label -1 lands at
-1 - 2/max_label and the body outline survives; repeated to the VAE's
channels, VAE-encoded and scaled like image latents (posterior mean here; the
official training draws a posterior sample).

"onehot" (ours): for each label value (-1 outside the body, 0, then the label
map's labels) the fraction of each latent pixel's f x f area it covers, mapped
to [-1, 1]. Fixed, no parameters: exact label geometry at latent resolution,
no need for a VAE that has learnt to encode label maps (a small VAE trained
on images has not), and a learnt projection would only duplicate the UNet's
first convolution.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from gem3d.config import Config
from gem3d.models.vae import encode_slices


def label_values(cfg: Config) -> Tuple[int, ...]:
    """Every value a mask may hold, ascending."""
    return ((-1,) if cfg.mask.outside_body else ()) + (0,) + tuple(sorted(cfg.data.labels))


def mask_channels(cfg: Config) -> int:
    return cfg.vae.latent_channels if cfg.mask.encoding == "vae" else len(label_values(cfg))


def check_labels(mask: torch.Tensor, values: Sequence[int]) -> None:
    unknown = sorted(set(torch.unique(mask).tolist()) - set(values))
    if unknown:
        raise ValueError(f"mask holds label values {unknown} outside the label map {list(values)}")


def vae_mask_image(mask: torch.Tensor, max_label: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, 1, H, W) image for the VAE, the official scaling."""
    return (mask.float() / max_label * 2 - 1)[:, None]


def onehot_fractions(mask: torch.Tensor, values: Sequence[int], factor: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, len(values), H/factor, W/factor) area fractions in [-1, 1]."""
    if mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise ValueError(f"mask slices {tuple(mask.shape[-2:])} not divisible by the VAE factor {factor}")
    index = torch.bucketize(mask.long(), torch.tensor(values, device=mask.device))
    onehot = F.one_hot(index, len(values)).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, factor) * 2 - 1


def encode_masks(mask: torch.Tensor, cfg: Config, vae: Optional[torch.nn.Module] = None,
                 chunk_size: int = 16, sample: bool = False,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(N, H, W) label slices -> (N, mask_channels(cfg), H/f, W/f), as cfg.mask.encoding says.
    `sample`: a VAE posterior sample instead of its mean (the official conventions)."""
    if mask.ndim != 3:
        raise ValueError(f"encode_masks: expected (N, H, W) label slices, got {tuple(mask.shape)}")
    values = label_values(cfg)
    check_labels(mask, values)
    if cfg.mask.encoding == "onehot":
        return onehot_fractions(mask, values, cfg.vae.factor)
    if vae is None:
        raise ValueError("encode_masks: the 'vae' mask encoding needs the VAE")
    return encode_slices(vae, vae_mask_image(mask, max(cfg.data.labels)), cfg.vae.scale, chunk_size,
                         sample=sample, generator=generator)
