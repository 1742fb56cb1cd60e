"""GEM3DEditorLib (the Slicer module's Slicer-free logic), tested without Slicer.

The worker transport is tested against real subprocesses: a small script written here speaks
the stdio protocol (docs/worker-protocol.md) and can crash or ignore cancel requests.
"""
import json
import os
import re
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "GEM3DEditor"))

from GEM3DEditorLib import (batch, dependencies, edits, export, geometry,  # noqa: E402
                            label_matching, mask_history, process, sink, thumbnail)
from gem3d.worker_client import WorkerClient, environment_with_path, worker_command  # noqa: E402

from gem3d.request import GenerateRequest  # noqa: E402
from gem3d.volume import Geometry, Volume  # noqa: E402


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def job_files(tmp_path):
    """A bundle folder, a reference and a mask file, as the module writes them."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({
        "format": "gem3d-bundle", "format_version": 1, "modality": "mri",
        "label_map": {"labels": {"1": "necrotic core", "2": "edema", "4": "enhancing tumour"}, "outside": -1},
        "slice_size": 64, "window_length": 16, "sampler": {"name": "dpm++", "steps": 20}}))
    reference = tmp_path / "reference.nrrd"
    mask = tmp_path / "mask.nrrd"
    reference.write_bytes(b"x")
    mask.write_bytes(b"x")
    return {"bundle": str(bundle), "reference": str(reference), "mask": str(mask),
            "out": str(tmp_path / "out" / "synthetic.nii.gz")}


def make_request(files, job_id="j1", **options):
    """The worker's `generate` message, built with gem3d's contract (gem3d.request)."""
    return GenerateRequest(files["reference"], files["mask"], files["out"], bundle=files["bundle"], job_id=job_id,
                           **options).to_message()


def test_the_client_refuses_a_request_the_contract_refuses(fake_worker, job_files):
    """Refused before it reaches the worker, as an `error` event (never an exception in Slicer)."""
    client = fake_worker("normal")
    for job_id, change, expected in (("j1", {"seed": -1}, "seed"), ("j2", {"slice_count": 3}, "unknown request key")):
        assert client.submit(dict(make_request(job_files, job_id=job_id), **change)) == job_id
        events = [e for e in client.poll(timeout=5.0) if e["event"] != "heartbeat"]
        assert [(e["event"], e["job_id"]) for e in events] == [("error", job_id)] and expected in events[0]["message"]
    assert client.active_jobs == []
    client.close()


# ----------------------------------------------------------------------------- label matching
BRATS = {1: "necrotic core", 2: "edema", 4: "enhancing tumour"}
ABDOMEN = {1: "liver", 2: "kidney", 3: "spleen", 4: "pancreas"}
TISSUE = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue~"
          "SCT^{code}^{meaning}~^^~Anatomic codes - DICOM master list~{region}~^^")


@pytest.mark.parametrize("name, label", [
    ("edema", 2), ("Oedema", 2), ("ED", 2), ("peritumoral edema", 2), ("SNFH", 2),
    ("Necrosis", 1), ("necrotic core", 1), ("NCR", 1), ("NCR/NET", 1),
    ("enhancing", 4), ("Enhancing tumor", 4), ("ET", 4), ("enhancing tumour", 4),
])
def test_segment_names_and_synonyms_match_brats_labels(name, label):
    matches, unmatched = label_matching.match_segments([label_matching.SegmentInfo("s", name)], BRATS)
    assert matches[0].label == label and not unmatched


def test_terminology_type_codes_match_and_anatomic_region_does_not():
    liver = label_matching.SegmentInfo("a", "Segment_1", TISSUE.format(code="10200004", meaning="Liver", region="^^"))
    kidney = label_matching.SegmentInfo("b", "right one", TISSUE.format(code="9846003", meaning="Right kidney",
                                                                          region="^^"))
    tumour_in_liver = label_matching.SegmentInfo(
        "c", "lesion", TISSUE.format(code="108369006", meaning="Neoplasm", region="SCT^10200004^Liver"))
    edema_by_meaning = label_matching.SegmentInfo("d", "x", TISSUE.format(code="99", meaning="Oedema", region="^^"))
    matches, unmatched = label_matching.match_segments([liver, kidney, tumour_in_liver], ABDOMEN)
    assert [m.label for m in matches] == [1, 2, None]
    assert "terminology" in matches[0].reason
    assert [m.segment_id for m in unmatched] == ["c"]
    assert label_matching.match_segments([edema_by_meaning], BRATS)[0][0].label == 2


def test_unmatched_segments_are_reported_and_never_mapped_by_label_value_or_number():
    segments = [label_matching.SegmentInfo("a", "tumour blob", label_value=2),
                label_matching.SegmentInfo("b", "Segment_4", label_value=7),
                label_matching.SegmentInfo("c", "label 1", label_value=1),
                label_matching.SegmentInfo("d", "edema", label_value=1)]
    matches, unmatched = label_matching.match_segments(segments, BRATS)
    assert [m.label for m in matches] == [None, None, None, 2]
    assert [m.name for m in unmatched] == ["tumour blob", "Segment_4", "label 1"]


def test_bundle_label_names_are_matched_through_synonyms_too():
    msd = {1: "edema", 2: "non-enhancing tumour", 3: "enhancing tumour"}
    names = ["ED", "necrosis", "ET"]
    matches, _ = label_matching.match_segments(
        [label_matching.SegmentInfo(n, n) for n in names], msd)
    assert [m.label for m in matches] == [1, 2, 3]


def test_composed_mask_keeps_inner_structures():
    edema = np.zeros((4, 8, 8), bool)
    edema[:, 1:7, 1:7] = True
    core = np.zeros_like(edema)
    core[1:3, 3:5, 3:5] = True
    mask = label_matching.compose_label_mask(edema.shape, [(core, 4), (edema, 2), (core, 0)])
    assert mask[2, 4, 4] == 4 and mask[0, 1, 1] == 2 and mask[0, 0, 0] == 0
    assert (mask == 4).sum() == core.sum()
    with pytest.raises(ValueError, match="does not fit"):
        label_matching.compose_label_mask((2, 2, 2), [(core, 1)])


# ----------------------------------------------------------------------------- undo history
def test_undo_redo_restore_the_arrays_and_the_applied_specs():
    history = mask_history.MaskHistory()
    state = {"tumour": np.zeros((3, 4, 5), np.uint8), "edema": np.ones((3, 4, 5), np.uint8)}
    first, second = {"op": "flip", "axis": "LR"}, {"op": "scale", "factor": 1.2}
    history.record({"tumour": state["tumour"].copy()}, first)
    state["tumour"][1] = 1
    history.record({"tumour": state["tumour"].copy(), "edema": state["edema"].copy()}, second)
    state["tumour"][:] = 1
    state["edema"][:] = 0
    assert history.applied_specs() == [first, second]

    restored, spec = history.undo(lambda key: state[key])
    assert spec == second and set(restored) == {"tumour", "edema"}
    assert restored["tumour"][1].all() and not restored["tumour"][0].any() and restored["edema"].all()
    assert restored["tumour"].dtype == np.uint8
    state.update(restored)
    assert history.applied_specs() == [first]

    restored, spec = history.redo(lambda key: state[key])
    assert spec == second and restored["tumour"].all() and not restored["edema"].any()
    state.update(restored)
    history.undo(lambda key: state[key])
    history.record({"tumour": state["tumour"]}, {"op": "rotate", "degrees": [1, 0, 0]})
    assert not history.can_redo  # a new edit drops the redo branch


def test_history_is_bounded_and_packs_binary_masks():
    mask = np.zeros((8, 64, 64), np.uint8)
    history = mask_history.MaskHistory(max_bytes=5 * mask.size // 8, max_steps=100)
    for i in range(10):
        assert history.record({"s": mask}, {"op": "translate", "mm": [i, 0, 0]})
    assert history.nbytes <= history.max_bytes
    assert [s["mm"][0] for s in history.applied_specs()] == [5, 6, 7, 8, 9]  # oldest forgotten
    labels = np.arange(8 * 64 * 64, dtype=np.int32).reshape(mask.shape)  # not binary: stored as is
    assert not history.record({"s": labels}, {"op": "x"})  # alone above the bound
    assert not history.can_undo
    steps = mask_history.MaskHistory(max_steps=3)
    for i in range(5):
        steps.record({"s": mask}, {"op": str(i)})
    assert [s["op"] for s in steps.applied_specs()] == ["2", "3", "4"]


# ----------------------------------------------------------------------------- sink
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_sink_fills_the_output_along_any_axis(axis, tmp_path):
    truth = np.random.default_rng(axis).normal(size=(6, 7, 8)).astype(np.float32)
    out = np.zeros_like(truth)
    calls = []
    array_sink = sink.ArraySink(out, on_modified=lambda: calls.append(1))
    array_sink.check_started(truth.shape, axis)
    length = truth.shape[axis]
    windows = [(0, 3), (2, 5), (4, length)]  # overlapping by one slice, as the engine sends them
    for i, (start, stop) in enumerate(windows):
        assert array_sink.filled_fraction < 1.0 and not array_sink.complete
        slab = np.take(truth, range(start, stop), axis=axis)
        array_sink.apply_event({"event": "window", "axis": axis, "start": start, "stop": stop, "slab": slab})
    assert array_sink.complete and array_sink.filled_fraction == 1.0 and len(calls) == 3
    np.testing.assert_array_equal(out, truth)


def test_sink_rejects_out_of_range_and_misshapen_slabs():
    out = np.zeros((4, 5, 6), np.float32)
    array_sink = sink.ArraySink(out)
    with pytest.raises(ValueError, match="outside"):
        array_sink.apply(0, 3, 5, np.zeros((2, 5, 6), np.float32))
    with pytest.raises(ValueError, match="outside"):
        array_sink.apply(2, -1, 2, np.zeros((4, 5, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        array_sink.apply(1, 0, 2, np.zeros((4, 3, 6), np.float32))
    with pytest.raises(ValueError, match="grid of shape"):
        array_sink.check_started((4, 5, 7), 0)
    assert not out.any()


# ----------------------------------------------------------------------------- export
def make_case(shape=(5, 6, 7)):
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    geometry = Geometry((0.9, 0.8, 2.5), (10.0, -20.0, 30.0), direction)
    image = Volume((np.random.default_rng(0).random(shape) * 1000).astype(np.float32), geometry)
    labels = np.zeros(shape, np.uint8)
    labels[1:3, 2:4, 2:5] = 2
    labels[2, 3, 3] = 4
    return image, Volume(labels, geometry)


def test_dicom_tags_carry_nothing_of_the_source_and_new_valid_uids():
    tags = export.dicom_tags("GEM-3D case 1", modality="MR")
    again = export.dicom_tags("GEM-3D case 1", modality="MR")
    assert tags["0008|103e"].startswith("SYNTHETIC")
    assert tags["0008|0008"] == "DERIVED\\SECONDARY" and tags["0028|0301"] == "NO"
    assert tags["0010|0010"] == "SYNTHETIC^PHANTOM" and tags["0010|0030"] == ""
    for key in ("0020|000d", "0020|000e", "0020|0052"):
        uid = tags[key]
        assert export.is_valid_uid(uid) and len(uid) <= 64 and set(uid) <= set("0123456789.")
        assert uid != again[key]
    assert not export.is_valid_uid("1.2.03") and not export.is_valid_uid("1." + "2" * 70)
    assert export.dicom_tags(patient_name="Study^Volunteer")["0010|0010"] == "Study^Volunteer"
    assert export.synthetic_description("Synthetically made") == "SYNTHETIC Synthetically made"
    assert export.synthetic_description("synthetic: case 2") == "synthetic: case 2"


def test_export_writes_marked_files_and_reads_back(tmp_path):
    from gem3d.io import read_description, read_segmentation, read_volume

    image, mask = make_case()
    paths = export.export_case(image, str(tmp_path), "case", mask=mask, provenance={"seed": 3},
                               label_names={2: "edema", 4: "enhancing tumour"}, image_format="nrrd")
    back = read_volume(paths["image"])
    np.testing.assert_allclose(back.array, image.array)
    assert back.geometry.allclose(image.geometry)
    assert read_description(paths["image"]).startswith("SYNTHETIC")
    assert read_description(paths["segmentation"]).startswith("SYNTHETIC")
    labels, segments = read_segmentation(paths["segmentation"])
    assert {(s["name"], s["label_value"]) for s in segments} == {("edema", 2), ("enhancing tumour", 4)}
    np.testing.assert_array_equal(labels.array, mask.array)
    record = json.loads(Path(paths["provenance"]).read_text())
    assert record["seed"] == 3 and record["synthetic"] is True and record["description"].startswith("SYNTHETIC")


def test_export_dicom_series_is_synthetic_and_anonymous(tmp_path):
    import SimpleITK as sitk

    image, mask = make_case()
    paths = export.export_case(image, str(tmp_path), "case", mask=mask, dicom=True, modality="MR",
                               description="from Doe^John's scan")
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(paths["dicom"])
    assert len(files) == image.shape[0]
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    series = reader.Execute()
    np.testing.assert_allclose(sitk.GetArrayFromImage(series), image.array, atol=0.5)
    np.testing.assert_allclose(series.GetSpacing(), image.geometry.spacing, atol=1e-4)
    np.testing.assert_allclose(series.GetOrigin(), image.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(np.reshape(series.GetDirection(), (3, 3)), image.geometry.direction, atol=1e-5)
    first = {key: reader.GetMetaData(0, key).strip() for key in reader.GetMetaDataKeys(0)}
    assert first["0008|103e"].startswith("SYNTHETIC") and first["0010|0010"] == "SYNTHETIC^PHANTOM"
    assert first["0008|0008"] == "DERIVED\\SECONDARY" and first["0028|0301"] == "NO"
    uids = {reader.GetMetaData(i, "0008|0018").strip() for i in range(len(files))}
    assert len(uids) == len(files) and all(export.is_valid_uid(u) for u in uids)
    assert export.is_valid_uid(first["0020|000e"])


def test_a_dicom_export_leaves_the_process_locale_as_it_was(tmp_path):
    """GDCM resets the C locale to "C" while writing: Python's default text encoding then turns ASCII,
    and any later subprocess output or file with a non-ASCII character fails to decode."""
    import locale

    before = locale.setlocale(locale.LC_ALL)
    image, mask = make_case()
    export.export_case(image, str(tmp_path), "case", mask=mask, dicom=True, modality="MR", description="d")
    assert locale.setlocale(locale.LC_ALL) == before


def test_dicom_of_normalised_intensities_keeps_them_through_a_recorded_mapping():
    values = np.linspace(0.0, 1.0, 60).reshape(3, 4, 5)
    pixels, scale, offset = export.dicom_pixels(values, "MR")
    assert pixels.dtype == np.int16 and scale != 1.0
    np.testing.assert_allclose(pixels / scale + offset, values, atol=0.5 / scale + 1e-9)
    hu, scale, offset = export.dicom_pixels(np.array([[[-1000.4, 40.0, 3000.0]]]), "CT")
    assert (scale, offset) == (1.0, 0.0) and hu.tolist() == [[[-1000, 40, 3000]]]


def test_export_never_overwrites_the_source_or_existing_files(tmp_path):
    image, mask = make_case()
    source = tmp_path / "case.nii.gz"
    source.write_bytes(b"the source scan")
    with pytest.raises(FileExistsError):
        export.export_case(image, str(tmp_path), "case", unique=False)
    with pytest.raises(ValueError, match="source"):
        export.export_case(image, str(tmp_path), "case", unique=False, protected=[str(source)])
    paths = export.export_case(image, str(tmp_path), "case", mask=mask, protected=[str(source)])
    assert source.read_bytes() == b"the source scan"
    assert Path(paths["image"]).name == "case_2.nii.gz"
    second = export.export_case(image, str(tmp_path), "case", mask=mask)
    assert Path(second["image"]).name == "case_3.nii.gz"


# ----------------------------------------------------------------------------- geometry, thumbnail
def test_slicer_geometry_round_trips_with_lps_and_finds_slices():
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    g = Geometry((0.9, 0.8, 2.5), (10.0, -20.0, 30.0), direction)
    ijk_to_ras = geometry.ijk_to_ras_from_geometry(g)
    point_lps = g.index_to_physical([2, 3, 4])
    ras = ijk_to_ras @ np.array([2, 3, 4, 1.0])
    np.testing.assert_allclose(ras[:3], point_lps * [-1, -1, 1])
    assert geometry.geometry_from_ijk_to_ras(ijk_to_ras).allclose(g)
    assert geometry.axial_axis(ijk_to_ras, (10, 8, 6)).axis == 0
    assert geometry.slice_index_at(ijk_to_ras, ras[:3], 0, 10) == 4
    centre = geometry.slice_center_ras(ijk_to_ras, (10, 8, 6), 0, 7)
    assert geometry.slice_index_at(ijk_to_ras, centre, 0, 10) == 7
    assert geometry.axial_axis(ijk_to_ras, (10, 8, 6)).position(9) == 1.0
    head_first = np.diag([1.0, 1.0, -2.0, 1.0])  # k runs toward inferior
    assert geometry.axial_axis(head_first, (5, 8, 6)).position(0) == 1.0
    assert geometry.axial_axis(head_first, (5, 8, 6)).position(1) == 0.75
    sagittal_stack = np.array([[0, 0, -1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # j runs S
    assert geometry.axial_axis(sagittal_stack, (6, 5, 4)).axis == 1


def test_thumbnail_is_oriented_like_slicer_and_loads_in_qt(tmp_path):
    lps_identity = np.diag([-1.0, -1.0, 1.0, 1.0])  # i -> L, j -> P: row 0 anterior, column 0 right
    array = np.zeros((2, 4, 6))
    array[1, 0, 0] = 1.0  # most anterior, most right voxel
    image = thumbnail.display_slice(array, lps_identity, 0, 1)
    assert image[0, 0] == 1.0
    flipped = np.diag([1.0, 1.0, 1.0, 1.0])  # i -> R, j -> A: Slicer shows it mirrored both ways
    assert thumbnail.display_slice(array, flipped, 0, 1)[-1, -1] == 1.0
    path = thumbnail.write_thumbnail(str(tmp_path / "t.pgm"), np.random.rand(3, 40, 20), lps_identity, 0, 1, 64)
    from PySide6.QtGui import QImage

    loaded = QImage(path)
    assert not loaded.isNull() and (loaded.width(), loaded.height()) == (32, 64)


# ----------------------------------------------------------------------------- dependencies, bundle, batch, edits
def test_dependency_table_matches_pyproject():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(declared) == sorted(dependencies.REQUIREMENTS.values())


def test_missing_dependencies_are_listed_and_torch_goes_apart():
    present = {"numpy", "scipy", "SimpleITK"}
    missing = dependencies.missing_packages(lambda name: object() if name in present else None)
    names = [name for name, _ in missing]
    assert "torch" in names and "diffusers" in names and "numpy" not in names
    torch, others = dependencies.split_torch(missing)
    assert torch.startswith("torch") and "diffusers>=0.30,<0.43" in others and not any(
        r.startswith("torch>") for r in others)
    assert dependencies.missing_packages() == []  # this test environment has everything
    assert dependencies.distribution_name("PyYAML>=6,<7") == "PyYAML"
    assert dependencies.loaded_distributions(["yaml", "os"]) == ["PyYAML"]
    assert dependencies.pins({"numpy": "1.26.4"}) == ["numpy==1.26.4"]
    assert dependencies.changed({"numpy": "1.0", "scipy": "1.1"}, {"numpy": "2.0", "scipy": "1.1"}) == ["numpy"]


def pytorch_utils_arguments(backend, version):
    """The signature of PyTorchUtilsLogic._getPipInstallArguments (SlicerPyTorch): its own set of packages."""
    return ["install", "torch" + version, "torchvision"] + ([f"--pytorch-computation-backend={backend}"]
                                                            if backend else [])


def test_torch_goes_through_the_pytorch_extension_where_installed_else_light_the_torch():
    req = "torch>=2.1,<3"
    assert dependencies.torch_install_arguments(req) == ["install", "torch>=2.1,<3"]
    assert dependencies.torch_install_arguments(req, "cpu") == ["install", "torch>=2.1,<3",
                                                                "--pytorch-computation-backend=cpu"]
    assert dependencies.torch_install_arguments(req, "cuda", pytorch_utils_arguments) == \
        ["install", "torch>=2.1,<3", "torchvision"]
    assert dependencies.torch_install_arguments(req, "cpu", pytorch_utils_arguments)[-1] == \
        "--pytorch-computation-backend=cpu"


def test_a_shared_torch_outside_the_bounds_is_not_replaced_behind_the_pytorch_extension():
    req = "torch>=2.1,<2.9"
    problem = dependencies.shared_torch_problem("2.9.1+cu126", req, pytorch_extension=True)
    assert "PyTorch 2.9.1+cu126" in problem and "PyTorch Utils" in problem
    assert dependencies.shared_torch_problem("2.8.0", req, pytorch_extension=True) is None
    assert dependencies.shared_torch_problem("2.9.1", req, pytorch_extension=False) is None  # ours to replace
    assert dependencies.shared_torch_problem(None, req, pytorch_extension=True) is None


def test_the_installer_never_imports_torch_into_slicer():
    source = (ROOT / "GEM3DEditor" / "GEM3DEditorLib" / "install.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*(import torch|from torch)", source, re.M)
    assert "installTorch(" not in source and "torchInstalled(" not in source and '"-m", "light_the_torch"' in source


def test_batch_commands(tmp_path, job_files):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    cmd = batch.batch_command("python", "enhance", str(dataset), str(tmp_path / "out"), times=3, augment=True,
                              bundle=job_files["bundle"], seed=2)
    assert cmd[:4] == ["python", "-m", "gem3d", "enhance"]
    assert cmd[cmd.index("--times") + 1] == "3" and "--augment" in cmd and "--informed-from" not in cmd
    cmd = batch.batch_command("python", "harmonize", str(dataset), str(tmp_path / "out"),
                              informed_scan=job_files["reference"], informed_position=0.5)
    assert cmd[cmd.index("--informed-from") + 1] == job_files["reference"] and "--informed-position" in cmd
    with pytest.raises(ValueError, match="fixed informed slice"):
        batch.batch_command("python", "harmonize", str(dataset), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="differ"):
        batch.batch_command("python", "enhance", str(dataset), str(dataset))


def test_segments_move_together_and_keep_their_nesting():
    geometry_lps = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    edema = np.zeros((20, 40, 40), np.uint8)
    edema[8:14, 5:15, 4:12] = 1
    core = np.zeros_like(edema)
    core[10:12, 8:12, 6:9] = 1
    arrays = {"edema": edema, "core": core}
    moved, applied, _ = edits.apply_to_segments(arrays, geometry_lps, [edits.translate_ras([-5, 0, 0])])
    assert applied == [{"op": "translate", "mm": [5.0, -0.0, 0.0]}]  # 5 mm toward R = -5 mm along L
    np.testing.assert_array_equal(moved["edema"], np.roll(edema, 5, axis=2))  # +x (L) in this LPS grid
    np.testing.assert_array_equal(moved["core"], np.roll(core, 5, axis=2))
    assert moved["core"].dtype == np.uint8

    rotated, applied, _ = edits.apply_to_segments(arrays, geometry_lps, [edits.rotate_ras([0, 0, 30])])
    assert not np.any(rotated["core"] & ~rotated["edema"])  # the core stays inside the oedema
    assert abs(int(rotated["edema"].sum()) - int(edema.sum())) < 0.1 * edema.sum()

    rng_specs = [{"op": "move_toward_center", "max_px": 60}]
    first, applied, _ = edits.apply_to_segments(arrays, geometry_lps, rng_specs, seed=4)
    assert applied[0]["fraction"] is not None  # drawn once and recorded
    replay, _, _ = edits.apply_to_segments(arrays, geometry_lps, applied)
    np.testing.assert_array_equal(first["core"], replay["core"])
    shift = np.argwhere(first["core"]).mean(0) - np.argwhere(core).mean(0)
    np.testing.assert_allclose(shift, np.argwhere(first["edema"]).mean(0) - np.argwhere(edema).mean(0))

    flipped, _, _ = edits.apply_to_segments({"edema": edema}, geometry_lps, [{"op": "flip", "axis": "LR"}])
    np.testing.assert_array_equal(flipped["edema"], edema[:, :, ::-1])
    with pytest.raises(ValueError, match="empty"):
        edits.apply_to_segments({"x": np.zeros_like(edema)}, geometry_lps, [{"op": "flip", "axis": "LR"}])


def test_rotation_given_in_ras_is_the_same_physical_rotation_in_lps():
    import SimpleITK as sitk

    angles = [10.0, -20.0, 35.0]
    spec = edits.rotate_ras(angles)

    def matrix(degrees):
        euler = sitk.Euler3DTransform((0, 0, 0), *np.radians(degrees).tolist())
        return np.reshape(euler.GetMatrix(), (3, 3))

    flip_xy = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(flip_xy @ matrix(spec["degrees"]) @ flip_xy, matrix(angles), atol=1e-12)


def test_paper_augmentation_uses_the_engines_draw():
    rng = np.random.default_rng(0)
    assert [s["op"] for s in edits.paper_augmentation("ct", rng)] == ["rotate"]
    ops = [[s["op"] for s in edits.paper_augmentation("mri", rng)] for _ in range(20)]
    assert all(o[-1] == "move_toward_center" for o in ops) and any(o[0] == "flip" for o in ops)


def test_progress_lines_are_parsed():
    assert process.parse_progress(" 30%|###       | 3/10 [00:01<00:02,  1.2case/s]") == (3, 10)
    assert process.parse_progress("[2/5] case_001") == (2, 5)
    assert process.parse_progress("rank 0/1: 4 of 4 cases") is None


# ----------------------------------------------------------------------------- worker transport
FAKE_WORKER = textwrap.dedent('''
    """Speaks docs/worker-protocol.md; behaviour chosen by argv[1]."""
    import json, os, subprocess, sys, time
    import numpy as np
    from gem3d.events import encode_event

    mode = sys.argv[1]
    print("fake worker ready", file=sys.stderr, flush=True)
    print("a stray line that is not JSON", flush=True)

    def emit(**event):
        sys.stdout.flush()
        sys.stdout.buffer.write(encode_event(event))
        sys.stdout.buffer.flush()

    for line in sys.stdin:
        message = json.loads(line)
        if message["type"] == "cancel":
            emit(event="cancelled", job_id=message["job_id"])
            continue
        job = message["job_id"]
        shape = [6, 3, 2]
        plan = [{"start": 2, "stop": 5, "direction": "first"}, {"start": 4, "stop": 6, "direction": "up"},
                {"start": 0, "stop": 3, "direction": "down"}]
        emit(event="started", job_id=job, shape=shape, axis=0, plan=plan, geometry=None)
        if mode == "crash":
            print("Traceback (most recent call last):", file=sys.stderr, flush=True)
            print("RuntimeError: CUDA out of memory", file=sys.stderr, flush=True)
            sys.exit(3)
        if mode == "ignore-cancel":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            with open(sys.argv[2], "w") as f:
                f.write(str(child.pid))
            time.sleep(120)  # busy: never reads the cancel request
        for i, window in enumerate(plan):
            z = np.arange(window["start"], window["stop"], dtype=np.float32)
            emit(event="window", job_id=job, axis=0, start=window["start"], stop=window["stop"],
                 direction=window["direction"], slab=np.broadcast_to(z[:, None, None], (len(z), 3, 2)),
                 progress=(i + 1) / 3)
        emit(event="finished", job_id=job, outputs={"image": message["out"]}, timings={"total": 0.1})
''')


@pytest.fixture
def fake_worker(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    clients = []

    def start(mode, *args, cancel_timeout=10.0):
        env = environment_with_path(None, [])
        client = WorkerClient([sys.executable, str(script), mode, *args], env=env,
                              cancel_timeout=cancel_timeout).start()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.kill()
        client.close(timeout=2)


def wait_for(client, kinds, timeout=30.0):
    """Events until one of `kinds` arrives (bounded: fails instead of hanging)."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += client.poll(timeout=0.1)
        if events and events[-1]["event"] in kinds:
            return events
    raise AssertionError(f"no {kinds} event within {timeout} s; got {[e['event'] for e in events]}")


def test_worker_events_arrive_in_order_and_fill_the_output(fake_worker, job_files):
    client = fake_worker("normal")
    assert worker_command("PythonSlicer")[1:] == ["-m", "gem3d", "worker"]
    job = client.submit(make_request(job_files))
    assert client.active_jobs == [job]
    events = wait_for(client, ("finished", "error"))
    assert [e["event"] for e in events] == ["started", "window", "window", "window", "finished"]
    assert all(e["job_id"] == job and e["type"] == e["event"] for e in events)
    assert [e["direction"] for e in events[1:4]] == ["first", "up", "down"]
    out = np.full(events[0]["shape"], np.nan, np.float32)
    array_sink = sink.ArraySink(out)
    array_sink.check_started(events[0]["shape"], events[0]["axis"])
    for event in events[1:4]:
        array_sink.apply_event(event)
    assert array_sink.complete and not np.isnan(out).any()
    np.testing.assert_array_equal(out[:, 0, 0], np.arange(6))
    assert client.active_jobs == [] and client.running
    # stderr and stdout are read by two threads, so the stderr line may land after the events
    wanted, log, deadline = {"a stray line that is not JSON", "fake worker ready"}, [], time.monotonic() + 5
    while not wanted <= set(log) and time.monotonic() < deadline:
        log += client.log_lines()
        time.sleep(0.02)
    assert wanted <= set(log)
    client.close()
    assert client.returncode == 0 and client.poll() == []  # a normal exit is no error


def test_a_crashing_worker_yields_an_error_event_not_a_hang(fake_worker, job_files):
    client = fake_worker("crash")
    job = client.submit(make_request(job_files))
    started = time.monotonic()
    events = wait_for(client, ("error",), timeout=20)
    assert time.monotonic() - started < 20
    error = events[-1]
    assert error["job_id"] == job and error["returncode"] == 3
    assert "exit code 3" in error["message"] and "CUDA out of memory" in error["message"]
    assert not client.running and client.active_jobs == []


def test_a_worker_dying_while_idle_is_reported(fake_worker, job_files):
    client = fake_worker("normal")
    client.kill()
    events = wait_for(client, ("error",), timeout=20)
    assert events[-1]["job_id"] is None and "killed by signal" in events[-1]["message"]


def test_cancel_is_passed_on_to_a_cooperative_worker(fake_worker, job_files):
    client = fake_worker("normal")
    client.send({"type": "cancel", "job_id": "nothing"})  # a cancel for an unknown job is harmless
    events = wait_for(client, ("cancelled",))
    assert events[-1]["job_id"] == "nothing" and client.running


def test_cancel_kills_a_worker_that_ignores_it(fake_worker, job_files, tmp_path):
    pid_file = tmp_path / "child.pid"
    client = fake_worker("ignore-cancel", str(pid_file), cancel_timeout=1.0)
    job = client.submit(make_request(job_files))
    wait_for(client, ("started",))
    deadline = time.monotonic() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    asked = time.monotonic()
    client.cancel(job)
    events = wait_for(client, ("cancelled", "error"), timeout=20)
    assert time.monotonic() - asked < 10
    assert events[-1]["event"] == "cancelled" and events[-1]["job_id"] == job
    assert "did not answer the cancel request" in events[-1]["message"]
    assert not client.running
    assert _dead(child), "the worker's own child process survived the kill"


def _dead(pid, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{pid}/status")
        if status.exists() and "\nState:\tZ" in status.read_text():
            return True  # killed, waiting for init to reap it
        time.sleep(0.05)
    return False


def test_a_worker_that_cannot_start_raises_a_clear_error():
    with pytest.raises(RuntimeError, match="Could not start"):
        WorkerClient(["/nonexistent/PythonSlicer", "-m", "gem3d", "worker"]).start()


def test_command_runner_reports_progress_failure_and_cancel(tmp_path):
    script = tmp_path / "cmd.py"
    script.write_text(textwrap.dedent('''
        import sys, time
        for i in range(1, 4):
            print(f"[{i}/3] case_{i}", flush=True)
        if sys.argv[1] == "fail":
            print("ValueError: no case has a mask", file=sys.stderr, flush=True)
            sys.exit(2)
        if sys.argv[1] == "hang":
            time.sleep(120)
    '''))
    runner = process.CommandRunner([sys.executable, str(script), "ok"]).start()
    runner.wait(20)
    events = runner.poll()
    assert [e["done"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert events[-1]["event"] == "finished"
    runner = process.CommandRunner([sys.executable, str(script), "fail"], what="gem3d enhance").start()
    runner.wait(20)
    error = runner.poll()[-1]
    assert error["event"] == "error" and "exit code 2" in error["message"] and "no case has a mask" in error["message"]
    runner = process.CommandRunner([sys.executable, str(script), "hang"]).start()
    time.sleep(0.3)
    runner.cancel()
    runner.wait(20)
    assert runner.poll()[-1]["event"] == "cancelled" and not runner.running


# ----------------------------------------------------------------------------- REAL gem3d worker
def test_real_worker_streams_into_the_sink_and_cancels(tiny_bundle, brain_phantom, tmp_path):
    """WorkerClient + ArraySink against `python -m gem3d worker` (tiny random-weight bundle from
    conftest.py): the output fills window by window and equals the written file; cancel stops a job."""
    from gem3d.io import read_volume

    reference = brain_phantom / "imagesTr" / "brain_000_0000.nii.gz"
    mask = brain_phantom / "labelsTr" / "brain_000.nii.gz"
    env = environment_with_path(None, [str(ROOT / "GEM3DCore")])
    client = WorkerClient(worker_command(sys.executable), env=env, cancel_timeout=30.0).start()
    try:
        req = GenerateRequest(str(reference), str(mask), str(tmp_path / "gen.nii.gz"), bundle=str(tiny_bundle),
                              job_id="gen", start=0.5, steps=2, device="cpu").to_message()
        client.submit(req)
        events = [e for e in wait_for(client, ("finished", "error"), timeout=240) if e["event"] != "heartbeat"]
        kinds = [e["event"] for e in events]
        assert kinds[0] == "started" and kinds[-1] == "finished", events[-1]
        out = np.zeros(events[0]["shape"], np.float32)
        array_sink = sink.ArraySink(out)
        array_sink.check_started(events[0]["shape"], events[0]["axis"])
        for event in events[1:-1]:
            array_sink.apply_event(event)
        assert array_sink.complete and array_sink.windows == len(events[0]["plan"])
        np.testing.assert_allclose(out, read_volume(events[-1]["outputs"]["image"]).array, atol=1e-4)

        req = GenerateRequest(str(reference), str(mask), str(tmp_path / "slow.nii.gz"), bundle=str(tiny_bundle),
                              job_id="slow", sampler="ddim", steps=400, device="cpu").to_message()
        client.submit(req)
        wait_for(client, ("started",), timeout=120)
        client.cancel("slow")
        events = wait_for(client, ("cancelled", "finished", "error"), timeout=60)
        assert events[-1]["event"] == "cancelled" and client.running  # the worker itself stopped the job
        assert not (tmp_path / "slow.nii.gz").exists()
    finally:
        client.close(timeout=30)
    assert client.returncode == 0
