"""Sampling core: scheduler configs, the window plan, propagation with known-frame replacement."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from gem3d.config import DiffusionConfig
from gem3d.sampler_settings import PRESETS
from gem3d.sampling import (
    Cancelled,
    make_scheduler,
    make_training_scheduler,
    plan_windows,
    propagate,
    scheduler_factory,
    start_slice,
)

C, H, W, N = 4, 4, 4, 8
SAMPLER_ARGS = {"ddim": dict(name="ddim", steps=20, eta=1.0),
                "dpm++": dict(name="dpm++", steps=20),
                "unipc": dict(name="unipc", steps=20)}


def ldm_alphas_cumprod():
    """LDM's "linear" schedule, written out: linear in sqrt(beta)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas))


ABAR = ldm_alphas_cumprod()


def slice_index_masks(Z, h=H, w=W):
    """Mask latents whose channel 0 holds the absolute slice index (for the oracle)."""
    masks = torch.zeros(Z, 2, h, w)
    masks[:, 0] = torch.arange(Z, dtype=torch.float32)[:, None, None]
    return masks


def frame_indices(mask_latent):
    return mask_latent[:, :, 0, 0, 0].round().long()


def oracle(X0, calls=None):
    """Predicts the exact noise of X0 at every frame: sampling must return X0."""
    def denoiser(x, t, mask_latent, informed_latent):
        x0 = X0[frame_indices(mask_latent)].double()
        a = ABAR[t].view(-1, 1, 1, 1, 1)
        if calls is not None:
            calls.append((x.clone(), t.clone(), mask_latent.clone(), informed_latent.clone()))
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)
    return denoiser


def mixing_denoiser(x, t, mask_latent, informed_latent):
    """A stand-in network that mixes frames, conditions and time, one batch element at a time."""
    return (0.3 * x + 0.1 * x.mean(dim=1, keepdim=True) + 0.05 * mask_latent[:, :, :1]
            + 0.1 * informed_latent[:, None] + 1e-4 * t.view(-1, 1, 1, 1, 1))


def run(denoiser, Z, p, sampler="dpm++", seed=0, X0=None, **kwargs):
    plan = plan_windows(Z, N, start_slice(p, Z, N))
    informed = X0[plan.first.start] if X0 is not None else \
        torch.randn(C, H, W, generator=torch.Generator().manual_seed(100))
    prop = propagate(denoiser, slice_index_masks(Z), informed, plan,
                     scheduler_factory(**SAMPLER_ARGS[sampler]),
                     torch.Generator().manual_seed(seed), **kwargs)
    return plan, prop, list(prop)


# ---------------------------------------------------------------- schedulers

@pytest.mark.parametrize("name", ["ddim", "dpm++", "unipc"])
def test_schedulers_use_ldm_linear_betas_eps_and_no_clipping(name):
    scheduler = make_scheduler(name, 20)
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ABAR, rtol=1e-5, atol=0)
    assert scheduler.config.prediction_type == "epsilon"
    assert math.isclose(float(scheduler.alphas_cumprod[-1]), 0.0046601, rel_tol=1e-4)
    if name == "ddim":
        assert scheduler.config.clip_sample is False


def test_training_scheduler_has_the_same_betas_and_adds_noise_like_the_formula():
    ddpm = make_training_scheduler()
    torch.testing.assert_close(ddpm.alphas_cumprod.double(), ABAR, rtol=1e-5, atol=0)
    assert ddpm.config.clip_sample is False and ddpm.config.num_train_timesteps == 1000
    x0, noise, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([10, 900])
    expected = ABAR[t].sqrt()[:, None] * x0 + (1 - ABAR[t]).sqrt()[:, None] * noise
    torch.testing.assert_close(ddpm.add_noise(x0, noise, t).double(), expected.double(),
                               rtol=1e-5, atol=1e-6)


def test_paper_preset_is_ldm_ddim_200_steps_eta_1_ending_clean():
    scheduler = scheduler_factory(**PRESETS["paper"])()
    assert scheduler.timesteps.tolist() == list(range(996, 0, -5))
    assert scheduler.eta == 1.0 and float(scheduler.final_alpha_cumprod) == 1.0


def test_fast_preset_is_dpmpp_2m_within_25_model_evaluations():
    scheduler = scheduler_factory(**PRESETS["fast"])()
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.solver_order == 2
    assert len(scheduler.timesteps) <= 25 and int(scheduler.timesteps[0]) == 999


def test_make_scheduler_rejects_bad_specs():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("euler", 20)
    with pytest.raises(ValueError, match="eta"):
        make_scheduler("dpm++", 20, eta=1.0)
    with pytest.raises(ValueError, match="steps"):
        make_scheduler("ddim", 0)
    with pytest.raises(ValueError, match="steps"):
        scheduler_factory("unipc", 1001, DiffusionConfig())


@pytest.mark.parametrize("name, most", [("ddim", 999), ("dpm++", 1000), ("unipc", 1000)])
def test_every_accepted_step_count_samples_and_one_more_is_refused(name, most):
    """LDM's DDIM timesteps (offset 1) would reach t=1000 at 1000 steps: an IndexError in
    diffusers' step, so DDIM's limit is 999 and said before sampling."""
    scheduler = make_scheduler(name, most)
    x = torch.zeros(1, 2)
    for t in scheduler.timesteps[:1].tolist() + scheduler.timesteps[-1:].tolist():
        x = scheduler.step(torch.zeros(1, 2), t, x).prev_sample
    assert scheduler.timesteps.max() <= 999
    with pytest.raises(ValueError, match=re.escape(f"steps must be in 1..{most} for {name}, got {most + 1}")):
        make_scheduler(name, most + 1)


# ---------------------------------------------------------------- plan

def test_plan_example_37_slices_from_the_middle():
    plan = plan_windows(37, 8, start_slice(0.5, 37, 8))
    spans = [[(w.start, w.stop, w.direction, w.known, w.informed_index) for w in r]
             for r in plan.rounds]
    assert spans == [
        [(18, 26, "first", (), None)],
        [(25, 33, "up", (0,), 25), (11, 19, "down", (7,), 18)],
        [(29, 37, "up", (0, 1, 2, 3), 32), (4, 12, "down", (7,), 11)],
        [(0, 8, "down", (4, 5, 6, 7), 4)],
    ]


@pytest.mark.parametrize("overlap", [1, 3])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.99, 1.0])
def test_plan_covers_the_volume_and_marks_every_generated_slice_known(p, overlap):
    for Z in range(N, 45):
        plan = plan_windows(Z, N, start_slice(p, Z, N), overlap)
        assert plan.first.start == min(math.floor(p * Z), Z - N)
        assert plan.windows[0] == plan.first and len(plan.windows) == 1 + len(plan.up) + len(plan.down)
        generated = set()
        for group in plan.rounds:
            new = []
            for w in group:
                assert w.stop - w.start == N and 0 <= w.start and w.stop <= Z
                inside = set(range(w.start, w.stop))
                assert {w.start + k for k in w.known} == inside & generated
                fresh = inside - generated
                if w.direction != "first":
                    assert len(w.known) >= overlap
                    assert w.informed_index in generated
                    neighbour = min(fresh) - 1 if w.direction == "up" else max(fresh) + 1
                    assert w.informed_index == neighbour
                new.append(fresh)
            assert not (len(new) == 2 and new[0] & new[1])  # batched windows are independent
            generated |= set().union(*new)
        assert generated == set(range(Z))
        for windows, edge in ((plan.up, lambda w: w.stop == Z), (plan.down, lambda w: w.start == 0)):
            if windows:
                assert edge(windows[-1]) and not any(edge(w) for w in windows[:-1])
                assert all(len(w.known) == overlap for w in windows[:-1])
        assert (plan.first.stop == Z) == (not plan.up) and (plan.first.start == 0) == (not plan.down)


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"7 slices.*window length 8"):
        plan_windows(7, 8, 0)
    with pytest.raises(ValueError, match="start position"):
        start_slice(1.5, 20, 8)
    with pytest.raises(ValueError, match="start slice"):
        plan_windows(20, 8, 13)
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(20, 8, 10, overlap=8)
    with pytest.raises(ValueError, match="overlap"):
        plan_windows(20, 8, 10, overlap=0)


# ---------------------------------------------------------------- propagation

@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("Z", [N, N + 1, 3 * N - 2, 37])
@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "unipc"])
def test_oracle_denoiser_reconstructs_the_volume(sampler, Z, p):
    X0 = torch.randn(Z, C, H, W, generator=torch.Generator().manual_seed(Z))
    plan, prop, results = run(oracle(X0), Z, p, sampler, X0=X0)
    assert [(r.start, r.stop, r.direction) for r in results] == \
        [(w.start, w.stop, w.direction) for w in plan.windows]
    for r in results:
        torch.testing.assert_close(r.latents, X0[r.start:r.stop], rtol=0, atol=1e-4)
    torch.testing.assert_close(prop.volume, X0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++", "unipc"])
def test_known_frames_carry_the_noise_level_of_the_timestep_they_are_fed_at(sampler):
    Z, h = 37, 8
    X0 = 3 * torch.randn(Z, C, h, h, generator=torch.Generator().manual_seed(1)) + 2
    calls = []
    plan = plan_windows(Z, N, start_slice(0.3, Z, N))
    prop = propagate(oracle(X0, calls), slice_index_masks(Z, h, h), X0[plan.first.start], plan,
                     scheduler_factory(**SAMPLER_ARGS[sampler]), torch.Generator().manual_seed(0))
    list(prop)
    by_start = {w.start: w for w in plan.windows}
    implied_by_window = {}
    for x, t, mask_latent, _ in calls:
        a = ABAR[t].view(-1, 1, 1, 1)
        for b, idx in enumerate(frame_indices(mask_latent)):
            window = by_start[int(idx[0])]
            known = list(window.known)
            if not known:
                continue
            implied = (x[b, known].double() - a[b].sqrt() * X0[idx[known]].double()) / (1 - a[b]).sqrt()
            assert 0.8 < float(implied.std()) < 1.2, f"t={int(t[b])}: std {float(implied.std()):.3f}"
            assert abs(float(implied.mean())) < 0.2
            implied_by_window.setdefault(window, []).append(implied)
    assert len(implied_by_window) == len(plan.windows) - 1
    for implied in implied_by_window.values():
        assert len(implied) == 20  # every step of every later window
        # the known frames' noise is fixed per window: any level error shows as a change
        for later in implied[1:]:
            torch.testing.assert_close(later, implied[0], rtol=0, atol=1e-3)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_fresh_known_noise_is_a_new_draw_at_the_right_level_every_step(sampler):
    """known_noise="fresh" (the paper's RePaint): each step's known frames carry unit noise at the
    step's level, drawn anew (nearly uncorrelated with the previous step's)."""
    Z, h = 3 * N - 2, 8
    X0 = 3 * torch.randn(Z, C, h, h, generator=torch.Generator().manual_seed(1)) + 2
    calls = []
    plan = plan_windows(Z, N, start_slice(0.5, Z, N))
    list(propagate(oracle(X0, calls), slice_index_masks(Z, h, h), X0[plan.first.start], plan,
                   scheduler_factory(**SAMPLER_ARGS[sampler]), torch.Generator().manual_seed(0),
                   batch_directions=False, known_noise="fresh"))
    window = plan.up[0]
    known = [window.start + k for k in window.known]
    implied = []
    for x, t, mask_latent, _ in calls:
        if int(frame_indices(mask_latent)[0, 0]) == window.start:
            a = ABAR[t].view(-1, 1, 1, 1)
            implied.append((x[0, list(window.known)].double() - a[0].sqrt() * X0[known].double())
                           / (1 - a[0]).sqrt())
    assert len(implied) == 20
    for previous, now in zip(implied, implied[1:]):
        assert 0.8 < float(now.std()) < 1.2
        assert abs(float(torch.corrcoef(torch.stack([previous.flatten(), now.flatten()]))[0, 1])) < 0.5
    with pytest.raises(ValueError, match="known_noise must be one of fixed, fresh"):
        run(mixing_denoiser, Z, 0.5, known_noise="stale")


def test_later_windows_are_informed_by_the_generated_overlap_slice():
    Z = 3 * N - 2
    X0 = torch.randn(Z, C, H, W)
    calls = []
    plan, prop, _ = run(oracle(X0, calls), Z, 0.5, "dpm++", X0=X0)
    by_start = {w.start: w for w in plan.windows}
    seen = set()
    for _, _, mask_latent, informed in calls:
        for b, idx in enumerate(frame_indices(mask_latent)):
            w = by_start[int(idx[0])]
            expected = X0[plan.first.start] if w.direction == "first" else prop.volume[w.informed_index]
            assert torch.equal(informed[b], expected)
            seen.add(w)
    assert seen == set(plan.windows) and len(plan.windows) == 4


def test_without_the_chain_every_window_is_informed_by_the_original_slice():
    """The ablation `Switches(chain_informed=False)`: the informed slice's contrast is not
    handed on through generated overlap slices."""
    Z = 3 * N - 2
    X0 = torch.randn(Z, C, H, W)
    calls = []
    plan = plan_windows(Z, N, start_slice(0.5, Z, N), chain_informed=False)
    assert [w.informed_index for w in plan.windows] == [None] * 4
    assert [w.known for w in plan.windows] == [w.known for w in plan_windows(Z, N, start_slice(0.5, Z, N)).windows]
    prop = propagate(oracle(X0, calls), slice_index_masks(Z), X0[plan.first.start], plan,
                     scheduler_factory(**SAMPLER_ARGS["dpm++"]), torch.Generator().manual_seed(0))
    list(prop)
    assert all(torch.equal(informed[b], X0[plan.first.start]) for *_, informed in calls
               for b in range(informed.shape[0]))
    torch.testing.assert_close(prop.volume, X0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_batched_directions_equal_sequential_windows(sampler):
    batch_sizes = {True: [], False: []}

    def counting(batched):
        def denoiser(x, t, m, i):
            batch_sizes[batched].append(x.shape[0])
            return mixing_denoiser(x, t, m, i)
        return denoiser

    Z = 37
    plan, batched, rb = run(counting(True), Z, 0.4, sampler, seed=3)
    _, sequential, rs = run(counting(False), Z, 0.4, sampler, seed=3, batch_directions=False)
    assert [(r.start, r.stop, r.direction) for r in rb] == [(r.start, r.stop, r.direction) for r in rs]
    for a, b in zip(rb, rs):
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.volume, sequential.volume, rtol=0, atol=1e-5)
    assert batched.volume.abs().sum() > 0
    steps = 20
    assert batch_sizes[True] == [1] * steps + [2] * 2 * steps + [1] * steps  # 37 slices from 0.4
    assert batch_sizes[False] == [1] * len(batch_sizes[False])


def test_windows_keep_known_slices_exactly_as_generated():
    plan = plan_windows(37, N, start_slice(0.4, 37, N))
    prop = propagate(mixing_denoiser, slice_index_masks(37), torch.randn(C, H, W), plan,
                     scheduler_factory("unipc", 10), torch.Generator().manual_seed(0))
    before = prop.volume.clone()
    for r, w in zip(prop, plan.windows):
        known = [w.start + k for k in w.known]
        assert torch.equal(r.latents[list(w.known)], before[known])
        assert torch.equal(prop.volume[known], before[known])
        assert torch.equal(prop.volume[r.start:r.stop], r.latents)
        before = prop.volume.clone()
    assert len(known) == 7 and before.abs().amin(dim=(1, 2, 3)).gt(0).all()


def test_same_seed_gives_bitwise_identical_volumes_and_another_seed_does_not():
    volumes = [run(mixing_denoiser, 22, 0.5, "ddim", seed=s)[1].volume for s in (5, 5, 6)]
    assert torch.equal(volumes[0], volumes[1])
    assert not torch.allclose(volumes[0], volumes[2], atol=1e-3)


@pytest.mark.parametrize("stop_after", [0, 7])
def test_cancel_stops_before_the_next_model_evaluation(stop_after):
    calls, results = [], []

    def denoiser(x, t, m, i):
        calls.append(int(t[0]))
        return mixing_denoiser(x, t, m, i)

    plan = plan_windows(22, N, start_slice(0.5, 22, N))
    prop = propagate(denoiser, slice_index_masks(22), torch.randn(C, H, W), plan,
                     scheduler_factory("dpm++", 5), torch.Generator().manual_seed(0),
                     cancel=lambda: len(calls) >= stop_after)
    with pytest.raises(Cancelled):
        for r in prop:
            results.append(r)
    assert len(calls) == stop_after
    assert len(results) == stop_after // 5  # the first window (5 steps) finished before


def test_callback_reports_every_model_evaluation_of_the_run():
    progress = []
    plan, prop, _ = run(mixing_denoiser, 37, 0.5, callback=lambda s, n: progress.append((s, n)))
    total = len(plan.rounds) * 20
    assert prop.total == total and progress == [(s, total) for s in range(1, total + 1)]


def test_propagation_is_a_single_pass_iterator():
    plan, prop, results = run(mixing_denoiser, 22, 0.5)
    assert len(results) == len(plan.windows) == 4
    assert next(prop, None) is None and iter(prop) is prop


def test_propagate_rejects_mismatched_latents_and_bad_denoiser_output():
    plan = plan_windows(10, N, 0)
    factory = scheduler_factory("dpm++", 5)
    with pytest.raises(ValueError, match="Z=10"):
        propagate(mixing_denoiser, slice_index_masks(9), torch.randn(C, H, W), plan, factory,
                  torch.Generator())
    with pytest.raises(ValueError, match="informed latent"):
        propagate(mixing_denoiser, slice_index_masks(10), torch.randn(C, H + 1, W), plan, factory,
                  torch.Generator())
    with pytest.raises(ValueError, match="denoiser returned"):
        next(propagate(lambda x, t, m, i: x[:, 1:], slice_index_masks(10), torch.randn(C, H, W),
                       plan, factory, torch.Generator()))
