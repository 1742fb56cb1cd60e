"""Several cases sampled together, so that their windows share every denoiser call.

Dataset enhancement runs one window plan (same Z, window length and start) for many cases.
Stacking the cases along the latent channels lets one `propagate` drive them all; the
denoiser wrapper unfolds those channels into the batch, so each step is one forward pass
of (cases x windows in the round).  Schedulers act element-wise, so every case follows
its own path; only the noise differs from a run of that case alone (it is drawn for the
stacked latent).
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Sequence

import torch

from gem3d.sampling.plan import WindowPlan
from gem3d.sampling.propagation import Denoiser, WindowResult, propagate


def _unfold(x: torch.Tensor, cases: int) -> torch.Tensor:
    """(B, ..., K*C, h, w) -> (B*K, ..., C, h, w), the case axis moved next to the batch."""
    b, *middle, kc, h, w = x.shape
    x = x.reshape(b, *middle, cases, kc // cases, h, w)
    return x.movedim(-4, 1).reshape(b * cases, *middle, kc // cases, h, w)


def _fold(x: torch.Tensor, cases: int) -> torch.Tensor:
    """Inverse of `_unfold`."""
    bk, *middle, c, h, w = x.shape
    x = x.reshape(bk // cases, cases, *middle, c, h, w)
    return x.movedim(1, -4).reshape(bk // cases, *middle, cases * c, h, w)


class CaseBatch:
    """Iterate for one list of `WindowResult`s (one per case) per finished window; read
    ``volumes`` at the end.  ``total``: model evaluations of the whole run."""

    def __init__(self, denoiser: Denoiser, mask_latents: Sequence[torch.Tensor],
                 informed_latents: Sequence[torch.Tensor], plan: WindowPlan,
                 scheduler_factory: Callable[[], object], generator: torch.Generator,
                 batch_directions: bool = True, callback: Optional[Callable[[int, int], None]] = None,
                 cancel: Optional[Callable[[], bool]] = None):
        if not mask_latents or len(mask_latents) != len(informed_latents):
            raise ValueError(f"give one informed latent per case: {len(mask_latents)} mask volumes, "
                             f"{len(informed_latents)} informed latents")
        for name, parts in (("mask latents", mask_latents), ("informed latents", informed_latents)):
            if len({tuple(p.shape) for p in parts}) > 1:
                raise ValueError(f"the cases' {name} differ in shape "
                                 f"({sorted({tuple(p.shape) for p in parts})}); batch only cases of one grid")
        self.cases = len(mask_latents)
        self.channels = informed_latents[0].shape[0]

        def stacked_denoiser(x_t, t, mask, informed):
            k = self.cases
            eps = denoiser(_unfold(x_t, k), t.repeat_interleave(k), _unfold(mask, k), _unfold(informed, k))
            return _fold(eps, k)

        self.propagation = propagate(stacked_denoiser, torch.cat(list(mask_latents), dim=1),
                                     torch.cat(list(informed_latents), dim=0), plan, scheduler_factory,
                                     generator, batch_directions=batch_directions, callback=callback,
                                     cancel=cancel)

    @property
    def total(self) -> int:
        return self.propagation.total

    @property
    def volumes(self) -> List[torch.Tensor]:
        """One latent volume ``(Z, C, h, w)`` per case."""
        return list(self.propagation.volume.split(self.channels, dim=1))

    def __iter__(self) -> Iterator[List[WindowResult]]:
        for result in self.propagation:
            yield [WindowResult(result.start, result.stop, result.direction, part)
                   for part in result.latents.split(self.channels, dim=1)]


def propagate_cases(denoiser: Denoiser, mask_latents: Sequence[torch.Tensor],
                    informed_latents: Sequence[torch.Tensor], plan: WindowPlan,
                    scheduler_factory: Callable[[], object], generator: torch.Generator,
                    batch_directions: bool = True, callback: Optional[Callable[[int, int], None]] = None,
                    cancel: Optional[Callable[[], bool]] = None) -> CaseBatch:
    """`propagate` for K cases at once: ``mask_latents`` K tensors ``(Z, Cm, h, w)``,
    ``informed_latents`` K tensors ``(C, h, w)``; the denoiser is called as in `propagate`,
    with batches of K x (windows in the round)."""
    return CaseBatch(denoiser, mask_latents, informed_latents, plan, scheduler_factory, generator,
                     batch_directions, callback, cancel)
