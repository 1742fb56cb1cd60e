"""Sampling an informed-slice latent with the position-conditioned slice model."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from gem3d.sampling.propagation import Cancelled


@torch.no_grad()
def generate_latent(slice_model: torch.nn.Module, position: float, shape, scheduler_factory: Callable,
                    generator: torch.Generator, cond: Optional[torch.Tensor] = None,
                    cancel: Optional[Callable[[], bool]] = None) -> torch.Tensor:
    """Sample one informed-slice latent (C, h, w) at normalised height `position` with the slice model."""
    scheduler = scheduler_factory()
    device = generator.device
    x = torch.randn((1,) + tuple(shape), generator=generator, device=device) * scheduler.init_noise_sigma
    p = torch.tensor([float(position)], device=device)
    for t in scheduler.timesteps:
        if cancel is not None and cancel():
            raise Cancelled()
        eps = slice_model(scheduler.scale_model_input(x, t), t.reshape(1).to(device), p, cond)
        x = scheduler.step(eps.float(), t, x).prev_sample
    return x[0]
