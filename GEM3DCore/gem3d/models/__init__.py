"""The networks: slice VAE, volume UNet (+ stage-2 volumetric layers), slice model,
mask encoding. Each is built from a `gem3d.config.Config`."""
from gem3d.models.mask_encoding import encode_masks, label_values, mask_channels
from gem3d.models.slice_model import SliceModel, build_slice_model
from gem3d.models.unet import UNet, build_unet, unet_in_channels, volume_condition
from gem3d.models.vae import build_vae, decode_latents, encode_slices
from gem3d.models.volumetric import is_volumetric, volumetric_parameters

__all__ = [
    "SliceModel", "UNet", "build_slice_model", "build_unet", "build_vae", "decode_latents",
    "encode_masks", "encode_slices", "is_volumetric", "label_values", "mask_channels",
    "unet_in_channels", "volume_condition", "volumetric_parameters",
]
