"""Model-agnostic sampling: schedulers, the window plan, bi-directional propagation."""
from gem3d.sampling.plan import Window, WindowPlan, plan_windows
from gem3d.sampling.propagation import Cancelled, Propagation, WindowResult, propagate
from gem3d.sampling.schedulers import make_scheduler, make_training_scheduler, scheduler_factory

__all__ = [
    "Cancelled", "Propagation", "Window", "WindowPlan", "WindowResult", "make_scheduler",
    "make_training_scheduler", "plan_windows", "propagate", "scheduler_factory",
]
