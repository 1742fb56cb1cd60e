"""The slice model: a 2D diffusion model that generates an informed-slice latent
at a normalised height p in [0, 1] (`gem3d.grid.slice_position`), for sampling
when the user has no informed slice.

p enters as the official PositionalEmbedder does it: the sinusoidal embedding
of 1000*p (position_dim = 128), either as one cross-attention token
("crossattn", official brain_slice.yaml) or through an MLP added to the time
embedding ("time"). Optionally the mask-slice latent is concatenated to the
input. The network is the volume UNet on one-slice windows; its keys are
`unet.` + the official ones (`model.diffusion_model.` in their checkpoints).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from gem3d.config import Config
from gem3d.models.mask_encoding import mask_channels
from gem3d.models.unet import UNet, timestep_embedding


class SliceModel(nn.Module):
    def __init__(self, position: str = "crossattn", position_dim: int = 128, **unet_kwargs):
        super().__init__()
        if position not in ("crossattn", "time"):
            raise ValueError(f"SliceModel: position must be 'crossattn' or 'time', got {position!r}")
        self.position, self.position_dim = position, position_dim
        self.unet = UNet(context_dim=position_dim if position == "crossattn" else None, **unet_kwargs)
        if position == "time":
            dim = 4 * self.unet.model_channels
            self.position_embed = nn.Sequential(nn.Linear(position_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, position: torch.Tensor,
                cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, C, h, w) noisy latents, t (B,), position (B,) in [0, 1],
        cond (B, Cc, h, w) mask-slice latent -> eps (B, C, h, w)."""
        position = torch.as_tensor(position, device=x.device)
        p = timestep_embedding(1000 * position, self.position_dim).to(x.dtype)
        context = p[:, None] if self.position == "crossattn" else None
        emb = self.position_embed(p) if self.position == "time" else None
        return self.unet(x[:, None], t, None if cond is None else cond[:, None], context=context, emb=emb)[:, 0]


def build_slice_model(cfg: Config) -> SliceModel:
    s, u, latent = cfg.slice_model, cfg.slice_model.unet, cfg.vae.latent_channels
    return SliceModel(position=s.position, position_dim=s.position_dim,
                      in_channels=latent + (mask_channels(cfg) if s.mask_conditioned else 0),
                      out_channels=latent, model_channels=u.model_channels, channel_mult=u.channel_mult,
                      num_res_blocks=u.num_res_blocks, attention_resolutions=u.attention_resolutions,
                      num_head_channels=u.num_head_channels, dropout=u.dropout,
                      use_checkpoint=u.use_checkpoint, transformer_depth=u.transformer_depth)
