"""Dataset readers (layout detected from the folder) and `inspect`, which finds the cases a
training run would choke on before it starts.

Layouts:
- nnU-Net raw: dataset.json + imagesTr/<case>_<XXXX><ending> + labelsTr/<case><ending>
  (+ imagesTs without labels). The image is the channel named FLAIR if any, else 0000.
- Medical Segmentation Decathlon: dataset.json whose "training" lists {"image", "label"}
  and whose images are 4D; the image is the FLAIR channel (0 in Task01_BrainTumour).
  MSD brain labels are NOT BraTS's: 1 edema, 2 non-enhancing tumour, 3 enhancing tumour;
  the label map comes from dataset.json (else `labels.MSD_BRAIN`), values are kept as stored.
- BraTS 2020/2021: <case>/<case>_flair.nii.gz + <case>_seg.nii.gz, labels `labels.BRATS`;
  BraTS 2023: <case>/<case>-t2f.nii.gz + <case>-seg.nii.gz, labels `labels.BRATS2023`.
- AbdomenCT-1K: Case_XXXXX_0000.nii.gz images in the folder (or in its sub-folders, e.g.
  the ImagePart1..3 downloads) + Case_XXXXX.nii.gz masks in a sub- or sibling folder whose
  name contains "mask" or "label"; labels `labels.ABDOMEN_CT1K`.
Labelled layouts where no case has a mask (BraTS validation sets) give cases without masks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import typed
from .io import Not3DImageError, extension, nifti_nonfinite_count, read_volume
from .labels import ABDOMEN_CT1K, BRATS, BRATS2023, MSD_BRAIN, LabelMap, UnknownLabelError, present_values
from .volume import Volume

NIFTI_ENDINGS = (".nii.gz", ".nii")


class DatasetFormatError(ValueError):
    """The folder matches no known dataset layout, or matches one but holds no case."""


@dataclass(frozen=True)
class Case:
    """One image (+ mask) pair; `mask` None means unlabelled, a missing path means missing."""

    case_id: str
    image: Path
    mask: Optional[Path] = None
    channel: Optional[int] = None


@dataclass
class Dataset:
    root: Path
    format: str
    cases: List[Case]
    label_map: LabelMap


def open_dataset(path, label_map: Optional[LabelMap] = None) -> Dataset:
    """Detect the layout of the dataset at `path`; `label_map` overrides the layout's own."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: not a folder")
    for reader in (_read_json_dataset, _read_brats, _read_abdomen):
        dataset = reader(root)
        if dataset is not None:
            break
    else:
        raise DatasetFormatError(
            f"{root}: no known dataset layout; looked for dataset.json (nnU-Net raw, MSD), BraTS case "
            "folders (<case>/<case>_flair.nii.gz or <case>/<case>-t2f.nii.gz) and AbdomenCT-1K images "
            "(Case_XXXXX_0000.nii.gz, masks Case_XXXXX.nii.gz in a *mask*/*label* folder)")
    if not dataset.cases:
        raise DatasetFormatError(f"{root}: looks like a {dataset.format} dataset but holds no case")
    return replace(dataset, label_map=label_map) if label_map is not None else dataset


def _visible_files(folder: Path) -> List[Path]:
    """Files of `folder`, skipping hidden ones (macOS "._" copies ship inside the MSD tars)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _flair_channel(channel_names: dict) -> int:
    for key, name in channel_names.items():
        if str(name).lower() in ("flair", "t2f", "t2-flair", "t2flair"):
            return int(key)
    return 0


def _read_json_dataset(root: Path) -> Optional[Dataset]:
    meta_path = root / "dataset.json"
    if not meta_path.exists():
        return None
    try:
        meta = typed.obj(typed.load_json(meta_path, "dataset.json"), str(meta_path))
        channels = typed.obj(meta.get("channel_names") or meta.get("modality") or {}, str(meta_path),
                             "channel_names")
        ending = typed.string(meta.get("file_ending", ".nii.gz"), str(meta_path), "file_ending")
        for key in ("training", "test"):
            entries = typed.array(meta.get(key, []), str(meta_path), key)
            for i, entry in enumerate(entries):
                if key == "training":
                    entry = typed.obj(entry, str(meta_path), f"training[{i}]")
                    typed.string(entry.get("image"), str(meta_path), f"training[{i}].image")
                    typed.string(entry.get("label"), str(meta_path), f"training[{i}].label")
                else:
                    typed.string(entry, str(meta_path), f"test[{i}]")
        labels = LabelMap.from_dataset_json(meta["labels"]) if meta.get("labels") else None
        channel = _flair_channel(channels)
    except ValueError as error:
        raise DatasetFormatError(str(error).replace("dataset.json: ", f"{meta_path}: ", 1)) from None
    image_re = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    images_tr = {m.group(1) for p in _visible_files(root / "imagesTr") for m in [image_re.match(p.name)] if m}
    if images_tr or not isinstance(meta.get("training"), list):
        labels_tr = {p.name[:-len(ending)] for p in _visible_files(root / "labelsTr") if p.name.endswith(ending)}
        images_ts = {m.group(1) for p in _visible_files(root / "imagesTs") for m in [image_re.match(p.name)] if m}
        image_name = f"_{channel:04d}{ending}"
        cases = [Case(c, root / "imagesTr" / f"{c}{image_name}", root / "labelsTr" / f"{c}{ending}")
                 for c in sorted(images_tr | labels_tr)]
        cases += [Case(c, root / "imagesTs" / f"{c}{image_name}") for c in sorted(images_ts)]
        return Dataset(root, "nnunet", cases, labels or LabelMap())
    msd_channel = channel if len(channels) > 1 else None
    cases = [Case(_case_id(entry["image"]), root / entry["image"], root / entry["label"], msd_channel)
             for entry in meta["training"]]
    cases += [Case(_case_id(entry), root / entry, None, msd_channel) for entry in meta.get("test", [])]
    return Dataset(root, "msd", cases, labels or MSD_BRAIN)


def _case_id(path: str) -> str:
    name = Path(path).name
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[:-len(ending)]
    return name


def _nifti(folder: Path, stem: str) -> Path:
    """The .nii.gz or .nii file `stem` in `folder`; the .nii.gz path when neither exists."""
    for ending in NIFTI_ENDINGS:
        if (folder / f"{stem}{ending}").exists():
            return folder / f"{stem}{ending}"
    return folder / f"{stem}{NIFTI_ENDINGS[0]}"


BRATS_LAYOUTS = (  # format, separator, image, all file suffixes, label map
    ("brats2021", "_", "flair", ("flair", "t1", "t1ce", "t2", "seg"), BRATS),
    ("brats2023", "-", "t2f", ("t2f", "t1n", "t1c", "t2w", "seg"), BRATS2023),
)


def _read_brats(root: Path) -> Optional[Dataset]:
    folders = sorted(d for d in root.iterdir() if d.is_dir())
    found = []
    for name, sep, image, suffixes, label_map in BRATS_LAYOUTS:
        cases = [d for d in folders if any(_nifti(d, f"{d.name}{sep}{s}").exists() for s in suffixes)]
        found.append((len(cases), name, sep, image, cases, label_map))
    count, name, sep, image, case_folders, label_map = max(found, key=lambda f: f[0])
    if not count:
        return None
    labelled = any(_nifti(d, f"{d.name}{sep}seg").exists() for d in case_folders)
    cases = [Case(d.name, _nifti(d, f"{d.name}{sep}{image}"), _nifti(d, f"{d.name}{sep}seg") if labelled else None)
             for d in case_folders]
    return Dataset(root, name, cases, label_map)


ABDOMEN_IMAGE = re.compile(r"^(Case_\d+)_0000\.nii(\.gz)?$")
ABDOMEN_MASK = re.compile(r"^(Case_\d+)\.nii(\.gz)?$")


def _matching(folder: Path, pattern: re.Pattern) -> Dict[str, Path]:
    return {m.group(1): p for p in _visible_files(folder) for m in [pattern.match(p.name)] if m}


def _read_abdomen(root: Path) -> Optional[Dataset]:
    if _matching(root, ABDOMEN_IMAGE):
        image_folders = [root]
    else:
        image_folders = [d for d in sorted(root.iterdir()) if d.is_dir() and _matching(d, ABDOMEN_IMAGE)]
    if not image_folders:
        return None
    images = {c: p for folder in image_folders for c, p in _matching(folder, ABDOMEN_IMAGE).items()}
    candidates = sorted({d for parent in (root, root.parent) for d in parent.iterdir()
                         if d.is_dir() and d not in image_folders and re.search("mask|label", d.name, re.I)
                         and _matching(d, ABDOMEN_MASK)})
    if len(candidates) > 1:
        raise DatasetFormatError(f"{root}: several AbdomenCT-1K mask folders: {', '.join(map(str, candidates))}")
    if not candidates:
        return Dataset(root, "abdomenct1k", [Case(c, p) for c, p in sorted(images.items())], ABDOMEN_CT1K)
    mask_folder = candidates[0]
    masks = _matching(mask_folder, ABDOMEN_MASK)
    ids = sorted(images) if image_folders == [root] else sorted(set(images) | set(masks))
    cases = [Case(c, images.get(c, image_folders[0] / f"{c}_0000.nii.gz"), masks.get(c, mask_folder / f"{c}.nii.gz"))
             for c in ids]
    return Dataset(root, "abdomenct1k", cases, ABDOMEN_CT1K)


@dataclass
class CaseReport:
    case: str
    shape: Optional[Tuple[int, int, int]] = None  # (z, y, x)
    spacing: Optional[Tuple[float, float, float]] = None  # (x, y, z) mm
    labels: List[int] = field(default_factory=list)  # non-zero values present in the mask
    problems: List[str] = field(default_factory=list)


def inspect_dataset(dataset: Dataset) -> List[CaseReport]:
    return [inspect_case(case, dataset.label_map) for case in dataset.cases]


def inspect_case(case: Case, label_map: LabelMap) -> CaseReport:
    """Read the case once and list everything that would break training or sampling on it."""
    report = CaseReport(case.case_id)
    image = _load(case.image, case.channel, "image", report.problems)
    mask = _load(case.mask, None, "mask", report.problems) if case.mask is not None else None
    reference = image if image is not None else mask
    if reference is not None:
        report.shape, report.spacing = reference.shape, reference.geometry.spacing
    if image is not None and image.array.dtype.kind == "f":
        bad = _nonfinite(case, image)
        if bad:
            report.problems.append(f"image has {bad} NaN/inf voxel(s)")
    if mask is not None:
        try:
            values = label_map.validate(mask.array, where="mask")
        except UnknownLabelError as error:
            values = present_values(mask.array)
            report.problems.append(str(error))
        report.labels = [v for v in values if v != 0 and v != label_map.outside]
        if not [v for v in values if v > 0]:
            report.problems.append("empty mask (no label > 0)")
    if image is not None and mask is not None:
        if image.shape != mask.shape:
            report.problems.append(f"shape mismatch: image {image.shape} vs mask {mask.shape} (z, y, x)")
        if not image.geometry.allclose(mask.geometry):  # the rule of Volume.same_grid
            report.problems.append(f"geometry mismatch: image {image.geometry.describe()} "
                                   f"vs mask {mask.geometry.describe()}")
    return report


def _nonfinite(case: Case, image: Volume) -> int:
    if extension(case.image).startswith(".nii"):  # the reader replaced them by 0
        return nifti_nonfinite_count(case.image, case.channel)
    return int(np.count_nonzero(~np.isfinite(image.array)))


def _load(path: Path, channel: Optional[int], what: str, problems: List[str]) -> Optional[Volume]:
    if not path.exists():
        problems.append(f"{what} missing: {path}")
        return None
    try:
        return read_volume(path, channel)
    except Not3DImageError as error:
        problems.append(f"{what} is not 3D: {error}")
    except (ValueError, OSError) as error:
        problems.append(f"{what} unreadable: {error}")
    return None
