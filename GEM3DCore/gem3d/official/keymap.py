"""Names and shapes: official LDM checkpoint keys <-> our modules' state-dict keys.

Works on key -> shape dictionaries only, so a full-size mapping is checked
without any tensor (the committed manifests, or a real file's shapes).
- UNet: official `model.diffusion_model.<k>` is our `<k>` (models/unet.py
  mirrors the official layout); the EMA copy of the same tensor is
  `model_ema.<"diffusion_model.<k>" without dots>` (LitEma). EMA is preferred
  when the checkpoint has it (the official sampling runs under `ema_scope`).
- VAE: LDM `first_stage_model.*` (or a standalone kl-f8 `model.ckpt`) ->
  diffusers AutoencoderKL keys by diffusers' own `convert_ldm_vae_checkpoint`,
  run on meta tensors to learn which key becomes which (and its new shape).
- Everything else in an official checkpoint is training state (noise-schedule
  buffers, EMA counters, the conditioning stage that *is* the frozen VAE in
  stage 1/2, the kl-f8 training loss) and is skipped with a stated reason;
  any key left unexplained is an error, as is any tensor of ours left unfilled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from gem3d import typed
from gem3d.config import VAEConfig

Shape = Tuple[int, ...]
Shapes = Dict[str, Shape]

UNET = "model.diffusion_model."
EMA = "model_ema."
VAE = "first_stage_model."
COND = "cond_stage_model."
LOSS = "loss."  # standalone kl-f8: LPIPS + discriminator of its training
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights", "scale_factor")
EMA_COUNTERS = ("model_ema.decay", "model_ema.num_updates")
MANIFESTS = Path(__file__).with_name("manifests")


class MappingError(ValueError):
    """Checkpoint keys and our parameters do not correspond one to one."""


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def load_manifest(name: str) -> Shapes:
    """A committed official key -> shape manifest, e.g. "brain_stage2", "kl_f8"."""
    file = MANIFESTS / f"{name}.json"
    if not file.is_file():
        raise ValueError(f"no official manifest {name!r}; known: {sorted(p.stem for p in MANIFESTS.glob('*.json'))}")
    return {k: tuple(v) for k, v in typed.load_json(file)["keys"].items()}


def ema_key(key: str) -> str:
    """The LitEma buffer holding the EMA of UNet parameter `key` (our = official suffix)."""
    return EMA + ("diffusion_model." + key).replace(".", "")


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """The part of a diffusers AutoencoderKL config that the LDM conversion reads."""
    blocks = len(cfg.block_out_channels)
    return {"down_block_types": ("DownEncoderBlock2D",) * blocks, "up_block_types": ("UpDecoderBlock2D",) * blocks}


def ldm_vae_layout(cfg: VAEConfig) -> Shapes:
    """Key -> shape of the LDM AutoencoderKL (Encoder/Decoder of ldm/modules/diffusionmodules/model.py,
    no attention but the mid blocks') equivalent to a diffusers VAE config; kl_f8_config() gives the
    kl_f8 manifest. Used to export our VAE to the LDM layout and to build test checkpoints."""
    blocks, n, z = list(cfg.block_out_channels), cfg.layers_per_block, cfg.latent_channels
    ch = blocks[0]
    if cfg.norm_num_groups != 32 or any(c % ch for c in blocks):
        raise MappingError(f"VAE {cfg}: no LDM equivalent (needs 32 norm groups and channels that are "
                           f"multiples of the first block's)")
    keys: Shapes = {}

    def conv(name, cin, cout, k):
        keys[f"{name}.weight"], keys[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        keys[f"{name}.weight"] = keys[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(side, c):
        resnet(f"{side}.mid.block_1", c, c)
        norm(f"{side}.mid.attn_1.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{name}", c, c, 1)
        resnet(f"{side}.mid.block_2", c, c)

    conv("encoder.conv_in", cfg.in_channels, ch, 3)
    c = ch
    for level, out in enumerate(blocks):
        for i in range(n):
            resnet(f"encoder.down.{level}.block.{i}", c, out)
            c = out
        if level != len(blocks) - 1:
            conv(f"encoder.down.{level}.downsample.conv", c, c, 3)
    mid("encoder", c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", c, 2 * z, 3)
    conv("decoder.conv_in", z, c, 3)
    mid("decoder", c)
    for level in reversed(range(len(blocks))):
        for i in range(n + 1):
            resnet(f"decoder.up.{level}.block.{i}", c, blocks[level])
            c = blocks[level]
        if level:
            conv(f"decoder.up.{level}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, cfg.out_channels, 3)
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    return keys


def vae_key_map(ldm: Shapes, config: Mapping) -> Dict[str, Tuple[str, Shape]]:
    """diffusers key -> (LDM key, converted shape), by running diffusers' conversion on meta tensors.

    `ldm` holds un-prefixed LDM VAE keys; `config` needs down/up_block_types."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):
        fake = {k: torch.empty(s) for k, s in ldm.items()}
    owner = {id(t): k for k, t in fake.items()}
    converted = convert_ldm_vae_checkpoint(fake, dict(config))
    result: Dict[str, Tuple[str, Shape]] = {}
    for key, tensor in converted.items():
        source = tensor if id(tensor) in owner else tensor._base  # reshaped attention weights are views
        if source is None or id(source) not in owner:
            raise MappingError(f"diffusers' VAE conversion produced {key!r} from no checkpoint tensor")
        result[key] = (owner[id(source)], tuple(tensor.shape))
    sources = [k for k, _ in result.values()]
    if len(set(sources)) != len(sources):
        raise MappingError("diffusers' VAE conversion used a checkpoint tensor twice")
    return result


@dataclass
class Plan:
    """For one checkpoint: where each of our tensors comes from, and why every other key is unused."""

    where: str
    sources: Dict[str, Dict[str, str]] = field(default_factory=dict)  # part -> our key -> checkpoint key
    skipped: Dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    frozen_vae: Dict[str, str] = field(default_factory=dict)  # diffusers key -> key of a VAE copy to compare
    has_ema: bool = False
    ema: bool = False

    def used(self) -> List[str]:
        return [k for part in self.sources.values() for k in part.values()]


def _unet(plan: Plan, shapes: Shapes, ours: Shapes, use_ema: Optional[bool]) -> None:
    plan.has_ema = any(k.startswith(EMA) and k not in EMA_COUNTERS for k in shapes)
    plan.ema = plan.has_ema if use_ema is None else use_ema
    if plan.ema and not plan.has_ema:
        raise MappingError(f"{plan.where}: EMA weights requested but the checkpoint has no 'model_ema.*' keys")
    dotless: Dict[str, str] = {}
    for key in ours:
        if dotless.setdefault(ema_key(key), key) != key:
            raise MappingError(f"{plan.where}: {key!r} and {dotless[ema_key(key)]!r} have the same EMA name")
    plan.sources["unet"] = {k: (ema_key(k) if plan.ema else UNET + k) for k in ours}
    other = "training weights (the EMA copy is used)" if plan.ema else "EMA copy (training weights requested)"
    for key in shapes:
        if (key.startswith(UNET) and plan.ema) or (key in dotless and not plan.ema):
            plan.skipped[key] = other
        elif key in EMA_COUNTERS:
            plan.skipped[key] = "EMA counter"


def _vae(plan: Plan, shapes: Shapes, ours: Optional[Shapes], config: Optional[Mapping]) -> None:
    """Claim the VAE keys: as the source of `ours`, or (ours None) as a frozen copy to compare."""
    prefix = VAE if any(k.startswith(VAE) for k in shapes) else ""
    parts = ("encoder", "decoder", "quant_conv", "post_quant_conv")
    ldm = {k[len(prefix):]: s for k, s in shapes.items()
           if k.startswith(prefix) and k[len(prefix):].split(".")[0] in parts}
    if not ldm or config is None:
        return
    mapping = {dk: prefix + lk for dk, (lk, _) in vae_key_map(ldm, config).items()}
    if ours is not None:
        plan.sources["vae"] = mapping
    else:
        plan.frozen_vae = mapping
        plan.skipped.update({k: "frozen VAE copy (compared with the bundle's VAE)" for k in mapping.values()})
    for key in shapes:
        if prefix == "" and key.startswith(LOSS):
            plan.skipped[key] = "kl-f8 training loss (LPIPS, discriminator)"
        if key.startswith(COND) and prefix and VAE + key[len(COND):] in shapes:
            plan.skipped[key] = "conditioning stage = the frozen VAE (duplicate of first_stage_model)"


def plan_checkpoint(shapes: Shapes, where: str, unet: Optional[Shapes] = None, vae: Optional[Shapes] = None,
                    vae_config: Optional[Mapping] = None, use_ema: Optional[bool] = None) -> Plan:
    """Map a checkpoint's keys onto our UNet (official suffixes) and/or diffusers VAE keys; strict.

    VAE keys present but not asked for (`vae=None`) are claimed as a frozen copy to be compared."""
    plan = Plan(where)
    if unet is not None:
        _unet(plan, shapes, unet, use_ema)
    _vae(plan, shapes, vae, vae_config)
    for key in SCHEDULE:
        if key in shapes:
            plan.skipped[key] = "noise-schedule buffer (checked against the bundle's scheduler)"
    check(plan, shapes, {"unet": unet, "vae": vae})
    return plan


def _fits(found: Shape, wanted: Shape) -> bool:
    """Equal, or a 1x1 conv stored where we have a linear layer (what diffusers' conversion squeezes)."""
    return found == wanted or (found[:len(wanted)] == wanted and all(s == 1 for s in found[len(wanted):]))


def check(plan: Plan, shapes: Shapes, ours: Mapping[str, Optional[Shapes]]) -> None:
    """MappingError listing unconsumed checkpoint keys, our unfilled tensors and shape mismatches."""
    problems = []
    unconsumed = sorted(set(shapes) - set(plan.used()) - set(plan.skipped))
    if unconsumed:
        problems.append(f"{len(unconsumed)} checkpoint key(s) not consumed: {unconsumed[:8]}")
    missing, mismatched = [], []
    for part, wanted in ours.items():
        if wanted is None:
            continue
        sources = plan.sources.get(part, {})
        missing += [f"{part}.{k} (from {sources.get(k, '?')})" for k in wanted
                    if sources.get(k) not in shapes]
        mismatched += [f"{part}.{k}: checkpoint {src} {shapes[src]} vs ours {wanted[k]}"
                       for k, src in sources.items() if src in shapes and k in wanted
                       and not _fits(shapes[src], wanted[k])]
        extra = sorted(set(sources) - set(wanted))
        if extra:
            problems.append(f"{len(extra)} {part} tensor(s) we do not have: {extra[:8]}")
    if missing:
        problems.append(f"{len(missing)} of our tensors have no checkpoint key: {missing[:8]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {mismatched[:8]}")
    if problems:
        raise MappingError(f"{plan.where}: the checkpoint does not match the configured networks: "
                           + "; ".join(problems))
