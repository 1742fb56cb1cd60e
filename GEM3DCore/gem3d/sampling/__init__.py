"""Sampling: schedulers, the window plan, bi-directional propagation, the slice-model loop."""
from gem3d.sampling.plan import Window, WindowPlan, plan_windows, start_slice
from gem3d.sampling.propagation import Cancelled, Propagation, WindowResult, propagate
from gem3d.sampling.slice_model import generate_latent
from gem3d.sampling.schedulers import make_scheduler, make_training_scheduler, scheduler_factory

__all__ = [
    "Cancelled", "Propagation", "generate_latent", "Window", "WindowPlan", "WindowResult", "make_scheduler",
    "make_training_scheduler", "plan_windows", "propagate", "scheduler_factory", "start_slice",
]
