"""Faults at the boundaries (issue 21, docs/faults.md classes A-F): detached data files are
inputs, every written file is an output, documents cross one typed layer, numbers are finite
and in range, volumes are what they claim, writes fail as one sentence. Real files, real
subprocesses, a real `gem3d serve` on loopback."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from gem3d.io import input_files, read_volume
from gem3d.preflight import output_limits
from gem3d.request import GenerateRequest
from gem3d.volume import Geometry, Volume
from test_io import write_dicom_series

UID = "1.2.826.0.1.3680043.2.1125.21."

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789abcdef"
ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def one_sentence(text: str) -> bool:
    return "Traceback" not in text and len(text.strip().splitlines()) == 1


def gem3d(*args, timeout=120, cwd=None):
    return subprocess.run([sys.executable, "-m", "gem3d", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, cwd=cwd)


def write_nhdr(folder: Path, name: str, data_name: str, array=None) -> Path:
    """A detached NRRD header `name` whose voxels are in `data_name` (any path, as the header says)."""
    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5) if array is None else array
    header = folder / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(header))
    written = header.with_suffix(".raw")
    target = (folder / data_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(written, target)
    text = header.read_text().replace(f"data file: {written.name}", f"data file: {data_name}")
    header.write_text(text)
    return header


# ------------------------------------------------------------------ A. detached data files are inputs
def test_a_detached_data_file_is_an_input_for_the_overwrite_rules(tmp_path):
    ref = write_nhdr(tmp_path, "ref.nhdr", "ref_data.nii")
    mask = write_nhdr(tmp_path, "mask.nhdr", "mask.raw", np.ones((3, 4, 5), np.int16))
    assert [p.name for p in input_files(ref)] == ["ref.nhdr", "ref_data.nii"]
    request = GenerateRequest(str(ref), str(mask), str(tmp_path / "ref_data.nii"), overwrite=True)
    problems = request.path_problems()
    assert any("would overwrite an input" in p and "ref_data.nii" in p for p in problems), problems


@pytest.mark.parametrize("name, reader", [("x.nii.gz", "read_volume"), ("x.seg.nrrd", "read_segmentation")])
def test_a_fifo_named_like_a_volume_is_refused_not_a_hang(tmp_path, name, reader):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    code = f"from gem3d.io import {reader}\ntry:\n {reader}({str(fifo)!r})\nexcept ValueError as e:\n print(e)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert "not a regular file" in done.stdout and one_sentence(done.stdout), done.stdout + done.stderr


def test_a_header_declaring_800_cubed_voxels_is_refused_before_allocation(tmp_path):
    huge = tmp_path / "huge.nrrd"
    huge.write_bytes(b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 800 800 800\nencoding: raw\n\n" + b"\0" * 64)
    with pytest.raises(ValueError, match="declares 800 x 800 x 800 voxels"):
        read_volume(huge)
    tiny = tmp_path / "tiny.nrrd"  # a 20-ish byte NRRD: a sentence, not "needs 5722045899 MiB free"
    tiny.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 99999 99999 99999\nendian: little\nencoding: raw\n\n")
    request = GenerateRequest(str(tiny), str(tiny), str(tmp_path / "out.nii.gz"))
    with pytest.raises(ValueError, match="declares 99999 x 99999 x 99999 voxels"):
        output_limits(request)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bundle):
    """`gem3d serve` with a data root holding a header whose voxels are outside it."""
    spec = importlib.util.spec_from_file_location("remote_bench", ROOT / "benchmarks" / "remote.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = tmp_path_factory.mktemp("serve")
    root, outside = base / "data_root", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.raw").write_bytes(bytes(range(60)) * 2)
    write_nhdr(root, "escape.nhdr", "../outside/secret.raw")
    write_nhdr(root, "ok.nhdr", "ok.raw")
    (base / "token").write_text(TOKEN)
    server = bench.ServerProcess([tiny_bundle], "--token-file", str(base / "token"), "--data-root", str(root),
                                 "--max-upload-mb", "1", env={"OMP_NUM_THREADS": "1", "TMPDIR": str(base)})
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    yield client, root, outside
    client.close()
    server.stop()


def test_a_uploads_with_detached_data_are_refused(served):
    client, _, outside = served
    for suffix, header in ((".mha", f"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                                    f"ElementDataFile = {outside / 'secret.raw'}\n"),
                           (".nrrd", f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                                     f"data file: {outside / 'secret.raw'}\n\n")):
        answer = client.post(f"/v1/uploads?suffix={suffix}", content=header.encode())
        assert answer.status_code == 400 and "detached data file" in answer.json()["error"], answer.text


def test_a_data_root_header_pointing_outside_is_refused_without_the_root_path(served):
    client, root, _ = served
    answer = client.post("/v1/jobs", json={"reference": "escape.nhdr", "mask": "ok.nhdr", "out": "o.nii.gz"})
    detail = answer.json()["error"]
    assert answer.status_code == 400 and "outside the server's data root" in detail, answer.text
    assert str(root) not in detail and "secret" not in detail and one_sentence(detail)


def test_a_failed_job_on_data_root_files_does_not_show_the_root_path(served, brain_phantom):
    client, root, _ = served
    reference = read_volume(brain_phantom / "imagesTr" / "brain_000_0000.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(brain_phantom / "imagesTr" / "brain_000_0000.nii.gz")), str(root / "ref.nrrd"))
    wrong = sitk.GetImageFromArray(np.full(reference.array.shape, 9, np.uint8))  # 9: not a label of the bundle
    wrong.CopyInformation(sitk.ReadImage(str(root / "ref.nrrd")))
    sitk.WriteImage(wrong, str(root / "nine.nrrd"))
    answer = client.post("/v1/jobs", json={"reference": "ref.nrrd", "mask": "nine.nrrd", "out": "o.nii.gz",
                                           "steps": 1, "device": "cpu"})
    if answer.status_code == 400:  # refused up front: the answer must not name the root either
        detail = answer.json()["error"]
    else:
        assert answer.status_code == 201, answer.text
        with client.stream("GET", answer.json()["events"]) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("{") and '"error"' in line]
        detail = json.loads(lines[-1])["message"]
    assert "9" in detail and str(root) not in detail, detail


def test_a_huge_declared_upload_is_refused(served):
    client, _, _ = served
    header = b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 800 800 800\nencoding: gzip\n\n"
    answer = client.post("/v1/uploads?suffix=.nrrd", content=header + b"\x1f\x8b" + b"\0" * 30)
    assert answer.status_code == 400, answer.text


# ------------------------------------------------------------------ B. outputs are every file written
def cli(*args):
    from click.testing import CliRunner

    from gem3d.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def phantom_case(phantom, i=0):
    return phantom / "imagesTr" / f"brain_{i:03d}_0000.nii.gz", phantom / "labelsTr" / f"brain_{i:03d}.nii.gz"


def test_b_an_existing_report_is_kept_without_overwrite(brain_phantom, tmp_path):
    report = tmp_path / "report.json"
    report.write_text('{"mine": 1}')
    for args in (("dataset", "inspect", brain_phantom, "--json", report),
                 ("evaluate", "--real", brain_phantom, "--synthetic", brain_phantom, "--json", report)):
        result = cli(*args)
        assert result.exit_code == 1 and "--overwrite" in result.output and one_sentence(result.output), result.output
        assert report.read_text() == '{"mine": 1}'
    result = cli("dataset", "inspect", brain_phantom, "--json", report, "--overwrite")
    assert result.exit_code == 0, result.output
    assert typed_cases(report) == 3


def typed_cases(path) -> int:
    from gem3d import typed

    return len(typed.load_json(path)["cases"])


def test_b_edit_mask_sidecar_and_edits_file_are_outputs_and_inputs(brain_phantom, tmp_path):
    _, mask = phantom_case(brain_phantom)
    (tmp_path / "case.json").write_text('{"mine": 1}')
    kept = cli("edit-mask", "--mask", mask, "--out", tmp_path / "case.nii.gz", "--flip", "LR")
    assert kept.exit_code == 1 and "case.json exists" in kept.output, kept.output
    assert (tmp_path / "case.json").read_text() == '{"mine": 1}' and not (tmp_path / "case.nii.gz").exists()
    edits = tmp_path / "e.json"
    edits.write_text('[{"op": "flip", "axis": "LR"}]')
    same = cli("edit-mask", "--mask", mask, "--edits", edits, "--out", tmp_path / "e.nii.gz", "--overwrite")
    assert same.exit_code == 1 and "would overwrite an input" in same.output, same.output
    assert edits.read_text() == '[{"op": "flip", "axis": "LR"}]' and not (tmp_path / "e.nii.gz").exists()


def test_b_generate_never_writes_over_its_edits_file(brain_phantom, tmp_path):
    reference, mask = phantom_case(brain_phantom)
    edits = tmp_path / "edits.nii.gz"
    edits.write_text("[]")
    result = cli("generate", "--reference", reference, "--mask", mask, "--edits", edits, "--out", edits,
                 "--overwrite")
    assert result.exit_code == 1 and "would overwrite an input" in result.output, result.output
    assert edits.read_text() == "[]"


def test_b_dataset_inspect_report_never_goes_inside_the_dataset(brain_phantom):
    before = (brain_phantom / "dataset.json").read_bytes()
    result = cli("dataset", "inspect", brain_phantom, "--json", brain_phantom / "dataset.json")
    assert result.exit_code == 1 and "inside the source dataset" in result.output, result.output
    assert (brain_phantom / "dataset.json").read_bytes() == before


def test_b_remote_client_checks_outputs_against_local_inputs(brain_phantom, tmp_path):
    from gem3d.remote import request_problems

    reference, mask = phantom_case(brain_phantom)
    ref_nhdr = write_nhdr(tmp_path, "ref.nhdr", "ref_data.nii")
    for out, ref in ((reference, reference), (tmp_path / "ref_data.nii", ref_nhdr)):
        problems = request_problems({"reference": str(ref), "mask": str(mask), "out": str(out), "overwrite": True})
        assert any("would overwrite an input" in p for p in problems), problems


def test_b_image_mask_and_provenance_land_together(brain_phantom, tmp_path):
    from gem3d.engine import write_outputs
    from gem3d.pipeline import Generated

    reference, mask = phantom_case(brain_phantom)
    (tmp_path / "file").write_text("x")
    request = GenerateRequest(str(reference), str(mask), str(tmp_path / "out.nii.gz"),
                              mask_out=str(tmp_path / "file" / "mask.nii.gz"))  # the mask's write fails
    image = read_volume(reference)
    generated = Generated(image, read_volume(mask), {"bundle": {"name": "b"}, "seed": 0})
    with pytest.raises(OSError):
        write_outputs(generated, request, {}, 0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# ------------------------------------------------------------------ C. documents cross one typed layer
def bundle_with(tmp_path, tiny_bundle, change) -> Path:
    """A copy of the tiny bundle whose bundle.json text is changed by `change(text)`."""
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    (copy / "bundle.json").write_text(change((copy / "bundle.json").read_text()))
    return copy


def one_error(call, error, *words):
    with pytest.raises(error) as caught:
        call()
    text = str(caught.value)
    assert one_sentence(text) and all(w in text for w in words), text
    return text


def test_c_wrong_types_in_bundle_and_dataset_json_are_one_sentence(tiny_bundle, brain_phantom, tmp_path):
    from gem3d.bundle_format import BundleError, read_info
    from gem3d.datasets import DatasetFormatError, open_dataset

    info = json.loads((Path(tiny_bundle) / "bundle.json").read_text())
    bad = bundle_with(tmp_path, tiny_bundle, lambda t: json.dumps(dict(info, weights=dict(info["weights"], vae=5))))
    one_error(lambda: read_info(bad), BundleError, "bundle.json", "'weights'")
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "bundle.json").write_text("[" * 100000 + "]" * 100000)
    one_error(lambda: read_info(deep), BundleError, "nests deeper")
    meta = json.loads((brain_phantom / "dataset.json").read_text())
    for change, field in (([meta], "the document"), (dict(meta, labels=[1, 2]), "'labels'"),
                          (dict(meta, file_ending=5), "'file_ending'"), ("{not json", "not valid JSON")):
        data = tmp_path / f"data_{len(list(tmp_path.iterdir()))}"
        data.mkdir()
        (data / "dataset.json").write_text(change if isinstance(change, str) else json.dumps(change))
        one_error(lambda: open_dataset(data), DatasetFormatError, "dataset.json", field)


def test_c_config_yaml_errors_and_batch_size_0_are_one_sentence(tmp_path):
    from gem3d.config import load_config

    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  batch_size: [1,\n")
    one_error(lambda: load_config(broken), ValueError, "broken.yaml", "not valid YAML", "line")
    zero = tmp_path / "zero.yaml"
    zero.write_text("preset: tiny\ntrain:\n  batch_size: 0\n")
    one_error(lambda: load_config(zero), ValueError, "zero.yaml", "train.batch_size")


def test_c_edit_parameters_of_the_wrong_type_name_file_and_field(brain_phantom, tmp_path):
    _, mask = phantom_case(brain_phantom)
    for edits, field in (('[{"op": "rotate", "degrees": "x"}]', "'degrees'"), ('{"edits": 5}', "'edits'"),
                         ('[{"op": "flip", "axis": 5}]', "'axis'"), ("[[[", "not valid JSON")):
        path = tmp_path / "edits.json"
        path.write_text(edits)
        result = cli("edit-mask", "--mask", mask, "--edits", path, "--out", tmp_path / "o.nii.gz")
        assert result.exit_code == 1 and "edits.json" in result.output and field in result.output, result.output
        assert not (tmp_path / "o.nii.gz").exists()


def test_c_deeply_nested_job_body_is_a_400(served):
    client, _, _ = served
    answer = client.post("/v1/jobs", content=b"[" * 100000 + b"]" * 100000,
                         headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "nests deeper" in answer.json()["error"], answer.text


# ------------------------------------------------------------------ D. numbers finite and in range
def test_d_bundle_nan_beta_and_huge_latent_scale_are_refused_at_load(tiny_bundle, tmp_path):
    from gem3d.bundle_format import BundleError, read_info

    info = json.loads((Path(tiny_bundle) / "bundle.json").read_text())
    nan = bundle_with(tmp_path, tiny_bundle, lambda t: t.replace('"beta_end": 0.012', '"beta_end": NaN'))
    one_error(lambda: read_info(nan), BundleError, "bundle.json", "NaN")
    config = dict(info["config"], vae=dict(info["config"]["vae"], scale=1e308))
    huge = bundle_with(tmp_path / "h", tiny_bundle, lambda t: json.dumps(dict(info, config=config)))
    one_error(lambda: read_info(huge), BundleError, "vae.scale")


@pytest.mark.parametrize("option", [["--translate", "nan", "0", "0"], ["--rotate", "inf", "0", "0"],
                                    ["--scale", "nan"]])
def test_d_non_finite_edit_options_are_refused(brain_phantom, tmp_path, option):
    _, mask = phantom_case(brain_phantom)
    result = cli("edit-mask", "--mask", mask, "--out", tmp_path / "o.nii.gz", *option)
    assert result.exit_code == 1 and "finite number" in result.output and one_sentence(result.output), result.output
    assert list(tmp_path.iterdir()) == []


def test_d_mask_labels_that_do_not_fit_are_refused_not_wrapped(tmp_path):
    from gem3d.labels import label_array
    from gem3d.preflight import check_mask_not_empty

    for value in (65540, 65537.0, -40000):
        one_error(lambda: label_array(np.full((2, 2, 2), value), "m.nii.gz"), ValueError, "m.nii.gz", "outside")
    assert label_array(np.array([0.0, 3.0]), "m").tolist() == [0, 3]
    outside_only = Volume(np.array([0, -1], np.int16).reshape(1, 1, 2), Geometry((1, 1, 1), (0, 0, 0), np.eye(3)))
    one_error(lambda: check_mask_not_empty(outside_only, False, "m.nii.gz"), ValueError, "no labelled voxel")


# ------------------------------------------------------------------ E. volumes are what they claim
def test_e_dicom_series_are_checked_for_gaps_duplicates_and_mixed_series(tmp_path):
    import shutil

    volume = Volume(np.arange(6 * 4 * 5, dtype=np.int16).reshape(6, 4, 5), Geometry((1, 1, 2), (0, 0, 0), np.eye(3)))
    for name in ("good", "gap", "dup", "mixed"):
        write_dicom_series(tmp_path / name, volume, UID + "1")
    good = read_volume(tmp_path / "good")
    assert np.array_equal(good.array, volume.array) and np.allclose(good.geometry.spacing, (1, 1, 2))
    sorted((tmp_path / "gap").iterdir())[3].unlink()
    one_error(lambda: read_volume(tmp_path / "gap"), ValueError, "gap", "missing")
    shutil.copy(sorted((tmp_path / "dup").iterdir())[2], tmp_path / "dup" / "copy.dcm")
    one_error(lambda: read_volume(tmp_path / "dup"), ValueError, "duplicated")
    write_dicom_series(tmp_path / "mixed", Volume(volume.array[:5], volume.geometry), UID + "2")
    one_error(lambda: read_volume(tmp_path / "mixed"), ValueError, "2 DICOM series")


def test_e_sheared_nrrd_is_refused_not_made_orthogonal(tmp_path):
    header = write_nhdr(tmp_path, "s.nhdr", "s.raw")
    header.write_text(header.read_text().replace("space directions: (1,0,0) (0,1,0) (0,0,1)",
                                                 "space directions: (1,0,0) (0.5,1,0) (0,0,1)"))
    one_error(lambda: read_volume(header), ValueError, "s.nhdr", "sheared")


def test_e_generate_accepts_a_dicom_folder(tiny_bundle, brain_phantom, tmp_path):
    from gem3d.engine import Engine

    reference, mask = phantom_case(brain_phantom)
    scan = read_volume(reference)
    folder = tmp_path / "dicom"
    write_dicom_series(folder, scan.with_array(np.round(scan.array * 1000 / max(scan.array.max(), 1)).astype(np.int16)),
                       UID + "3")
    request = GenerateRequest(str(folder), str(mask), str(tmp_path / "out.nii.gz"), start=0.5, steps=1)
    assert request.path_problems() == []
    events = list(Engine(tiny_bundle, "cpu").generate(request))
    assert events[-1]["event"] == "finished", events[-1]
    assert read_volume(tmp_path / "out.nii.gz").shape == scan.shape


# ------------------------------------------------------------------ F. writes and state: one sentence
def test_f_edit_mask_on_a_full_disk_leaves_nothing(brain_phantom, tmp_path):
    import resource
    import signal

    _, mask = phantom_case(brain_phantom)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    result = subprocess.run([sys.executable, "-m", "gem3d", "edit-mask", "--mask", str(mask), "--out",
                             str(tmp_path / "e.nii"), "--flip", "LR"], capture_output=True, text=True, env=ENV,
                            preexec_fn=limit, timeout=120)
    assert result.returncode == 1 and "File too large" in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # (NIfTI's C library prints its own line first)
    assert "Traceback" not in result.stderr and last.startswith("Error: cannot write"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_f_too_long_paths_and_symlink_loops_are_one_sentence(brain_phantom, tmp_path):
    from gem3d.outputs import OutputError, check_outputs

    reference, mask = phantom_case(brain_phantom)
    one_error(lambda: check_outputs({"--out": tmp_path / ("x" * 300 + ".nii.gz")}), OutputError, "--out",
              "File name too long")
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(tmp_path / "loop.nii.gz")
    one_error(lambda: read_volume(loop), ValueError, "loop.nii.gz", "symbolic links")
    result = cli("generate", "--reference", reference, "--mask", mask, "--out", tmp_path / ("y" * 300 + ".nii.gz"))
    assert result.exit_code == 1 and "File name too long" in result.output and one_sentence(result.output)


def test_f_serve_paths_too_long_or_looping_are_a_400(served):
    client, root, _ = served
    (root / "loop.nii.gz").symlink_to(root / "loop.nii.gz")
    for path in ("loop.nii.gz", "z" * 5000 + ".nii.gz"):
        answer = client.post("/v1/jobs", json={"reference": path, "mask": "ok.nhdr", "out": "o.nii.gz"})
        assert answer.status_code == 400 and one_sentence(answer.json()["error"]), answer.text
        assert str(root) not in answer.json()["error"]


def test_b_harmonize_never_writes_into_another_dataset(tiny_bundle, brain_phantom, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(brain_phantom, other)
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    reference, _ = phantom_case(brain_phantom)
    result = cli("harmonize", "--dataset", brain_phantom, "--informed-from", reference, "--out", other,
                 "--bundle", tiny_bundle, "--steps", "1", "--device", "cpu")
    assert result.exit_code == 1 and "did not generate" in result.output, result.output
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_a_a_file_that_is_not_a_mask_is_not_echoed_back():
    from gem3d.labels import BRATS, UnknownLabelError

    secret = np.frombuffer(b"the secret bytes of some file", np.uint8).reshape(1, 1, -1)
    text = one_error(lambda: BRATS.validate(secret, "m.nii.gz"), UnknownLabelError, "m.nii.gz", "more")
    assert text.startswith("m.nii.gz: label value(s) [32, 98, 99, 101, 102] and 9 more are not"), text
