"""What the module shows about a model bundle, read from its bundle.json (no weights are loaded).

gem3d.bundle owns the format (and checks it fully in the worker); it imports torch, so the
module reads the summary fields itself: modality, label_map {"labels": {"1": name}, "outside"},
slice_size, window_length, sampler {"name", "steps"}.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

DEMO_BUNDLE = os.path.join("gem3d", "resources", "demo_bundle")


@dataclass
class BundleInfo:
    path: str
    modality: str = "?"
    label_map: Dict[int, str] = field(default_factory=dict)
    slice_size: Optional[str] = None
    window_length: Optional[int] = None
    sampler: Optional[str] = None
    steps: Optional[int] = None
    name: str = ""

    def describe(self) -> str:
        labels = ", ".join(f"{value} {name}" for value, name in sorted(self.label_map.items())) or "none"
        parts = [f"Modality: {self.modality}", f"labels: {labels}"]
        if self.slice_size:
            parts.append(f"slice size: {self.slice_size}")
        if self.window_length:
            parts.append(f"window: {self.window_length} slices")
        return (self.name + " - " if self.name else "") + "; ".join(parts)


def _first(data: dict, *keys):
    for key in keys:
        if key in data and data[key] is not None:
            return data[key]
    return None


def parse_label_map(raw) -> Dict[int, str]:
    """{value: name} of the non-zero labels, from gem3d's {"labels": {"1": "necrosis"}, "outside": -1},
    or a plain {"1": "necrosis"} / {"necrosis": 1} / [{"value": 1, "name": ...}]."""
    if raw is None:
        return {}
    if isinstance(raw, dict) and isinstance(raw.get("labels"), dict):
        raw = raw["labels"]
    if isinstance(raw, list):
        return {int(item["value"]): str(item["name"]) for item in raw}
    result = {}
    for key, value in dict(raw).items():
        if str(key).lstrip("-").isdigit():
            result[int(key)] = str(value)
        elif isinstance(value, int) or str(value).lstrip("-").isdigit():
            result[int(value)] = str(key)
        else:
            raise ValueError(f"cannot read label map entry {key!r}: {value!r}")
    return {value: name for value, name in result.items() if value > 0}


def read_bundle_info(folder: str) -> BundleInfo:
    path = os.path.join(folder, "bundle.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder!r} is not a model bundle: it has no bundle.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    size = _first(data, "slice_size", "image_size")
    if isinstance(size, (list, tuple)):
        size = " x ".join(str(s) for s in size)
    scheduler = _first(data, "sampler", "scheduler") or {}
    return BundleInfo(
        path=os.path.abspath(folder),
        modality=str(_first(data, "modality") or "?"),
        label_map=parse_label_map(_first(data, "label_map", "labels")),
        slice_size=None if size is None else str(size),
        window_length=_first(data, "window_length", "window"),
        sampler=_first(scheduler, "sampler", "name") if isinstance(scheduler, dict) else None,
        steps=_first(scheduler, "steps", "num_inference_steps") if isinstance(scheduler, dict) else None,
        name=str(_first(data, "name", "title") or ""),
    )


def find_gem3d_root(module_dir: str) -> Optional[str]:
    """Folder that holds the `gem3d` package: next to the module (installed extension) or
    ../GEM3DCore (source tree)."""
    for candidate in (module_dir, os.path.join(module_dir, os.pardir, "GEM3DCore")):
        if os.path.isfile(os.path.join(candidate, "gem3d", "__init__.py")):
            return os.path.abspath(candidate)
    return None


def demo_bundle_path(gem3d_root: Optional[str]) -> Optional[str]:
    if gem3d_root is None:
        return None
    path = os.path.join(gem3d_root, DEMO_BUNDLE)
    return path if os.path.isfile(os.path.join(path, "bundle.json")) else None
