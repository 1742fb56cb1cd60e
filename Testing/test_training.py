"""Training: every stage learns, stage 2 touches only volumetric layers, an interrupted run
resumes bitwise, data order and labels are right, and `gem3d train all` writes a bundle."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from gem3d.bundle import load_bundle
from gem3d.cli import main
from gem3d.config import load_config, save_config
from gem3d.labels import LabelMap
from gem3d.models import build_vae
from gem3d.models.volumetric import is_volumetric
from gem3d.phantom import write_dataset
from gem3d.sampling import make_training_scheduler
from gem3d.through_plane import calibrate_vae
from gem3d.training import STAGES, Run, init, stages, trainer
from gem3d.training.checkpoint import latest_checkpoint
from gem3d.training.data import batches, label_mapping

# stage 1 is left short so that stage 2, which only tunes the volumetric layers, has room to learn
STEPS = {"vae": 60, "stage1": 30, "stage2": 150, "slice": 100}


def tiny_config(**train):
    cfg = load_config("tiny")
    cfg.data.slice_size = 32
    cfg.window_length = 4
    settings = dict(batch_size=2, warmup_steps=10, lr=2e-3, stage2_lr=5e-3, slice_lr=2e-3, vae_lr=2e-3,
                    ema_decay=0.9, checkpoint_every=0, preview_every=0)
    cfg.train = dataclasses.replace(cfg.train, **{**settings, **train})
    return cfg


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are dispatch-bound: one thread is as fast, and much faster when test files share cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "brain"
    write_dataset(path, "brain", cases=4, size=32, slices=12)
    return path


def fixed_loss(stage, items=8, seeds=(0, 1, 2, 3)) -> float:
    """The stage's loss on a fixed batch with fixed noise and timesteps."""
    index = np.linspace(0, len(stage.dataset) - 1, items).round().astype(int)
    batch = default_collate([stage.dataset[int(i)] for i in index])
    stage.objective.eval()
    losses = []
    with torch.no_grad():
        for seed in seeds:
            torch.manual_seed(seed)
            losses.append(float(stage.objective(batch)))
    stage.objective.train()
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    """All four stages trained in order; losses before/after and stage 2's untouched tensors."""
    cfg = tiny_config(preview_every=STEPS["stage2"], **{f"{k}_steps": v for k, v in STEPS.items()})
    run = Run(cfg, phantoms, tmp_path_factory.mktemp("run"), init("cpu"))
    out = {"run": run, "loss": {}}
    for name in STAGES:
        stage = run.stage(name)
        before = fixed_loss(stage)
        if name == "stage2":
            out["frozen"] = {k: v.clone() for k, v in stage.model.state_dict().items() if not is_volumetric(k)}
            out["volumetric"] = {k: v.clone() for k, v in stage.model.state_dict().items() if is_volumetric(k)}
        out[name] = run.run_stage(stage)
        out["loss"][name] = (before, fixed_loss(stage))
        if name == "stage2":
            out["stage2_model"] = stage.model
    return out


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_learns(trained, name):
    before, after = trained["loss"][name]
    assert after < 0.7 * before, (name, before, after)
    result = trained[name]
    assert result["steps"] == STEPS[name] and np.isfinite(result["final_loss"])


def test_stage2_changes_only_volumetric_parameters(trained):
    state = trained["stage2_model"].state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained["frozen"].items())
    changed = [k for k, v in trained["volumetric"].items() if not torch.equal(state[k], v)]
    assert len(changed) == len(trained["volumetric"]) > 0


def test_vae_latent_scale_gives_unit_std(trained):
    run = trained["run"]
    latents = torch.cat([z.flatten() for z in run.cache().images])
    assert trained["vae"]["latent_scale"] == pytest.approx(run.cfg.vae.scale)
    assert run.vae().config.scaling_factor == run.cfg.vae.scale  # diffusers' copy is not stale
    assert float(latents.std()) == pytest.approx(1.0, abs=1e-3)


def test_the_vae_stage_calibrates_the_through_plane_filter(trained):
    """The stripe fix's strength is the trained VAE's: recomputed from its round trips of the
    training volumes, and kept for the bundle (0 would mean the calibration never ran)."""
    run = trained["run"]
    images = [case.image for case in run.training_set.cases]
    expected = calibrate_vae(run.vae(), run.cfg.vae.scale, images)
    assert trained["vae"]["through_plane"] == expected == run.cfg.vae.through_plane
    assert run.result("vae")["through_plane"] == expected


def test_previews_and_outputs_are_written(trained):
    run = trained["run"]
    png = run.dir / "previews" / f"stage2_{STEPS['stage2']:06d}.png"
    assert png.is_file() and png.stat().st_size > 500
    for name in STAGES:
        assert run.result(name)["steps"] == STEPS[name]


class Crash(Exception):
    pass


def test_interrupted_run_resumes_bitwise(phantoms, tmp_path, monkeypatch):
    """Kill stage 1 between checkpoints, resume: same weights, EMA, optimiser state and step."""
    cfg = tiny_config(vae_steps=2, stage1_steps=8, checkpoint_every=3)

    def stage1(folder, crash_at=None):
        run = Run(dataclasses.replace(cfg), phantoms, folder, init("cpu"))
        run.train("vae")
        if crash_at is not None:
            real = trainer.seed_step

            def seed_step(seed, stage, rank, step):
                if step == crash_at:
                    raise Crash()
                real(seed, stage, rank, step)
            monkeypatch.setattr(trainer, "seed_step", seed_step)
            with pytest.raises(Crash):
                run.train("stage1")
            monkeypatch.setattr(trainer, "seed_step", real)
            assert latest_checkpoint(folder / "checkpoints" / "stage1").name == "step_00000006"
            run = Run(dataclasses.replace(cfg), phantoms, folder, init("cpu"))
        return run.train("stage1")

    straight = stage1(tmp_path / "straight")
    resumed = stage1(tmp_path / "resumed", crash_at=7)
    assert resumed["steps"] == straight["steps"] == 8
    assert resumed["final_loss"] == straight["final_loss"]
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / run / "checkpoints/stage1/step_00000008" / file))
                for run in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (torch.load(tmp_path / r / "checkpoints/stage1/step_00000008/state.pt", weights_only=True)
            for r in ("straight", "resumed"))
    assert a["step"] == b["step"] == 8 and a["ema"] == b["ema"] and a["schedule"] == b["schedule"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_batches_resume_where_they_stopped():
    data = [{"i": torch.tensor(i)} for i in range(10)]
    straight = batches(data, 3, seed=5)
    order = [next(straight)["i"].tolist() for _ in range(7)]  # 3 batches per epoch: crosses 2 epochs
    resumed = batches(data, 3, seed=5, start_step=4)
    assert [next(resumed)["i"].tolist() for _ in range(3)] == order[4:]
    assert sorted(sum(order[:3], [])) == sorted(set(sum(order[:3], [])))  # an epoch repeats nothing
    assert order[:3] != order[3:6]  # a new permutation each epoch
    shards = [next(batches(data, 5, seed=5, rank=rank, world=2))["i"].tolist() for rank in (0, 1)]
    assert len(set(shards[0] + shards[1])) == 10  # two processes share an epoch without overlap


def test_loss_uses_one_timestep_per_slice_in_stage1_and_per_window_in_stage2():
    cfg = tiny_config()
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, cond):
            seen.append(t)
            return torch.zeros_like(x, requires_grad=True)

    batch = {"latent": torch.randn(3, 4, 4, 2, 2), "mask": torch.randn(3, 4, 5, 2, 2),
             "informed": torch.randn(3, 4, 2, 2)}
    stages.WindowLoss(Spy(), cfg, shared_timestep=False)(batch)
    stages.WindowLoss(Spy(), cfg, shared_timestep=True)(batch)
    assert seen[0].shape == (3, 4) and len(set(seen[0][0].tolist())) > 1
    assert seen[1].shape == (3,)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_the_loss_regresses_what_the_samplers_expect(prediction):
    """An oracle that returns the exact eps / v / x0 of the noised input has zero loss."""
    cfg = tiny_config()
    cfg.diffusion.prediction_type = prediction
    x0 = torch.randn(2, 4, 4, 2, 2)
    abar = make_training_scheduler().alphas_cumprod

    class Oracle(torch.nn.Module):
        def forward(self, x, t, cond):
            a = abar[t].view(-1, 1, 1, 1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction]

    batch = {"latent": x0, "mask": torch.zeros(2, 4, 5, 2, 2), "informed": torch.zeros(2, 4, 2, 2)}
    assert float(stages.WindowLoss(Oracle(), cfg, shared_timestep=True)(batch)) < 1e-6
    cfg.diffusion.prediction_type = "epsilon" if prediction != "epsilon" else "sample"
    assert float(stages.WindowLoss(Oracle(), cfg, shared_timestep=True)(batch)) > 0.1


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.name and cfg.window_length >= 1


def test_a_pretrained_vae_is_used_frozen_with_the_configs_scale(phantoms, tmp_path):
    cfg = tiny_config(vae_steps=0, stage1_steps=1)
    cfg.vae.scale = 0.5
    with pytest.raises(ValueError, match="--vae-weights"):
        Run(dataclasses.replace(cfg), phantoms, tmp_path / "a", init("cpu")).train("vae")
    torch.manual_seed(3)
    save_file(build_vae(cfg).state_dict(), str(tmp_path / "vae.safetensors"))
    run = Run(cfg, phantoms, tmp_path / "b", init("cpu"), vae_weights=tmp_path / "vae.safetensors")
    result = run.train("vae")
    assert result == {"steps": 0, "pretrained": str(tmp_path / "vae.safetensors"), "latent_scale": 0.5,
                      "through_plane": result["through_plane"]}
    assert 0.0 <= result["through_plane"] <= 0.25 and run.cfg.vae.through_plane == result["through_plane"]
    run.train("stage1")
    written = load_file(str(tmp_path / "b" / "models" / "vae.safetensors"))
    given = load_file(str(tmp_path / "vae.safetensors"))
    assert all(torch.equal(written[k], given[k]) for k in given) and run.cfg.vae.scale == 0.5


def test_dataset_labels_map_to_model_labels_by_name():
    brats2023 = LabelMap({1: "necrotic core", 2: "edema", 3: "enhancing tumour"})
    model = LabelMap({1: "necrosis", 2: "edema", 4: "enhancing"})
    assert label_mapping(brats2023, model, "d") == {1: 1, 2: 2, 3: 4}
    with pytest.raises(ValueError, match="liver"):
        label_mapping(LabelMap({1: "liver"}), model, "d")


def test_train_all_cli_writes_a_loadable_bundle(phantoms, tmp_path):
    cfg = tiny_config(vae_steps=2, stage1_steps=2, stage2_steps=2, slice_steps=2)
    save_config(cfg, tmp_path / "cfg.yaml")
    args = ["train", "all", "--config", str(tmp_path / "cfg.yaml"), "--dataset", str(phantoms),
            "--out", str(tmp_path / "run"), "--note", "dataset_command=gem3d phantom ..."]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "run" / "bundle")
    prov = bundle.info["provenance"]
    assert prov["command"].startswith("gem3d ") and prov["notes"] == {"dataset_command": "gem3d phantom ..."}
    assert prov["dataset"]["cases"] == 4 and set(prov["final_losses"]) == set(STAGES)
    assert all(prov["stages"][s]["steps"] == 2 for s in STAGES)
    assert bundle.info["volumetric"] and bundle.slice_model is not None
    assert bundle.config.vae.scale == pytest.approx(prov["stages"]["vae"]["latent_scale"])
    assert bundle.config.vae.through_plane == prov["stages"]["vae"]["through_plane"]
    assert {"platform", "cpus", "device"} <= set(prov["machine"]) and prov["wall_s"] > 0
    changed = tiny_config()
    changed.unet.model_channels = 64
    save_config(changed, tmp_path / "other.yaml")
    args[3] = str(tmp_path / "other.yaml")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "another configuration" in result.output and "unet" in result.output
