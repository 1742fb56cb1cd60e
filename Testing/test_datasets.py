from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from gem3d.cli import main
from gem3d.datasets import Case, DatasetFormatError, inspect_case, inspect_dataset, open_dataset
from gem3d.labels import ABDOMEN_CT1K, BRATS, BRATS2023, LabelMap, UnknownLabelError, preset
from gem3d.volume import Geometry, Volume

SHAPE = (12, 10, 8)  # (z, y, x)
GEOMETRY = Geometry((1.0, 1.0, 2.0), (5.0, -3.0, 10.0))


def write(path, array, geometry=GEOMETRY):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(Volume(np.asarray(array), geometry).to_sitk(), str(path))
    return path


def image(seed=0):
    return np.random.default_rng(seed).normal(100, 20, SHAPE).astype(np.float32)


def mask(values=(1, 2, 4)):
    array = np.zeros(SHAPE, np.uint8)
    for i, value in enumerate(values):
        array[2 + 3 * i:4 + 3 * i, 2:6, 2:6] = value
    return array


def brats2021_case(root, name, flair=True, seg=True, seg_values=(1, 2, 4)):
    if flair:
        write(root / name / f"{name}_flair.nii.gz", image())
    write(root / name / f"{name}_t1.nii.gz", image(1))
    if seg:
        write(root / name / f"{name}_seg.nii.gz", mask(seg_values))


def run(*args):
    return CliRunner().invoke(main, ["dataset", "inspect", *map(str, args)])


def test_nnunet_v2_layout(tmp_path):
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "kidney": 2},
            "numTraining": 2, "file_ending": ".nii.gz"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    for case in ("abd_001", "abd_002"):
        write(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", image())
        write(tmp_path / "labelsTr" / f"{case}.nii.gz", mask((1, 2)))
    write(tmp_path / "imagesTs" / "abd_101_0000.nii.gz", image())
    dataset = open_dataset(tmp_path)
    assert dataset.format == "nnunet"
    assert [(c.case_id, c.mask is not None) for c in dataset.cases] == \
        [("abd_001", True), ("abd_002", True), ("abd_101", False)]
    assert dataset.label_map.names == {1: "liver", 2: "kidney"}
    rows = inspect_dataset(dataset)
    assert [r.problems for r in rows] == [[], [], []]
    assert rows[0].shape == SHAPE and rows[0].spacing == (1.0, 1.0, 2.0) and rows[0].labels == [1, 2]
    assert rows[2].labels == []


def test_nnunet_v1_layout_and_flair_channel(tmp_path):
    meta = {"modality": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"},
            "labels": {"0": "background", "1": "necrotic core", "2": "edema", "3": "enhancing tumour"},
            "training": [{"image": "./imagesTr/b_001.nii.gz", "label": "./labelsTr/b_001.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    for channel in range(4):
        write(tmp_path / "imagesTr" / f"b_001_{channel:04d}.nii.gz", image(channel))
    write(tmp_path / "labelsTr" / "b_001.nii.gz", mask((1, 2, 3)))
    write(tmp_path / "labelsTr" / "b_002.nii.gz", mask((1, 2, 3)))
    dataset = open_dataset(tmp_path)
    assert dataset.format == "nnunet"
    assert dataset.cases[0].image.name == "b_001_0003.nii.gz"
    assert dataset.label_map == BRATS2023
    rows = inspect_dataset(dataset)
    assert rows[0].problems == []
    assert rows[1].case == "b_002" and rows[1].problems[0].startswith("image missing")


def test_msd_brain_tumour_layout_reads_flair_channel_and_msd_labels(tmp_path):
    meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
            "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
            "test": ["./imagesTs/BRATS_101.nii.gz"]}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    channels = [Volume(image(c), GEOMETRY).to_sitk() for c in range(4)]
    for name in ("imagesTr/BRATS_001.nii.gz", "imagesTs/BRATS_101.nii.gz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        sitk.WriteImage(sitk.JoinSeries(channels), str(tmp_path / name))
    (tmp_path / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    write(tmp_path / "labelsTr" / "BRATS_001.nii.gz", mask((1, 2, 3)))
    dataset = open_dataset(tmp_path)
    assert dataset.format == "msd"
    assert [(c.case_id, c.channel, c.mask is not None) for c in dataset.cases] == \
        [("BRATS_001", 0, True), ("BRATS_101", 0, False)]
    labels = dataset.label_map
    assert (labels.by_name("ED"), labels.by_name("necrosis"), labels.by_name("enhancing")) == (1, 2, 3)
    rows = inspect_dataset(dataset)
    assert [r.problems for r in rows] == [[], []]
    assert rows[0].shape == SHAPE and rows[0].labels == [1, 2, 3]


def test_brats2021_layout(tmp_path):
    brats2021_case(tmp_path, "BraTS2021_00000")
    brats2021_case(tmp_path, "BraTS2021_00002")
    (tmp_path / "name_mapping.csv").write_text("not a case")
    dataset = open_dataset(tmp_path)
    assert dataset.format == "brats2021" and dataset.label_map == BRATS
    assert [c.case_id for c in dataset.cases] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert dataset.cases[0].image.name == "BraTS2021_00000_flair.nii.gz"
    assert [r.labels for r in inspect_dataset(dataset)] == [[1, 2, 4], [1, 2, 4]]


def test_brats2023_layout_and_unlabelled_validation_set(tmp_path):
    for name in ("BraTS-GLI-00000-000", "BraTS-GLI-00001-000"):
        write(tmp_path / "train" / name / f"{name}-t2f.nii.gz", image())
        write(tmp_path / "train" / name / f"{name}-seg.nii.gz", mask((1, 2, 3)))
        write(tmp_path / "val" / name / f"{name}-t2f.nii.gz", image())
    train = open_dataset(tmp_path / "train")
    assert train.format == "brats2023" and train.label_map == BRATS2023
    assert [r.problems for r in inspect_dataset(train)] == [[], []]
    validation = open_dataset(tmp_path / "val")
    assert [c.mask for c in validation.cases] == [None, None]
    assert [r.problems for r in inspect_dataset(validation)] == [[], []]


def test_abdomenct1k_layout_from_the_root_and_from_the_image_folder(tmp_path):
    for case in ("Case_00001", "Case_00002"):
        write(tmp_path / "AbdomenCT-1K-ImagePart1" / f"{case}_0000.nii.gz", image().astype(np.int16))
        write(tmp_path / "Mask" / f"{case}.nii.gz", mask((1, 2, 3, 4)[:2]))
    write(tmp_path / "Mask" / "Case_00003.nii.gz", mask((1,)))
    dataset = open_dataset(tmp_path)
    assert dataset.format == "abdomenct1k" and dataset.label_map == ABDOMEN_CT1K
    rows = inspect_dataset(dataset)
    assert [(r.case, r.labels) for r in rows] == [("Case_00001", [1, 2]), ("Case_00002", [1, 2]), ("Case_00003", [1])]
    assert rows[2].problems[0].startswith("image missing")
    part = open_dataset(tmp_path / "AbdomenCT-1K-ImagePart1")
    assert [c.case_id for c in part.cases] == ["Case_00001", "Case_00002"]
    assert part.cases[0].mask == tmp_path / "Mask" / "Case_00001.nii.gz"


def test_unknown_layout_says_what_was_looked_for(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DatasetFormatError) as error:
        open_dataset(tmp_path)
    for looked_for in ("dataset.json", "_flair.nii.gz", "-t2f.nii.gz", "Case_XXXXX_0000.nii.gz"):
        assert looked_for in str(error.value)
    result = run(tmp_path)
    assert result.exit_code == 1 and "no known dataset layout" in result.output


def test_clean_dataset_exits_zero_with_a_table(tmp_path):
    brats2021_case(tmp_path, "BraTS2021_00000")
    result = run(tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["case", "shape(z,y,x)", "spacing(x,y,z)", "labels", "problems"]
    assert lines[2].split() == ["BraTS2021_00000", "12x10x8", "1x1x2", "1,2,4", "ok"]
    assert lines[-1] == "1 case(s) inspected, 0 with problems"


def corrupt(root, case, problem):
    """Make `case` of a BraTS 2021 folder have exactly `problem`."""
    flair, seg = root / case / f"{case}_flair.nii.gz", root / case / f"{case}_seg.nii.gz"
    if problem == "image missing":
        flair.unlink()
    elif problem == "mask missing":
        seg.unlink()
    elif problem == "image unreadable":
        flair.write_bytes(b"this is not a NIfTI file")
    elif problem == "image is not 3D":
        sitk.WriteImage(sitk.JoinSeries([Volume(image(c), GEOMETRY).to_sitk() for c in range(2)]), str(flair))
    elif problem == "NaN/inf":
        array = image()
        array[3, 4, 5], array[6, 1, 2] = np.nan, np.inf
        write(flair, array)
    elif problem == "empty mask":
        write(seg, np.zeros(SHAPE, np.uint8))
    elif problem == "not in the label map":
        write(seg, mask((1, 2, 5)))
    elif problem == "shape mismatch":
        write(seg, mask()[:, :, :7])
    elif problem == "geometry mismatch":
        write(seg, mask(), Geometry((1.0, 1.0, 2.0), (5.0, -3.0, 12.5)))


PROBLEMS = ["image missing", "mask missing", "image unreadable", "image is not 3D", "NaN/inf", "empty mask",
            "not in the label map", "shape mismatch", "geometry mismatch"]


@pytest.mark.parametrize("problem", PROBLEMS)
def test_each_bad_case_fails_inspect_naming_case_and_problem(tmp_path, problem):
    brats2021_case(tmp_path, "BraTS2021_good")
    brats2021_case(tmp_path, "BraTS2021_bad")
    corrupt(tmp_path, "BraTS2021_bad", problem)
    result = run(tmp_path)
    assert result.exit_code == 1
    assert f"BraTS2021_bad: {problem}" in result.stderr or \
        any(line.startswith("BraTS2021_bad: ") and problem in line for line in result.stderr.splitlines())
    bad_rows = [line for line in result.stdout.splitlines() if problem in line]
    assert [row.split()[0] for row in bad_rows] == ["BraTS2021_bad"]
    good_row = next(line for line in result.stdout.splitlines() if line.startswith("BraTS2021_good"))
    assert good_row.endswith(" ok")
    assert result.stdout.splitlines()[-1] == "2 case(s) inspected, 1 with problems"


def test_problem_details(tmp_path):
    brats2021_case(tmp_path, "c")
    geometry = Geometry((1.0, 1.0, 2.0), (5.0, -3.0, 12.5))
    write(tmp_path / "c" / "c_seg.nii.gz", mask((1, 2, 5)), geometry)
    array = image()
    array[0, 0, :3] = np.nan
    write(tmp_path / "c" / "c_flair.nii.gz", array)
    problems = inspect_case(Case("c", tmp_path / "c" / "c_flair.nii.gz", tmp_path / "c" / "c_seg.nii.gz"),
                            BRATS).problems
    assert problems[0] == "image has 3 NaN/inf voxel(s)"
    assert "[5]" in problems[1] and "4 enhancing tumour" in problems[1]
    assert problems[2] == f"geometry mismatch: image {GEOMETRY.describe()} vs mask {geometry.describe()}"
    assert len(problems) == 3


def test_geometry_within_float32_noise_is_not_a_mismatch(tmp_path):
    brats2021_case(tmp_path, "c")
    write(tmp_path / "c" / "c_seg.nii.gz", mask(), Geometry((1.0, 1.0, 2.0), (5.0, -3.0, 10.0 + 1e-5)))
    assert inspect_case(Case("c", tmp_path / "c" / "c_flair.nii.gz", tmp_path / "c" / "c_seg.nii.gz"),
                        BRATS).problems == []


def test_label_map_option_and_json_report(tmp_path):
    name = "BraTS-GLI-00000-000"
    write(tmp_path / "data" / name / f"{name}-t2f.nii.gz", image())
    write(tmp_path / "data" / name / f"{name}-seg.nii.gz", mask((1, 2, 3)))
    assert run(tmp_path / "data").exit_code == 0
    out = tmp_path / "report.json"
    result = run(tmp_path / "data", "--label-map", "brats", "--json", out)
    assert result.exit_code == 1
    report = json.loads(out.read_text())
    assert report["format"] == "brats2023" and report["label_map"]["labels"]["4"] == "enhancing tumour"
    [case] = report["cases"]
    assert case["case"] == name and case["shape"] == list(SHAPE) and case["labels"] == [1, 2, 3]
    assert len(case["problems"]) == 1 and "[3]" in case["problems"][0]


def test_help_texts():
    runner = CliRunner()
    assert "inspect" in runner.invoke(main, ["dataset", "--help"]).output
    text = " ".join(runner.invoke(main, ["dataset", "inspect", "--help"]).output.split())
    assert "--json" in text and "--label-map" in text and "code 1" in text


def test_nan_in_an_nrrd_nnunet_image_is_found(tmp_path):
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "edema": 1}, "file_ending": ".nrrd"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    array = image()
    array[5, 5, :4] = np.nan
    write(tmp_path / "imagesTr" / "x_0000.nrrd", array)
    write(tmp_path / "labelsTr" / "x.nrrd", mask((1,)))
    [row] = inspect_dataset(open_dataset(tmp_path))
    assert row.problems == ["image has 4 NaN/inf voxel(s)"]


def test_label_names_and_synonyms():
    assert [BRATS.by_name(n) for n in ("Necrosis", "NCR", "ed", "Edema", "ET", "enhancing tumor")] == [1, 1, 2, 2, 4, 4]
    assert BRATS2023.by_name("enhancing") == 3 and ABDOMEN_CT1K.by_name("Kidneys") == 2
    with pytest.raises(UnknownLabelError, match="no label named 'liver'.*4 enhancing tumour"):
        BRATS.by_name("liver")
    with pytest.raises(UnknownLabelError, match="brats2023"):
        preset("brats2022")
    assert preset("BraTS2023") is BRATS2023


def test_validate_names_the_unknown_values_and_where():
    body = LabelMap({1: "liver"}, outside=-1)
    assert body.validate(np.array([[[-1, 0, 1]]], np.int16), where="case 7") == [-1, 0, 1]
    with pytest.raises(UnknownLabelError, match=r"case 7: label value\(s\) \[2, 9\]"):
        body.validate(np.array([[[0, 1, 2, 9]]], np.uint8), where="case 7")
    with pytest.raises(UnknownLabelError, match=r"\[-1\]"):
        ABDOMEN_CT1K.validate(np.array([[[-1, 4]]], np.int8), where="m")
    assert issubclass(UnknownLabelError, ValueError)


def test_label_map_dict_round_trip_and_dataset_json_styles():
    body = LabelMap({1: "liver", 3: "spleen"}, outside=-1)
    assert LabelMap.from_dict(json.loads(json.dumps(body.to_dict()))) == body
    v1 = LabelMap.from_dataset_json({"0": "background", "1": "edema", "2": "non-enhancing tumor"})
    v2 = LabelMap.from_dataset_json({"background": 0, "edema": 1, "non-enhancing tumor": 2})
    assert v1 == v2 and v1.names == {1: "edema", 2: "non-enhancing tumor"}
    regions = LabelMap.from_dataset_json({"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                                          "enhancing tumor": 3})
    assert regions.names == {1: "whole tumor", 2: "tumor core", 3: "enhancing tumor"}
