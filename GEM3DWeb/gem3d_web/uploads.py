"""Uploaded files onto the session's disk: a scan (NIfTI/NRRD/MetaImage, or a zipped DICOM series read
into NRRD) and an optional .seg.nrrd, under names of our own (the client's file names never reach disk).

A zip is checked before anything is extracted: no absolute or `..` names, no links, and a bounded
number of entries and unpacked size, so a crafted archive can neither escape the folder nor fill the disk.
"""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
from typing import List, Optional, Tuple

from gem3d.io import check_self_contained, read_volume, write_volume

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"
DICOM_ZIP_SUFFIX = ".zip"
MAX_ZIP_ENTRIES = 4000
ZIP_EXPANSION = 8  # a zip may unpack to at most this many times the upload limit


def is_segmentation_file(name: str) -> bool:
    return name.lower().endswith(SEGMENTATION_SUFFIX)


def is_volume_file(name: str) -> bool:
    return name.lower().endswith(VOLUME_SUFFIXES) and not is_segmentation_file(name)


def is_scan_upload(name: str) -> bool:
    return is_volume_file(name) or name.lower().endswith(DICOM_ZIP_SUFFIX)


def _suffix(name: str) -> str:
    name = name.lower()
    return next(s for s in (SEGMENTATION_SUFFIX, DICOM_ZIP_SUFFIX, *sorted(VOLUME_SUFFIXES, key=len, reverse=True))
                if name.endswith(s))


def save(files: List[dict], folder: str, max_bytes: int, segmentation: bool = True) -> Tuple[str, Optional[str]]:
    """The uploaded scan's path (a zipped DICOM series read and written as NRRD) and the .seg.nrrd's or None;
    ValueError with one sentence for a wrong set of files or an unsafe zip."""
    total = sum(int(f.get("size") or len(f.get("content") or b"")) for f in files)
    if total > max_bytes:
        raise ValueError(f"The upload is {total / 1e6:.0f} MB; this editor accepts up to "
                         f"{max_bytes / 1e6:.0f} MB (gem3d-web --max-upload-mb).")
    scans = [f for f in files if is_scan_upload(f.get("name", ""))]
    segs = [f for f in files if is_segmentation_file(f.get("name", ""))]
    if len(scans) != 1 or len(segs) > int(segmentation) or len(scans) + len(segs) != len(files):
        raise ValueError("Upload one scan (.nii, .nii.gz, .nrrd, .mha or a .zip of one DICOM series)"
                         + (" and at most one .seg.nrrd." if segmentation else "."))
    paths = []
    for f, stem in ((scans[0], "scan"), *((s, "segmentation") for s in segs)):
        path = os.path.join(folder, stem + _suffix(f["name"]))
        with open(path, "wb") as out:
            out.write(f["content"])
        paths.append(path)
        try:
            check_self_contained(path)
        except ValueError as e:
            for written in paths:
                os.remove(written)
            raise ValueError(f"{str(e)[:1].upper()}{str(e)[1:]}.") from None
    if paths[0].endswith(DICOM_ZIP_SUFFIX):
        paths[0] = dicom_zip_to_nrrd(paths[0], os.path.join(folder, "dicom"), ZIP_EXPANSION * max_bytes)
    return paths[0], paths[1] if len(paths) > 1 else None


def dicom_zip_to_nrrd(archive: str, folder: str, max_unpacked: int) -> str:
    """Extract a zipped DICOM series into folder (checked first) and write it as NRRD beside it."""
    try:
        with zipfile.ZipFile(archive) as z:
            entries = [e for e in z.infolist() if not e.is_dir()]
            _check_entries(entries, max_unpacked)
            os.makedirs(folder)
            for index, entry in enumerate(entries):  # our own names: nothing lands outside folder
                with z.open(entry) as source, open(os.path.join(folder, f"{index:05d}.dcm"), "wb") as out:
                    shutil.copyfileobj(source, out)  # at most the entry's checked size
    except (zipfile.BadZipFile, EOFError):
        raise ValueError("The uploaded .zip is not a readable zip archive: zip the DICOM series' folder again.") \
            from None
    try:
        volume = read_volume(folder)
    except (ValueError, OSError) as e:
        raise ValueError(f"The zipped DICOM series could not be read ({e}): zip one complete series.") from None
    path = folder + ".nrrd"
    write_volume(volume, path)
    return path


def _check_entries(entries: List[zipfile.ZipInfo], max_unpacked: int) -> None:
    for entry in entries:
        name = entry.filename.replace("\\", "/")
        if name.startswith("/") or ":" in name.split("/")[0] or ".." in name.split("/"):
            raise ValueError(f"The uploaded zip holds the entry {entry.filename!r} that points outside its folder: "
                             "zip the DICOM files with plain relative names.")
        if stat.S_ISLNK(entry.external_attr >> 16):
            raise ValueError(f"The uploaded zip holds a link ({entry.filename!r}): zip the DICOM files themselves.")
    if len(entries) > MAX_ZIP_ENTRIES:
        raise ValueError(f"The uploaded zip holds {len(entries)} files, more than the {MAX_ZIP_ENTRIES} accepted: "
                         "zip one DICOM series.")
    unpacked = sum(e.file_size for e in entries)
    if unpacked > max_unpacked:
        raise ValueError(f"The uploaded zip unpacks to {unpacked / 1e6:.0f} MB, more than the {max_unpacked / 1e6:.0f} "
                         "MB accepted: zip one DICOM series.")
