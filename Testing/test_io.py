from __future__ import annotations

import gzip

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy.spatial.transform import Rotation

from gem3d.io import (Not3DImageError, nifti_nonfinite_count, read_description, read_metadata,
                      read_segmentation, read_volume, write_segmentation, write_volume)
from gem3d.outputs import write_atomically
from gem3d.volume import Geometry, Volume

AXIS = np.array([1.0, 2.0, 3.0]) / np.linalg.norm([1.0, 2.0, 3.0])
OBLIQUE = Geometry((0.7, 0.9, 3.1), (-12.5, 30.25, 7.125),
                   Rotation.from_rotvec(np.deg2rad(20) * AXIS).as_matrix())
SHAPE = (12, 10, 8)  # (z, y, x)


def random_volume(dtype=np.float32, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.normal(size=SHAPE) * 100 if np.dtype(dtype).kind == "f" else rng.integers(0, 5, SHAPE)
    return Volume(array.astype(dtype), OBLIQUE)


def test_oblique_fixture_is_really_oblique():
    off_diagonal = OBLIQUE.direction - np.diag(np.diag(OBLIQUE.direction))
    assert np.abs(off_diagonal).max() > 0.2
    assert np.allclose(OBLIQUE.direction @ OBLIQUE.direction.T, np.eye(3))


@pytest.mark.parametrize("ext, atol", [(".nrrd", 1e-12), (".mha", 1e-12), (".nii", 1e-6), (".nii.gz", 1e-6)])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_round_trip_keeps_voxels_and_oblique_anisotropic_geometry(tmp_path, ext, atol, dtype):
    volume = random_volume(dtype)
    path = write_volume(volume, tmp_path / f"v{ext}")
    back = read_volume(path)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.geometry.allclose(volume.geometry, atol=atol), back.geometry.describe()
    np.testing.assert_allclose(back.geometry.spacing, (0.7, 0.9, 3.1), atol=atol)


def test_mha_round_trip_is_exact(tmp_path):
    volume = random_volume()
    assert read_volume(write_volume(volume, tmp_path / "v.mha")).geometry == volume.geometry


def test_bool_masks_are_written_as_uint8(tmp_path):
    volume = Volume(random_volume(np.uint8).array > 2, OBLIQUE)
    back = read_volume(write_volume(volume, tmp_path / "m.nrrd"))
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, volume.array.astype(np.uint8))


def test_mhd_is_readable(tmp_path):
    volume = random_volume()
    sitk.WriteImage(volume.to_sitk(), str(tmp_path / "v.mhd"))
    back = read_volume(tmp_path / "v.mhd")
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.geometry.allclose(OBLIQUE, atol=1e-12)


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_description_survives_a_round_trip(tmp_path, ext):
    text = "SYNTHETIC GEM-3D seed=7"
    path = write_volume(random_volume(), tmp_path / f"s{ext}", description=text)
    assert read_description(path) == text
    assert read_description(write_volume(random_volume(), tmp_path / f"plain{ext}")) is None


def test_nifti_description_keeps_the_first_79_characters(tmp_path):
    text = "SYNTHETIC " + "x" * 100
    path = write_volume(random_volume(), tmp_path / "s.nii.gz", description=text)
    assert read_description(path) == text[:79]


def test_metadata_keys_are_written_to_nrrd(tmp_path):
    path = write_volume(random_volume(), tmp_path / "s.nrrd", metadata={"gem3d_seed": 7})
    assert read_metadata(path)["gem3d_seed"] == "7"


def test_existing_files_are_never_overwritten_by_default(tmp_path):
    path = write_volume(random_volume(seed=1), tmp_path / "v.nrrd")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_volume(random_volume(seed=2), path)
    np.testing.assert_array_equal(read_volume(path).array, random_volume(seed=1).array)
    write_volume(random_volume(seed=2), path, overwrite=True)
    np.testing.assert_array_equal(read_volume(path).array, random_volume(seed=2).array)
    assert [p.name for p in tmp_path.iterdir()] == ["v.nrrd"]


def test_a_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "v.nii.gz"

    def half_write(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half_write)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_extension_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="cannot write '.png'"):
        write_volume(random_volume(), tmp_path / "v.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_volume(random_volume(), tmp_path / "nope" / "v.nrrd")


@pytest.mark.parametrize("layout", ["vector", "4d-scalar"])
def test_4d_nifti_is_read_channel_by_channel_with_the_3d_geometry(tmp_path, layout):
    channels = [random_volume(seed=s) for s in range(4)]
    images = [c.to_sitk() for c in channels]
    image = sitk.Compose(images) if layout == "vector" else sitk.JoinSeries(images)
    if layout == "4d-scalar":
        direction = np.eye(4)
        direction[:3, :3] = OBLIQUE.direction
        image.SetDirection(direction.reshape(-1).tolist())
        image.SetOrigin(OBLIQUE.origin + (0.0,))
        image.SetSpacing(OBLIQUE.spacing + (1.0,))
    path = tmp_path / "brats.nii.gz"
    sitk.WriteImage(image, str(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    expected = (3, 4) if layout == "vector" else (4, 1)
    assert (reader.GetDimension(), reader.GetNumberOfComponents()) == expected
    for c in (0, 3):
        volume = read_volume(path, channel=c)
        np.testing.assert_array_equal(volume.array, channels[c].array)
        assert volume.geometry.allclose(OBLIQUE, atol=1e-6)
    with pytest.raises(Not3DImageError, match="4 channels"):
        read_volume(path)
    with pytest.raises(ValueError, match="channel 4 requested"):
        read_volume(path, channel=4)


def test_channel_zero_of_a_3d_image_is_the_image(tmp_path):
    volume = random_volume()
    np.testing.assert_array_equal(read_volume(write_volume(volume, tmp_path / "v.nrrd"), channel=0).array,
                                  volume.array)


def test_2d_image_is_rejected(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 8), np.float32)), str(tmp_path / "slice.nii.gz"))
    with pytest.raises(Not3DImageError, match="2D"):
        read_volume(tmp_path / "slice.nii.gz")


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_truncated_nifti_is_an_error_not_zeros(tmp_path, name):
    path = write_volume(random_volume(), tmp_path / name)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_volume(path)


def test_multi_member_gzip_nifti_is_read(tmp_path):
    """bgzip-style files end with another member's size: the full check must accept them."""
    raw = write_volume(random_volume(), tmp_path / "v.nii").read_bytes()
    half = len(raw) // 2
    (tmp_path / "m.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    np.testing.assert_array_equal(read_volume(tmp_path / "m.nii.gz").array, random_volume().array)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "junk.nrrd").write_text("NRRD0004\ntype: float\n")
    with pytest.raises(ValueError, match="cannot read .*junk.nrrd"):
        read_volume(tmp_path / "junk.nrrd")
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        read_volume(tmp_path / "absent.nii.gz")


def write_dicom_series(folder, volume: Volume, series_uid: str):
    folder.mkdir(exist_ok=True)
    image = volume.to_sitk()
    d = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        s.SetMetaData("0008|0060", "MR")
        s.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.7")
        s.SetMetaData("0020|000e", series_uid)
        s.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        s.SetMetaData("0020|0013", str(k + 1))
        s.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))
        s.SetMetaData("0020|0037", "\\".join(map(str, (d[0], d[3], d[6], d[1], d[4], d[7]))))
        s.SetMetaData("0028|0030", f"{volume.geometry.spacing[1]}\\{volume.geometry.spacing[0]}")
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(s)


def test_dicom_series_is_read_with_its_geometry(tmp_path):
    volume = random_volume(np.int16)
    write_dicom_series(tmp_path / "dcm", volume, "1.2.826.0.1.3680043.2.1125.7.100")
    back = read_volume(tmp_path / "dcm")
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.geometry.spacing, OBLIQUE.spacing, atol=1e-3)
    np.testing.assert_allclose(back.geometry.origin, OBLIQUE.origin, atol=1e-3)
    np.testing.assert_allclose(back.geometry.direction, OBLIQUE.direction, atol=1e-3)


def test_dicom_folder_with_two_series_gives_the_larger(tmp_path):
    big = random_volume(np.int16, seed=1)
    small = Volume(random_volume(np.int16, seed=2).array[:3], OBLIQUE)
    write_dicom_series(tmp_path / "dcm", small, "1.2.826.0.1.3680043.2.1125.7.200")
    write_dicom_series(tmp_path / "dcm", big, "1.2.826.0.1.3680043.2.1125.7.300")
    np.testing.assert_array_equal(read_volume(tmp_path / "dcm").array, big.array)


def test_folder_without_dicom_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no DICOM series"):
        read_volume(tmp_path)


SEGMENTS = [{"name": "necrotic core", "label_value": 1, "color": (1.0, 0.0, 0.0)},
            {"name": "edema", "label_value": 2},
            {"name": "enhancing tumour", "label_value": 4, "color": (0.0, 0.0, 1.0)}]


def label_volume() -> Volume:
    array = np.zeros(SHAPE, np.uint8)
    array[2:6, 3:7, 2:5] = 2
    array[3:5, 4:6, 3:4] = 1
    array[8:10, 1:3, 5:7] = 4
    return Volume(array, OBLIQUE)


def test_segmentation_round_trip_through_slicerio(tmp_path):
    labels = label_volume()
    path = write_segmentation(labels, tmp_path / "mask.seg.nrrd", SEGMENTS)
    raw = slicerio.read_segmentation(str(path))
    assert [(s["name"], s["labelValue"]) for s in raw["segments"]] == \
        [("necrotic core", 1), ("edema", 2), ("enhancing tumour", 4)]
    expected = np.eye(4)
    expected[:3, :3] = OBLIQUE.direction * np.asarray(OBLIQUE.spacing)
    expected[:3, 3] = OBLIQUE.origin
    np.testing.assert_allclose(raw["ijkToLPS"], expected, atol=1e-12)
    np.testing.assert_array_equal(raw["voxels"], labels.array.transpose(2, 1, 0))

    back, segments = read_segmentation(path)
    np.testing.assert_array_equal(back.array, labels.array)
    assert back.geometry.allclose(OBLIQUE, atol=1e-12)
    assert read_volume(path).geometry.allclose(back.geometry, atol=1e-12)
    assert [(s["name"], s["label_value"]) for s in segments] == [(s["name"], s["label_value"]) for s in SEGMENTS]
    assert segments[0]["color"] == (1.0, 0.0, 0.0) and segments[2]["color"] == (0.0, 0.0, 1.0)


def test_write_segmentation_refuses_labels_without_a_segment(tmp_path):
    with pytest.raises(ValueError, match=r"\[4\] of the volume have no segment"):
        write_segmentation(label_volume(), tmp_path / "m.seg.nrrd", SEGMENTS[:2])
    with pytest.raises(FileExistsError):
        write_segmentation(label_volume(), write_volume(label_volume(), tmp_path / "x.nrrd"), SEGMENTS)


def test_overlapping_layers_are_flattened_with_distinct_values(tmp_path):
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = OBLIQUE.direction * np.asarray(OBLIQUE.spacing)
    ijk_to_lps[:3, 3] = OBLIQUE.origin
    seg = slicerio.create_segmentation(SHAPE[::-1], ijk_to_lps)
    a, b, c = (np.zeros(SHAPE[::-1], bool) for _ in range(3))
    a[1:5, 1:5, 1:5] = True
    b[3:7, 3:7, 3:7] = True  # overlaps a: goes to a second layer
    c[0:2, 7:9, 9:11] = True
    for mask, name in ((a, "tumour"), (b, "edema"), (c, "cyst")):
        slicerio.add_segment(seg, mask, {"name": name})
    assert seg["voxels"].ndim == 4
    path = tmp_path / "overlap.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)

    labels, segments = read_segmentation(path)
    assert [(s["name"], s["label_value"]) for s in segments] == [("tumour", 1), ("edema", 2), ("cyst", 3)]
    ijk = labels.array.transpose(2, 1, 0)
    assert (ijk[a & ~b] == 1).all() and (ijk[b] == 2).all() and (ijk[c] == 3).all()
    assert (ijk[~(a | b | c)] == 0).all()
    assert labels.geometry.allclose(OBLIQUE, atol=1e-12)


def test_ras_space_segmentation_is_returned_in_lps(tmp_path):
    ijk = label_volume().array.transpose(2, 1, 0)
    header = {"space": "right-anterior-superior", "space directions": np.diag([0.7, 0.9, 3.1]),
              "space origin": np.array([10.0, 20.0, 30.0]), "kinds": ["domain"] * 3,
              "Segment0_ID": "s1", "Segment0_Name": "edema", "Segment0_LabelValue": "2", "Segment0_Layer": "0"}
    path = tmp_path / "ras.seg.nrrd"
    nrrd.write(str(path), np.where(ijk == 2, 2, 0).astype(np.uint8), header)
    labels, segments = read_segmentation(path)
    assert labels.geometry.allclose(Geometry((0.7, 0.9, 3.1), (-10.0, -20.0, 30.0), np.diag([-1.0, -1.0, 1.0])))
    assert labels.geometry.allclose(read_volume(path).geometry, atol=1e-12)
    assert segments == [{"name": "edema", "label_value": 2, "color": segments[0]["color"]}]
    assert int((labels.array == 2).sum()) == int((label_volume().array == 2).sum())


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_voxels_hidden_by_the_nifti_reader_are_counted(tmp_path, name, dtype):
    array = random_volume(dtype).array
    array[1, 2, 3], array[4, 5, 6], array[7, 8, 1] = np.nan, np.inf, -np.inf
    path = write_volume(Volume(array, OBLIQUE), tmp_path / name)
    assert np.isfinite(read_volume(path).array).all()  # ITK replaced them by 0
    assert nifti_nonfinite_count(path) == 3
    assert nifti_nonfinite_count(write_volume(random_volume(np.int16), tmp_path / f"i{name}")) == 0


@pytest.mark.parametrize("layout", ["vector", "4d-scalar"])
def test_nonfinite_count_of_one_channel(tmp_path, layout):
    channels = [random_volume(seed=s).array for s in range(3)]
    channels[2][0, 0, :5] = np.nan
    images = [Volume(c, OBLIQUE).to_sitk() for c in channels]
    path = tmp_path / "c.nii.gz"
    sitk.WriteImage(sitk.Compose(images) if layout == "vector" else sitk.JoinSeries(images), str(path))
    assert [nifti_nonfinite_count(path, c) for c in range(3)] == [0, 0, 5]
    assert nifti_nonfinite_count(path) == 5
