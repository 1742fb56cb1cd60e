"""Model and training configuration: plain dataclasses, presets, YAML/JSON.

A `Config` fully describes the networks (so a bundle can rebuild them) and how
to train them. Loading is strict: an unknown key is an error naming the key,
because a misspelt option silently falling back to its default wastes a
training run; for the same reason setting an attribute that is not a field (in a script or a
benchmark) is an error too. A file may start from a preset (`preset: tiny`) and override
only what differs.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple, Union, get_type_hints

from gem3d import typed


class _Fields:
    """Attributes are the dataclass's fields only: ``cfg.train.stage1_step = 5`` (a typo) is an
    error instead of a new attribute that training never reads."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; its fields: "
                                 f"{', '.join(self.__dataclass_fields__)}")
        object.__setattr__(self, name, value)


@dataclass
class DataConfig(_Fields):
    """The dataset and the model grid (what the engine resamples to)."""

    dataset: str = ""
    modality: str = "mri"  # "mri" | "ct"
    labels: Dict[int, str] = field(default_factory=lambda: {1: "necrosis", 2: "edema", 3: "enhancing"})
    normalisation: str = "minmax"  # official: (x - min) / (max - min) per volume, then to [-1, 1]
    hu_window: Tuple[float, float] = (-1000.0, 1000.0)  # CT only
    slice_size: int = 64  # axial slices are resampled to slice_size x slice_size


@dataclass
class VAEConfig(_Fields):
    """A diffusers AutoencoderKL; one block per entry of block_out_channels."""

    in_channels: int = 1
    out_channels: int = 1
    block_out_channels: Tuple[int, ...] = (32, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 64
    scale: float = 1.0  # latent scaling factor (SD: 0.18215)
    through_plane: float = 0.0  # [a, 1-2a, a] along z after per-slice decoding (gem3d.through_plane)

    @property
    def factor(self) -> int:
        """Spatial downsampling factor slice -> latent."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class MaskConfig(_Fields):
    """How a label slice becomes a conditioning latent (see models/mask_encoding.py)."""

    encoding: str = "vae"  # "vae" (official) | "onehot" (area fractions, no parameters)
    outside_body: bool = True  # masks carry -1 outside the body (nnU-Net nonzero region)


@dataclass
class UNetConfig(_Fields):
    """openaimodel-style UNet; attention_resolutions are downsample factors."""

    model_channels: int = 32
    channel_mult: Tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: Tuple[int, ...] = (2,)
    num_head_channels: int = 32
    transformer_depth: int = 1  # cross-attention blocks only
    dropout: float = 0.0
    use_checkpoint: bool = False


@dataclass
class SliceModelConfig(_Fields):
    """Position-conditioned 2D model that generates informed slices."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    position: str = "crossattn"  # "crossattn" (official) | "time" (added to the time embedding)
    position_dim: int = 128
    mask_conditioned: bool = False  # also concatenate the mask-slice latent


@dataclass
class DiffusionConfig(_Fields):
    """Noise schedule (LDM "linear" = diffusers "scaled_linear"), and the step count of a sampler
    named without steps (the default sampler is `gem3d.sampler_settings`')."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    sampling_steps: int = 200


@dataclass
class TrainConfig(_Fields):
    """Optimisation of the four trainable parts: own VAE, stage 1, stage 2, slice model."""

    lr: float = 1e-4  # stage 1 (volume UNet, 2D)
    stage2_lr: float = 1e-4  # volumetric layers only
    slice_lr: float = 1e-4
    vae_lr: float = 1e-4
    warmup_steps: int = 100
    vae_steps: int = 2000
    stage1_steps: int = 2000
    stage2_steps: int = 1000
    slice_steps: int = 2000
    batch_size: int = 2  # windows (slices for the slice model) per step
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    bf16: bool = False
    checkpoint_every: int = 500
    preview_every: int = 250
    seed: int = 0


@dataclass
class Config(_Fields):
    name: str = "tiny"
    informed_slice: bool = True  # False: the mask-only "Make-A-Volume" baseline
    window_length: int = 8  # slices the volume model sees at once: its training and sampling windows
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    slice_model: SliceModelConfig = field(default_factory=SliceModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        choices = {"data.modality": (self.data.modality, ("mri", "ct")),
                   "mask.encoding": (self.mask.encoding, ("vae", "onehot")),
                   "slice_model.position": (self.slice_model.position, ("crossattn", "time"))}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"config {key}={value!r}: must be one of {allowed}")
        if self.data.slice_size % self.vae.factor:
            raise ValueError(f"config data.slice_size={self.data.slice_size} is not a multiple of "
                             f"the VAE factor {self.vae.factor}")


def kl_f8_config() -> VAEConfig:
    """The LDM/Stable-Diffusion "kl-f8" VAE used frozen by the official models
    (ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4, 256 px, RGB: grey is repeated)."""
    return VAEConfig(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
                     layers_per_block=2, latent_channels=4, norm_num_groups=32,
                     sample_size=256, scale=0.18215)


def _tiny() -> Config:
    return Config(name="tiny", mask=MaskConfig(encoding="onehot"))


def _small() -> Config:
    return Config(
        name="small",
        window_length=16,
        data=DataConfig(slice_size=128),
        vae=VAEConfig(block_out_channels=(64, 128, 128), layers_per_block=2, sample_size=128),
        mask=MaskConfig(encoding="onehot"),
        unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 3), num_res_blocks=2,
                        attention_resolutions=(2, 4), use_checkpoint=True),
        slice_model=SliceModelConfig(unet=UNetConfig(model_channels=64, channel_mult=(1, 2, 3),
                                                     num_res_blocks=2, attention_resolutions=(2, 4))),
        train=TrainConfig(lr=5e-5, stage2_lr=5e-5, slice_lr=5e-5, warmup_steps=500, vae_steps=20000,
                          stage1_steps=50000, stage2_steps=20000, slice_steps=50000, batch_size=2,
                          ema_decay=0.9999, bf16=True, checkpoint_every=5000,
                          preview_every=2000),
    )


def _paper() -> Config:
    """configs/latent-diffusion/brain_stage{1,2}.yaml and brain_slice.yaml of the official code."""
    return Config(
        name="paper",
        window_length=16,
        data=DataConfig(slice_size=512),
        vae=kl_f8_config(),
        mask=MaskConfig(encoding="vae"),
        unet=UNetConfig(model_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                        attention_resolutions=(8, 4, 2), num_head_channels=32, use_checkpoint=True),
        slice_model=SliceModelConfig(
            unet=UNetConfig(model_channels=224, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                            attention_resolutions=(4, 2, 1), num_head_channels=32, use_checkpoint=True),
            position="crossattn", position_dim=128),
        train=TrainConfig(lr=5e-6, stage2_lr=5e-6, slice_lr=5e-7, warmup_steps=0, vae_steps=0,
                          stage1_steps=150000, stage2_steps=50000, slice_steps=150000, batch_size=1,
                          ema_decay=0.9999, bf16=True, checkpoint_every=10000,
                          preview_every=20000),
    )


PRESETS = {"tiny": _tiny, "small": _small, "paper": _paper}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def to_dict(cfg: Config) -> dict:
    """Plain dict of lists/dicts/scalars, ready for YAML or JSON."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(cfg))


# Ranges beyond the general rule (numbers finite and within +-MAX_NUMBER, integers >= 0): a
# batch of 0 divides by zero, a beta of NaN or a latent scale of 1e308 generates NaN volumes.
MAX_NUMBER = 1e9
RANGES = {"diffusion.beta_start": (1e-8, 1.0), "diffusion.beta_end": (1e-8, 1.0), "vae.scale": (1e-6, 1e3),
          "vae.through_plane": (0.0, 0.25),
          "train.batch_size": (1, 1 << 16), "diffusion.num_train_timesteps": (1, 1 << 16),
          "diffusion.sampling_steps": (1, 1 << 16), "data.slice_size": (1, 1 << 16), "window_length": (1, 1 << 16),
          "vae.latent_channels": (1, 1 << 16), "unet.model_channels": (1, 1 << 16)}


def _convert(hint, value, key: str):
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            value = float(value)  # PyYAML reads "5e-6" (no dot) as a string
        except ValueError:
            pass
    if hint in (int, float, bool, str):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ValueError(f"config {key}: expected {hint.__name__}, got {value!r}")
        if hint in (int, float):
            low, high = RANGES.get(key, (0 if hint is int else -MAX_NUMBER, MAX_NUMBER))
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"config {key}: must be a finite number in [{low:g}, {high:g}], got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        args = hint.__args__
        types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)) \
            else list(args)
        if not isinstance(value, (list, tuple)) or len(types) != len(value):
            raise ValueError(f"config {key}: expected a list of {len(types)} values, got {value!r}")
        return tuple(_convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(types, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config {key}: expected a mapping, got {value!r}")
        key_type, value_type = hint.__args__
        try:  # JSON object keys are strings
            return {key_type(k): _convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(str(err) if str(err).startswith("config ") else f"config {key}: {err}") from None
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ValueError(f"config {prefix.rstrip('.') or 'root'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ValueError(f"unknown config key {prefix + str(key)!r}")
    return cls(**{k: _convert(hints[k], v, prefix + k) for k, v in data.items()})


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "labels":
            merged[key] = _merge(base[key], value)
        else:
            merged[key] = value
    return merged


LEGACY_KEYS = (("diffusion", "sampler"),)  # written by older gem3d, never used to choose anything
LEGACY_MOVES = {("train", "window"): "window_length"}  # older gem3d kept the window length in train


def _drop_legacy(data: dict) -> dict:
    data = dict(data)
    for (section, key), target in list(LEGACY_MOVES.items()) + [(k, None) for k in LEGACY_KEYS]:
        if isinstance(data.get(section), dict) and key in data[section]:
            value = data[section][key]
            data[section] = {k: v for k, v in data[section].items() if k != key}
            if target is not None:
                data.setdefault(target, value)
    return data


def from_dict(data: dict) -> Config:
    """Strict inverse of `to_dict`; a top-level `preset` key starts from that preset; the
    `LEGACY_KEYS` of older bundles are dropped and `LEGACY_MOVES` moved."""
    data = _drop_legacy(data)
    if "preset" in data:
        data = _merge(to_dict(preset(data.pop("preset"))), data)
    return _build(Config, data)


def load_config(path_or_preset: Union[str, Path]) -> Config:
    """A preset name ("tiny", "small", "paper") or a .yaml/.yml/.json file."""
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        return preset(path_or_preset)
    path = Path(path_or_preset)
    if not path.is_file():
        raise ValueError(f"{path}: not a config file nor a preset ({sorted(PRESETS)})")
    data: Any = typed.load_yaml(path, "config file")
    try:
        return from_dict(data or {})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    import yaml

    path = Path(path)
    data = to_dict(cfg)
    path.write_text(json.dumps(data, indent=2) if path.suffix == ".json"
                    else yaml.safe_dump(data, sort_keys=False))
