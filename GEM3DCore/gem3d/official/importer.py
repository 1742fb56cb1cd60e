"""Official GEM-3D checkpoints (HKU-MedAI/GEM-3D, PyTorch Lightning) -> a gem3d model bundle.

The bundle's configuration is the `paper` preset (the official architecture)
with the conventions the official data code trained with (ldm/data/*.py on
nnU-Net-preprocessed data):
- brain: MSD Task01 BrainTumour, FLAIR only; labels 1 edema, 2 non-enhancing
  tumour, 3 enhancing tumour (mask / 3); per-volume min-max.
- abdomen: AbdomenCT-1K; labels 1 liver, 2 kidney, 3 spleen, 4 pancreas
  (mask / 4). nnU-Net clipped every CT to its dataset's foreground 0.5-99.5
  percentile HU range before the per-volume min-max, so the model saw that
  fixed HU window mapped to [-1, 1]; the window comes from the dataset's
  nnUNetPlans.json / dataset_fingerprint.json (or is given).
Both: VAE-encoded masks with -1 outside the body (nnU-Net), windows of 16
slices, 512 x 512 slices, latent scale 0.18215, LDM linear betas
0.00085..0.012 over 1000 steps, eps prediction.
"""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from gem3d import config as config_lib
from gem3d import conventions as conventions_lib
from gem3d import typed
from gem3d.bundle import save_bundle
from gem3d.config import Config
from gem3d.labels import ABDOMEN_CT1K, MSD_BRAIN
from gem3d.official.keymap import (COND, UNET, VAE, MappingError, Plan, diffusers_vae_config, plan_checkpoint,
                                   shapes_of)
from gem3d.official.safe_load import load_checkpoint, sha256, state_dict_of, training_info

PathLike = Union[str, Path]
LATENT_SCALE = 0.18215  # scale_factor of every official config
REGIONS = {
    "brain": {"dataset": "MSD Task01 BrainTumour, FLAIR only (nnU-Net Dataset202_Brain)", "modality": "mri",
              "labels": MSD_BRAIN},
    "abdomen": {"dataset": "AbdomenCT-1K (nnU-Net Dataset200_Abdomen)", "modality": "ct", "labels": ABDOMEN_CT1K},
}
NOTES = {
    "brain": {
        "labels": "MSD Task01 labels (1 edema, 2 non-enhancing tumour, 3 enhancing tumour); a BraTS 2021 mask "
                  "(1 necrosis, 2 edema, 4 enhancing) must be relabelled 1->2, 2->1, 4->3 first.",
        "intensity": "official inputs: nnU-Net z-score inside the head, background left at 0 (= the head's mean "
                     "intensity), then per-volume min-max to [-1, 1]. Raw min-max of a skull-stripped FLAIR matches "
                     "this inside the head (exactly when its darkest head voxel is 0); the official background sat "
                     "at the head's mean level, not at -1.",
    },
    "abdomen": {
        "intensity": "official inputs: nnU-Net CT normalisation (clip to the dataset's foreground 0.5-99.5 "
                     "percentiles, z-score), then per-volume min-max: that fixed HU window whenever a CT reaches "
                     "both bounds (air and bone: practically always), which is how it is recorded.",
    },
}
SAMPLER_NOTE = "official inference: DDIM, 200 steps, eta 1, overlap 1 slice, window 16"


def ct_window_from_plans(path: PathLike) -> Tuple[float, float]:
    """The HU clip window nnU-Net used: foreground 0.5 / 99.5 percentiles of channel 0 in an
    nnUNetPlans.json or dataset_fingerprint.json."""
    try:
        props = typed.load_json(path)["foreground_intensity_properties_per_channel"]["0"]
        return float(props["percentile_00_5"]), float(props["percentile_99_5"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: no CT intensity properties (foreground_intensity_properties_per_channel."
                         f"0.percentile_00_5/_99_5) in it: {err}") from None


def official_config(region: str, base: Union[str, Config] = "paper", informed_slice: bool = True,
                    ct_window: Optional[Sequence[float]] = None) -> Config:
    """`base` (architecture, slice size; default `paper`) with the region's official data conventions."""
    if region not in REGIONS:
        raise ValueError(f"unknown official preset {region!r}; choose one of {sorted(REGIONS)}")
    spec = REGIONS[region]
    if (spec["modality"] == "ct") != (ct_window is not None):
        raise ValueError("the abdomen (CT) models need the HU window nnU-Net clipped to (--nnunet-plans FILE or "
                         "--ct-window LOW HIGH)" if ct_window is None else
                         f"a CT window applies to the abdomen models only, not {region!r}")
    data = config_lib.to_dict(base if isinstance(base, Config) else config_lib.load_config(base))
    data["name"] = f"gem3d-official-{region}"
    data["informed_slice"] = informed_slice
    data["data"].update(dataset=spec["dataset"], modality=spec["modality"], normalisation="minmax",
                        labels={str(k): v for k, v in spec["labels"].names.items()})
    if ct_window is not None:
        data["data"]["hu_window"] = [float(v) for v in ct_window]
    data["vae"]["scale"] = LATENT_SCALE
    data["mask"] = {"encoding": "vae", "outside_body": True}
    data["diffusion"] = config_lib.to_dict(config_lib.Config())["diffusion"]  # LDM linear = scaled_linear
    data["window_length"] = 16
    return config_lib.from_dict(data)


def _check_schedule(sd: Dict[str, torch.Tensor], cfg: Config, where: str) -> None:
    d = cfg.diffusion
    if "betas" in sd:
        betas = torch.linspace(d.beta_start ** 0.5, d.beta_end ** 0.5, d.num_train_timesteps, dtype=torch.float64) ** 2
        found = sd["betas"].double()
        if found.shape != betas.shape or not torch.allclose(found, betas, rtol=1e-4, atol=1e-7):
            raise ValueError(f"{where}: its noise schedule (betas) is not LDM 'linear' {d.beta_start}..{d.beta_end} "
                             f"over {d.num_train_timesteps} steps, which the bundle would record")
    if "scale_factor" in sd and abs(float(sd["scale_factor"]) - cfg.vae.scale) > 1e-6:
        raise ValueError(f"{where}: latent scale_factor {float(sd['scale_factor'])} != {cfg.vae.scale}")


def _fill(module: torch.nn.Module, sd: Dict[str, torch.Tensor], sources: Dict[str, str], prefix: str = "") -> None:
    """Assign checkpoint tensors (memory-mapped, no copy for float32) to a meta-built module."""
    wanted = module.state_dict()
    state = {prefix + k: sd[src].to(torch.float32).reshape(wanted[prefix + k].shape).contiguous()
             for k, src in sources.items()}
    module.load_state_dict(state, strict=True, assign=True)


def _same_vae(sd: Dict[str, torch.Tensor], vae: torch.nn.Module, mapping: Dict[str, str], where: str) -> None:
    """A checkpoint's frozen VAE copy (and the cond stage that aliases it) must equal the bundle's VAE."""
    ours = vae.state_dict()
    differ = [ck for dk, ck in mapping.items()
              if not torch.equal(sd[ck].to(torch.float32).reshape(ours[dk].shape), ours[dk])]
    differ += [k for k in sd if k.startswith(COND) and not torch.equal(sd[k], sd[VAE + k[len(COND):]])]
    if differ:
        raise ValueError(f"{where}: its frozen VAE differs from the VAE being imported in {len(differ)} tensor(s) "
                         f"(e.g. {differ[:3]}); pass the kl-f8 the model was trained with, or omit --vae to use "
                         f"the copy stored in the volume checkpoint")


def _describe(path: Path, ckpt: object, what: str, plan: Optional[Plan] = None) -> dict:
    entry = {"file": path.name, "sha256": sha256(path), "used": what, **training_info(ckpt)}
    if plan is not None and "unet" in plan.sources:
        entry["weights"] = ("EMA (model_ema.*)" if plan.ema else "training weights (model.diffusion_model.*); "
                            + ("EMA present but not used" if plan.has_ema else "the checkpoint has no EMA"))
    return entry


def _load(path: Path):
    ckpt = load_checkpoint(path)
    return ckpt, state_dict_of(ckpt, str(path))


def _volume_kind(sd: Dict[str, torch.Tensor], where: Path, latent: int) -> Tuple[bool, bool]:
    """(informed_slice, volumetric) of a volume checkpoint, from its keys and first conv."""
    first = sd.get(UNET + "input_blocks.0.0.weight")
    if first is None or first.ndim != 4:
        raise MappingError(f"{where}: no 4-D '{UNET}input_blocks.0.0.weight': not a GEM-3D LDM checkpoint")
    if first.shape[1] not in (3 * latent, 2 * latent):
        raise MappingError(f"{where}: the UNet takes {first.shape[1]} input channels; GEM-3D takes "
                           f"{3 * latent} (noise, mask, informed slice), the mask-only baseline {2 * latent}")
    volumetric = any(("_tem" in k or "temporal_conv" in k) for k in sd if k.startswith(UNET))
    return first.shape[1] == 3 * latent, volumetric


def import_official(out: PathLike, volume: PathLike, region: str, vae: Optional[PathLike] = None,
                    slice_model: Optional[PathLike] = None, base: Union[str, Config] = "paper",
                    use_ema: Optional[bool] = None, ct_window: Optional[Sequence[float]] = None,
                    command: Optional[str] = None, overwrite: bool = False,
                    conventions: Optional[str] = None) -> Path:
    """Write a bundle at `out` from a stage-2 (or stage-1) volume checkpoint, the kl-f8 VAE (a standalone
    file, or the copy inside the volume checkpoint when `vae` is None) and optionally the slice model.

    `base` gives the architecture (default: the official `paper` sizes); use_ema None = EMA where present.
    `conventions` (gem3d.conventions; default ours) is recorded in the provenance and becomes the
    bundle's default for `generate`; "official" imports the slice model's raw training weights.
    Every checkpoint key must be used or skipped for a stated reason and every tensor of ours filled with
    an equal shape (MappingError otherwise); frozen VAE copies must equal the imported VAE."""
    from gem3d.models import build_slice_model, build_unet, build_vae

    conv = conventions_lib.get(conventions)
    slice_ema = use_ema
    if conv.slice_weights == "raw":
        if use_ema:
            raise ValueError(f"--weights ema contradicts --conventions {conv.name}, which samples the slice "
                             "model with its raw training weights")
        slice_ema = False
    volume = Path(volume)
    vol_ckpt, vol_sd = _load(volume)
    base_cfg = base if isinstance(base, Config) else config_lib.load_config(base)
    informed, volumetric = _volume_kind(vol_sd, volume, base_cfg.vae.latent_channels)
    cfg = official_config(region, base_cfg, informed_slice=informed, ct_window=ct_window)
    with torch.device("meta"):
        modules = {"vae": build_vae(cfg), "unet": build_unet(cfg, volumetric=volumetric)}
        if slice_model is not None:
            modules["slice_model"] = build_slice_model(cfg)
    want = {name: shapes_of(m.state_dict()) for name, m in modules.items()}
    vae_cfg = diffusers_vae_config(cfg.vae)

    plan = plan_checkpoint(shapes_of(vol_sd), str(volume), unet=want["unet"],
                           vae=want["vae"] if vae is None else None, vae_config=vae_cfg, use_ema=use_ema)
    _check_schedule(vol_sd, cfg, str(volume))
    _fill(modules["unet"], vol_sd, plan.sources["unet"])
    stage = "stage 2, with volumetric layers" if volumetric else "stage 1, no volumetric layers"
    files = {"volume": _describe(volume, vol_ckpt, f"volume UNet ({stage})", plan)}
    if vae is None:
        _fill(modules["vae"], vol_sd, plan.sources["vae"])
        files["volume"]["used"] += " and VAE (its first_stage_model)"
    else:
        vae = Path(vae)
        vae_ckpt, vae_sd = _load(vae)
        vae_plan = plan_checkpoint(shapes_of(vae_sd), str(vae), vae=want["vae"], vae_config=vae_cfg)
        _fill(modules["vae"], vae_sd, vae_plan.sources["vae"])
        files["vae"] = _describe(vae, vae_ckpt, "VAE (LDM kl-f8 -> diffusers AutoencoderKL)")
    _same_vae(vol_sd, modules["vae"], plan.frozen_vae, str(volume))
    if slice_model is not None:
        slice_model = Path(slice_model)
        slice_ckpt, slice_sd = _load(slice_model)
        inner = {k[len("unet."):]: s for k, s in want["slice_model"].items()}
        slice_plan = plan_checkpoint(shapes_of(slice_sd), str(slice_model), unet=inner, vae_config=vae_cfg,
                                     use_ema=slice_ema)
        _check_schedule(slice_sd, cfg, str(slice_model))
        _fill(modules["slice_model"], slice_sd, slice_plan.sources["unet"], prefix="unet.")
        _same_vae(slice_sd, modules["vae"], slice_plan.frozen_vae, str(slice_model))
        files["slice"] = _describe(slice_model, slice_ckpt, "slice model (position-conditioned)", slice_plan)
    provenance = _provenance(region, cfg, files, command, conv)
    return save_bundle(out, cfg, modules, provenance, overwrite=overwrite)


def _provenance(region: str, cfg: Config, files: dict, command: Optional[str],
                conv: conventions_lib.Conventions) -> dict:
    import diffusers

    import gem3d

    notes = dict(NOTES[region], sampler=SAMPLER_NOTE)
    if not cfg.informed_slice:
        notes["baseline"] = "mask-only baseline (Make-A-Volume variant): no informed slice"
    return {
        "source": "official GEM-3D checkpoints (github.com/HKU-MedAI/GEM-3D, arXiv 2403.12852), imported",
        "command": command or f"gem3d.official.import_official(region={region!r})",
        "files": files,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"gem3d": gem3d.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "notes": notes,
        "conventions": conv.to_dict(),
    }
