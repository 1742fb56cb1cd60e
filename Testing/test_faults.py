"""Fault suite (docs/faults.md): bad inputs, unsafe outputs, broken writes, corrupt weights and
interrupted runs, on real files and real subprocesses. Every fault must give one sentence,
change no input and leave no partial file."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from gem3d.bundle import BundleError, load_bundle
from gem3d.cli import main
from gem3d.engine import Engine
from gem3d.io import read_description, read_volume, write_segmentation, write_volume
from gem3d.outputs import OutputError, PARTIAL, check_folder, check_outputs, write_atomically
from gem3d.preflight import fit_mask
from gem3d.request import GenerateRequest
from gem3d.training.checkpoint import load_latest_checkpoint, save_checkpoint
from gem3d.volume import Geometry, Volume

ENV = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")


def snapshot(folder: Path) -> dict:
    """Hash of every file under `folder`: proves an input was not changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list:
    """Hidden or partial files anywhere under `folder`."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.startswith(".") or PARTIAL in p.name)


def case(phantom, i=0):
    return (str(phantom / "imagesTr" / f"brain_{i:03d}_0000.nii.gz"),
            str(phantom / "labelsTr" / f"brain_{i:03d}.nii.gz"))


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine(tiny_bundle, "cpu")


def run(engine, phantom, out, **kwargs):
    reference, mask = case(phantom)
    request = GenerateRequest(**{"reference": reference, "mask": mask, "out": str(out), "start": 0.5,
                                 "steps": 1, **kwargs})
    return list(engine.generate(request))


def refused(events, *words):
    """The job failed before any model work, with a message holding `words`."""
    assert [e["event"] for e in events] == ["error"], events
    message = events[0]["message"]
    assert "Traceback" not in message and "internal error" not in message, message
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------- inputs
def test_gzip_garbled_mid_file_is_refused(engine, brain_phantom, tmp_path):
    reference, _ = case(brain_phantom)
    raw = gzip.decompress(Path(reference).read_bytes())
    middle = len(raw) // 2
    garbled = raw[:middle] + bytes(b ^ 0x5A for b in raw[middle:middle + 64]) + raw[middle + 64:]
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(garbled) + deflate.flush()  # a valid stream, the original CRC and size
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"
    garbled = header + body + struct.pack("<II", zlib.crc32(raw), len(raw))
    bad = tmp_path / "garbled.nii.gz"
    bad.write_bytes(garbled)
    with pytest.raises(ValueError, match="corrupt gzip data"):
        read_volume(bad)
    refused(run(engine, brain_phantom, tmp_path / "o.nii.gz", reference=str(bad)), "garbled.nii.gz", "corrupt")
    assert not (tmp_path / "o.nii.gz").exists()


@pytest.mark.parametrize("values", [[np.nan] * 5, [np.inf, -np.inf], [np.nan, np.inf, -np.inf]])
def test_nonfinite_voxels_are_refused_with_their_count(engine, brain_phantom, tmp_path, values):
    reference, _ = case(brain_phantom)
    volume = read_volume(reference)
    array = volume.array.astype(np.float32)
    array.reshape(-1)[:len(values)] = values
    bad = write_volume(volume.with_array(array), tmp_path / "nan.nii.gz")
    message = refused(run(engine, brain_phantom, tmp_path / "o.nii.gz", reference=str(bad)),
                      f"{len(values)} NaN/Inf voxels")
    assert "nan.nii.gz" in message


def test_mask_without_overlap_is_refused_not_resampled_to_nothing(engine, brain_phantom, tmp_path):
    _, mask = case(brain_phantom)
    labels = read_volume(mask)
    g = labels.geometry
    far = Volume(labels.array, Geometry(g.spacing, np.asarray(g.origin) + 1000.0, g.direction))
    moved = write_volume(far, tmp_path / "far.nii.gz")
    refused(run(engine, brain_phantom, tmp_path / "o.nii.gz", mask=str(moved)), "far.nii.gz",
            "loses labels", "0% kept")


def test_cropped_mask_is_refused_and_a_finer_grid_keeps_its_labels(brain_phantom):
    reference, mask = case(brain_phantom)
    ref, labels = read_volume(reference), read_volume(mask)
    g = labels.geometry
    shift = np.asarray(g.direction) @ (np.asarray(g.spacing) * np.array([0, 0, labels.shape[0] // 2]))
    half = Volume(labels.array, Geometry(g.spacing, np.asarray(g.origin) + shift, g.direction))
    with pytest.raises(ValueError, match="loses labels"):
        fit_mask(half, ref, "half")
    fine = Volume(np.repeat(labels.array, 2, axis=0),
                  Geometry(np.asarray(g.spacing) * [1, 1, 0.5],
                           np.asarray(g.origin) - np.asarray(g.direction)[:, 2] * g.spacing[2] * 0.25,
                           g.direction))
    fitted, kept = fit_mask(fine, ref, "fine")
    assert kept == pytest.approx(1.0, abs=0.01)
    assert (fitted.array == labels.array).mean() > 0.99


def test_empty_mask_needs_the_explicit_option(engine, brain_phantom, tmp_path):
    _, mask = case(brain_phantom)
    labels = read_volume(mask)
    empty = write_volume(labels.with_array(np.zeros_like(labels.array)), tmp_path / "empty.nii.gz")
    refused(run(engine, brain_phantom, tmp_path / "o.nii.gz", mask=str(empty)), "no labelled voxel",
            "allow_empty_mask")
    events = run(engine, brain_phantom, tmp_path / "o.nii.gz", mask=str(empty), allow_empty_mask=True)
    assert events[-1]["event"] == "finished", events[-1]


def test_ddim_1000_steps_is_refused_before_any_model_work(engine, brain_phantom, tmp_path, monkeypatch):
    monkeypatch.setattr(type(engine.pipeline), "_prepare", lambda *a, **k: pytest.fail("model work began"))
    refused(run(engine, brain_phantom, tmp_path / "o.nii.gz", sampler="ddim", steps=1000),
            "steps must be in 1..999 for ddim, got 1000")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- outputs, checked first
@pytest.mark.parametrize("problem", ["mask_out_is_reference", "mask_out_is_mask", "out_is_mask_out",
                                     "mask_out_exists", "provenance_exists", "no_folder", "read_only_folder",
                                     "inside_input_dataset"])
def test_unsafe_outputs_are_refused_before_any_work(engine, brain_phantom, tmp_path, problem):
    reference, mask = case(brain_phantom)
    before = snapshot(brain_phantom)
    out, mask_out, overwrite = tmp_path / "o.nii.gz", tmp_path / "m.nii.gz", False
    expect = {"mask_out_is_reference": "would overwrite an input", "mask_out_is_mask": "would overwrite an input",
              "out_is_mask_out": "same file", "mask_out_exists": "exists", "provenance_exists": "exists",
              "no_folder": "does not exist", "read_only_folder": "cannot write in the output folder",
              "inside_input_dataset": "inside the source dataset"}[problem]
    if problem == "mask_out_is_reference":
        mask_out, overwrite = Path(reference), True
    elif problem == "mask_out_is_mask":
        mask_out, overwrite = Path(mask), True
    elif problem == "out_is_mask_out":
        mask_out = out
    elif problem == "mask_out_exists":
        mask_out.write_bytes(b"keep me")
    elif problem == "provenance_exists":
        (tmp_path / "o.provenance.json").write_text("keep me")
    elif problem == "no_folder":
        out = tmp_path / "missing" / "o.nii.gz"
    elif problem == "read_only_folder":
        out = Path("/sys/gem3d-test.nii.gz")  # read-only even for root (tests may run as root)
    else:
        out, overwrite = brain_phantom / "imagesTr" / "brain_new_0000.nii.gz", True
    started = time.perf_counter()
    refused(run(engine, brain_phantom, out, mask_out=str(mask_out), overwrite=overwrite), expect)
    assert time.perf_counter() - started < 5
    assert snapshot(brain_phantom) == before
    assert not out.exists() or problem == "out_is_mask_out"
    if problem == "mask_out_exists":
        assert mask_out.read_bytes() == b"keep me"
    assert leftovers(tmp_path) == []


def test_too_little_free_space_is_found_first(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(OutputError, match="MiB free but the outputs need"):
        check_outputs({"--out": tmp_path / "o.nii.gz"}, expected_bytes=2 * free)


@pytest.mark.parametrize("size", [0, 1 << 20])
def test_an_interrupted_folder_probe_leaves_no_file(tmp_path, monkeypatch, size):
    """Ctrl-C while the output folder is probed (a CI run caught one left in labelsTr)."""
    real_fsync = os.fsync

    def interrupted(fd):
        real_fsync(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        check_folder(tmp_path, size)
    assert list(tmp_path.iterdir()) == []


def test_a_probe_left_by_a_killed_run_is_removed_by_the_next_check(tmp_path):
    """SIGKILL during the folder probe leaves it (a CI run found one after a resumed enhance)."""
    (tmp_path / f"{PARTIAL}0123456789ab.probe").write_bytes(b"")
    (tmp_path / "keep.nii.gz").write_bytes(b"user file")
    check_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.nii.gz"]


# ----------------------------------------------------------------------------- atomic, verified writes
def test_full_disk_gives_the_os_message_and_leaves_nothing(tiny_bundle, brain_phantom, tmp_path):
    """A real file-size limit (RLIMIT_FSIZE) makes every large write fail as a full disk does."""
    reference, mask = case(brain_phantom)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "o.nii.gz"
    result = subprocess.run([sys.executable, "-m", "gem3d", "generate", "--bundle", str(tiny_bundle),
                             "--reference", reference, "--mask", mask, "--out", str(out), "--mask-out",
                             str(tmp_path / "m.nii.gz"), "--steps", "1", "--start", "0.5", "--device", "cpu"],
                            capture_output=True, text=True, env=ENV, preexec_fn=limit, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_writer_leaves_a_partial_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "v.nii.gz"
    stale = tmp_path / f"{PARTIAL}0123456789ab.v.nii.gz"  # what SIGKILL during a write leaves
    stale.write_bytes(b"half")
    write_volume(Volume(np.ones((4, 4, 4), np.float32), Geometry()), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]

    def truncated(tmp):  # a writer that stops early without an error
        tmp.write_bytes(b"\x1f\x8b")

    with pytest.raises(ValueError, match="cannot read"):
        write_atomically(tmp_path / "w.nii.gz", truncated, lambda tmp: read_volume(tmp))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]


# ----------------------------------------------------------------------------- synthetic marking
def test_everything_a_synthetic_case_writes_is_marked(engine, brain_phantom, tmp_path):
    events = run(engine, brain_phantom, tmp_path / "o.nrrd", mask_out=str(tmp_path / "m.nii.gz"))
    outputs = events[-1]["outputs"]
    assert read_description(outputs["image"]).startswith("SYNTHETIC")
    assert read_description(outputs["mask"]).startswith("SYNTHETIC")
    assert json.loads(Path(outputs["provenance"]).read_text())["synthetic"] is True
    seg = write_segmentation(read_volume(outputs["mask"]), tmp_path / "s.seg.nrrd",
                             [{"name": n, "label_value": v} for v, n in ((1, "a"), (2, "b"), (4, "c"))],
                             description="SYNTHETIC segmentation")
    assert read_description(seg) == "SYNTHETIC segmentation"


def test_edit_mask_scale_1000_is_refused_not_a_full_volume(brain_phantom, tmp_path):
    _, mask = case(brain_phantom)
    out = tmp_path / "e.nii.gz"
    result = CliRunner().invoke(main, ["edit-mask", "--mask", mask, "--out", str(out), "--scale", "1000"])
    assert result.exit_code == 1 and "more than the whole volume" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not out.exists()


# ----------------------------------------------------------------------------- weights and checkpoints
@pytest.mark.parametrize("fault", ["truncated", "garbage", "dtype", "nan"])
def test_broken_weights_are_a_bundle_error_naming_file_and_tensor(tiny_bundle, tmp_path, fault):
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    file = bundle / "unet.safetensors"
    tensors = load_file(str(file))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    if fault == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif fault == "garbage":
        file.write_bytes(os.urandom(4096))
    elif fault == "dtype":
        tensors[name] = tensors[name].half()
        save_file(tensors, str(file))
    else:
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
        save_file(tensors, str(file))
    with pytest.raises(BundleError, match="unet.safetensors") as error:
        load_bundle(bundle)
    if fault in ("dtype", "nan"):
        assert name in str(error.value)
    result = CliRunner().invoke(main, ["bundle", "info", str(bundle)])
    assert result.exit_code == 1 and "unet.safetensors" in result.output and "Traceback" not in result.output


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(tmp_path, step, model, {"weight": model.weight.detach().clone()}, {"step": step})
    newest = tmp_path / "step_00000002" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:40])
    with pytest.warns(UserWarning, match="step_00000002 is unreadable.*previous checkpoint"):
        model_state, _, state = load_latest_checkpoint(tmp_path, torch.device("cpu"))
    assert state["step"] == 1 and float(model_state["weight"][0, 0]) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_00000002.corrupt", "step_00000001"]


# ----------------------------------------------------------------------------- dataset commands
def enhance_args(bundle, dataset, out, *extra):
    return ["enhance", "--bundle", str(bundle), "--dataset", str(dataset), "--times", "1", "--steps", "1",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_dataset_out_must_be_separate_from_the_source(tiny_bundle, brain_phantom, where):
    before = snapshot(brain_phantom)
    out = {"same": brain_phantom, "inside": brain_phantom / "synthetic", "around": brain_phantom.parent}[where]
    result = CliRunner().invoke(main, enhance_args(tiny_bundle, brain_phantom, out))
    assert result.exit_code == 1 and "source dataset" in result.output, result.output
    assert snapshot(brain_phantom) == before


def test_dataset_outputs_are_not_replaced_and_no_dataset_json_when_nothing_was_made(tiny_bundle,
                                                                                   brain_phantom, tmp_path):
    out = tmp_path / "enhanced"
    (out / "imagesTr").mkdir(parents=True)
    for i in range(3):
        (out / "imagesTr" / f"brain_{i:03d}_syn00_0000.nii.gz").write_bytes(b"user file")
    result = CliRunner().invoke(main, enhance_args(tiny_bundle, brain_phantom, out))
    assert result.exit_code == 1 and "dataset.json was not written" in result.output, result.output
    assert "--overwrite" in result.output
    assert not (out / "dataset.json").exists()
    assert all(p.read_bytes() == b"user file" for p in (out / "imagesTr").iterdir())
    result = CliRunner().invoke(main, enhance_args(tiny_bundle, brain_phantom, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    info = json.loads((out / "dataset.json").read_text())
    assert info["synthetic"] and len(info["training"]) == 3 and all(c["synthetic"] for c in info["training"])
    for entry in info["training"]:
        assert read_description(out / entry["image"]).startswith("SYNTHETIC")
        assert read_description(out / entry["label"]).startswith("SYNTHETIC")
    assert leftovers(out) == []


def wait_for_files(folder: Path, pattern: str, count: int, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(pattern))) < count:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, f"no {pattern} in {folder} within {timeout} s"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_enhance_resumes_without_redoing_or_leaving_partials(tiny_bundle, brain_phantom, tmp_path, sig):
    out = tmp_path / "enhanced"
    before = snapshot(brain_phantom)
    args = enhance_args(tiny_bundle, brain_phantom, out)
    args[args.index("--times") + 1] = "2"
    slow = list(args)
    slow[args.index("--steps") + 1] = "6"  # slower cases while interrupted; resumed with 1 step
    proc = subprocess.Popen([sys.executable, "-m", "gem3d", *slow], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_files(out / "provenance", "*.json", 1, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    if sig == signal.SIGINT:
        assert leftovers(out) == []
    done = {p.name: p.stat().st_mtime_ns for p in (out / "provenance").glob("*.json")}
    assert 1 <= len(done) < 6
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{6 - len(done)} of 6 cases to generate" in result.output
    assert {p: (out / "provenance" / p).stat().st_mtime_ns for p in done} == done, "finished cases were redone"
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 6
    assert leftovers(out) == [] and snapshot(brain_phantom) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_training_resumes_from_its_checkpoint(brain_phantom, tmp_path, sig):
    from gem3d.config import load_config, save_config

    cfg = load_config("tiny")
    cfg.data.slice_size = 32
    cfg.window_length, cfg.train.batch_size, cfg.train.vae_steps = 4, 1, 400
    cfg.train.checkpoint_every, cfg.train.preview_every = 2, 0
    save_config(cfg, tmp_path / "cfg.yaml")
    args = ["train", "vae", "--config", str(tmp_path / "cfg.yaml"), "--dataset", str(brain_phantom),
            "--out", str(tmp_path / "run"), "--device", "cpu"]
    folder = tmp_path / "run" / "checkpoints" / "vae"
    proc = subprocess.Popen([sys.executable, "-m", "gem3d", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_files(folder, "step_*", 1, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr
    steps = sorted(int(p.name[5:]) for p in folder.glob("step_*"))
    assert steps and steps[-1] < 400
    cfg.train.vae_steps = steps[-1] + 2
    save_config(cfg, tmp_path / "cfg.yaml")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"vae: {steps[-1] + 2} steps" in result.output
    assert sorted(p.name for p in folder.iterdir())[-1] == f"step_{steps[-1] + 2:08d}"
