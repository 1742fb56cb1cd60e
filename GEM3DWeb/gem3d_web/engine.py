"""The one seam between the browser editor and the module's MRML logic.

The page never talks to an engine itself: it asks this module for an EditorLogic and for the
engine settings a request carries; the logic reaches its engine through the engine-client Protocol
(`gem3d.events.EngineClient`: the stdio worker, or `gem3d serve` when a server URL is set).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from gem3d.bundle_format import read_bundle_info

from GEM3DEditorLib.headless import register_segmentation_converters  # noqa: F401  (for the session)
from GEM3DEditorLib.logic import EditorLogic
from GEM3DEditorLib.settings import EngineSettings, GenerateSettings


def new_logic(scene, volumes_logic, work_folder: str) -> EditorLogic:
    """The module's logic on this session's scene; its engine is the local worker (`<this python> -m
    gem3d worker`) or a `gem3d serve` (settings.server_url), started on the first Generate and kept."""
    return EditorLogic(scene, volumes_logic, work_folder)


def generate_settings(bundle: str, sampler: Optional[str], steps: Optional[int], seed: int,
                      informed_slice: int, informed_source: str = "same", server_url: str = "",
                      server_token: str = "") -> GenerateSettings:
    """No engine Python is chosen: the session's own Python runs the worker."""
    engine = EngineSettings(sampler=sampler or None, steps=steps or None, seed=int(seed), device="auto",
                            engine_python="", server_url=server_url, server_token=server_token)
    return GenerateSettings(bundle, informed_source=informed_source, informed_slice=int(informed_slice), start=None,
                            engine=engine)


def bundle_labels(bundle: str) -> Tuple[Dict[int, str], bool]:
    """(label value -> name, whether the bundle has a slice model that can generate the informed slice)."""
    info = read_bundle_info(bundle)
    return info.label_map.names, info.has_slice_model
