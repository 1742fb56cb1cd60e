"""The README's main job: a counterfactual brain volume from the embedded default.

Phantom brains (made here, nothing downloaded) + the demo bundle shipped with
gem3d -> the tumour of one case is moved further than its own length (old and
new masks disjoint) -> a synthetic volume is generated with that case's own
informed slice -> NIfTI + provenance + the edited mask + a PNG montage (rows:
mask, reference, synthetic, truth). Because phantoms are rendered from known
parameters, the true counterfactual is known too: it is written beside the
output, and the synthetic volume is scored against it beside the do-nothing
answer (the unedited reference), over the whole volume, inside the edited region
(where the counterfactual differs from the reference) and in a shell around it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from scipy import ndimage

from gem3d import phantom, typed
from gem3d.bundle_format import DEMO_BUNDLE
from gem3d.engine import Engine, write_outputs
from gem3d.io import read_volume, write_volume
from gem3d.montage import montage
from gem3d.request import GenerateRequest, InformedSpec
from gem3d.volume import Volume

# The demo phantom's lesion is 16 voxels (60 mm) long from front to back: 67.5 mm moves it clear
# of where it was (a flip about the volume's middle would not: it sits near the midline).
COUNTERFACTUAL = [{"op": "translate", "mm": [0.0, -67.5, 0.0]}]
SHELL_VOXELS = 3   # "around the edit": this many voxels outside the edited region


def psnr(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range ** 2 / mse)


def edit_scores(reference: np.ndarray, synthetic: np.ndarray, truth: np.ndarray) -> dict:
    """PSNR (dB, range of the truth) and mean absolute error of the synthetic volume and of the
    do-nothing answer (the reference) against the true counterfactual: everywhere, in the edited
    region (where truth and reference differ) and in a shell of `SHELL_VOXELS` around it."""
    data_range = float(np.ptp(truth))
    edited = np.abs(truth.astype(np.float64) - reference) > 1e-3 * data_range
    shell = ndimage.binary_dilation(edited, iterations=SHELL_VOXELS) & ~edited
    scores = {"edited_voxels": int(edited.sum())}
    for region, where in (("volume", np.ones_like(edited)), ("edited", edited), ("around", shell)):
        for name, volume in (("synthetic", synthetic), ("do_nothing", reference)):
            scores[f"{region}_psnr_{name}_db"] = round(float(psnr(volume[where], truth[where], data_range)), 2)
            error = np.abs(volume[where] - truth[where].astype(np.float64))
            scores[f"{region}_mae_{name}"] = round(float(error.mean()), 2)
    return scores


def run_demo(out: Path, bundle: Optional[str] = None, device: str = "auto", seed: int = 0,
             echo: Callable[[str], None] = print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(bundle or DEMO_BUNDLE, device)
    size, slices = engine.bundle.slice_size, 2 * engine.bundle.window_length + 8
    data = out / "phantom"
    if not (data / "dataset.json").exists():
        echo(f"making phantom brains in {data}")
        phantom.write_dataset(data, "brain", cases=2, size=size, slices=slices, seed=seed)
    reference = data / "imagesTr" / "brain_000_0000.nii.gz"
    mask = data / "labelsTr" / "brain_000.nii.gz"
    synthetic = out / "counterfactual.nii.gz"
    request = GenerateRequest(reference=str(reference), mask=str(mask), out=str(synthetic),
                              mask_out=str(out / "counterfactual_mask.nii.gz"), edits=list(COUNTERFACTUAL),
                              informed=InformedSpec("same"), start=0.5, seed=seed, overwrite=True,
                              job_id="demo")
    echo(f"generating a counterfactual (tumour moved 67.5 mm, clear of where it was) with {engine.bundle.path.name} "
         f"on {engine.device}")
    t0 = time.perf_counter()
    ref = read_volume(reference)
    run = engine.pipeline.run(ref, read_volume(mask), request)
    for event in run:
        if event["event"] == "window":
            echo(f"  window {event['start']}:{event['stop']} ({event['direction']}), {event['progress']:.0%}")
    generated, timings = run.result, run.result.timings
    outputs = write_outputs(generated, request, timings, t0)
    edited, out_volume = generated.mask, generated.image
    truth = typed.load_json(data / "groundtruth" / "brain_000.json")
    true_cf = Volume(phantom.render_case(truth, edited.array.astype(np.int16)), ref.geometry)
    write_volume(true_cf, out / "counterfactual_truth.nii.gz", description="SYNTHETIC phantom ground truth",
                 overwrite=True)
    scores = edit_scores(ref.array, out_volume.array, true_cf.array)
    original = read_volume(mask).array
    moved = edited.array
    scores["masks_overlap_voxels"] = int(((original != 0) & (moved != 0)).sum())
    lesion = np.argwhere(moved != 0)
    centre = lesion.mean(axis=0).round().astype(int) if len(lesion) else None
    window = tuple(np.percentile(ref.array, [1, 99.5]))
    sheet = montage([("edited mask", edited, "label"), ("reference", ref, "image"),
                     ("synthetic", out_volume, "image"), ("true counterf.", true_cf, "image")],
                    centre_index=centre, window=window, contours=edited)   # outlines: the moved mask
    png = out / "montage.png"
    sheet.save(png)
    summary = {"outputs": {**outputs, "truth": str(out / "counterfactual_truth.nii.gz"),
                           "montage": str(png)},
               "psnr_vs_true_counterfactual_db": scores["volume_psnr_synthetic_db"], "scores": scores,
               "timings": timings}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
