"""Inference conventions: ours (the default) or the official GEM-3D scripts', exactly.

The imported official networks match the official code numerically; what differs is how
they are used. Five choices, each a field here, recorded in bundle.json and provenance:

- ``slice_weights``: the slice model's EMA weights (ours) or its raw training weights (the
  official sampling script loads the raw ones).
- ``decode``: a grey slice from the VAE's three output channels as their mean (ours: the
  channels are trained on repeated grey, the mean averages out their decoding noise) or
  channel 0 (official).
- ``ddim_final_alpha``: DDIM's last step lands on the clean sample, alpha-bar = 1 (ours, so
  every sampler ends clean like the known frames) or on LDM's alpha-bar(t=0) = 0.99915
  (official, ``set_alpha_to_one=False``).
- ``conditioning``: mask and informed-slice latents as the VAE posterior mean (ours:
  deterministic for a seed) or a posterior sample (official).
- ``position``: the slice model's position at the first window's centre (ours: where the
  informed slice is used) or at the start slice (official).

Torch-free: the CLI, the worker and bundles use it without importing the engine.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional


@dataclass(frozen=True)
class Conventions:
    name: str
    slice_weights: str        # "ema" | "raw"
    decode: str               # "channel-mean" | "channel-0"
    ddim_final_alpha: str     # "one" | "ldm"
    conditioning: str         # "posterior-mean" | "posterior-sample"
    position: str             # "first-window-centre" | "start-slice"

    def to_dict(self) -> Dict[str, str]:
        return asdict(self)

    @property
    def decode_channel(self) -> Optional[int]:
        """The VAE output channel kept as the grey slice; None: the channel mean."""
        return 0 if self.decode == "channel-0" else None

    @property
    def sample_posterior(self) -> bool:
        return self.conditioning == "posterior-sample"

    @property
    def alpha_to_one(self) -> bool:
        """DDIM's `set_alpha_to_one`."""
        return self.ddim_final_alpha == "one"


CONVENTIONS: Dict[str, Conventions] = {
    "gem3d": Conventions("gem3d", "ema", "channel-mean", "one", "posterior-mean", "first-window-centre"),
    "official": Conventions("official", "raw", "channel-0", "ldm", "posterior-sample", "start-slice"),
}
DEFAULT = "gem3d"


def get(name: Optional[str]) -> Conventions:
    """The conventions called `name` (None: ours)."""
    name = DEFAULT if name is None else name
    if name not in CONVENTIONS:
        raise ValueError(f"unknown conventions {name!r}; choose one of {', '.join(CONVENTIONS)}")
    return CONVENTIONS[name]


def from_dict(record: Optional[dict]) -> Conventions:
    """Conventions as bundle.json / provenance store them (absent: ours, as older bundles were)."""
    if not record:
        return CONVENTIONS[DEFAULT]
    expected = {f.name for f in fields(Conventions)}
    if not isinstance(record, dict) or set(record) != expected:
        raise ValueError(f"conventions must have the keys {sorted(expected)}, got {record!r}")
    known = CONVENTIONS.get(record["name"])
    if known is None or known.to_dict() != record:
        raise ValueError(f"conventions {record!r} are neither of {', '.join(CONVENTIONS)}")
    return known
