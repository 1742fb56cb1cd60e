"""Export a synthetic case: the volume, its segmentation, the provenance JSON, optionally DICOM.

Every output is marked synthetic: the volume's description (NIfTI descrip / NRRD content) and the
DICOM series description start with "SYNTHETIC"; DICOM gets new UIDs, ImageType DERIVED\\SECONDARY,
BurnedInAnnotation NO and no identifiers of the patient whose scan served as reference.
Existing files (the source scan above all) are never overwritten.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import locale
import os
import re
import uuid
from typing import Dict, Iterable, List, Optional

import numpy as np

SYNTHETIC = "SYNTHETIC"
DEFAULT_PATIENT_NAME = "SYNTHETIC^PHANTOM"
IMAGE_FORMATS = ("nii.gz", "nrrd")
MAX_UID_LENGTH = 64


def safe_name(text: str) -> str:
    """A file name stem from a node name ("MRHead synthetic_2" -> "MRHead_synthetic_2")."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text or "").strip("._")
    return name or "synthetic_case"


def new_uid() -> str:
    """A DICOM UID without a registered root: 2.25.<UUID as an integer> (PS3.5 B.2), <= 44 chars."""
    return "2.25." + str(uuid.uuid4().int)


def is_valid_uid(uid: str) -> bool:
    if not uid or len(uid) > MAX_UID_LENGTH or not all(c.isdigit() or c == "." for c in uid):
        return False
    parts = uid.split(".")
    return all(p and (p == "0" or not p.startswith("0")) for p in parts)


def synthetic_description(text: str = "") -> str:
    """The user's description behind the SYNTHETIC word, unless it already starts with it."""
    text = (text or "").strip()
    if text.upper().startswith(SYNTHETIC) and text[len(SYNTHETIC):][:1] in ("", " ", ":"):
        return text
    return f"{SYNTHETIC} {text}".strip()


def dicom_tags(series_description: str = "", modality: str = "MR",
               patient_name: str = DEFAULT_PATIENT_NAME, patient_id: Optional[str] = None,
               study_uid: Optional[str] = None, series_uid: Optional[str] = None,
               frame_of_reference_uid: Optional[str] = None,
               now: Optional[datetime.datetime] = None) -> Dict[str, str]:
    """Series-level DICOM tags ("gggg|eeee" -> value, SimpleITK's metadata keys) of a synthetic
    series. Nothing comes from the source scan: identifiers are the given (synthetic) ones."""
    now = now or datetime.datetime.now()
    patient_name = (patient_name or DEFAULT_PATIENT_NAME).strip()
    patient_id = patient_id or "SYN" + uuid.uuid4().hex[:12].upper()
    tags = {
        "0008|0008": "DERIVED\\SECONDARY",  # Image Type
        "0008|0020": now.strftime("%Y%m%d"),  # Study Date
        "0008|0021": now.strftime("%Y%m%d"),  # Series Date
        "0008|0030": now.strftime("%H%M%S"),  # Study Time
        "0008|0031": now.strftime("%H%M%S"),  # Series Time
        "0008|0060": (modality or "OT").upper()[:16],  # Modality
        "0008|0070": "GEM-3D Editor",  # Manufacturer
        "0008|103e": synthetic_description(series_description)[:64],  # Series Description
        "0008|1030": synthetic_description("GEM-3D generated study")[:64],  # Study Description
        "0010|0010": patient_name[:64],  # Patient's Name
        "0010|0020": patient_id[:64],  # Patient ID
        "0010|0030": "",  # Patient's Birth Date
        "0010|0040": "",  # Patient's Sex
        "0020|000d": study_uid or new_uid(),  # Study Instance UID
        "0020|000e": series_uid or new_uid(),  # Series Instance UID
        "0020|0010": "1",  # Study ID
        "0020|0011": "1",  # Series Number
        "0020|0052": frame_of_reference_uid or new_uid(),  # Frame of Reference UID
        "0028|0301": "NO",  # Burned In Annotation
    }
    for key in ("0020|000d", "0020|000e", "0020|0052"):
        if not is_valid_uid(tags[key]):
            raise ValueError(f"invalid DICOM UID {tags[key]!r} for tag {key}")
    return tags


def dicom_pixels(array: np.ndarray, modality: str = "MR"):
    """(int16 pixels, scale, offset) with value ~= pixel / scale + offset.

    CT keeps integer HU (scale 1, offset 0). Other modalities keep their values rounded when they
    span at least 255 units and fit 16 bits; otherwise (e.g. intensities normalised to [0, 1])
    they are mapped linearly onto 0..4095, and the mapping goes into Image Comments. (GDCM writes
    non-integer rescale slopes only as Enhanced MR objects, which many viewers do not read.)
    """
    array = np.asarray(array, dtype=np.float64)
    low, high = (float(np.min(array)), float(np.max(array))) if array.size else (0.0, 0.0)
    if (modality or "").upper() == "CT" or (high - low >= 255 and low >= -32768 and high <= 32767):
        return np.clip(np.round(array), -32768, 32767).astype(np.int16), 1.0, 0.0
    scale = 4095.0 / max(high - low, 1e-12)
    return np.round((array - low) * scale).astype(np.int16), scale, low


def _check_targets(paths: Iterable[str], protected: Iterable[str]) -> None:
    protected = {os.path.realpath(p) for p in protected if p}
    for path in paths:
        if os.path.realpath(path) in protected:
            raise ValueError(f"refusing to write {path}: it is a source file")
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists already; exports never overwrite files")


def _free_stem(out_dir: str, stem: str, suffixes: List[str]) -> str:
    candidate, number = stem, 1
    while any(os.path.exists(os.path.join(out_dir, candidate + s)) for s in suffixes):
        number += 1
        candidate = f"{stem}_{number}"
    return candidate


def dicom_modality(modality: str) -> str:
    """DICOM Modality of a bundle's modality ("ct", "mri", "flair"...)."""
    text = (modality or "").lower()
    return "CT" if text == "ct" else ("MR" if text.startswith("mr") or text in ("flair", "t1", "t2") else "OT")


@contextlib.contextmanager
def _locale_kept():
    """GDCM (SimpleITK's DICOM writer) sets the process's C locale to "C" and leaves it so; Python's
    default text encoding would then be ASCII for the rest of the process (Slicer's too)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(image, folder: str, tags: Dict[str, str], modality: str = "MR") -> dict:
    """One file per slice of a gem3d.Volume into `folder` (which must not exist).
    Returns {"files", "scale", "offset"} (see dicom_pixels)."""
    import SimpleITK as sitk

    if os.path.exists(folder):
        raise FileExistsError(f"{folder} exists already; exports never overwrite files")
    os.makedirs(folder)
    pixels, scale, offset = dicom_pixels(image.array, modality)
    volume = sitk.GetImageFromArray(pixels)
    volume.SetSpacing(image.geometry.spacing)
    volume.SetOrigin(image.geometry.origin)
    direction = np.asarray(image.geometry.direction)
    volume.SetDirection(direction.reshape(-1).tolist())
    orientation = "\\".join(f"{v:.6f}" for v in list(direction[:, 0]) + list(direction[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    with _locale_kept():
        for k in range(volume.GetDepth()):
            slice_image = volume[:, :, k]
            for key, value in tags.items():
                slice_image.SetMetaData(key, value)
            position = volume.TransformIndexToPhysicalPoint((0, 0, k))
            slice_image.SetMetaData("0008|0018", new_uid())  # SOP Instance UID
            slice_image.SetMetaData("0020|0013", str(k + 1))  # Instance Number
            slice_image.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
            slice_image.SetMetaData("0020|0037", orientation)
            slice_image.SetMetaData("0018|0050", f"{image.geometry.spacing[2]:.6f}")  # Slice Thickness
            if scale != 1.0:  # Image Comments
                slice_image.SetMetaData("0020|4000", f"SYNTHETIC; intensity = pixel / {scale:.9g} + {offset:.9g}")
            path = os.path.join(folder, f"slice_{k + 1:04d}.dcm")
            writer.SetFileName(path)
            writer.Execute(slice_image)
            paths.append(path)
    return {"files": paths, "scale": scale, "offset": offset}


def segments_for(mask_array: np.ndarray, label_names: Dict[int, str]) -> List[dict]:
    """gem3d.io segment dicts for the labels present in a mask."""
    values = [int(v) for v in np.unique(mask_array) if v > 0]
    return [{"name": label_names.get(v, f"label {v}"), "label_value": v} for v in values]


def export_case(image, out_dir: str, name: str = "synthetic_case", mask=None,
                provenance: Optional[dict] = None, image_format: str = "nii.gz",
                label_names: Optional[Dict[int, str]] = None, dicom: bool = False,
                patient_name: str = DEFAULT_PATIENT_NAME, modality: str = "MR",
                description: str = "", protected: Iterable[str] = (),
                unique: bool = True) -> Dict[str, object]:
    """Write a synthetic case (gem3d.Volume image and mask) into out_dir.

    Returns {"image", "segmentation", "provenance", "dicom"} paths. With unique=True a taken name
    gets a numeric suffix; otherwise an existing file raises FileExistsError. Paths in
    `protected` (the source scan, its mask) are never written.
    """
    from gem3d import io

    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if mask is not None and tuple(mask.shape) != tuple(image.shape):
        raise ValueError(f"mask shape {mask.shape} does not match the image shape {image.shape}")
    os.makedirs(out_dir, exist_ok=True)
    suffixes = ["." + image_format, ".seg.nrrd", ".provenance.json", "_dicom"]
    stem = _free_stem(out_dir, name, suffixes) if unique else name
    paths = {"image": os.path.join(out_dir, f"{stem}.{image_format}"),
             "segmentation": os.path.join(out_dir, f"{stem}.seg.nrrd") if mask is not None else None,
             "provenance": os.path.join(out_dir, f"{stem}.provenance.json"),
             "dicom": os.path.join(out_dir, f"{stem}_dicom") if dicom else None}
    _check_targets([p for p in paths.values() if p], protected)

    text = synthetic_description(description or f"GEM-3D {stem}")
    io.write_volume(image, paths["image"], description=text)
    if mask is not None:
        segments = segments_for(mask.array, label_names or {})
        if segments:
            io.write_segmentation(mask, paths["segmentation"], segments, description=text)
        else:
            paths["segmentation"] = None
    record = dict(provenance or {})
    record.update({"synthetic": True, "description": text,
                   "files": {k: v for k, v in paths.items() if k != "provenance"}})
    if dicom:
        tags = dicom_tags(text, modality=modality, patient_name=patient_name)
        written = write_dicom_series(image, paths["dicom"], tags, modality)
        record["dicom"] = {"series_instance_uid": tags["0020|000e"],
                           "study_instance_uid": tags["0020|000d"], "patient_name": tags["0010|0010"],
                           "intensity": {"scale": written["scale"], "offset": written["offset"],
                                         "meaning": "intensity = pixel / scale + offset"}}
    with open(paths["provenance"], "x", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=str)
    return paths
