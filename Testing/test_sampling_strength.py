"""Sampling strength (SDEdit): start from the reference's own latents noised part of the way.
Strength 1 is plain sampling, bit for bit; a strength near 0 returns (nearly) the input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gem3d import phantom
from gem3d.bundle_format import DEMO_BUNDLE
from gem3d.cli import main
from gem3d.demo import psnr
from gem3d.engine import Engine
from gem3d.io import read_volume
from gem3d.request import GenerateRequest, InformedSpec, RequestError
from gem3d.sampling import plan_windows, propagate, scheduler_factory, start_slice

C, H, W, N, Z = 4, 4, 4, 8, 22
SAMPLERS = {"ddim": dict(name="ddim", steps=20, eta=1.0), "dpm++": dict(name="dpm++", steps=20)}


def zero_noise(x, t, mask_latent, informed_latent):
    """A model that takes its input for clean: predicts no noise at all."""
    return torch.zeros_like(x)


def sample(sampler, strength=None, init=None, seed=0):
    plan = plan_windows(Z, N, start_slice(0.5, Z, N))
    masks = torch.zeros(Z, 2, H, W)
    informed = torch.randn(C, H, W, generator=torch.Generator().manual_seed(100))
    kwargs = {} if strength is None else {"strength": strength, "init_latents": init}
    prop = propagate(zero_noise, masks, informed, plan, scheduler_factory(**SAMPLERS[sampler]),
                     torch.Generator().manual_seed(seed), **kwargs)
    list(prop)
    return prop


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_strength_one_is_plain_sampling_bit_for_bit(sampler):
    init = torch.randn(Z, C, H, W, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample(sampler).volume, sample(sampler, 1.0, init).volume)


@pytest.mark.parametrize("sampler, tolerance", [("ddim", 0.15), ("dpm++", 0.8)])
def test_strength_near_zero_returns_the_input_and_runs_one_step_per_window(sampler, tolerance):
    """One step from the lowest noise level: DDIM's last timestep is 1 (noise std 0.03), DPM++'s
    about 50 (std ~0.2); a model that predicts no noise keeps what it is given."""
    init = torch.randn(Z, C, H, W, generator=torch.Generator().manual_seed(1))
    low, full = sample(sampler, 0.01, init), sample(sampler, 1.0, init)
    assert low.steps == 1 and low.total == len(plan_windows(Z, N, start_slice(0.5, Z, N)).rounds)
    assert float((low.volume - init).abs().max()) < tolerance
    assert float((full.volume - init).abs().mean()) > 1.0


def test_strength_below_one_needs_the_volume_latents():
    with pytest.raises(ValueError, match="init_latents of 22 slices"):
        sample("ddim", 0.5, None)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        sample("ddim", 0.0, torch.zeros(Z, C, H, W))


@pytest.mark.parametrize("strength", [0, -0.1, 1.5, math.nan, math.inf, "0.5", True])
def test_request_refuses_a_strength_outside_zero_to_one(strength):
    with pytest.raises(RequestError, match=r"strength must be a number in \(0, 1\]"):
        GenerateRequest(reference="r.nii.gz", mask="m.nii.gz", out="o.nii.gz", strength=strength)


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    data = tmp_path_factory.mktemp("strength") / "phantom"
    phantom.write_dataset(data, "brain", cases=1, size=64, slices=24, seed=0)
    return data / "imagesTr" / "brain_000_0000.nii.gz", data / "labelsTr" / "brain_000.nii.gz"


def test_pipeline_strength_one_equals_todays_output_and_a_low_strength_keeps_the_patient(brain, tmp_path):
    reference, mask = brain
    engine = Engine(DEMO_BUNDLE, "cpu")

    def generate(name, **options):
        request = GenerateRequest(reference=str(reference), mask=str(mask), out=str(tmp_path / f"{name}.nii.gz"),
                                  informed=InformedSpec("same"), start=0.5, seed=4, steps=8, **options)
        *_, finished = engine.generate(request)
        assert finished["event"] == "finished", finished
        return (read_volume(finished["outputs"]["image"]).array,
                json.loads(Path(finished["outputs"]["provenance"]).read_text()))

    (today, _), (one, _), (low, record) = generate("today"), generate("one", strength=1.0), \
        generate("low", strength=0.05)
    assert np.array_equal(today, one)
    assert record["sampler"]["strength"] == 0.05
    ref = read_volume(reference).array
    kept, resampled = (psnr(v, ref, float(np.ptp(ref))) for v in (low, today))
    assert kept > 24.0 and kept > resampled + 4.0, (kept, resampled)


def test_cli_checks_strength_before_loading_a_model(brain, tmp_path):
    reference, mask = brain
    for command in (["generate", "--reference", str(reference), "--mask", str(mask), "--out",
                     str(tmp_path / "o.nii.gz"), "--bundle", str(tmp_path)],
                    ["harmonize", "--dataset", str(reference.parent.parent), "--informed-from", str(reference),
                     "--out", str(tmp_path / "h"), "--bundle", str(tmp_path)]):
        result = CliRunner().invoke(main, command + ["--strength", "nan"])
        assert result.exit_code != 0
        assert "strength must be a number in (0, 1]" in result.output, result.output
        assert not (tmp_path / "o.nii.gz").exists() and not (tmp_path / "h").exists()
