"""Model bundles: a folder with `bundle.json` (its format: `gem3d.bundle_format`) and
`*.safetensors` weights.

A bundle is everything the engine needs to run a trained model. Weights are safetensors,
so loading a bundle never unpickles anything. Loading checks bundle.json and every
tensor's name and shape, and says precisely what is wrong.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gem3d import config as config_lib
from gem3d.bundle_format import (FORMAT, FORMAT_VERSION, PARTS, BundleError, BundleFacts, describe_config,
                                 read_info)
from gem3d.config import Config

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def cpu_tensors(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies: what safetensors can write."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


@dataclass
class Bundle(BundleFacts):
    """A loaded bundle: configuration, conventions and the modules (eval mode)."""

    path: Path
    info: dict
    config: Config
    vae: torch.nn.Module
    unet: torch.nn.Module
    slice_model: Optional[torch.nn.Module] = None

    def to(self, device: Union[str, torch.device]) -> "Bundle":
        for module in (self.vae, self.unet, self.slice_model):
            if module is not None:
                module.to(device)
        return self


def save_bundle(path: Union[str, Path], cfg: Config, modules: Dict[str, torch.nn.Module],
                provenance: dict, overwrite: bool = False) -> Path:
    """Write a bundle atomically (a temporary sibling folder renamed into place)."""
    path = Path(path)
    unknown = set(modules) - set(PARTS)
    if unknown or "vae" not in modules or "unet" not in modules:
        raise BundleError(f"a bundle needs modules 'vae' and 'unet' (optional 'slice_model'), got {sorted(modules)}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another folder or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        weights = {}
        for name, module in modules.items():
            save_file(cpu_tensors(module.state_dict()), str(tmp / f"{name}.safetensors"), metadata={"format": FORMAT, "part": name})
            weights[name] = f"{name}.safetensors"
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": cfg.name,
                **describe_config(cfg),
                "volumetric": bool(getattr(modules["unet"], "volumetric", False)),
                "weights": weights, "config": config_lib.to_dict(cfg), "provenance": provenance}
        (tmp / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _check_tensors(file: Path, module: torch.nn.Module, part: str) -> None:
    if not file.is_file():
        raise BundleError(f"{file}: weights of '{part}' are missing")
    state = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()}
    try:
        with safe_open(str(file), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError, OSError...
        raise BundleError(f"{file}: not a readable safetensors file ({err}); it is truncated or "
                          "corrupt, copy or export the bundle again") from None
    problems = []
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    shapes = [f"{k}: {found[k]} != {expected[k]}" for k in sorted(set(found) & set(expected))
              if found[k] != expected[k]]
    if shapes:
        problems.append(f"{len(shapes)} with other shapes (e.g. {shapes[:3]})")
    wrong = [f"{k}: {dtypes[k]} != {SAFETENSORS_DTYPES.get(state[k].dtype, state[k].dtype)}"
             for k in sorted(set(found) & set(expected))
             if dtypes[k] != SAFETENSORS_DTYPES.get(state[k].dtype, dtypes[k])]
    if wrong:
        problems.append(f"{len(wrong)} with another dtype (e.g. {wrong[:3]})")
    if problems:
        raise BundleError(f"{file}: tensors do not match the configured '{part}': " + "; ".join(problems))


def _load_finite(file: Path) -> Dict[str, torch.Tensor]:
    """The tensors of `file`; a NaN/Inf weight would silently give a NaN volume."""
    try:
        tensors = load_file(str(file))
    except Exception as err:
        raise BundleError(f"{file}: cannot read its tensors ({err}); the file is corrupt, copy or export "
                          "the bundle again") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise BundleError(f"{file}: tensor '{name}' holds {bad} NaN/Inf values of {tensor.numel()}; "
                                  "the weights are broken (a diverged training run?); use another bundle")
    return tensors


def load_bundle(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Bundle:
    """Rebuild the modules from bundle.json and fill them from safetensors (strict)."""
    from gem3d.models import build_slice_model, build_unet, build_vae

    path = Path(path)
    info = read_info(path)
    cfg = config_lib.from_dict(info["config"])
    modules = {"vae": build_vae(cfg), "unet": build_unet(cfg)}
    if info["volumetric"]:
        modules["unet"].add_volumetric_layers()
    if "slice_model" in info["weights"]:
        modules["slice_model"] = build_slice_model(cfg)
    for part, module in modules.items():
        file = path / info["weights"].get(part, f"{part}.safetensors")
        _check_tensors(file, module, part)
        module.load_state_dict(_load_finite(file))
        module.eval().requires_grad_(False)
    return Bundle(path, info, cfg, **modules).to(device)


def parameter_counts(modules: Dict[str, Optional[torch.nn.Module]]) -> Dict[str, int]:
    """Parameters per part (None parts skipped), plus the volumetric layers' share of the UNet."""
    from gem3d.models import volumetric_parameters

    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items() if m is not None}
    if getattr(modules["unet"], "volumetric", False):
        counts["unet (volumetric layers)"] = sum(p.numel() for p in volumetric_parameters(modules["unet"]))
    return counts
