"""The sampler names and the defaults a request gets (torch-free: the editor checks requests with it).

The schedulers themselves are in `gem3d.sampling.schedulers`.
"""
from __future__ import annotations

from typing import Optional, Tuple

from gem3d.config import DiffusionConfig

SAMPLERS = ("ddim", "dpm++", "unipc")
PRESETS = {
    "paper": {"name": "ddim", "steps": 200, "eta": 1.0},
    "fast": {"name": "dpm++", "steps": 20},
}
DEFAULT_PRESET = "fast"


def resolve_sampler(diffusion: DiffusionConfig, name: Optional[str] = None,
                    steps: Optional[int] = None) -> Tuple[str, int]:
    """The sampler and step count a request gets: the fast preset unless another sampler is
    named; a named sampler without steps gets the model's ``sampling_steps``."""
    fast = PRESETS[DEFAULT_PRESET]
    name = name or fast["name"]
    return name, steps or (fast["steps"] if name == fast["name"] else diffusion.sampling_steps)
