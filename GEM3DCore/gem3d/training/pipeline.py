"""A training run folder and the order of its stages: vae -> stage1 -> stage2 -> slice -> bundle.

RUN_DIR/
  config.yaml                 the run's configuration (a resumed run must match it)
  models/<stage>.safetensors  each finished stage's EMA weights + its result (steps,
                              final loss, wall time; the VAE also its latent scale and z filter)
  checkpoints/<stage>/        resumable training state (see checkpoint.py)
  previews/<stage>_<step>.png
  bundle/                     written by `train all` (or `write_bundle`)

Stages can run one at a time (`gem3d train stage1 ...`) or all in one process, which
encodes the latents once. A stage with 0 steps is skipped, except the VAE: 0 VAE steps
means a pretrained VAE given as a safetensors file, used frozen with the config's scale.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Dict, Optional

import diffusers
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gem3d
from gem3d import config as config_lib
from gem3d import typed
from gem3d.bundle import cpu_tensors, save_bundle
from gem3d.config import Config
from gem3d.models import build_slice_model, build_unet, build_vae
from gem3d.through_plane import calibrate_vae
from gem3d.training import stages
from gem3d.training.data import LatentCache, TrainingSet, latent_scale, load_training_set, raw_latents
from gem3d.training.distributed import Context
from gem3d.training.trainer import fit

STAGES = ("vae", "stage1", "stage2", "slice")


class Run:
    """One run folder; loads the dataset and encodes its latents lazily, once."""

    def __init__(self, cfg: Config, dataset, run_dir, ctx: Context, resume: bool = True,
                 vae_weights: Optional[Path] = None):
        self.cfg, self.dataset, self.dir, self.ctx = cfg, Path(dataset), Path(run_dir), ctx
        self.resume, self.vae_weights = resume, vae_weights
        self._set: Optional[TrainingSet] = None
        self._vae: Optional[torch.nn.Module] = None
        self._cache: Optional[LatentCache] = None
        self._raw: Optional[list] = None  # unscaled latents the VAE stage already computed
        self._began = time.perf_counter()
        self._check_config()

    def _check_config(self) -> None:
        """A resumed run must train the same networks on the same grid (train.* may change)."""
        file = self.dir / "config.yaml"
        given = config_lib.to_dict(self.cfg)
        if file.exists():
            before = config_lib.to_dict(config_lib.load_config(file))
            changed = sorted(k for k in given if k != "train" and given[k] != before[k])
            if changed:
                raise ValueError(f"{self.dir} was started with another configuration (differs in "
                                 f"{changed}); use a new --out folder or the run's {file}")
        elif self.ctx.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            config_lib.save_config(self.cfg, file)
        self.ctx.barrier()

    @property
    def training_set(self) -> TrainingSet:
        if self._set is None:
            self._set = load_training_set(self.dataset, self.cfg)
        return self._set

    def steps(self, name: str) -> int:
        return getattr(self.cfg.train, f"{name}_steps")

    def output(self, name: str) -> Path:
        return self.dir / "models" / f"{name}.safetensors"

    def _save_output(self, name: str, module: torch.nn.Module, result: dict) -> None:
        if self.ctx.main:
            self.output(name).parent.mkdir(parents=True, exist_ok=True)
            save_file(cpu_tensors(module.state_dict()), str(self.output(name)), metadata={"stage": name, "result": json.dumps(result)})
        self.ctx.barrier()

    def result(self, name: str) -> dict:
        """A finished stage's result (steps, final_loss, wall_s, ...)."""
        file = self.output(name)
        if not file.is_file():
            raise ValueError(f"{file} is missing: run `gem3d train {name}` on this run folder first")
        with safe_open(str(file), framework="pt") as f:
            return typed.loads(f.metadata()["result"], f"{file} metadata")

    def _load(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        self.result(name)
        module.load_state_dict(load_file(str(self.output(name))))
        return module.to(self.ctx.device)

    def vae(self) -> torch.nn.Module:
        """The trained (or pretrained) VAE, frozen; sets cfg.vae.scale to its latent scale and
        cfg.vae.through_plane to its calibrated z filter (0 for runs made before it existed)."""
        if self._vae is None:
            self._use_vae(self._load("vae", build_vae(self.cfg)), self.result("vae"))
        return self._vae

    def cache(self) -> LatentCache:
        if self._cache is None:
            self._cache = LatentCache(self.training_set.cases, self.vae(), self.cfg, self.ctx.device, self._raw)
        return self._cache

    def stage(self, name: str) -> stages.Stage:
        """The stage `name`, built from a seeded initialisation (and earlier stages' weights)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        torch.manual_seed(self.cfg.train.seed)
        if name == "vae":
            vae = build_vae(self.cfg).to(self.ctx.device)
            return stages.vae_stage(self.cfg, vae, self.training_set.cases)
        if name == "stage1":
            return stages.stage1(self.cfg, build_unet(self.cfg).to(self.ctx.device), self.vae(), self.cache())
        if name == "stage2":
            return stages.stage2(self.cfg, self._load("stage1", build_unet(self.cfg)), self.vae(), self.cache())
        model = build_slice_model(self.cfg).to(self.ctx.device)
        return stages.slice_stage(self.cfg, model, self.vae(), self.cache())

    def train(self, name: str) -> dict:
        """Run one stage (resuming its checkpoints) and save its EMA weights to models/;
        {} for a skipped stage."""
        if name == "vae" and self.steps("vae") == 0:
            return self._pretrained_vae()
        if self.steps(name) == 0:
            return {}
        return self.run_stage(self.stage(name))

    def run_stage(self, stage: stages.Stage) -> dict:
        result = fit(stage, self.cfg, self.dir, self.ctx, self.resume)
        if stage.name == "vae":
            raw = raw_latents(stage.model, self.training_set.cases, self.ctx.device)
            result["latent_scale"] = latent_scale(raw)
            result["through_plane"] = self._calibrated_through_plane(stage.model, result["latent_scale"])
            self._use_vae(stage.model, result, raw)
        self._save_output(stage.name, stage.model, result)
        return result

    def _pretrained_vae(self) -> dict:
        if self.vae_weights is None:
            raise ValueError("train.vae_steps is 0: give the pretrained VAE with --vae-weights FILE")
        vae = build_vae(self.cfg).to(self.ctx.device)
        vae.load_state_dict(load_file(str(self.vae_weights), device=str(self.ctx.device)))
        result = {"steps": 0, "pretrained": str(self.vae_weights), "latent_scale": self.cfg.vae.scale,
                  "through_plane": self._calibrated_through_plane(vae, self.cfg.vae.scale)}
        self._use_vae(vae, result)
        self._save_output("vae", vae, result)
        return result

    def _calibrated_through_plane(self, vae: torch.nn.Module, scale: float) -> float:
        """The z filter this VAE's per-slice decoding needs (`gem3d.through_plane`: the stripe fix)."""
        return calibrate_vae(vae, scale, [case.image for case in self.training_set.cases])

    def _use_vae(self, vae: torch.nn.Module, result: dict, raw=None) -> None:
        """Use `vae` from now on; its latent scale and z filter are cfg.vae's (the bundle's
        facts), and diffusers' own copy of the scale is kept equal for code that reads it."""
        scale = float(result["latent_scale"])
        self.cfg.vae.scale, self.cfg.vae.through_plane = scale, float(result.get("through_plane", 0.0))
        vae.register_to_config(scaling_factor=scale)
        self._vae = vae.eval().requires_grad_(False)
        self._cache, self._raw = None, raw

    def write_bundle(self, command: str, notes: Optional[Dict[str, str]] = None) -> Path:
        """RUN_DIR/bundle from the finished stages' weights, with provenance."""
        trained = [name for name in STAGES if self.steps(name) > 0 or name == "vae"]
        # stage 2's file holds the whole UNet (its frozen stage-1 weights included)
        unet_stage = "stage2" if "stage2" in trained else "stage1"
        unet = self._load(unet_stage, build_unet(self.cfg, volumetric=unet_stage == "stage2"))
        modules = {"vae": self.vae(), "unet": unet}
        if "slice" in trained:
            modules["slice_model"] = self._load("slice", build_slice_model(self.cfg))
        results = {name: self.result(name) for name in trained}
        provenance = {
            "command": command,
            "notes": dict(notes or {}),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dataset": {"path": str(self.dataset), "format": self.training_set.format,
                        "cases": len(self.training_set.cases),
                        "label_mapping": {str(k): v for k, v in self.training_set.label_mapping.items()}},
            "stages": results,
            "final_losses": {name: r.get("final_loss") for name, r in results.items()},
            "wall_s": round(sum(r.get("wall_s", 0.0) for r in results.values()), 1),
            "process_wall_s": round(time.perf_counter() - self._began, 1),
            "versions": {"gem3d": gem3d.__version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__},
            "machine": machine(self.ctx),
        }
        path = self.dir / "bundle"
        if self.ctx.main:
            save_bundle(path, self.cfg, modules, provenance, overwrite=True)
        self.ctx.barrier()
        return path


def machine(ctx: Context) -> dict:
    device = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device,
            "processes": ctx.world, "torch_threads": torch.get_num_threads()}


def train(run: Run, what: str, command: str, notes: Optional[Dict[str, str]] = None) -> Dict[str, dict]:
    """Train one stage, or "all" of them in order and write the bundle."""
    results = {name: run.train(name) for name in (STAGES if what == "all" else (what,))}
    if what == "all":
        run.write_bundle(command, notes)
    return results
