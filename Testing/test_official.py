"""Importing the official GEM-3D checkpoints: safe unpickling, the full-size key/shape mapping
(on the committed manifests, no tensors), a real import of scaled-down checkpoints in the
official layout through the CLI, and export -> re-import round trips."""
from __future__ import annotations

import json
import os
import shlex
import sys
import types
import uuid

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from gem3d.bundle import load_bundle, read_info
from gem3d.config import Config, UNetConfig, VAEConfig, kl_f8_config, load_config, save_config
from gem3d.models import build_slice_model, build_unet, build_vae
from gem3d.official import (MappingError, UnsafeCheckpointError, export_official, import_official,
                            ldm_vae_layout, load_checkpoint, load_manifest, official_config, plan_checkpoint,
                            save_official)
from gem3d.official.keymap import diffusers_vae_config, ema_key, shapes_of
from gem3d.official.safe_load import sha256

PL_MODULES = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")


def paper_shapes(region="brain"):
    """Our full-size networks' key -> shape, built on the meta device (no memory)."""
    cfg = official_config(region, ct_window=(-100.0, 240.0) if region == "abdomen" else None)
    with torch.device("meta"):
        unet, vae, slice_model = build_unet(cfg, volumetric=True), build_vae(cfg), build_slice_model(cfg)
    inner = {k[len("unet."):]: s for k, s in shapes_of(slice_model.state_dict()).items()}
    return cfg, shapes_of(unet.state_dict()), shapes_of(vae.state_dict()), inner


# --- the full-size mapping, on the manifests derived from the official code ------------------------

def test_brain_and_abdomen_checkpoints_share_one_architecture():
    for kind in ("stage2", "slice"):
        assert load_manifest(f"brain_{kind}") == load_manifest(f"abdomen_{kind}")
    # so one mapping serves both; the tests below still run it for each region
    assert len(load_manifest("brain_stage2")) == 1045 and len(load_manifest("brain_slice")) == 1635


@pytest.mark.parametrize("region", ["brain", "abdomen"])
def test_manifests_map_onto_the_paper_networks(region):
    cfg, unet, vae, slice_unet = paper_shapes(region)
    official = load_manifest(f"{region}_stage2")
    plan = plan_checkpoint(official, region, unet=unet, vae=vae, vae_config=diffusers_vae_config(cfg.vae))
    assert set(plan.used()) | set(plan.skipped) == set(official)  # every key consumed or skipped for a reason
    assert not set(plan.used()) & set(plan.skipped)
    assert set(plan.sources["unet"]) == set(unet) and set(plan.sources["vae"]) == set(vae)
    assert all(official[plan.sources["unet"][k]] == s for k, s in unet.items())
    numel = sum(torch.Size(s).numel() for s in unet.values())
    assert numel == sum(torch.Size(official[k]).numel() for k in plan.sources["unet"].values()) == 367_878_616
    assert sum(torch.Size(official[k]).numel() for k in plan.sources["vae"].values()) == 83_653_863
    assert not plan.ema and len(plan.skipped) == 248 + 13  # cond stage = VAE copy, schedule buffers

    official = load_manifest(f"{region}_slice")
    plan = plan_checkpoint(official, region, unet=slice_unet, vae_config=diffusers_vae_config(cfg.vae))
    assert plan.ema and set(plan.sources["unet"].values()) == {ema_key(k) for k in slice_unet}
    assert all(official[plan.sources["unet"][k]] == s for k, s in slice_unet.items())
    assert len(plan.frozen_vae) == 248 and set(plan.used()) | set(plan.skipped) == set(official)
    assert sum(torch.Size(s).numel() for s in slice_unet.values()) == 414_106_788


def test_kl_f8_layout_and_diffusers_conversion():
    manifest = load_manifest("kl_f8")
    assert ldm_vae_layout(kl_f8_config()) == manifest
    stage2 = load_manifest("brain_stage2")
    assert {k: s for k, s in stage2.items() if k.startswith("first_stage_model.")} == \
        {"first_stage_model." + k: s for k, s in manifest.items()}
    cfg, _, vae, _ = paper_shapes()
    standalone = dict(manifest, **{"loss.logvar": (), "loss.discriminator.main.0.weight": (64, 3, 4, 4)})
    plan = plan_checkpoint(standalone, "model.ckpt", vae=vae, vae_config=diffusers_vae_config(cfg.vae))
    assert len(plan.sources["vae"]) == 248 and set(plan.skipped) == {"loss.logvar", "loss.discriminator.main.0.weight"}
    squeezed = [k for k, src in plan.sources["vae"].items() if manifest[src] != vae[k]]
    assert len(squeezed) == 8 and all(manifest[plan.sources["vae"][k]][2:] == (1, 1) for k in squeezed)


def test_mapping_errors_list_the_keys():
    cfg, unet, vae, _ = paper_shapes()
    official = load_manifest("brain_stage2")
    kwargs = dict(unet=unet, vae=vae, vae_config=diffusers_vae_config(cfg.vae))
    extra = dict(official, **{"model.diffusion_model.extra.weight": (3,)})
    with pytest.raises(MappingError, match=r"1 checkpoint key\(s\) not consumed: \['model.diffusion_model.extra"):
        plan_checkpoint(extra, "x.ckpt", **kwargs)
    missing = {k: s for k, s in official.items() if k != "model.diffusion_model.out.2.weight"}
    with pytest.raises(MappingError, match=r"1 of our tensors have no checkpoint key: \['unet.out.2.weight"):
        plan_checkpoint(missing, "x.ckpt", **kwargs)
    other = dict(official, **{"model.diffusion_model.out.2.weight": (4, 225, 3, 3)})
    with pytest.raises(MappingError,
                       match=r"1 shape mismatch.*out\.2\.weight \(4, 225, 3, 3\) vs ours \(4, 224, 3, 3\)"):
        plan_checkpoint(other, "x.ckpt", **kwargs)
    with pytest.raises(MappingError, match="no 'model_ema"):
        plan_checkpoint(official, "x.ckpt", use_ema=True, **kwargs)


# --- safe loading ------------------------------------------------------------------------------------

class Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def fake_lightning(monkeypatch):
    """A class named like Lightning's ModelCheckpoint; torch.save can pickle it while the stub modules exist."""
    cls = type("ModelCheckpoint", (), {"__module__": PL_MODULES[-1], "__qualname__": "ModelCheckpoint"})
    for name in PL_MODULES:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[PL_MODULES[-1]].ModelCheckpoint = cls
    return cls


def lightning_save(monkeypatch, state_dict, path, **extra):
    with monkeypatch.context() as m:
        cls = fake_lightning(m)
        callback = cls()
        callback.best_model_path = "epoch=3.ckpt"
        torch.save({"state_dict": state_dict, "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {cls: {"best_model_score": torch.tensor(0.1), "callback": callback}},
                    "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 5e-6}]}],
                    "lr_schedulers": [], **extra}, path)


def test_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    marker = f"/tmp/pwned_{uuid.uuid4().hex}"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": Pwn(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load.*'posix\.system'|refusing.*system"):
        load_checkpoint(path)
    assert not os.path.exists(marker)
    with pytest.raises(UnsafeCheckpointError, match="posix.system|system"):
        import_official(tmp_path / "b", path, "brain")
    assert not os.path.exists(marker)


def test_lightning_objects_are_skipped_and_the_weights_load(tmp_path, monkeypatch):
    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0])}
    path = tmp_path / "last.ckpt"
    lightning_save(monkeypatch, weights, path)
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in \
        torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    ckpt = load_checkpoint(path)
    assert set(ckpt["state_dict"]) == {"w", "b"} and torch.equal(ckpt["state_dict"]["w"], weights["w"])
    assert ckpt["global_step"] == 1234
    (key, state), = ckpt["callbacks"].items()
    assert key.original == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert not hasattr(state["callback"], "best_model_path")  # inert: the pickled state is dropped
    assert "pytorch_lightning" not in sys.modules


# --- a real import: scaled-down networks, official key layout, through the CLI -----------------------

def small_base() -> Config:
    cfg = load_config("paper")
    cfg.data.slice_size = 32
    cfg.vae = VAEConfig(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=32, scale=0.18215)
    cfg.unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                          num_head_channels=32)
    cfg.slice_model.unet = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                      attention_resolutions=(1, 2), num_head_channels=32)
    return cfg


def random_state(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float(), "logvar": torch.zeros(1000)}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """Scaled-down checkpoints in the official layout: stage 2 (+ cond stage aliasing the VAE, no EMA),
    slice model (with a distinct EMA), standalone kl-f8 (+ loss.*), written as Lightning pickles."""
    cfg = official_config("brain", small_base())
    folder = tmp_path_factory.mktemp("official")
    with torch.device("meta"):
        unet, slice_model = build_unet(cfg, volumetric=True), build_slice_model(cfg)
    vae = random_state(ldm_vae_layout(cfg.vae), 1)
    raw = {"model.diffusion_model." + k: v for k, v in random_state(shapes_of(unet.state_dict()), 2).items()}
    volume = dict(raw, **schedule(), **{"first_stage_model." + k: v for k, v in vae.items()},
                  **{"cond_stage_model." + k: v for k, v in vae.items()})
    slice_raw = random_state({k[len("unet."):]: s for k, s in shapes_of(slice_model.state_dict()).items()}, 3)
    slice_sd = dict({"model.diffusion_model." + k: v for k, v in slice_raw.items()}, **schedule(),
                    **{ema_key(k): v + 0.5 for k, v in slice_raw.items()},
                    **{"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(150000)},
                    **{"first_stage_model." + k: v for k, v in vae.items()})
    mp = pytest.MonkeyPatch()
    try:
        lightning_save(mp, volume, folder / "stage2.ckpt")
        lightning_save(mp, slice_sd, folder / "slice.ckpt")
    finally:
        mp.undo()
    torch.save({"state_dict": dict(vae, **{"loss.logvar": torch.zeros(())})}, folder / "kl_f8.ckpt")
    save_config(small_base(), folder / "small.yaml")
    return {"folder": folder, "vae": vae, "unet": raw, "slice": slice_raw, "slice_sd": slice_sd}


def assert_vae_is_diffusers_conversion(bundle_vae, ldm_vae, cfg):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    expected = convert_ldm_vae_checkpoint(dict(ldm_vae), diffusers_vae_config(cfg.vae))
    ours = bundle_vae.state_dict()
    assert set(expected) == set(ours) and all(torch.equal(ours[k], v) for k, v in expected.items())


def test_import_cli_writes_a_usable_bundle(official_files, tmp_path):
    from gem3d.cli import main

    f = official_files["folder"]
    out = tmp_path / "brain_bundle"
    result = CliRunner().invoke(main, ["import-official", "--vae", str(f / "kl_f8.ckpt"), "--volume",
                                       str(f / "stage2.ckpt"), "--slice", str(f / "slice.ckpt"), "--preset", "brain",
                                       "--out", str(out), "--config", str(f / "small.yaml")])
    assert result.exit_code == 0, result.output
    assert "EMA (model_ema.*)" in result.output and "the checkpoint has no EMA" in result.output
    info = read_info(out)
    assert (info["modality"], info["intensity"], info["window_length"], info["latent_scale"]) == \
        ("mri", {"kind": "minmax"}, 16, 0.18215)
    assert info["label_map"] == {"labels": {"1": "edema", "2": "non-enhancing tumour", "3": "enhancing tumour"},
                                 "outside": -1}
    assert info["config"]["mask"] == {"encoding": "vae", "outside_body": True} and info["informed_slice"]
    d = info["config"]["diffusion"]
    assert (d["beta_start"], d["beta_end"], d["num_train_timesteps"], d["beta_schedule"], d["prediction_type"]) == \
        (0.00085, 0.012, 1000, "scaled_linear", "epsilon")
    files = info["provenance"]["files"]
    assert files["volume"]["sha256"] == sha256(f / "stage2.ckpt") and files["volume"]["global_step"] == 1234
    assert files["vae"]["file"] == "kl_f8.ckpt" and files["slice"]["weights"] == "EMA (model_ema.*)"
    command = shlex.split(info["provenance"]["command"])
    assert command[:2] == ["gem3d", "import-official"] and command[command.index("--preset") + 1] == "brain"
    assert command[command.index("--slice") + 1] == str(f / "slice.ckpt")
    assert info["provenance"]["versions"]["gem3d"] and info["volumetric"]

    bundle = load_bundle(out)
    unet = bundle.unet.state_dict()
    assert set(unet) == {k[len("model.diffusion_model."):] for k in official_files["unet"]}
    assert all(torch.equal(unet[k[len("model.diffusion_model."):]], v) for k, v in official_files["unet"].items())
    slice_state = bundle.slice_model.state_dict()
    assert all(torch.equal(slice_state["unet." + k], v + 0.5) for k, v in official_files["slice"].items())  # EMA
    assert_vae_is_diffusers_conversion(bundle.vae, official_files["vae"], bundle.config)


def test_export_then_reimport_is_identical(official_files, tmp_path):
    f = official_files["folder"]
    first = load_bundle(import_official(tmp_path / "a", f / "stage2.ckpt", "brain", vae=f / "kl_f8.ckpt",
                                        slice_model=f / "slice.ckpt", base=small_base()))
    volume = export_official(first, "volume")
    for key, value in official_files["unet"].items():  # the exact official layout comes back
        assert torch.equal(volume[key], value)
    for key, value in official_files["vae"].items():
        assert torch.equal(volume["first_stage_model." + key], value)
    assert len(volume) == len(official_files["unet"]) + len(official_files["vae"])
    paths = save_official(first, tmp_path / "exported")
    second = load_bundle(import_official(tmp_path / "b", paths["volume"], "brain", vae=paths["vae"],
                                         slice_model=paths["slice"], base=small_base()))
    for name in ("vae", "unet", "slice_model"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert second.info["provenance"]["files"]["slice"]["weights"].startswith("training weights")


def test_abdomen_records_the_nnunet_ct_window(official_files, tmp_path):
    from gem3d.cli import main

    f = official_files["folder"]
    plans = tmp_path / "nnUNetPlans.json"
    plans.write_text(json.dumps({"foreground_intensity_properties_per_channel": {
        "0": {"mean": 99.1, "std": 60.2, "percentile_00_5": -58.0, "percentile_99_5": 267.0}}}))
    args = ["import-official", "--volume", str(f / "stage2.ckpt"), "--preset", "abdomen",
            "--config", str(f / "small.yaml")]
    refused = CliRunner().invoke(main, args + ["--out", str(tmp_path / "no")])
    assert refused.exit_code != 0 and "--nnunet-plans" in refused.output and not (tmp_path / "no").exists()
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "ab"), "--nnunet-plans", str(plans)])
    assert result.exit_code == 0, result.output
    info = read_info(tmp_path / "ab")
    assert info["modality"] == "ct" and info["intensity"] == {"kind": "ct_window", "low": -58.0, "high": 267.0}
    assert info["label_map"]["labels"] == {"1": "liver", "2": "kidney", "3": "spleen", "4": "pancreas"}
    assert info["provenance"]["files"]["volume"]["used"].endswith("VAE (its first_stage_model)")
    assert "vae" not in info["provenance"]["files"]


def test_mismatched_vae_or_schedule_is_refused(official_files, tmp_path):
    f = official_files["folder"]
    other = dict(official_files["vae"])
    other["decoder.conv_out.bias"] = other["decoder.conv_out.bias"] + 1e-3
    torch.save({"state_dict": other}, tmp_path / "other_vae.ckpt")
    with pytest.raises(ValueError,
                       match=r"frozen VAE differs .* 1 tensor\(s\).*first_stage_model\.decoder\.conv_out\.bias"):
        import_official(tmp_path / "x", f / "stage2.ckpt", "brain", vae=tmp_path / "other_vae.ckpt",
                        base=small_base())
    sd = dict(official_files["slice_sd"], betas=torch.linspace(1e-4, 2e-2, 1000))  # DDPM linear, not LDM
    torch.save({"state_dict": sd}, tmp_path / "slice_ddpm.ckpt")
    with pytest.raises(ValueError, match="noise schedule"):
        import_official(tmp_path / "y", f / "stage2.ckpt", "brain", slice_model=tmp_path / "slice_ddpm.ckpt",
                        base=small_base())
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_official_conventions_import_the_raw_slice_weights(official_files, tmp_path):
    from gem3d.cli import main

    f = official_files["folder"]
    args = ["import-official", "--volume", str(f / "stage2.ckpt"), "--slice", str(f / "slice.ckpt"),
            "--preset", "brain", "--config", str(f / "small.yaml")]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "official"), "--conventions", "official"])
    assert result.exit_code == 0, result.output
    assert "conventions: official" in result.output and "EMA present but not used" in result.output
    bundle = load_bundle(tmp_path / "official")
    slice_state = bundle.slice_model.state_dict()
    assert all(torch.equal(slice_state["unet." + k], v) for k, v in official_files["slice"].items())  # raw, not EMA
    assert bundle.info["provenance"]["conventions"] == {
        "name": "official", "slice_weights": "raw", "decode": "channel-0", "ddim_final_alpha": "ldm",
        "conditioning": "posterior-sample", "position": "start-slice"}
    ours = read_info(import_official(tmp_path / "ours", f / "stage2.ckpt", "brain", slice_model=f / "slice.ckpt",
                                     base=small_base()))
    assert ours["provenance"]["conventions"]["name"] == "gem3d"
    refused = CliRunner().invoke(main, args + ["--out", str(tmp_path / "no"), "--conventions", "official",
                                               "--weights", "ema"])
    assert refused.exit_code != 0 and "contradicts --conventions official" in refused.output
    assert not (tmp_path / "no").exists()


def test_decode_keeps_channel_0_under_the_official_conventions():
    from gem3d.conventions import get
    from gem3d.models import decode_latents

    cfg = small_base()
    torch.manual_seed(0)
    vae = build_vae(cfg).eval()
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        rgb = vae.decode(z / 0.18215).sample
        ours, official = (decode_latents(vae, z, 0.18215, channel=get(name).decode_channel)
                          for name in ("gem3d", "official"))
    assert rgb.shape[1] == 3 and not torch.allclose(rgb[:, 0], rgb[:, 1])       # the channels differ
    assert torch.equal(official, rgb[:, :1]) and torch.allclose(ours, rgb.mean(1, keepdim=True))


def test_ddim_ends_at_ldms_alpha_bar_under_the_official_conventions():
    from gem3d.conventions import get
    from gem3d.sampling.schedulers import make_scheduler

    ours, official = (make_scheduler("ddim", 10, alpha_to_one=get(n).alpha_to_one) for n in ("gem3d", "official"))
    assert float(ours.final_alpha_cumprod) == 1.0
    assert float(official.final_alpha_cumprod) == pytest.approx(1 - 0.00085, abs=1e-6)   # alpha-bar(t=0)


def test_generate_with_the_official_conventions(tiny_bundle, brain_phantom, tmp_path):
    from gem3d.engine import Engine
    from gem3d.grid import slice_position
    from gem3d.io import read_volume
    from gem3d.request import GenerateRequest, InformedSpec

    def generate(conventions, name):
        out = tmp_path / f"{name}.nii.gz"
        request = GenerateRequest(reference=str(brain_phantom / "imagesTr" / "brain_000_0000.nii.gz"),
                                  mask=str(brain_phantom / "labelsTr" / "brain_000.nii.gz"), out=str(out),
                                  informed=InformedSpec("generated"), start=0.5, sampler="ddim", steps=3, seed=4)
        events = list(Engine(tiny_bundle, "cpu", conventions).generate(request))
        assert events[-1]["event"] == "finished", events[-1]
        record = json.loads(out.with_name(f"{name}.provenance.json").read_text())
        return read_volume(out).array, record, events[0]

    ours, ours_record, started = generate(None, "ours")
    official, record, _ = generate("official", "official")
    again, _, _ = generate("official", "again")
    assert ours_record["conventions"]["name"] == "gem3d" and record["conventions"]["name"] == "official"
    z = 12                                             # the phantom's slices; window 4, start 0.5 -> slice 6
    assert record["informed_slice"]["position"] == pytest.approx(slice_position(6, z))            # start slice
    assert ours_record["informed_slice"]["position"] == pytest.approx(slice_position(6 + 2, z))   # window centre
    assert not np.allclose(ours, official) and np.array_equal(official, again)   # sampled, but seeded
    with pytest.raises(ValueError, match="unknown conventions"):
        Engine(tiny_bundle, "cpu", "authors")
