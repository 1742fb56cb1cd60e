"""The volume UNet: an openaimodel-style 2D UNet run on windows of n slices.

Convention: `forward(x (B, n, C, h, w), t (B,), cond (B, n, Cc, h, w)) -> eps
(B, n, out, h, w)`. The n slices of a window are flattened into the batch,
`(b n) c h w`; one timestep per window is broadcast over its slices; `cond` is
concatenated to x on channels (GEM-3D: [mask latent, informed-slice latent],
see `volume_condition`). Stage 1 is a plain 2D model (any n, slices
independent); `add_volumetric_layers()` turns it into the stage-2 pseudo-3D
model (models/volumetric.py) without changing its output at initialisation.
The slice model (models/slice_model.py) is this class with n=1 and a position
context for cross-attention (SpatialTransformer instead of AttentionBlock).

Official layout mirrored key for key (openaimodel.py / openaimodel_pseudo3D.py
of HKU-MedAI/GEM-3D, configs brain_stage{1,2}.yaml, brain_slice.yaml; the
Lightning checkpoints prefix every key with `model.diffusion_model.`):
- time_embed.{0,2}                        Linear(mc, 4mc), Linear(4mc, 4mc)
- input_blocks.0.0                        Conv2d(in, mc, 3)   [.0.1 = TemporalConv in stage 2]
- input_blocks.N.0  ResBlock: in_layers.{0 GroupNorm32, 2 conv3x3}, emb_layers.1 Linear,
                    out_layers.{0 GroupNorm32, 3 conv3x3 zero-init}, skip_connection (1x1 conv
                    when channels change); stage 2 adds in_layers_tem/out_layers_tem.temporal_conv
- input_blocks.N.1  AttentionBlock (volume model, use_spatial_transformer: false):
                    norm, qkv (Conv1d c->3c, legacy head order: per head q|k|v),
                    proj_out (zero-init); stage 2 adds qkv_tem, proj_out_tem
                    (temporal attention reuses `norm`, as the official code does)
                 or SpatialTransformer (slice model, context_dim 128): norm, proj_in (1x1 conv),
                    transformer_blocks.0.{attn1,attn2}.{to_q,to_k,to_v,to_out.0}, norm{1,2,3},
                    ff.net.0.proj (GEGLU), ff.net.2, proj_out (1x1 conv, zero-init)
- input_blocks.N.0  Downsample: op (conv3x3 stride 2) [+ op_tem]
- middle_block.{0,2} ResBlock, middle_block.1 attention (always present)
- output_blocks.N.{0 ResBlock, 1 attention if at an attention level, last: Upsample conv [+ conv_tem]}
- out.{0 GroupNorm32, 2 conv3x3 zero-init} [+ out_tem]
attention_resolutions are downsample factors (official volume model: [8, 4, 2] =
attention on the 32, 16 and 8 px latents of 512 px slices, none at 64 px;
slice model: [4, 2, 1]).

Known differences: only num_head_channels (no num_heads, legacy=False
semantics), no use_scale_shift_norm / resblock_updown / class labels / fp16
conversion; attention runs through F.scaled_dot_product_attention (same math,
scale applied once); n is an argument instead of the hard-coded 16; the
official AttentionBlock always checkpoints, here only with use_checkpoint;
the official pseudo-3D SpatialTransformer has no temporal layers (never used
by the official volume models), here it gets qkv_tem/proj_out_tem like
AttentionBlock.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from gem3d.config import Config
from gem3d.models.mask_encoding import mask_channels
from gem3d.models.volumetric import (TemporalConv, from_slice_axis, temporal_proj_out, temporal_qkv,
                                     to_slice_axis)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, [cos | sin] as in the official code (order matters for its weights)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), (0, dim % 2))


def qkv_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, heads*3*c, T) -> (B, heads*c, T); channels ordered per head as q|k|v (official legacy order)."""
    q, k, v = rearrange(qkv, "b (h three c) t -> three b h t c", h=heads, three=3)
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h t c -> b (h c) t")


class GroupNorm32(nn.GroupNorm):
    """32 groups, computed in float32 (official `normalization`)."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def checkpointed(module: nn.Module, fn, *args):
    """fn(*args), recomputed in backward when the module asks for checkpointing."""
    if module.use_checkpoint and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def apply_tem(layer: Optional[TemporalConv], x: torch.Tensor, n: int) -> torch.Tensor:
    return x if layer is None else layer(x, n)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float,
                 use_checkpoint: bool):
        super().__init__()
        self.out_channels = out_channels
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))
        self.in_layers_tem = self.out_layers_tem = None

    def add_volumetric(self) -> None:
        self.in_layers_tem = TemporalConv(self.out_channels)
        self.out_layers_tem = TemporalConv(self.out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, n: int) -> torch.Tensor:
        return checkpointed(self, self._forward, x, emb, n)

    def _forward(self, x, emb, n):
        h = apply_tem(self.in_layers_tem, self.in_layers(x), n)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        h = apply_tem(self.out_layers_tem, self.out_layers(h), n)
        return self.skip_connection(x) + h


class _Attention(nn.Module):
    """Spatial attention; stage 2 adds a residual temporal self-attention behind it
    that reuses the block's `norm` (official openaimodel_pseudo3D)."""

    def __init__(self, channels: int, head_channels: int, use_checkpoint: bool):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention: {channels} channels not divisible by head size {head_channels}")
        self.channels = channels
        self.heads = channels // head_channels
        self.use_checkpoint = use_checkpoint
        self.qkv_tem = self.proj_out_tem = None

    def add_volumetric(self) -> None:
        self.qkv_tem = temporal_qkv(self.channels)
        self.proj_out_tem = temporal_proj_out(self.channels)

    def _temporal(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if self.qkv_tem is None:
            return x
        h, w = x.shape[-2:]
        s = to_slice_axis(x, n)
        s = s + self.proj_out_tem(qkv_attention(self.qkv_tem(self.norm(s)), self.heads))
        return from_slice_axis(s, h, w)


class AttentionBlock(_Attention):
    """Self-attention over the h*w positions of each slice."""

    def __init__(self, channels: int, head_channels: int, use_checkpoint: bool):
        super().__init__(channels, head_channels, use_checkpoint)
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return checkpointed(self, self._forward, x, n)

    def _forward(self, x, n):
        h = x.shape[-2]
        s = rearrange(x, "b c h w -> b c (h w)")
        s = s + self.proj_out(qkv_attention(self.qkv(self.norm(s)), self.heads))
        return self._temporal(rearrange(s, "b c (h w) -> b c h w", h=h), n)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # the Identity keeps the official index of the output layer (net.2; net.1 was dropout 0)
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(_Attention):
    """Self-attention then cross-attention to `context` tokens (the slice model's position)."""

    def __init__(self, channels: int, head_channels: int, depth: int, context_dim: int,
                 use_checkpoint: bool):
        super().__init__(channels, head_channels, use_checkpoint)
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, self.heads, head_channels, context_dim) for _ in range(depth))
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor], n: int) -> torch.Tensor:
        return checkpointed(self, self._forward, x, context, n)

    def _forward(self, x, context, n):
        h = x.shape[-2]
        s = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            s = block(s, context)
        s = self.proj_out(rearrange(s, "b (h w) c -> b c h w", h=h))
        return self._temporal(x + s, n)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.op_tem = None

    def add_volumetric(self) -> None:
        self.op_tem = TemporalConv(self.channels)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return apply_tem(self.op_tem, self.op(x), n)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_tem = None

    def add_volumetric(self) -> None:
        self.conv_tem = TemporalConv(self.channels)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return apply_tem(self.conv_tem, self.conv(F.interpolate(x, scale_factor=2, mode="nearest")), n)


class EmbedSequential(nn.Sequential):
    """Passes each layer what it needs: time embedding, context, window length n."""

    def forward(self, x, emb, context, n):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, n)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, n)
            elif isinstance(layer, nn.Conv2d):
                x = layer(x)
            else:
                x = layer(x, n)
        return x


class UNet(nn.Module):
    """See the module docstring. With `context_dim`, attention layers are
    SpatialTransformers that cross-attend to `context`; without, AttentionBlocks."""

    def __init__(self, in_channels: int, out_channels: int, model_channels: int,
                 channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int],
                 num_head_channels: int = 32, dropout: float = 0.0, use_checkpoint: bool = False,
                 context_dim: Optional[int] = None, transformer_depth: int = 1, volumetric: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.levels = len(channel_mult)
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, dropout, use_checkpoint)

        def attention(ch: int) -> nn.Module:
            if context_dim is None:
                return AttentionBlock(ch, num_head_channels, use_checkpoint)
            return SpatialTransformer(ch, num_head_channels, transformer_depth, context_dim, use_checkpoint)

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(res(ch, ch), attention(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 zero_init(nn.Conv2d(ch, out_channels, 3, padding=1)))
        self.out_tem = None
        if volumetric:
            self.add_volumetric_layers()

    @property
    def volumetric(self) -> bool:
        return self.out_tem is not None

    def add_volumetric_layers(self) -> None:
        """Insert the stage-2 pseudo-3D layers (identity at init) on the model's device/dtype."""
        if self.volumetric:
            raise RuntimeError("the UNet already has volumetric layers")
        ref = self.out[2].weight
        for module in [m for m in self.modules() if hasattr(m, "add_volumetric")]:
            module.add_volumetric()
        self.input_blocks[0].append(TemporalConv(self.model_channels))
        self.out_tem = TemporalConv(self.out_channels)
        self.to(device=ref.device, dtype=ref.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, n, C, h, w); t (B,) shared by a window's slices, or (B, n); cond (B, n, Cc, h, w)
        concatenated after x on channels; context (B, L, D) tokens for cross-attention;
        emb (B, 4*model_channels) added to the time embedding. Returns (B, n, out, h, w)."""
        if x.ndim != 5:
            raise ValueError(f"UNet: expected x of shape (B, n, C, h, w), got {tuple(x.shape)}")
        b, n, _, height, width = x.shape
        if cond is not None:
            x = torch.cat([x, cond], dim=2)
        if x.shape[2] != self.in_channels:
            raise ValueError(f"UNet: x + cond have {x.shape[2]} channels, the model takes {self.in_channels}")
        if height % 2 ** (self.levels - 1) or width % 2 ** (self.levels - 1):
            raise ValueError(f"UNet: latent size {height}x{width} not divisible by {2 ** (self.levels - 1)}")
        t = torch.as_tensor(t, device=x.device)
        if t.shape == (b,):
            t = t[:, None].expand(b, n)
        if t.shape != (b, n):
            raise ValueError(f"UNet: timesteps must be (B,) or (B, n) = ({b}, {n}), got {tuple(t.shape)}")
        e = self.time_embed(timestep_embedding(t.reshape(-1), self.model_channels).to(self.out[2].weight.dtype))
        if emb is not None:
            e = e + emb.repeat_interleave(n, dim=0)
        if context is not None:
            context = context.repeat_interleave(n, dim=0)
        h = rearrange(x, "b n c h w -> (b n) c h w")
        skips = []
        for block in self.input_blocks:
            h = block(h, e, context, n)
            skips.append(h)
        h = self.middle_block(h, e, context, n)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), e, context, n)
        h = apply_tem(self.out_tem, self.out(h), n)
        return rearrange(h, "(b n) c h w -> b n c h w", b=b)


def volume_condition(mask_latent: torch.Tensor, informed_latent: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GEM-3D `cond`: mask latents (B, n, Cm, h, w) then the informed-slice latent
    (B, C, h, w) repeated over the window (official channel order); None: mask only."""
    if informed_latent is None:
        return mask_latent
    n = mask_latent.shape[1]
    return torch.cat([mask_latent, informed_latent[:, None].expand(-1, n, -1, -1, -1)], dim=2)


def unet_in_channels(cfg: Config) -> int:
    """noisy latent + mask latent (+ informed-slice latent): 12 for GEM-3D, 8 for the mask-only baseline."""
    latent = cfg.vae.latent_channels
    return latent + mask_channels(cfg) + (latent if cfg.informed_slice else 0)


def build_unet(cfg: Config, volumetric: bool = False) -> UNet:
    u = cfg.unet
    return UNet(in_channels=unet_in_channels(cfg), out_channels=cfg.vae.latent_channels,
                model_channels=u.model_channels, channel_mult=u.channel_mult,
                num_res_blocks=u.num_res_blocks, attention_resolutions=u.attention_resolutions,
                num_head_channels=u.num_head_channels, dropout=u.dropout,
                use_checkpoint=u.use_checkpoint, volumetric=volumetric)
