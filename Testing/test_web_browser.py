"""The browser editor end to end: a real gem3d-web server (wslink's launcher, one session process
per page, the module's EditorLogic, a real `gem3d worker` with the demo bundle) driven in
Debian's chromium by Playwright."""
from __future__ import annotations

import glob
import io
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest

from web_fixtures import (axial_pixels, browser, free_ports, lesion_centre, load_sample,  # noqa: F401
                          mask_voxels, open_page, wait_text, WebServer)


def phantom_files(folder, seed=5, index=1, names=None):
    """A phantom scan (NIfTI) and its segmentation (.seg.nrrd), its segments named `names` (label value -> name;
    default: the bundle's label names); its label volume."""
    from gem3d import phantom
    from gem3d.io import write_segmentation, write_volume

    image, labels, _truth = phantom.make_case("brain", seed=seed, index=index, size=48, slices=16)
    scan, segmentation = folder / "Jane_Doe.nii.gz", folder / "Jane_Doe.seg.nrrd"
    write_volume(image, scan)
    names = names or {4: "enhancing", 2: "edema", 1: "necrosis"}
    write_segmentation(labels, segmentation, [{"name": n, "label_value": v} for v, n in names.items()])
    return scan, segmentation, labels


def export_files(page, folder):
    """Click Export; the zip's files extracted into folder: (names, provenance)."""
    with page.expect_download() as download:
        page.click("#export")
    path = folder / "export.zip"
    download.value.save_as(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        archive.extractall(folder / "zip")
    return names, json.loads((folder / "zip" / next(n for n in names if n.endswith(".json"))).read_text())


def wait_voxels(page, expected: int) -> int:
    deadline = time.time() + 10
    while mask_voxels(page) != expected and time.time() < deadline:
        time.sleep(0.1)
    return mask_voxels(page)


def generate_and_export(page, folder) -> dict:
    """Generate with 2 steps, wait for the end, export: the provenance."""
    page.fill("#steps", "2")
    page.click("#generate")
    deadline = time.time() + 30  # busy first: the last job's "100 %" and "Done" are still shown till then
    while page.is_enabled("#generate") and time.time() < deadline:
        time.sleep(0.05)
    wait_text(page, "#windows", "100 %", timeout_s=120)
    wait_text(page, "#status", "Done")
    return export_files(page, folder)[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """wslink's launcher: every browser page gets a scene in its own session process."""
    port, session_port = free_ports(2)
    data = tmp_path_factory.mktemp("data")
    phantom_files(data, seed=7, index=2)
    server = WebServer(tmp_path_factory.mktemp("web"), "--max-upload-mb", "1", "--sessions", "2",
                       "--port", str(port), "--session-port", str(session_port), "--idle-timeout", "3",
                       "--data-root", str(data))
    yield server
    server.stop()
    assert not server.session_processes()


@pytest.fixture(scope="module")
def page(browser, server):  # noqa: F811
    page = open_page(browser, server.url)
    load_sample(page)
    yield page
    page.close()


def test_sample_then_a_paint_stroke_changes_the_mask(page):
    before = mask_voxels(page)
    assert before > 100  # the phantom's tumour, mapped to the bundle's labels
    page.click("#effect_paint")
    box = page.locator("#views img:visible").first.bounding_box()
    x, y = box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.4
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(15):  # a fast stroke: 30 ms between mouse moves
        page.mouse.move(x + 4 * step, y)
        time.sleep(0.03)
    page.mouse.up()
    deadline = time.time() + 10
    while mask_voxels(page) == before and time.time() < deadline:
        time.sleep(0.1)
    page.click("#effect_none")
    assert mask_voxels(page) > before + 20


def test_move_the_lesion_and_undo(page):
    before = lesion_centre(page)
    assert before.shape == (3,)
    page.click("#edit_right")
    deadline = time.time() + 10
    while np.allclose(lesion_centre(page), before) and time.time() < deadline:
        time.sleep(0.1)
    moved = lesion_centre(page)
    assert moved[0] - before[0] == pytest.approx(5.0, abs=2.0) and abs(moved[1] - before[1]) < 1.0
    page.click("#undo")
    deadline = time.time() + 10
    while not np.allclose(lesion_centre(page), before, atol=0.05) and time.time() < deadline:
        time.sleep(0.1)
    np.testing.assert_allclose(lesion_centre(page), before, atol=0.05)
    voxels = mask_voxels(page)
    page.click("#edit_grow")
    deadline = time.time() + 10
    while mask_voxels(page) == voxels and time.time() < deadline:
        time.sleep(0.1)
    assert mask_voxels(page) > 1.3 * voxels  # 1.2 per axis
    page.click("#undo")
    deadline = time.time() + 10
    while mask_voxels(page) != voxels and time.time() < deadline:
        time.sleep(0.1)
    assert mask_voxels(page) == voxels


def test_generate_paints_the_first_window_then_exports_a_marked_zip(page, tmp_path):
    from gem3d import phantom
    from gem3d.io import read_description, read_volume

    page.click("#informed_pick")
    informed = int(page.inner_text("#informed_slice").split()[-1])
    thumb = page.locator("#informed_thumb").screenshot()
    assert 0 <= informed < 16 and len(thumb) > 500  # a preview of that slice
    reference_view = axial_pixels(page)
    page.locator(".v-select:has(#sampler)").click()
    page.get_by_role("option", name="ddim").click()
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.click("#generate")
    deadline, painted = time.time() + 120, None
    while time.time() < deadline:  # the synthetic slice shown in the axial view, not the reference's
        shown = axial_pixels(page)
        grey = (np.ptp(shown, axis=2) < 12) & (shown.mean(axis=2) > 40)
        if grey.mean() > 0.05 and np.abs(shown - reference_view).mean() > 3.0:
            painted = page.inner_text("#windows")
            break
        time.sleep(0.1)
    assert painted is not None, "the axial view never showed a generated window"
    assert int(painted.split()[0]) >= 1
    wait_text(page, "#windows", "100 %", timeout_s=120)
    wait_text(page, "#status", "Done")
    names, provenance = export_files(page, tmp_path)
    image = next(n for n in names if n.endswith(".nrrd") and not n.endswith(".seg.nrrd"))
    segmentation = next(n for n in names if n.endswith(".seg.nrrd"))
    reference, _labels, _truth = phantom.make_case("brain", seed=0, index=0, size=64, slices=16)
    synthetic = read_volume(tmp_path / "zip" / image)
    assert synthetic.array.shape == reference.array.shape
    assert synthetic.geometry.allclose(reference.geometry, atol=1e-4)
    assert read_description(tmp_path / "zip" / image).startswith("SYNTHETIC")
    assert read_description(tmp_path / "zip" / segmentation).startswith("SYNTHETIC")
    assert provenance["synthetic"] is True
    request = provenance["slicer"]["request"]
    assert request["seed"] == 3 and request["steps"] == 2 and request["sampler"] == "ddim"
    assert request["informed"]["slice"] == informed


def test_side_by_side_shows_the_reference_beside_the_synthetic(page):
    from PIL import Image

    def views():  # an image the layout change replaces is detached while it is read: read again
        from playwright.sync_api import Error

        try:
            return [np.asarray(Image.open(io.BytesIO(v.screenshot(timeout=2000))).convert("RGB"), dtype=np.float32)
                    for v in page.locator("#views img:visible").all()]
        except Error:
            return []

    def grey(view):
        return ((np.ptp(view, axis=2) < 12) & (view.mean(axis=2) > 40)).mean()

    assert len(views()) == 3
    page.click("#layout_side")
    deadline, shown = time.time() + 30, []
    while time.time() < deadline:
        shown = views()
        if len(shown) == 2 and shown[0].shape == shown[1].shape and min(grey(v) for v in shown) > 0.05 \
                and np.abs(shown[0] - shown[1]).mean() > 3.0:
            break
        time.sleep(0.2)
    assert len(shown) == 2 and min(grey(v) for v in shown) > 0.05  # both show a scan
    assert np.abs(shown[0] - shown[1]).mean() > 3.0  # the reference beside the synthetic, not one volume twice
    assert grey(shown[1]) == pytest.approx(grey(shown[0]), rel=0.3)  # at one zoom: the head fills as much
    page.click("#layout_three")
    deadline = time.time() + 30
    while len(views()) != 3 and time.time() < deadline:
        time.sleep(0.2)
    assert len(views()) == 3


def test_cancel_mid_job(page):
    page.fill("#steps", "50")  # long enough to cancel after the first window, short enough to wait for it
    page.click("#generate")
    wait_text(page, "#status", "Window", timeout_s=120)
    page.click("#cancel")
    status = wait_text(page, "#status", "ancel", timeout_s=10)  # "Cancelling...", then the engine's answer
    deadline = time.time() + 60
    while "Cancelling" in status and time.time() < deadline:
        status = page.inner_text("#status")
        time.sleep(0.1)
    assert "ancel" in status and "Done" not in status  # the engine's "cancelled", not a finished job
    deadline = time.time() + 10
    while page.is_enabled("#export") and time.time() < deadline:
        time.sleep(0.1)
    assert page.is_enabled("#generate") and not page.is_enabled("#export"), page.inner_text("#windows")


def test_the_informed_slice_from_another_scan_reaches_the_provenance(page, tmp_path):
    assert not page.is_enabled("#informed_other")  # no other scan yet
    same = page.get_attribute("#informed_thumb", "src")
    page.click("#informed_sample")
    wait_text(page, "#status", "Other scan loaded", timeout_s=30)
    page.click("#informed_other")
    deadline = time.time() + 10
    while page.get_attribute("#informed_thumb", "src") == same and time.time() < deadline:
        time.sleep(0.1)
    assert page.get_attribute("#informed_thumb", "src") != same  # the other scan's slice
    informed = int(page.inner_text("#informed_slice").split()[-1])
    provenance = generate_and_export(page, tmp_path)
    request = provenance["slicer"]["request"]
    assert request["informed"]["source"] == "other" and request["informed"]["slice"] == informed
    assert request["informed"]["scan"]
    page.click("#informed_same")
    deadline = time.time() + 10
    while page.get_attribute("#informed_thumb", "src") != same and time.time() < deadline:
        time.sleep(0.1)
    assert page.get_attribute("#informed_thumb", "src") == same


def test_the_informed_slice_generated_by_the_slice_model_reaches_the_provenance(page, tmp_path):
    page.click("#informed_generated")  # the demo bundle has a slice model
    provenance = generate_and_export(page, tmp_path)
    assert provenance["slicer"]["request"]["informed"]["source"] == "generated"
    page.click("#informed_same")


def test_garbled_and_oversized_uploads_give_one_sentence_and_the_session_keeps_working(page, server, tmp_path):
    garbled = tmp_path / "Jane_Doe_1957.nii.gz"  # a patient's name in the file name never reaches the log
    garbled.write_bytes(b"not a volume at all" * 100)
    page.set_input_files("#upload", str(garbled))
    message = wait_text(page, "#message", "could not be read", timeout_s=30)
    assert message.count(".") <= 3 and "Traceback" not in message
    big = tmp_path / "big.nrrd"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    page.set_input_files("#upload", str(big))
    wait_text(page, "#message", "accepts up to 1 MB", timeout_s=30)
    load_sample(page)
    assert mask_voxels(page) > 100
    assert "Jane" not in server.log.read_text()


def test_upload_a_nifti_scan_and_its_seg_nrrd(page, tmp_path):
    scan, segmentation, labels = phantom_files(tmp_path)
    page.set_input_files("#upload", [str(scan), str(segmentation)])
    wait_text(page, "#status", "Uploaded case loaded", timeout_s=30)
    deadline = time.time() + 10
    while mask_voxels(page) != int((labels.array > 0).sum()) and time.time() < deadline:
        time.sleep(0.1)
    assert mask_voxels(page) == int((labels.array > 0).sum())


def test_open_a_case_from_the_data_root(page):
    from gem3d import phantom

    _image, labels, _truth = phantom.make_case("brain", seed=7, index=2, size=48, slices=16)
    for select, label, name in (("#data_scan", "Scan in the data folder", "Jane_Doe.nii.gz"),
                                ("#data_segmentation", "Segmentation", "Jane_Doe.seg.nrrd")):
        page.locator(f".v-select:has({select})").click()
        page.get_by_role("listbox", name=label).get_by_role("option", name=name, exact=True).click()
    page.click("#open_data")
    wait_text(page, "#status", "data folder", timeout_s=30)
    deadline = time.time() + 10
    while mask_voxels(page) != int((labels.array > 0).sum()) and time.time() < deadline:
        time.sleep(0.1)
    assert mask_voxels(page) == int((labels.array > 0).sum())


def test_an_unmatched_segment_is_listed_then_mapped_in_the_table_and_generate_uses_it(page, tmp_path):
    scan, segmentation, labels = phantom_files(tmp_path, seed=6, names={4: "blob", 2: "edema", 1: "necrosis"})
    page.set_input_files("#upload", [str(scan), str(segmentation)])
    row = page.locator("#segment_labels .segment_row", has_text="blob")
    row.wait_for(timeout=30000)
    assert "unmatched" in row.inner_text() and "not used" in row.inner_text()
    assert "name" in page.locator("#segment_labels .segment_row", has_text="edema").inner_text()
    assert wait_voxels(page, int(np.isin(labels.array, [1, 2]).sum())) == int(np.isin(labels.array, [1, 2]).sum())
    row.locator(".v-select").click()
    page.get_by_role("option", name="enhancing", exact=True).click()
    assert wait_voxels(page, int((labels.array > 0).sum())) == int((labels.array > 0).sum())
    assert "chosen" in row.inner_text() and "enhancing" in row.inner_text()
    provenance = generate_and_export(page, tmp_path)
    mapping = provenance["slicer"]["label_mapping"]
    assert sorted(mapping.values()) == [1, 2, 4] and len(mapping) == 3


def test_an_uploaded_scan_provides_the_informed_slice(page, tmp_path):
    scan, _segmentation, _labels = phantom_files(tmp_path, seed=8, index=3)
    page.set_input_files("#upload_informed", str(scan))
    wait_text(page, "#status", "Other scan loaded", timeout_s=30)
    page.click("#informed_other")
    provenance = generate_and_export(page, tmp_path)
    assert provenance["slicer"]["request"]["informed"]["source"] == "other"
    page.click("#informed_same")


def test_a_zipped_dicom_series_loads_with_the_reference_geometry(page, tmp_path):
    from gem3d.io import read_volume
    from test_io import write_dicom_series

    scan, segmentation, labels = phantom_files(tmp_path, seed=9, index=4)
    volume = read_volume(scan)
    write_dicom_series(tmp_path / "series", volume.with_array(np.round(volume.array * 1000 / volume.array.max())
                                                              .astype(np.int16)), "1.2.826.0.1.3680043.2.1125.7.9")
    archive = tmp_path / "Jane_Doe_dicom.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted((tmp_path / "series").iterdir()):
            z.write(path, f"series/{path.name}")
    page.set_input_files("#upload", [str(archive), str(segmentation)])
    wait_text(page, "#status", "Uploaded case loaded", timeout_s=60)
    assert wait_voxels(page, int((labels.array > 0).sum())) == int((labels.array > 0).sum())
    provenance = generate_and_export(page, tmp_path)
    image = next(p for p in (tmp_path / "zip").iterdir() if p.name.endswith(".nrrd") and
                 not p.name.endswith(".seg.nrrd"))
    synthetic = read_volume(image)
    assert synthetic.array.shape == volume.array.shape
    assert synthetic.geometry.allclose(volume.geometry, atol=1e-3)
    assert provenance["synthetic"] is True


def test_a_zip_that_points_outside_its_folder_is_refused_and_the_session_keeps_working(page, tmp_path):
    voxels = mask_voxels(page)
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("series/0001.dcm", b"DICM" * 10)
        z.writestr("../x", b"escaped")
    page.set_input_files("#upload", str(archive))
    message = wait_text(page, "#message", "outside its folder", timeout_s=30)
    assert message.count(". ") == 0 and "Traceback" not in message
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "gem3d-web-*", "x"))
    assert mask_voxels(page) == voxels and page.is_enabled("#generate")  # the case stays


def test_a_second_browser_session_gets_its_own_process_and_empty_scene(browser, server, page):  # noqa: F811
    try:
        urllib.request.urlopen(server.base, timeout=30)
        raise AssertionError("the launcher's page opened without the token")
    except urllib.error.HTTPError as e:
        assert e.code == 403
    folders = set(glob.glob(os.path.join(tempfile.gettempdir(), "gem3d-web-*")))
    second = open_page(browser, server.url)
    assert mask_voxels(second) == 0 and "Load a case" in second.inner_text("#status")
    assert mask_voxels(page) > 100
    assert len(server.session_processes()) == 2
    created = set(glob.glob(os.path.join(tempfile.gettempdir(), "gem3d-web-*"))) - folders
    assert len(created) == 1  # the second session's work folder
    folder = created.pop()
    second.close()  # its process stops --idle-timeout s later and removes its folder
    deadline = time.time() + 60
    while (len(server.session_processes()) > 1 or os.path.exists(folder)) and time.time() < deadline:
        time.sleep(0.2)
    assert len(server.session_processes()) == 1 and not os.path.exists(folder)
    assert mask_voxels(page) > 100  # the first session is untouched
