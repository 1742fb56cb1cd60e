"""Checks a generation request passes before any model work: its outputs can and may be
written, its inputs are complete, finite, and its mask says what the user meant.

Each failure is one sentence naming the file, the problem and the fix. Torch-free, so the
worker, the server and the CLI can all run it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from gem3d.io import TooLargeError, declared_voxels, extension, nifti_nonfinite_count, read_volume
from gem3d.request import RequestError
from gem3d.volume import Volume

log = logging.getLogger("gem3d.preflight")
DATASET_FOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")  # nnU-Net raw layout
MIN_KEPT = 0.9  # a resampled mask must keep this share of each label's physical volume


def check_request(request) -> None:
    """The request's file rules and the disk's (free space, source datasets), before any model work."""
    problems = request.path_problems(*output_limits(request))
    if problems:
        raise RequestError("; ".join(problems))


def output_limits(request) -> Tuple[int, list]:
    """What `GenerateRequest.path_problems` needs to know of the disk: the outputs' size
    bound and the source datasets the outputs must stay out of."""
    return _expected_bytes(request.reference), _datasets_of(request.inputs())


def _expected_bytes(reference: str) -> int:
    """Upper bound of the outputs' size: float32 image + int16 mask, uncompressed. A header
    declaring more than io.MAX_VOXELS is refused here, before any allocation."""
    if Path(reference).is_dir():
        return 0  # a DICOM folder: reading it checks it
    try:
        return declared_voxels(reference) * 6 + (1 << 20)
    except TooLargeError:
        raise
    except (OSError, ValueError):
        return 0  # missing or unreadable: the path check or reading it says why


def _datasets_of(inputs) -> list:
    """The nnU-Net datasets the inputs come from: outputs never go inside them."""
    found = []
    for path in inputs:
        if path and Path(path).parent.name in DATASET_FOLDERS:
            found.append(Path(path).parent.parent)
    return found


def read_input(path, what: str, channel: Optional[int] = None) -> Volume:
    """`read_volume`, refusing NaN/Inf voxels (also those ITK's NIfTI reader hides as 0)."""
    volume = read_volume(path, channel)
    count = int(np.count_nonzero(~np.isfinite(volume.array))) if volume.array.dtype.kind == "f" else 0
    if count == 0 and extension(path).startswith(".nii") and not Path(path).is_dir():
        count = nifti_nonfinite_count(path, channel)
    if count:
        raise ValueError(f"the {what} {path} has {count} NaN/Inf voxels of {volume.array.size}; "
                         "replace them with real values (e.g. 0) and try again")
    return volume


def fit_mask(mask: Volume, reference: Volume, where: str) -> Tuple[Volume, Optional[float]]:
    """The mask on the reference's grid and the share of its labelled volume kept (None when it
    was already there). Refused when resampling loses a label (no overlap, cropped lesion)."""
    if mask.same_grid(reference):
        return mask, None
    resampled = sitk.Resample(mask.to_sitk(), reference.to_sitk(), sitk.Transform(),
                              sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    fitted = Volume(sitk.GetArrayFromImage(resampled), reference.geometry)
    before, after = _label_volumes(mask), _label_volumes(fitted)
    total = sum(before.values())
    kept = sum(after.values()) / total if total else 1.0
    lost = {label: after.get(label, 0.0) / v for label, v in before.items() if after.get(label, 0.0) < MIN_KEPT * v}
    if lost:
        worst = ", ".join(f"label {label}: {100 * share:.0f}% kept" for label, share in sorted(lost.items()))
        raise ValueError(f"the mask {where} is on another grid than the reference and resampling it onto the "
                         f"reference loses labels ({worst}); give a mask that covers the same region as "
                         "the reference")
    log.warning("mask %s is on another grid than the reference; resampled it, %.1f%% of the labelled "
                "volume kept", where, 100 * kept)
    return fitted, kept


def _label_volumes(mask: Volume) -> Dict[int, float]:
    """Physical volume (mm^3) of each non-zero label."""
    values, counts = np.unique(mask.array, return_counts=True)
    voxel = float(np.prod(mask.geometry.spacing))
    return {int(v): float(c) * voxel for v, c in zip(values, counts) if v != 0}


def check_mask_not_empty(mask: Volume, allow_empty: bool, where: str) -> None:
    """An all-zero mask is a real use (a healthy counterfactual) but must be asked for."""
    if not allow_empty and not np.any(mask.array > 0):  # -1 marks outside the body, not a lesion
        raise ValueError(f"the mask {where} has no labelled voxel; draw a label, or allow an empty mask "
                         "(--allow-empty-mask / \"allow_empty_mask\": true) to generate a scan without one")
