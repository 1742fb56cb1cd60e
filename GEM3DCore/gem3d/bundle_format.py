"""The model-bundle format: `bundle.json`, read and checked without loading any weights.

Torch-free, so the editor shows and checks a bundle in Slicer's own Python; `gem3d.bundle`
loads the weights. bundle.json holds the network configuration (the one source of truth),
a summary derived from it (modality, label map, intensity normalisation, slice size, window
length, latent scale, the default sampler), the weight files and provenance.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple, Union

from gem3d import config as config_lib
from gem3d import typed
from gem3d.config import Config
from gem3d.labels import LabelMap
from gem3d.sampler_settings import resolve_sampler

FORMAT = "gem3d-bundle"
FORMAT_VERSION = 1
PARTS = ("vae", "unet", "slice_model")
DEMO_BUNDLE = Path(__file__).resolve().parent / "resources" / "demo_bundle"


class BundleError(ValueError):
    """A bundle folder that cannot be used, with the reason."""


def cfg_label_map(cfg: Config) -> LabelMap:
    return LabelMap(dict(cfg.data.labels), -1 if cfg.mask.outside_body else None)


def cfg_intensity(cfg: Config) -> dict:
    """The `gem3d.intensity.make_normaliser` config of a model configuration."""
    if cfg.data.modality == "ct":
        low, high = cfg.data.hu_window
        return {"kind": "ct_window", "low": float(low), "high": float(high)}
    if cfg.data.normalisation == "percentile":
        return {"kind": "percentile", "low": 0.5, "high": 99.5}
    return {"kind": "minmax"}


def describe_config(cfg: Config) -> dict:
    """The bundle.json summary fields, derived from the configuration (one source of truth)."""
    sampler, steps = resolve_sampler(cfg.diffusion)
    return {
        "modality": cfg.data.modality,
        "label_map": cfg_label_map(cfg).to_dict(),
        "intensity": cfg_intensity(cfg),
        "slice_size": cfg.data.slice_size,
        "window_length": cfg.window_length,
        "latent_scale": cfg.vae.scale,
        "informed_slice": cfg.informed_slice,
        "sampler": {"name": sampler, "steps": steps},
    }


def _drop_legacy_sampler(info: dict) -> dict:
    """Bundles of older gem3d record `diffusion.sampler`, which chose nothing, and a summary
    `sampler` made of it: read them as the sampler requests really get."""
    diffusion = info.get("config", {}).get("diffusion")
    if not isinstance(diffusion, dict) or "sampler" not in diffusion:
        return info
    legacy = {"name": diffusion["sampler"], "steps": diffusion.get("sampling_steps")}
    upgraded = dict(info, config=config_lib.to_dict(config_lib.from_dict(info["config"])))
    if info.get("sampler") == legacy:
        upgraded["sampler"] = describe_config(config_lib.from_dict(upgraded["config"]))["sampler"]
    return upgraded


def read_info(path: Union[str, Path]) -> dict:
    """bundle.json, checked for format and consistency (no weights loaded)."""
    path = Path(path)
    file = path / "bundle.json"
    if not file.is_file():
        raise BundleError(f"{path}: not a model bundle (no bundle.json)")
    try:
        info = typed.load_json(file, "bundle.json")
    except typed.DocumentError as err:
        raise BundleError(str(err)) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise BundleError(f"{file}: format is {info.get('format') if isinstance(info, dict) else None!r}, "
                          f"expected {FORMAT!r}")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{file}: format_version {version!r} is not supported by this gem3d "
                          f"(supports {FORMAT_VERSION}); update gem3d or re-export the bundle")
    missing = [k for k in ("config", "weights", "provenance", "volumetric") if k not in info]
    if missing:
        raise BundleError(f"{file}: missing keys {missing}")
    try:
        info = _drop_legacy_sampler(info)
        derived = describe_config(config_lib.from_dict(info["config"]))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{file}: invalid configuration: {err}") from None
    stale = [k for k, v in derived.items() if typed.loads(json.dumps(v), "summary") != info.get(k)]
    if stale:
        raise BundleError(f"{file}: {stale} disagree with the 'config' section; edit the config, not the summary")
    weights = info["weights"]
    unknown = sorted(set(weights) - set(PARTS)) if isinstance(weights, dict) else None
    if unknown is None or unknown or not {"vae", "unet"} <= set(weights) or \
            not all(typed.matches(name, str) and "/" not in name and name not in (".", "..")
                    for name in weights.values()):
        raise BundleError(f"{file}: 'weights' must name the files of 'vae' and 'unet' (optional "
                          f"'slice_model') in the bundle folder, got {typed.show(weights)}")
    return info


class BundleFacts:
    """What a bundle is, answered from its configuration (bundle.json's summary is derived
    from it): one definition for the description (`BundleInfo`) and the loaded bundle."""

    config: Config

    @property
    def modality(self) -> str:
        return self.config.data.modality

    @property
    def slice_size(self) -> int:
        return self.config.data.slice_size

    @property
    def window_length(self) -> int:
        return self.config.window_length

    @property
    def label_map(self) -> LabelMap:
        return cfg_label_map(self.config)


@dataclass(frozen=True)
class BundleInfo(BundleFacts):
    """A bundle's checked bundle.json, without its weights: what the editor shows and checks against."""

    path: Path
    name: str
    config: Config
    sampler: str
    steps: int
    volumetric: bool
    parts: Tuple[str, ...]
    info: dict

    @property
    def has_slice_model(self) -> bool:
        """Whether the bundle can generate informed slices (informed source 'generated')."""
        return "slice_model" in self.parts

    def describe(self) -> str:
        return (f"{self.name} - modality: {self.modality}; labels: {str(self.label_map) or 'none'}; "
                f"slices {self.slice_size} x {self.slice_size} px, windows of {self.window_length}; "
                f"sampler {self.sampler}, {self.steps} steps by default")


def read_bundle_info(path: Union[str, Path]) -> BundleInfo:
    """The checked bundle.json of the bundle folder `path` (BundleError if unusable)."""
    info = read_info(path)
    return BundleInfo(Path(path).resolve(), str(info.get("name", "")), config_lib.from_dict(info["config"]),
                      info["sampler"]["name"],
                      int(info["sampler"]["steps"]), bool(info["volumetric"]), tuple(info["weights"]), info)
