"""Several cases in one propagation (gem3d.sampling.cases): shared denoiser calls, no mixing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gem3d.sampling import plan_windows, propagate, scheduler_factory, start_slice
from gem3d.sampling.cases import propagate_cases

C, H, W, N, Z = 4, 4, 4, 8, 20
ABAR = torch.from_numpy(np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2))


def case_masks(case: int) -> torch.Tensor:
    """Mask latents: channel 0 the slice index, channel 1 the case number (read by the oracle)."""
    masks = torch.zeros(Z, 2, H, W)
    masks[:, 0] = torch.arange(Z, dtype=torch.float32)[:, None, None]
    masks[:, 1] = case
    return masks


def oracle(targets, batches):
    """Predicts the exact noise of each case's target volume: sampling must return it."""
    def denoiser(x, t, mask, informed):
        batches.append(x.shape[0])
        frames, cases = mask[:, :, 0, 0, 0].round().long(), mask[:, 0, 1, 0, 0].round().long()
        x0 = torch.stack([targets[c][f] for c, f in zip(cases.tolist(), frames)]).double()
        a = ABAR[t].view(-1, 1, 1, 1, 1)
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)
    return denoiser


@pytest.mark.parametrize("sampler", [("ddim", 10, 1.0), ("dpm++", 8, None)])
def test_each_case_gets_its_own_volume_in_shared_calls(sampler):
    targets = [torch.randn(Z, C, H, W, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    plan = plan_windows(Z, N, start_slice(0.4, Z, N))
    name, steps, eta = sampler
    factory = scheduler_factory(name, steps, eta=eta)
    batches, alone = [], []
    run = propagate_cases(oracle(targets, batches), [case_masks(k) for k in range(3)],
                          [torch.randn(C, H, W) for _ in range(3)], plan, factory, torch.Generator().manual_seed(0))
    events = list(run)
    for k, volume in enumerate(run.volumes):
        torch.testing.assert_close(volume, targets[k], atol=1e-4, rtol=0)
    single = propagate(oracle(targets, alone), case_masks(0), torch.randn(C, H, W), plan, factory,
                       torch.Generator().manual_seed(0))
    list(single)
    assert len(batches) == len(alone) == run.total == single.total  # one call per step for all cases
    assert batches == [3 * b for b in alone]
    assert [len(e) for e in events] == [3] * len(plan.windows)
    assert [(e[0].start, e[0].stop, e[0].direction) for e in events] == \
        [(w.start, w.stop, w.direction) for w in plan.windows]
    torch.testing.assert_close(events[-1][2].latents, targets[2][events[-1][2].start:events[-1][2].stop],
                               atol=1e-4, rtol=0)


def test_cases_of_different_grids_are_refused():
    plan = plan_windows(Z, N, start_slice(0.5, Z, N))
    with pytest.raises(ValueError, match="differ in shape"):
        propagate_cases(oracle([], []), [case_masks(0), case_masks(1)[:, :1]], [torch.zeros(C, H, W)] * 2,
                        plan, scheduler_factory("ddim", 2), torch.Generator())
    with pytest.raises(ValueError, match="one informed latent per case"):
        propagate_cases(oracle([], []), [case_masks(0)], [], plan, scheduler_factory("ddim", 2), torch.Generator())
