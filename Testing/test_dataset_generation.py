"""`gem3d enhance` / `gem3d harmonize`: dataset outputs, resumption, sharding across torchrun ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from gem3d.cli import main
from gem3d.dataset_generation import pending, plan_enhance
from gem3d.datasets import open_dataset
from gem3d.io import read_volume


def test_shards_have_no_duplicates_and_no_gaps(brain_phantom, tmp_path):
    jobs = plan_enhance(open_dataset(brain_phantom), tmp_path, times=3)
    assert len(jobs) == 9 and len({j.out_id for j in jobs}) == 9
    for world in (1, 2, 4):
        shards = [pending(jobs, tmp_path, rank, world) for rank in range(world)]
        ids = [j.out_id for shard in shards for j in shard]
        assert sorted(ids) == sorted(j.out_id for j in jobs)


def test_enhance_uses_other_cases_and_keeps_masks(brain_phantom, tmp_path):
    jobs = plan_enhance(open_dataset(brain_phantom), tmp_path, times=2, seed=5)
    for job in jobs:
        assert job.request.informed.source == "other"
        assert Path(job.request.informed.scan).name != Path(job.request.reference).name
    again = plan_enhance(open_dataset(brain_phantom), tmp_path, times=2, seed=5)
    assert [j.request for j in again] == [j.request for j in jobs], "plans are seeded"


def test_enhance_writes_a_dataset_and_resumes(tiny_bundle, brain_phantom, tmp_path):
    out = tmp_path / "enhanced"
    args = ["enhance", "--bundle", str(tiny_bundle), "--dataset", str(brain_phantom), "--times", "1",
            "--steps", "1", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "dataset.json").read_text())
    assert info["numTraining"] == 3 and "SYNTHETIC" in info["description"]
    images = sorted((out / "imagesTr").glob("*_0000.nii.gz"))
    assert [p.name for p in images] == [f"brain_{i:03d}_syn00_0000.nii.gz" for i in range(3)]
    for i in range(3):
        used = read_volume(out / "labelsTr" / f"brain_{i:03d}_syn00.nii.gz").array
        source = read_volume(brain_phantom / "labelsTr" / f"brain_{i:03d}.nii.gz").array
        assert (used == source).all()
        record = json.loads((out / "provenance" / f"brain_{i:03d}_syn00.json").read_text())
        assert record["synthetic"] and record["informed_slice"]["source"] == "other"
    assert open_dataset(out).format == "nnunet"
    stamps = {p: p.stat().st_mtime_ns for p in images}
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "0 of 3 cases to generate" in result.output
    assert {p: p.stat().st_mtime_ns for p in images} == stamps, "finished cases are not redone"


def test_harmonize_uses_one_fixed_slice(tiny_bundle, brain_phantom, tmp_path):
    out = tmp_path / "harmonized"
    scan = brain_phantom / "imagesTr" / "brain_002_0000.nii.gz"
    result = CliRunner().invoke(main, ["harmonize", "--bundle", str(tiny_bundle), "--dataset", str(brain_phantom),
                                       "--informed-from", str(scan), "--informed-slice", "6", "--steps", "1",
                                       "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(p.read_text()) for p in sorted((out / "provenance").glob("*.json"))]
    assert len(records) == 3
    assert {(r["informed_slice"]["scan"], r["informed_slice"]["scan_index"]) for r in records} == {(str(scan), 6)}


def test_torchrun_two_ranks_share_the_work(tiny_bundle, brain_phantom, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path))  # torchrun's logs
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "gem3d", "enhance", "--bundle", str(tiny_bundle), "--dataset", str(brain_phantom),
         "--times", "2", "--steps", "1", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2: 3 of 6" in result.stderr and "rank 1/2: 3 of 6" in result.stderr
    assert len(list((out / "provenance").glob("*.json"))) == 6
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 6
