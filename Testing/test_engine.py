"""The engine end to end on real files: events, geometry, provenance, informed sources, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from gem3d.cli import main
from gem3d.bundle_format import DEMO_BUNDLE
from gem3d.engine import Engine
from gem3d.pipeline import Switches
from gem3d.io import provenance_path
from gem3d.io import read_description, read_volume, write_volume
from gem3d.request import GenerateRequest, InformedSpec
from gem3d.volume import Geometry, Volume


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(tiny_bundle, device="cpu")


def case(phantom, i=0):
    return (str(phantom / "imagesTr" / f"brain_{i:03d}_0000.nii.gz"),
            str(phantom / "labelsTr" / f"brain_{i:03d}.nii.gz"))


def run(engine, **kwargs):
    events = list(engine.generate(GenerateRequest(**kwargs)))
    return events


def test_events_geometry_and_provenance(engine, brain_phantom, tmp_path):
    reference, mask = case(brain_phantom)
    out = tmp_path / "syn.nii.gz"
    events = run(engine, reference=reference, mask=mask, out=str(out), start=0.5, steps=3, seed=1)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished", events[-1]
    windows = [e for e in events if e["event"] == "window"]
    assert len(windows) == len(events[0]["plan"]) >= 3
    assert [w["progress"] for w in windows][-1] == 1.0
    ref, syn = read_volume(reference), read_volume(out)
    assert syn.shape == ref.shape and syn.geometry.allclose(ref.geometry, atol=1e-6)
    filled = np.full(ref.shape, np.nan, dtype=np.float32)
    for w in windows:
        index = [slice(None)] * 3
        index[w["axis"]] = slice(w["start"], w["stop"])
        filled[tuple(index)] = w["slab"]
    assert not np.isnan(filled).any(), "the windows must cover every slice"
    np.testing.assert_allclose(filled, syn.array, rtol=1e-6, atol=1e-4)
    assert read_description(out).startswith("SYNTHETIC")
    record = json.loads(provenance_path(out).read_text())
    assert record["synthetic"] is True and record["seed"] == 1 and record["sampler"]["steps"] == 3
    assert record["informed_slice"]["source"] == "same"
    first = record["windows"][0]
    assert first["start"] <= record["informed_slice"]["model_index"] < first["stop"]


def test_seeded_runs_are_bitwise_reproducible(engine, brain_phantom, tmp_path):
    reference, mask = case(brain_phantom)
    arrays = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(engine, reference=reference, mask=mask, out=str(tmp_path / f"{name}.nii.gz"), start=0.2,
            steps=2, seed=seed)
        arrays.append(read_volume(tmp_path / f"{name}.nii.gz").array)
    assert np.array_equal(arrays[0], arrays[1])
    assert not np.array_equal(arrays[0], arrays[2])


def test_switches_reach_the_sampling_loop(brain_phantom, tmp_path):
    """Only the windows after the first change when they keep the original informed slice (the
    demo bundle: the random tiny one predicts the same noise whatever it is informed by)."""
    engine = Engine(DEMO_BUNDLE, device="cpu")
    reference, mask = case(brain_phantom)
    arrays = {}
    for name, switches in (("chain", Switches()), ("kept", Switches(chain_informed=False))):
        out = tmp_path / f"{name}.nii.gz"
        events = list(engine.generate(GenerateRequest(reference=reference, mask=mask, out=str(out), start=0.5,
                                                      steps=2, seed=5), switches=switches))
        assert events[-1]["event"] == "finished", events[-1]
        arrays[name] = read_volume(out).array
    first, axis = events[0]["plan"][0], events[0]["axis"]  # in the reference's slice order
    inside = [slice(None)] * 3
    inside[axis] = slice(first["start"] + 1, first["stop"] - 1)  # the first window, less its overlaps
    np.testing.assert_array_equal(arrays["chain"][tuple(inside)], arrays["kept"][tuple(inside)])
    assert not np.array_equal(arrays["chain"], arrays["kept"])


def test_picked_slice_places_the_first_window(engine, brain_phantom, tmp_path):
    reference, mask = case(brain_phantom)
    out = tmp_path / "picked.nii.gz"
    events = run(engine, reference=reference, mask=mask, out=str(out), steps=1,
                 informed=InformedSpec("same", slice=10))
    assert events[-1]["event"] == "finished", events[-1]
    record = json.loads(provenance_path(out).read_text())
    assert record["informed_slice"]["scan_index"] == 10
    first = record["windows"][0]
    assert first["start"] <= record["informed_slice"]["model_index"] < first["stop"]


@pytest.mark.parametrize("source", ["other", "fixed", "generated"])
def test_informed_sources(engine, brain_phantom, tmp_path, source):
    reference, mask = case(brain_phantom, 0)
    other, _ = case(brain_phantom, 1)
    spec = InformedSpec(source, None if source == "generated" else other, 3 if source == "fixed" else None)
    out = tmp_path / f"{source}.nii.gz"
    events = run(engine, reference=reference, mask=mask, out=str(out), informed=spec, steps=2, start=0.0)
    assert events[-1]["event"] == "finished", events[-1]
    record = json.loads(provenance_path(out).read_text())["informed_slice"]
    assert record["source"] == source
    if source == "fixed":
        assert record["scan"] == other and record["scan_index"] == 3


def test_mask_edits_are_applied_and_recorded(engine, brain_phantom, tmp_path):
    reference, mask = case(brain_phantom)
    out, mask_out = tmp_path / "cf.nii.gz", tmp_path / "cf_mask.nii.gz"
    events = run(engine, reference=reference, mask=mask, out=str(out), mask_out=str(mask_out), steps=1,
                 edits=[{"op": "flip", "axis": "x"}])
    assert events[-1]["event"] == "finished", events[-1]
    original, used = read_volume(mask).array, read_volume(mask_out).array
    assert np.array_equal(used, original[:, :, ::-1])
    assert json.loads(provenance_path(out).read_text())["mask_edits"][0]["op"] == "flip"


def test_cancel_stops_without_output(engine, brain_phantom, tmp_path):
    reference, mask = case(brain_phantom)
    out = tmp_path / "cancelled.nii.gz"
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    events = list(engine.generate(GenerateRequest(reference=reference, mask=mask, out=str(out), steps=50),
                                  cancel=cancel))
    assert events[-1]["event"] == "cancelled"
    assert len(calls) == 3, "cancel must stop within one sampler step"
    assert not out.exists()


@pytest.mark.parametrize("problem", ["unknown_label", "exists", "overwrite_input", "too_few_slices", "bad_informed"])
def test_errors_are_events_with_a_reason(engine, brain_phantom, tmp_path, problem):
    reference, mask = case(brain_phantom)
    out = tmp_path / "out.nii.gz"
    kwargs = dict(reference=reference, mask=mask, out=str(out), steps=1)
    expect = {"unknown_label": "[3]", "exists": "exists", "overwrite_input": "overwrite an input",
              "too_few_slices": "fewer than the model's window", "bad_informed": "outside the scan"}[problem]
    if problem == "unknown_label":
        labels = read_volume(mask)
        array = labels.array.copy()
        array[array == 4] = 3
        kwargs["mask"] = str(write_volume(labels.with_array(array), tmp_path / "bad_mask.nii.gz"))
    elif problem == "exists":
        out.write_bytes(b"keep me")
    elif problem == "overwrite_input":
        kwargs["out"] = reference
    elif problem == "too_few_slices":
        ref = read_volume(reference)
        kwargs["reference"] = str(write_volume(Volume(ref.array[:3], ref.geometry), tmp_path / "thin.nii.gz"))
        kwargs["mask"] = str(write_volume(Volume(read_volume(mask).array[:3], ref.geometry),
                                          tmp_path / "thin_mask.nii.gz"))
        kwargs["allow_empty_mask"] = True  # the first 3 slices hold no label
    else:
        kwargs["informed"] = InformedSpec("same", slice=99)
    events = run(engine, **kwargs)
    assert [e["event"] for e in events][-1] == "error"
    assert expect in events[-1]["message"]
    if problem == "exists":
        assert out.read_bytes() == b"keep me"


def test_generate_cli_keeps_an_oblique_anisotropic_reference_geometry(tiny_bundle, tmp_path):
    """Sagittal acquisition (slice axis = array x), oblique, anisotropic, odd sizes."""
    rotation = np.asarray(sitk.VersorTransform((0.3, -0.2, 0.9), np.deg2rad(20)).GetMatrix()).reshape(3, 3)
    columns = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float)  # i -> S, j -> L, k -> P
    direction = rotation @ columns
    geometry = Geometry((0.9, 1.3, 3.1), (-40.5, 12.25, 7.0), direction)
    rng = np.random.default_rng(0)
    image = rng.normal(100, 20, (27, 23, 9)).astype(np.float32)
    mask = np.zeros(image.shape, np.uint8)
    mask[10:15, 8:14, 3:6] = 2
    ref = write_volume(Volume(image, geometry), tmp_path / "ref.nrrd")
    m = write_volume(Volume(mask, geometry), tmp_path / "mask.nrrd")
    out = tmp_path / "syn.nrrd"
    result = CliRunner().invoke(main, ["generate", "--bundle", str(tiny_bundle), "--mask", str(m),
                                       "--reference", str(ref), "--steps", "1", "--device", "cpu",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = sitk.ReadImage(str(out))
    original = sitk.ReadImage(str(ref))
    assert written.GetSize() == original.GetSize()
    # NRRD stores direction x spacing, so a read-back is exact only to ~1e-16.
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(written.GetSpacing(), (0.9, 1.3, 3.1), rtol=0, atol=1e-12)


def _files(folder):
    return sorted(p for p in folder.rglob("*"))


def test_pipeline_generates_from_volumes_in_memory_and_writes_no_file(engine, brain_phantom, tiny_bundle,
                                                                      tmp_path, monkeypatch):
    reference, mask = case(brain_phantom)
    ref, labels, scan = read_volume(reference), read_volume(mask), read_volume(case(brain_phantom, 1)[0])
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    watched = {folder: _files(folder) for folder in (work, brain_phantom, tiny_bundle)}
    request = GenerateRequest(reference="in memory", mask="in memory", out=str(work / "never.nii.gz"),
                              informed=InformedSpec("other", scan="patient 1", position=0.5),
                              edits=[{"op": "flip", "axis": "LR"}], start=0.25, steps=2, seed=3)
    run = engine.pipeline.run(ref, labels, request, informed_scan=scan)
    events = list(run)
    assert {folder: _files(folder) for folder in watched} == watched
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and set(kinds[1:]) == {"window"}  # the result is a value, not an event
    generated = run.result
    assert generated.image.shape == ref.shape and generated.image.geometry == ref.geometry
    assert scan.shape[0] == 12  # axial, not flipped: round(0.5 * 11) = 6, at 6 / 11
    assert generated.record["informed_slice"] == {"source": "other", "scan": "patient 1", "model_index": 6,
                                                  "scan_index": 6, "position": 6 / 11}
    assert generated.record["start_position"] == 0.25 and generated.record["mask_edits"][0]["op"] == "flip"
    assert not np.array_equal(generated.mask.array, labels.array)  # the flip moved the lesion
    # the file engine is read -> this pipeline -> write: the same volume, bit for bit
    files = GenerateRequest(reference=reference, mask=mask, out=str(tmp_path / "syn.nii.gz"),
                            informed=InformedSpec("other", scan=case(brain_phantom, 1)[0], position=0.5),
                            edits=[{"op": "flip", "axis": "LR"}], start=0.25, steps=2, seed=3)
    assert [e["event"] for e in engine.generate(files)][-1] == "finished"
    np.testing.assert_array_equal(read_volume(tmp_path / "syn.nii.gz").array, generated.image.array)
