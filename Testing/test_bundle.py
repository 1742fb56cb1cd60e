"""Bundles: save/load round trip, `gem3d bundle info` (a bundle, or a config on the meta
device), and one clear line + exit code 1 for each kind of broken bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import gem3d
from gem3d.bundle import load_bundle, save_bundle
from gem3d.cli import main
from gem3d.config import load_config
from gem3d.models import build_slice_model, build_unet, build_vae

PROVENANCE = {"command": "gem3d train all --config tiny --dataset d --out r",
              "final_losses": {"vae": 0.0312, "stage1": 0.1234}, "wall_s": 12.0}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = load_config("tiny")
    cfg.vae.scale = 0.77
    torch.manual_seed(0)
    modules = {"vae": build_vae(cfg), "unet": build_unet(cfg, volumetric=True), "slice_model": build_slice_model(cfg)}
    with torch.no_grad():  # no zero-initialised tensors left: a dropped tensor would load unnoticed
        for module in modules.values():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    path = save_bundle(tmp_path_factory.mktemp("b") / "tiny", cfg, modules, PROVENANCE)
    return path, modules


def broken_copy(saved, tmp_path):
    path = tmp_path / "bundle"
    shutil.copytree(saved[0], path)
    return path


def info(*args):
    return CliRunner().invoke(main, ["bundle", "info", *map(str, args)])


def test_round_trip_gives_equal_tensors(saved):
    path, modules = saved
    bundle = load_bundle(path)
    for name, module in modules.items():
        loaded = getattr(bundle, name).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in module.state_dict().items()), name
    assert bundle.config.vae.scale == 0.77 and bundle.unet.volumetric


def test_info_prints_the_summary_and_parameter_counts(saved):
    path, modules = saved
    result = info(path)
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("name:           tiny", "window length:  8", "latent scale:   0.77", "volumetric:     True",
                 "1 necrosis, 2 edema, 3 enhancing, -1 outside", "slice size:     64",
                     "dpm++, 20 steps by default; other samplers 200 steps unless --steps is given",
                 PROVENANCE["command"], "vae 0.0312, stage1 0.1234"):
        assert text in out, text
    for name, module in modules.items():
        assert f"{sum(p.numel() for p in module.parameters()):,}" in out, name


def test_info_counts_the_paper_config_without_weights():
    result = info("--config", "paper")
    assert result.exit_code == 0, result.output
    assert "83,653,863" in result.output  # the Stable-Diffusion kl-f8 VAE


def test_info_needs_a_bundle_or_a_config():
    assert info().exit_code == 2


def test_the_committed_demo_bundle_loads_with_its_recipe():
    path = Path(gem3d.__file__).parent / "resources" / "demo_bundle"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2 ** 20
    bundle = load_bundle(path)
    prov = bundle.info["provenance"]
    assert "gem3d train all --config configs/demo.yaml" in prov["command"]
    assert prov["notes"]["dataset_command"].startswith("gem3d phantom --kind brain")
    assert set(prov["final_losses"]) == {"vae", "stage1", "stage2", "slice"}
    assert bundle.unet.volumetric and bundle.slice_model is not None and bundle.window_length == 8


def edit_json(path, change):
    info_file = path / "bundle.json"
    data = json.loads(info_file.read_text())
    change(data)
    info_file.write_text(json.dumps(data))


def wrong_version(path):
    edit_json(path, lambda d: d.update(format_version=99))


def missing_weights(path):
    (path / "unet.safetensors").unlink()


def wrong_shape(path):
    state = load_file(str(path / "vae.safetensors"))
    key = next(k for k in state if k.endswith("conv_in.weight"))
    state[key] = state[key][:, :, :2].contiguous()
    save_file(state, str(path / "vae.safetensors"))


def edited_summary(path):
    edit_json(path, lambda d: d.update(window_length=16))


@pytest.mark.parametrize("breakage, message", [
    (wrong_version, "format_version 99 is not supported"),
    (missing_weights, "weights of 'unet' are missing"),
    (wrong_shape, "other shapes"),
    (edited_summary, "['window_length'] disagree with the 'config' section"),
])
def test_broken_bundles_give_one_clear_line(saved, tmp_path, breakage, message):
    path = broken_copy(saved, tmp_path)
    assert info(path).exit_code == 0
    breakage(path)
    result = info(path)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1 and message in result.output
