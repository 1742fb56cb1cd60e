"""A gem3d bundle -> official LDM key layout (the inverse of importing).

For running a bundle's weights in the official code, or for checking an import:
exporting then re-importing gives identical tensors. The VAE goes back to the
LDM layout through the inverse of diffusers' own conversion (keymap.vae_key_map);
the UNets are `model.diffusion_model.` + our keys. Only weights are written:
the official `init_from_ckpt` loads non-strictly and recomputes its schedule
buffers, and its stage 1/2 conditioning stage is the same VAE module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import torch

from gem3d.bundle import Bundle
from gem3d.official.keymap import UNET, VAE, diffusers_vae_config, ldm_vae_layout, vae_key_map

PARTS = ("volume", "slice", "vae")


def _ldm_vae(bundle: Bundle) -> Dict[str, torch.Tensor]:
    layout = ldm_vae_layout(bundle.config.vae)
    ours = bundle.vae.state_dict()
    return {ldm: ours[key].reshape(layout[ldm]) for key, (ldm, _) in
            vae_key_map(layout, diffusers_vae_config(bundle.config.vae)).items()}


def export_official(bundle: Bundle, part: str = "volume") -> Dict[str, torch.Tensor]:
    """The state_dict of an official checkpoint: "volume" (stage-2 LatentDiffusion: UNet + first_stage_model),
    "slice" (the slice model's LatentDiffusion) or "vae" (a standalone kl-f8 model.ckpt)."""
    if part not in PARTS:
        raise ValueError(f"export_official: part must be one of {PARTS}, got {part!r}")
    vae = _ldm_vae(bundle)
    if part == "vae":
        return vae
    if part == "slice" and bundle.slice_model is None:
        raise ValueError(f"{bundle.path}: the bundle has no slice model to export")
    unet = bundle.unet if part == "volume" else bundle.slice_model.unet
    state = {UNET + k: v for k, v in unet.state_dict().items()}
    state.update({VAE + k: v for k, v in vae.items()})
    return state


def save_official(bundle: Bundle, folder: Union[str, Path]) -> Dict[str, Path]:
    """volume.ckpt, slice.ckpt (when the bundle has one) and kl_f8.ckpt as {"state_dict": ...} files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part in PARTS:
        if part == "slice" and bundle.slice_model is None:
            continue
        paths[part] = folder / f"{'kl_f8' if part == 'vae' else part}.ckpt"
        torch.save({"state_dict": export_official(bundle, part)}, paths[part])
    return paths
