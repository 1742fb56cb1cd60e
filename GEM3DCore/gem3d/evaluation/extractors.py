"""Feature extractors for Frechet distances: slices (B, 1, H, W) in [0, 1] -> features (B, D).

Two kinds, chosen by a spec string (`make_extractor`):

- ``default``: a fixed random-weight conv net (no download, no weights file). Its weights
  come from numpy's PCG64 with seed 0, so they are the same on every machine and torch
  version. Random conv features measure differences of intensity, contrast, texture and
  edge statistics at four scales; they know nothing about anatomy. Its distances are only
  comparable with distances from the same extractor (same input size) — never with
  published FIDs, which use Inception or RadImageNet features.
- ``radimagenet:PATH``: the RadImageNet ResNet-50 (the paper's FID backbone), weights from a
  local file the user gives. It is a torchvision-style ResNet-50 (v1.5, bias-free convs)
  whose layers sit in ``backbone`` = Sequential(conv1, bn1, relu, maxpool, layer1..4,
  avgpool), the layout of the published RadImageNet PyTorch checkpoint (keys
  ``backbone.0.weight`` ... ``backbone.7.2.bn3.running_var``); torchvision names
  (``conv1.weight``, ``layer1.0.conv1.weight``) and a ``module.`` prefix are accepted too.
  Grey slices are resized to 224 x 224, repeated to 3 channels and, by default, normalised
  as the medical FID implementations built on these weights do (MONAI / MAISI: [0, 1],
  channels in BGR order minus the ImageNet means 0.406, 0.456, 0.485);
  ``preprocess="symmetric"`` gives the [-1, 1] scaling of RadImageNet's PyTorch example.
  Global average pooling gives 2048 features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=bool(min(x.shape[-2:]) > size))


class RandomConvExtractor(nn.Module):
    """Four conv stages (3x3, ReLU, 2x2 average pooling) with He-scaled Gaussian weights from
    a fixed numpy seed; features: each stage's per-channel spatial mean (16+32+64+128 = 240)."""

    name = "default"

    def __init__(self, widths=(16, 32, 64, 128), input_size: int = 64, seed: int = 0):
        super().__init__()
        self.input_size = input_size
        rng = np.random.default_rng(seed)
        self.convs = nn.ModuleList()
        channels = 1
        for width in widths:
            conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
            weight = rng.standard_normal(conv.weight.shape) * np.sqrt(2.0 / (channels * 9))
            conv.weight.data = torch.from_numpy(weight.astype(np.float32))
            self.convs.append(conv)
            channels = width
        self.requires_grad_(False).eval()

    @property
    def dim(self) -> int:
        return sum(c.out_channels for c in self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(x.float(), self.input_size) * 2 - 1
        features = []
        for conv in self.convs:
            x = F.relu(conv(x))
            features.append(x.mean(dim=(2, 3)))
            x = F.avg_pool2d(x, 2)
        return torch.cat(features, dim=1)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


def _layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride)]
    layers += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


BGR_MEANS = (0.406, 0.456, 0.485)  # ImageNet RGB means (0.485, 0.456, 0.406), channels in BGR order
TORCHVISION_NAMES = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


class RadImageNetResNet50(nn.Module):
    """ResNet-50 in the RadImageNet PyTorch checkpoint layout; (B, 1, H, W) in [0, 1] -> (B, 2048)."""

    name = "radimagenet"
    input_size = 224
    dim = 2048

    def __init__(self, preprocess: str = "bgr-mean"):
        super().__init__()
        if preprocess not in ("bgr-mean", "symmetric"):
            raise ValueError(f"preprocess must be 'bgr-mean' or 'symmetric', got {preprocess!r}")
        self.preprocess = preprocess
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            _layer(64, 64, 3, 1), _layer(256, 128, 4, 2), _layer(512, 256, 6, 2), _layer(1024, 512, 3, 2),
            nn.AdaptiveAvgPool2d(1))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(x.float(), self.input_size).repeat(1, 3, 1, 1)
        if self.preprocess == "symmetric":
            x = x * 2 - 1
        else:
            x = x - torch.tensor(BGR_MEANS, device=x.device).view(1, 3, 1, 1)
        return self.backbone(x).flatten(1)


def radimagenet_state_dict(raw: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A checkpoint's tensors under this module's names (official, torchvision or DataParallel
    spelling); the classifier (``fc.*``) is dropped."""
    if "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    out = {}
    for key, value in raw.items():
        key = key[len("module."):] if key.startswith("module.") else key
        head, _, rest = key.partition(".")
        if head == "fc":
            continue
        if head in TORCHVISION_NAMES:
            key = f"backbone.{TORCHVISION_NAMES[head]}.{rest}"
        out[key] = value
    return out


def load_radimagenet(path: Union[str, Path], preprocess: str = "bgr-mean") -> RadImageNetResNet50:
    """The RadImageNet ResNet-50 with weights from a local .pt/.pth (loaded with
    weights_only=True: no pickled code runs) or .safetensors file; strict about every tensor."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such RadImageNet weights file (give the ResNet-50 checkpoint, "
                         "e.g. RadImageNet's ResNet50.pt)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        raw = load_file(str(path))
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickles with code, or not a torch file at all
            raise ValueError(f"{path}: not a plain tensor checkpoint ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(raw).__name__} (save model.state_dict())")
    model = RadImageNetResNet50(preprocess)
    state = radimagenet_state_dict(raw)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: not a RadImageNet/torchvision ResNet-50 state dict: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                         f"{len(shapes)} with other shapes (e.g. {sorted(shapes)[:3]}). Keras-converted "
                         "weights (biased convs, stride on the first 1x1 conv) are a different network")
    model.load_state_dict(state)
    return model.requires_grad_(False).eval()


def make_extractor(spec: str = "default") -> nn.Module:
    """``default`` or ``radimagenet:PATH``."""
    if spec == "default":
        return RandomConvExtractor()
    kind, sep, path = spec.partition(":")
    if kind == "radimagenet" and sep and path:
        return load_radimagenet(path)
    raise ValueError(f"unknown feature extractor {spec!r}; use 'default' or 'radimagenet:PATH'")
