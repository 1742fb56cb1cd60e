"""Read and write volumes (NIfTI, NRRD, MetaImage, DICOM series) and Slicer `.seg.nrrd`
segmentations, always with their geometry (LPS, see `volume.py`).

Writes are atomic and verified (`gem3d.outputs.write_atomically`: a temporary file in the
target folder, fsync, read back, rename) and never replace an existing file unless asked, so
a crash, a full disk or a second writer never leaves a half-written or silently overwritten
volume.
"""
from __future__ import annotations

import gzip
import os
import re
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .outputs import write_atomically
from .typed import DocumentError, regular_file
from .volume import Geometry, Volume

WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
DESCRIPTION_KEY = "description"  # NRRD/MHA header key; NIfTI uses its 80-byte `descrip` field
NIFTI_DESCRIP_LENGTH = 79
MAX_VOXELS = 1 << 28  # 1 GiB of float32: far above any scan GEM-3D generates, far below a hostile header
MAX_DATA_FILES = 4096
HEADER_BYTES = 1 << 16
LOCALISER_SLICES = 3  # a DICOM folder's scout images, skipped beside the series
DEFAULT_COLORS = ((0.5, 0.68, 0.5), (0.85, 0.32, 0.2), (0.98, 0.9, 0.25), (0.3, 0.5, 0.95),
                  (0.9, 0.5, 0.9), (0.3, 0.85, 0.85), (0.95, 0.6, 0.2), (0.6, 0.4, 0.25))


class Not3DImageError(ValueError):
    """The file holds no 3D volume (2D, 4D without a chosen channel, vector pixels...)."""


class TooLargeError(ValueError):
    """A header declares more voxels than gem3d reads (found before any allocation)."""


def extension(path) -> str:
    """The lower-case format extension of `path` (".nii.gz", ".seg.nrrd" counts as ".nrrd")."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else os.path.splitext(name)[1]


def provenance_path(out: Union[str, Path]) -> Path:
    """Where an output's provenance JSON goes: beside it, ``<name>.provenance.json``."""
    out = Path(out)
    return out.with_name(out.name[: -len(extension(out))] + ".provenance.json")


def read_volume(path, channel: Optional[int] = None) -> Volume:
    """Read a 3D volume from a file SimpleITK reads (.nii[.gz], .nrrd, .mha/.mhd...) or a DICOM
    series folder.

    `channel` picks one channel of a multi-channel image (MSD BraTS: 0 = FLAIR); SimpleITK
    gives 4D NIfTI either as a 4D scalar image or as a 3D image of vector pixels, and both
    keep the geometry of the three spatial axes.
    """
    path = Path(path)
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    return _select_channel(image, channel, path)


def _read_file(path: Path) -> sitk.Image:
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"{path}: no such file")
    for file in input_files(path):
        regular_file(file, "image file" if file == path else f"data file of {path.name}")
    check_not_sheared(path)
    size = _gzip_size(path) if extension(path) == ".nii.gz" else None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        check_declared_size(reader, path)
        image = reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"cannot read {path}: {_itk_message(error)}") from None
    if extension(path).startswith(".nii"):
        _check_nifti_complete(path, reader, path.stat().st_size if size is None else size)
    return image


def check_declared_size(reader: sitk.ImageFileReader, path) -> int:
    """The voxel count a header declares (after `ReadImageInformation`), refused above
    MAX_VOXELS before anything is allocated."""
    voxels = int(np.prod([int(n) for n in reader.GetSize()], dtype=object)) * reader.GetNumberOfComponents()
    if voxels > MAX_VOXELS:
        shape = " x ".join(str(n) for n in reader.GetSize())
        raise TooLargeError(f"{path}: the header declares {shape} voxels ({voxels} values), more than gem3d reads "
                         f"({MAX_VOXELS}); the header is damaged or the volume is not a scan")
    return voxels


def _header(path) -> sitk.ImageFileReader:
    """A reader that has read the header of the image file at ``path``, not its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise ValueError(f"cannot read {path}: {_itk_message(error)}") from None
    return reader


def declared_voxels(path) -> int:
    """The voxel count of an image file from its header alone (refused above MAX_VOXELS)."""
    return check_declared_size(_header(regular_file(path, "image file")), path)


def input_files(path) -> List[Path]:
    """Every file reading `path` opens: the file itself and the detached voxel files its header
    names (.mhd/.mha `ElementDataFile`, .nhdr/.nrrd `data file`), so that confinement, overwrite
    and locking rules cover them too. A folder (DICOM series) is itself."""
    path = Path(path)
    return [path] if path.is_dir() else [path, *data_files(path)]


class OutsideRootError(ValueError):
    """A file that is not (wholly) inside the folder it must come from; the message names only the user's path."""


def confined_input(path, root: Path) -> Path:
    """`path` (relative to `root`, or absolute inside it) as an existing file in `root`, links
    followed, whose detached data files lie in `root` too."""
    root = Path(root).resolve()
    try:
        resolved = (root / path).resolve()  # an absolute `path` replaces root
        if resolved != root and root not in resolved.parents:
            raise OutsideRootError(f"{path!r} is outside the server's data root")
        if not resolved.is_file():
            raise OutsideRootError(f"{path!r}: no such file under the server's data root")
        for data in data_files(resolved):  # a header's voxels are read too: they must be inside as well
            data = data.resolve()
            if root not in data.parents or not data.is_file():
                raise OutsideRootError(f"{path!r} names a data file outside the server's data root (or none)")
    except OutsideRootError:
        raise
    except (OSError, RuntimeError, ValueError):  # symlink loop, name too long, unreadable header
        raise OutsideRootError(f"{path!r} cannot be resolved under the server's data root") from None
    return resolved


def check_self_contained(path) -> None:
    """An uploaded volume must carry its voxels: a header naming detached data files would make the
    reader open files of the machine it was uploaded to."""
    try:
        named = data_files(path)
    except ValueError:  # more data files than allowed: named all the same
        named = [path]
    if named:
        raise ValueError("the upload's header names a detached data file; upload a volume with its voxels in "
                         "the same file (.nii.gz, .nrrd or .mha)")


def data_files(path) -> List[Path]:
    """The detached data files named by the header of `path` (absolute, or relative to its
    folder), [] for formats without detached data; a header that cannot be read names none."""
    path = Path(path)
    lines = _header_lines(path)
    names = _nrrd_data_files(lines) if extension(path) in (".nrrd", ".nhdr") else _meta_data_files(lines)
    if len(names) > MAX_DATA_FILES:
        raise ValueError(f"{path}: the header names {len(names)} data files, more than {MAX_DATA_FILES}")
    return [path.parent / name for name in names]


def _header_lines(path: Path) -> List[str]:
    """The text header of a NRRD or MetaImage file ([] for other formats or an unreadable file)."""
    if extension(path) not in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return []
    try:
        with open(regular_file(path), "rb") as f:
            return f.read(HEADER_BYTES).decode("latin-1").split("\n")
    except (OSError, DocumentError):
        return []


def check_not_sheared(path) -> None:
    """Refuse axes that are not perpendicular (NRRD `space directions`, MetaImage
    `TransformMatrix`): ITK would silently make them orthogonal, moving every voxel."""
    path = Path(path)
    axes = None
    for line in _header_lines(path):
        key, sep, value = line.partition(":" if extension(path) in (".nrrd", ".nhdr") else "=")
        key = key.strip().lower()
        if not line.strip() and extension(path) in (".nrrd", ".nhdr"):
            break
        numbers = [float(n) for n in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", value)]
        if sep and key in ("space directions", "transformmatrix") and len(numbers) == 9:
            axes = np.reshape(numbers, (3, 3))
    if axes is None:
        return
    norms = np.linalg.norm(axes, axis=1)
    if np.any(norms == 0) or not np.all(np.isfinite(axes)):
        raise ValueError(f"{path}: the header's axis directions are zero or not finite; the file is damaged")
    unit = axes / norms[:, None]
    cosines = np.abs(unit @ unit.T - np.eye(3))
    if cosines.max() > 1e-4:
        angle = float(np.degrees(np.arcsin(min(1.0, cosines.max()))))
        raise ValueError(f"{path}: the volume's axes are sheared ({angle:.2g} degrees off perpendicular); "
                         "gem3d keeps geometry exactly, so resample it onto a perpendicular grid first")


def _nrrd_data_files(lines: List[str]) -> List[str]:
    for i, line in enumerate(lines[1:], 1):
        if not line.strip():
            return []
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("data file", "datafile"):
            return _listed(value.strip(), lines[i + 1:])
    return []


def _meta_data_files(lines: List[str]) -> List[str]:
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ElementDataFile":
            value = value.strip()
            return [] if value.upper() == "LOCAL" else _listed(value, lines[i + 1:])
    return []


def _listed(value: str, rest: List[str]) -> List[str]:
    """One data file, a LIST (one name per following line) or a printf pattern `fmt min max step`."""
    words = value.split()
    if words and words[0].upper() == "LIST":
        return [line.strip() for line in rest if line.strip()]
    if len(words) >= 4 and "%" in words[0]:
        try:
            low, high, step = (int(w) for w in words[1:4])
            indices = range(low, high + (1 if step > 0 else -1), step) if step else range(0)
            if len(indices) > MAX_DATA_FILES:
                return [words[0]] * len(indices)
            return [words[0] % i for i in indices]
        except (ValueError, TypeError):
            return [value]
    return [value]


def _itk_message(error: RuntimeError) -> str:
    """The reader's own words, without SimpleITK's source-file prefix."""
    lines = str(error).splitlines()
    if lines and lines[0].startswith("Exception thrown"):
        lines = lines[1:]
    text = " ".join(line.strip() for line in lines if line.strip())
    return re.sub(r"(sitk|itk)::ERROR: (\w+\(0x[0-9a-fA-F]+\): )?", "", text)


def _gzip_size(path: Path) -> int:
    """Decompressed size, every member's CRC checked: ITK reads bytes garbled mid-file (CRC
    wrong, size trailer right) as garbage voxels, or fails with a vague message."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                total += len(block)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"cannot read {path}: truncated or corrupt gzip data ({error}); "
                         "copy or download the file again") from None
    return total


def _check_nifti_complete(path: Path, reader: sitk.ImageFileReader, size: int) -> None:
    """ITK zero-fills truncated NIfTI files without an error (interrupted downloads). `size`:
    the (decompressed) file size."""
    dims = [int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, int(reader.GetMetaData("dim[0]")) + 1)]
    expected = int(float(reader.GetMetaData("vox_offset"))) + \
        int(np.prod(dims)) * int(reader.GetMetaData("bitpix")) // 8
    if size < expected:
        raise ValueError(f"cannot read {path}: truncated file ({size} of {expected} bytes)")


def _read_dicom_series(folder: Path) -> sitk.Image:
    """The one series in `folder` (besides localisers of at most LOCALISER_SLICES slices), its
    slices checked: ITK reads a series with a missing slice with an averaged spacing, and
    duplicated positions or a second series silently."""
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as error:
        raise ValueError(f"cannot read the DICOM folder {folder}: {_itk_message(error)}") from None
    if not series:
        raise ValueError(f"{folder}: no DICOM series found in this folder")
    found = sorted((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    if len(found) > 1 and len(found[-2]) > LOCALISER_SLICES:
        counts = ", ".join(f"{len(files)} slices" for files in found)
        raise ValueError(f"{folder}: the folder holds {len(found)} DICOM series ({counts}); "
                         "put each series in its own folder and give that folder")
    files = found[-1]
    _check_slice_positions(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise ValueError(f"cannot read the DICOM series in {folder}: {_itk_message(error)}") from None


def _check_slice_positions(folder: Path, files) -> None:
    """Slices evenly spaced along the slice normal: no duplicated position, no missing slice."""
    positions, normal = [], None
    for file in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(file)
        try:
            reader.ReadImageInformation()
            if normal is None:
                row_col = np.array(reader.GetMetaData("0020|0037").split("\\"), float)
                normal = np.cross(row_col[:3], row_col[3:])
            positions.append(float(np.dot(np.array(reader.GetMetaData("0020|0032").split("\\"), float), normal)))
        except (RuntimeError, ValueError):
            raise ValueError(f"{folder}: slice {Path(file).name} has no readable position/orientation; "
                             "give a complete DICOM series") from None
    if len(positions) < 2:
        return
    steps = np.diff(np.sort(positions))
    spacing = float(np.median(steps))
    if np.any(steps < 1e-3 * max(spacing, 1e-6)):
        raise ValueError(f"{folder}: two slices of the DICOM series share a position (duplicated slice); "
                         "remove the duplicate")
    if np.any(steps > 1.5 * spacing):
        missing = int(round(float(np.sum(steps / spacing - 1))))
        raise ValueError(f"{folder}: the DICOM series has a gap of about {missing} missing slice(s) "
                         f"(spacing {spacing:g} mm elsewhere); give the complete series")


def _select_channel(image: sitk.Image, channel: Optional[int], path: Path) -> Volume:
    dim, components, size = image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize()
    if dim not in (3, 4) or (dim == 4 and components > 1):
        raise Not3DImageError(f"{path}: expected a 3D image, got a {dim}D image of size {size} "
                              f"with {components} component(s)")
    channels = components if components > 1 else (size[3] if dim == 4 else 1)
    if channel is None and channels > 1:
        raise Not3DImageError(f"{path}: the image has {channels} channels; choose one (channel=0..{channels - 1})")
    channel = channel or 0
    if not 0 <= channel < channels:
        raise ValueError(f"{path}: channel {channel} requested but the image has {channels} channel(s)")
    array = sitk.GetArrayViewFromImage(image)
    array = array[..., channel] if components > 1 else (array[channel] if dim == 4 else array)
    direction = np.reshape(image.GetDirection(), (dim, dim))[:3, :3]
    geometry = Geometry(image.GetSpacing()[:3], image.GetOrigin()[:3], direction)
    return Volume(np.array(array), geometry)


def write_volume(volume: Volume, path, description: Optional[str] = None,
                 metadata: Optional[Dict[str, str]] = None, overwrite: bool = False) -> Path:
    """Write `volume` to .nii/.nii.gz/.nrrd/.mha in its own geometry.

    `description` marks the file (e.g. "SYNTHETIC GEM-3D ..."): NIfTI keeps its first 79
    characters in `descrip`; NRRD/MHA keep it whole under DESCRIPTION_KEY. `metadata` adds
    NRRD/MHA header keys; NIfTI has no free-form keys and ignores them.
    """
    path = Path(path)
    ext = extension(path)
    if ext not in WRITE_EXTENSIONS:
        raise ValueError(f"{path}: cannot write '{ext}' files; use one of {', '.join(WRITE_EXTENSIONS)}")
    _check_target(path, overwrite)
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = Volume(array, volume.geometry).to_sitk()
    for key, value in (metadata or {}).items():
        image.SetMetaData(str(key), str(value))
    if description is not None:
        if ext.startswith(".nii"):
            image.SetMetaData("ITK_FileNotes", description[:NIFTI_DESCRIP_LENGTH])
        else:
            image.SetMetaData(DESCRIPTION_KEY, description)
    write_atomically(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True),
                     lambda tmp: _verify_written(tmp, image.GetSize()), _raw_bytes(array))
    return path


def _raw_bytes(array: np.ndarray) -> int:
    """Uncompressed size plus a header: what an output may need on disk at most."""
    return int(array.nbytes) + (64 << 10)


def _verify_written(path: Path, size) -> None:
    """Read the written file back (complete, right size) before it replaces anything."""
    image = _read_file(path)
    if image.GetSize() != size:
        raise ValueError(f"{path}: wrote a {image.GetSize()} image instead of {size}")


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")


def nifti_nonfinite_count(path, channel: Optional[int] = None) -> int:
    """NaN/inf voxels stored in a NIfTI file (in one channel, if given).

    ITK's NIfTI reader silently turns them into 0, so `read_volume` cannot see them: this
    scans the stored values. A channel is a contiguous block for both 4D layouts.
    """
    path = Path(path)
    metadata = read_metadata(path)
    dtype = {"16": "f4", "64": "f8"}.get(metadata["datatype"])
    if dtype is None:  # integer types hold no NaN
        return 0
    dims = [int(metadata[f"dim[{i}]"]) for i in range(1, int(metadata["dim[0]"]) + 1)]
    block = int(np.prod(dims[:3]))
    count = block if channel is not None else int(np.prod(dims))
    with (gzip.open(path, "rb") if extension(path) == ".nii.gz" else open(path, "rb")) as f:
        endian = "<" if int.from_bytes(f.read(4), "little") in (348, 540) else ">"
        f.seek(int(float(metadata["vox_offset"])) + (channel or 0) * block * int(dtype[1]))
        values = np.frombuffer(f.read(count * int(dtype[1])), dtype=endian + dtype)
    return int(np.count_nonzero(~np.isfinite(values)))


def read_metadata(path) -> Dict[str, str]:
    """Header key/values of an image file, without reading its voxels."""
    reader = _header(path)
    return {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}


def read_description(path) -> Optional[str]:
    """The description written by `write_volume` (None when the file has none)."""
    metadata = read_metadata(path)
    key = "descrip" if extension(path).startswith(".nii") else DESCRIPTION_KEY
    return metadata.get(key) or None


def read_segmentation(path) -> Tuple[Volume, List[dict]]:
    """A Slicer `.seg.nrrd` as one label volume plus its segments (name, label_value, color).

    Overlapping segments (several layers) are flattened; later segments win where they
    overlap. Label values are the file's when they are unique across layers, else the
    segments are renumbered 1..n in file order (the returned segments say which).
    """
    import slicerio

    path = regular_file(path, "segmentation file")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # slicerio/pynrrd raise IOError, NRRDError, ValueError...
        raise ValueError(f"cannot read segmentation {path}: {error}") from None
    segments = segmentation.get("segments") or []
    if not segments:
        raise ValueError(f"{path}: no segments in this file (read a plain label volume with read_volume)")
    values = [s.get("labelValue", 1) for s in segments]
    if len(set(values)) != len(values):
        values = list(range(1, len(segments) + 1))
    voxels = segmentation["voxels"]
    labels = np.zeros(voxels.shape[-3:], dtype=np.result_type(voxels.dtype, np.min_scalar_type(max(values))))
    result = []
    for segment, value in zip(segments, values):
        labels[slicerio.segment_mask(segmentation, segment)] = value
        result.append({"name": segment.get("name", segment["id"]), "label_value": int(value),
                       "color": tuple(segment.get("color", DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]))})
    geometry = _geometry_from_ijk_to_lps(segmentation["ijkToLPS"])
    return Volume(np.ascontiguousarray(labels.transpose(2, 1, 0)), geometry), result


def _geometry_from_ijk_to_lps(matrix) -> Geometry:
    matrix = np.asarray(matrix, dtype=np.float64)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    return Geometry(spacing, matrix[:3, 3], matrix[:3, :3] / spacing)


def write_segmentation(label_volume: Volume, path, segments: List[dict], overwrite: bool = False,
                       description: Optional[str] = None) -> Path:
    """Write a label volume as a Slicer `.seg.nrrd`, one segment per dict(name, label_value[, color]).

    `description` marks the file (header key DESCRIPTION_KEY, as for `write_volume`'s NRRD).

    Every non-zero label in the volume must have a segment: Slicer would hide the others.
    """
    import slicerio

    path = Path(path)
    _check_target(path, overwrite)
    array = label_volume.array
    values = [int(s["label_value"]) for s in segments]
    if min(values, default=1) <= 0 or len(set(values)) != len(values):
        raise ValueError(f"{path}: segment label values must be unique and > 0, got {values}")
    present = set(np.unique(array).tolist()) - {0}
    if present - set(values):
        raise ValueError(f"{path}: label values {sorted(present - set(values))} of the volume have no segment")
    dtype = np.min_scalar_type(max(values, default=1))
    geometry = label_volume.geometry
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = geometry.direction * np.asarray(geometry.spacing)
    ijk_to_lps[:3, 3] = geometry.origin
    segmentation = {
        "voxels": np.asarray(array, dtype=dtype).transpose(2, 1, 0),
        "ijkToLPS": ijk_to_lps,
        "segments": [{"id": f"Segment_{value}", "name": s["name"], "labelValue": value, "layer": 0,
                      "color": list(s.get("color") or DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)])}
                     for s, value in zip(segments, values)],
    }
    if description is not None:
        segmentation[DESCRIPTION_KEY] = description
    write_atomically(path, lambda tmp: slicerio.write_segmentation(str(tmp), segmentation),
                     lambda tmp: _read_file(tmp), _raw_bytes(segmentation["voxels"]))
    return path
