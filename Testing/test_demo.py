"""The README's main job, `gem3d demo`, run as a user runs it: the console script in a subprocess
with the demo bundle shipped inside the package (~15 s on 2 CPU cores)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from gem3d.io import read_description, read_volume


def gem3d_command():
    script = Path(sys.executable).parent / "gem3d"
    return [str(script)] if script.exists() else [shutil.which("gem3d") or "gem3d"]


def test_demo_writes_a_synthetic_counterfactual_that_follows_the_moved_mask(tmp_path):
    out = tmp_path / "demo_out"
    run = subprocess.run(gem3d_command() + ["demo", "--out", str(out)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["outputs"]) == {"image", "mask", "provenance", "truth", "montage"}
    assert all(Path(p).exists() for p in summary["outputs"].values())

    reference = read_volume(out / "phantom" / "imagesTr" / "brain_000_0000.nii.gz")
    original_mask = read_volume(out / "phantom" / "labelsTr" / "brain_000.nii.gz").array
    synthetic = read_volume(out / "counterfactual.nii.gz")
    moved_mask = read_volume(out / "counterfactual_mask.nii.gz").array
    truth = read_volume(out / "counterfactual_truth.nii.gz").array
    assert synthetic.shape == reference.shape
    assert np.allclose(synthetic.geometry.spacing, reference.geometry.spacing)
    assert np.allclose(synthetic.geometry.origin, reference.geometry.origin)
    assert np.allclose(synthetic.geometry.direction, reference.geometry.direction)
    assert "SYNTHETIC" in read_description(out / "counterfactual.nii.gz")

    provenance = json.loads((out / "counterfactual.provenance.json").read_text())
    assert provenance["synthetic"] is True
    assert provenance["request"]["edits"] == [{"op": "translate", "mm": [0.0, -67.5, 0.0]}]
    assert provenance["mask_edits"] and provenance["mask_edits"][0]["op"] == "translate"

    # The lesion really moved: old and new masks are disjoint, of the same size.
    assert ((original_mask > 0) & (moved_mask > 0)).sum() == 0
    assert (moved_mask > 0).sum() == (original_mask > 0).sum() > 100
    # The model put the bright lesion where the edited mask says, and took it away where it was.
    gained, lost = moved_mask > 0, original_mask > 0
    true_contrast = truth[gained].mean() - truth[lost].mean()
    synthetic_contrast = synthetic.array[gained].mean() - synthetic.array[lost].mean()
    assert true_contrast > 0 and synthetic_contrast > 0.3 * true_contrast, (synthetic_contrast, true_contrast)
    # Where the edit is, the synthetic volume beats doing nothing (the unedited reference).
    scores = summary["scores"]
    assert scores["edited_voxels"] >= (moved_mask > 0).sum()
    assert scores["edited_psnr_synthetic_db"] > scores["edited_psnr_do_nothing_db"] + 1.0, scores
    assert scores["edited_mae_synthetic"] < scores["edited_mae_do_nothing"], scores
    assert summary["psnr_vs_true_counterfactual_db"] == scores["volume_psnr_synthetic_db"] > 18.0

    sheet = Image.open(out / "montage.png")
    assert sheet.size[0] >= 400 and sheet.size[1] >= 400
    assert np.asarray(sheet.convert("L")).std() > 10
