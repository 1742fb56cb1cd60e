"""The four trainable parts as `Stage`s: what is trained, on which data, with which loss,
and how its preview is drawn.

- vae: L1 reconstruction + a small KL term on single slices (pixel space).
- stage1: the 2D UNet, diffusion MSE on windows with one timestep per slice;
  input = noisy latent + mask latent + informed-slice latent (a random slice of the
  window, repeated over it).
- stage2: the stage-1 UNet with volumetric layers; only those train, one timestep per window.
- slice: the slice model, diffusion MSE of a slice latent at its height p.
The diffusion target is eps (GEM-3D) unless cfg.diffusion.prediction_type says v or x0.

Each loss is an `nn.Module` (`forward(batch) -> loss`) so DistributedDataParallel can wrap
it whole, whatever methods of the network it calls. Randomness comes from torch's global
RNG, which the trainer seeds at every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gem3d.config import Config
from gem3d.grid import slice_position
from gem3d.models import decode_latents, encode_slices, is_volumetric, volume_condition
from gem3d.sampling import generate_latent, make_training_scheduler, plan_windows, propagate, scheduler_factory
from gem3d.training.data import LatentCache, LatentSlices, LatentWindows
from gem3d.training.previews import save_rows
from gem3d.training.examples import PreparedCase, SliceDataset

KL_WEIGHT = 1e-6  # per-sample summed KL vs mean L1: keeps latents bounded, barely blurs
PREVIEW_STEPS = 25  # DDIM steps of a preview sample


@dataclass
class Stage:
    """One training stage: `model` is what it produces, `objective(batch)` its loss,
    `trainable` the named parameters the optimiser updates, `preview(path)` a PNG.
    A batch holds as many slices in every stage: batch_size windows, or
    batch_size * window single slices (vae, slice)."""

    name: str
    model: nn.Module
    objective: nn.Module
    trainable: Dict[str, nn.Parameter]
    dataset: torch.utils.data.Dataset
    batch_size: int
    steps: int
    lr: float
    preview: Callable[[Path], Path]


class VAELoss(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, batch: dict) -> torch.Tensor:
        x = batch["image"].expand(-1, self.vae.config.in_channels, -1, -1)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
        reconstruction = self.vae.decode(z).sample
        return F.l1_loss(reconstruction.float(), x.float()) + KL_WEIGHT * posterior.kl().float().mean()


class _DiffusionLoss(nn.Module):
    """MSE to the network's target, set by cfg.diffusion.prediction_type (eps as in GEM-3D,
    or v / x0), the setting the samplers read too."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.noise = make_training_scheduler(cfg.diffusion)
        self.prediction = cfg.diffusion.prediction_type
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"config diffusion.prediction_type={self.prediction!r}: must be "
                             "'epsilon', 'v_prediction' or 'sample'")

    def noised(self, x0: torch.Tensor, t: torch.Tensor):
        """(x_t, regression target) for clean latents (N, C, h, w) at timesteps t (N,)."""
        eps = torch.randn_like(x0)
        target = {"epsilon": eps, "sample": x0}.get(self.prediction)
        if target is None:
            target = self.noise.get_velocity(x0, eps, t)
        return self.noise.add_noise(x0, eps, t), target


class WindowLoss(_DiffusionLoss):
    """Diffusion loss of the volume UNet on windows (B, n, C, h, w): one timestep per slice
    (stage 1) or one shared by the window (stage 2)."""

    def __init__(self, unet: nn.Module, cfg: Config, shared_timestep: bool):
        super().__init__(cfg)
        self.unet, self.informed, self.shared = unet, cfg.informed_slice, shared_timestep

    def forward(self, batch: dict) -> torch.Tensor:
        x0 = batch["latent"]
        b, n = x0.shape[:2]
        t = torch.randint(self.noise.config.num_train_timesteps, (b,) if self.shared else (b, n), device=x0.device)
        per_slice = t[:, None].expand(b, n) if self.shared else t
        xt, target = self.noised(x0.flatten(0, 1), per_slice.reshape(-1))
        cond = volume_condition(batch["mask"], batch["informed"] if self.informed else None)
        return F.mse_loss(self.unet(xt.view_as(x0), t, cond).float(), target.view_as(x0))


class SliceLoss(_DiffusionLoss):
    """Diffusion loss of the slice model on slice latents at their heights."""

    def __init__(self, slice_model: nn.Module, cfg: Config):
        super().__init__(cfg)
        self.model, self.mask_conditioned = slice_model, cfg.slice_model.mask_conditioned

    def forward(self, batch: dict) -> torch.Tensor:
        x0 = batch["latent"]
        t = torch.randint(self.noise.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        xt, target = self.noised(x0, t)
        cond = batch["mask"] if self.mask_conditioned else None
        return F.mse_loss(self.model(xt, t, batch["position"], cond).float(), target)


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _preview_slices(case: PreparedCase, cfg: Config) -> np.ndarray:
    """`window_length` slice indices spread over the case, for slice-wise previews."""
    return np.linspace(0, case.n_slices - 1, cfg.window_length).round().astype(int)


def vae_stage(cfg: Config, vae: nn.Module, cases: List[PreparedCase]) -> Stage:
    case = cases[0]
    z = _preview_slices(case, cfg)

    @torch.no_grad()
    def preview(path: Path) -> Path:
        x = torch.from_numpy(case.image[z])[:, None].to(_device(vae))
        rec = decode_latents(vae, encode_slices(vae, x, 1.0), 1.0)
        return save_rows([("truth", case.image[z], "image"), ("vae", _numpy(rec[:, 0]), "image")], path)

    return Stage("vae", vae, VAELoss(vae), dict(vae.named_parameters()), SliceDataset(cases),
                 cfg.train.batch_size * cfg.window_length, cfg.train.vae_steps, cfg.train.vae_lr, preview)


def _window_preview(cfg: Config, unet: nn.Module, vae: nn.Module, cache: LatentCache) -> Callable[[Path], Path]:
    """A DDIM sample of the middle window of the first case, given its mask and middle slice."""
    case, n = cache.cases[0], cfg.window_length
    start = max((case.n_slices - n) // 2, 0)
    window = slice(start, start + n)

    @torch.no_grad()
    def preview(path: Path) -> Path:
        device = _device(unet)
        masks = cache.masks[0][window].to(device)
        informed = cache.images[0][start + n // 2].to(device)

        def denoiser(x, t, mask, informed_latent):
            return unet(x, t, volume_condition(mask, informed_latent if cfg.informed_slice else None)).float()

        run = propagate(denoiser, masks, informed, plan_windows(n, n, 0),
                        scheduler_factory("ddim", PREVIEW_STEPS, cfg.diffusion),
                        torch.Generator(device).manual_seed(cfg.train.seed))
        for _ in run:
            pass
        sample = decode_latents(vae, run.volume, cfg.vae.scale)
        return save_rows([("truth", case.image[window], "image"), ("mask", case.mask[window], "label"),
                          ("sample", _numpy(sample[:, 0]), "image")], path)

    return preview


def stage1(cfg: Config, unet: nn.Module, vae: nn.Module, cache: LatentCache) -> Stage:
    t = cfg.train
    return Stage("stage1", unet, WindowLoss(unet, cfg, shared_timestep=False), dict(unet.named_parameters()),
                 LatentWindows(cache, cfg.window_length, t.seed), t.batch_size, t.stage1_steps, t.lr,
                 _window_preview(cfg, unet, vae, cache))


def stage2(cfg: Config, unet: nn.Module, vae: nn.Module, cache: LatentCache) -> Stage:
    """`unet`: the trained stage-1 UNet; it gets volumetric layers and everything else freezes."""
    unet.add_volumetric_layers()
    trainable = {k: p for k, p in unet.named_parameters() if is_volumetric(k)}
    unet.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    t = cfg.train
    return Stage("stage2", unet, WindowLoss(unet, cfg, shared_timestep=True), trainable,
                 LatentWindows(cache, cfg.window_length, t.seed), t.batch_size, t.stage2_steps, t.stage2_lr,
                 _window_preview(cfg, unet, vae, cache))


def slice_stage(cfg: Config, model: nn.Module, vae: nn.Module, cache: LatentCache) -> Stage:
    case = cache.cases[0]
    z = _preview_slices(case, cfg)

    @torch.no_grad()
    def preview(path: Path) -> Path:
        device = _device(model)
        factory = scheduler_factory("ddim", PREVIEW_STEPS, cfg.diffusion)
        generator = torch.Generator(device).manual_seed(cfg.train.seed)
        shape = tuple(cache.images[0].shape[1:])
        latents = torch.stack([
            generate_latent(model, slice_position(k, case.n_slices), shape, factory, generator,
                            cache.masks[0][k][None].to(device) if cfg.slice_model.mask_conditioned else None)
            for k in z])
        sample = decode_latents(vae, latents.float(), cfg.vae.scale)
        mask = [("mask", case.mask[z], "label")] if cfg.slice_model.mask_conditioned else []
        return save_rows([("truth", case.image[z], "image"), *mask, ("sample", _numpy(sample[:, 0]), "image")], path)

    return Stage("slice", model, SliceLoss(model, cfg), dict(model.named_parameters()), LatentSlices(cache),
                 cfg.train.batch_size * cfg.window_length, cfg.train.slice_steps, cfg.train.slice_lr, preview)
