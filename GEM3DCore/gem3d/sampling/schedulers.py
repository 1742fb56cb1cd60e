"""Diffusers schedulers configured like GEM-3D's training (LDM "linear" betas, eps prediction).

Choices, and why:
- Betas: LDM's ``linear`` schedule with linear_start 0.00085 / linear_end 0.012 is
  ``linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`` (linear in sqrt-space), which is
  diffusers' ``scaled_linear``; diffusers' ``linear`` would be a different schedule.
- DDIM (the paper preset) uses LDM's timesteps: ``range(0, 1000, 1000 // steps) + 1``
  (= ``timestep_spacing="leading"``, ``steps_offset=1``).  It deliberately differs from LDM
  at the very last step: ``set_alpha_to_one=True`` lands on the clean sample (LDM stops at
  the noise level of t=0, abar=0.99915, i.e. noise of std ~0.03 left in the latent), so
  that all samplers end clean, like the known frames that are written back clean.
- DPM-Solver++ and UniPC keep diffusers' defaults (``linspace`` spacing starting at t=999,
  ``final_sigmas_type="zero"``): with few steps, starting at the highest trained noise
  level matters, and they end clean.
- ``clip_sample=False`` everywhere: latents are not bounded to [-1, 1].
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    SchedulerMixin,
    UniPCMultistepScheduler,
)

from gem3d.config import DiffusionConfig
from gem3d.sampler_settings import SAMPLERS

NOISE_PROCESS_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def noise_process(diffusion: Optional[DiffusionConfig]) -> dict:
    """The part of a config that fixes the trained noise process, as diffusers' scheduler kwargs."""
    diffusion = diffusion or DiffusionConfig()
    return {name: getattr(diffusion, name) for name in NOISE_PROCESS_FIELDS}


class EtaDDIMScheduler(DDIMScheduler):
    """DDIM whose eta is fixed at construction (diffusers takes it per ``step()``), so the
    propagation can step every scheduler the same way."""

    eta = 0.0

    def step(self, model_output, timestep, sample, eta=None, use_clipped_model_output=False,
             generator=None, variance_noise=None, return_dict=True):
        return super().step(model_output, timestep, sample, self.eta if eta is None else eta,
                            use_clipped_model_output, generator, variance_noise, return_dict)


def make_scheduler(name: str, steps: int, diffusion: Optional[DiffusionConfig] = None,
                   eta: Optional[float] = None, alpha_to_one: bool = True) -> SchedulerMixin:
    """A fresh sampling scheduler with its timesteps set (multistep solvers keep state).
    ``alpha_to_one=False``: DDIM ends at LDM's alpha-bar(t=0), as the official scripts do."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    common = noise_process(diffusion)
    most = common["num_train_timesteps"] - (name == "ddim")  # DDIM's offset 1 would reach t=T at T steps
    if not 1 <= steps <= most:
        raise ValueError(f"steps must be in 1..{most} for {name}, got {steps}")
    if eta is not None and name != "ddim":
        raise ValueError(f"eta applies to ddim only, not to {name!r}")
    if name == "ddim":
        scheduler = EtaDDIMScheduler(**common, clip_sample=False, set_alpha_to_one=alpha_to_one,
                                     steps_offset=1, timestep_spacing="leading")
        scheduler.eta = 0.0 if eta is None else float(eta)
    elif name == "dpm++":
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++",
                                                solver_order=2)
    else:
        scheduler = UniPCMultistepScheduler(**common)
    scheduler.set_timesteps(steps)
    return scheduler


def scheduler_factory(name: str, steps: int, diffusion: Optional[DiffusionConfig] = None,
                      eta: Optional[float] = None, alpha_to_one: bool = True) -> Callable[[], SchedulerMixin]:
    """A zero-argument maker of fresh schedulers (one per window batch), checked now."""
    make_scheduler(name, steps, diffusion, eta, alpha_to_one)
    return functools.partial(make_scheduler, name, steps, diffusion, eta, alpha_to_one)


def make_training_scheduler(diffusion: Optional[DiffusionConfig] = None) -> DDPMScheduler:
    """The training noise process (``add_noise``) with the same betas as the samplers."""
    return DDPMScheduler(**noise_process(diffusion), clip_sample=False)
