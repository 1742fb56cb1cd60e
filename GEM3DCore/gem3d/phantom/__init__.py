"""Phantom datasets with known ground truth: FLAIR-like brain MRI with BraTS-labelled
tumours (a synthetic head, or the MNI152 template nilearn ships) and abdominal CT with
organ labels. One module per kind (brain, mni, abdomen); shared machinery in `common`.

A case is drawn as a patient (anatomy, pose, scan coverage), a scanner (contrasts, bias,
noise) and, for brains, a lesion. With `sites` > 0 each case is also scanned at one of
that many sites (protocols: contrast ratios, nonlinearity, bias, noise, blur, slice
thickness; for CT the contrast phase and kernel) and its patient gets the wider anatomy
the mask does not show; without sites the phantoms are exactly the original ones. The
anatomy becomes soft tissue fractions on the scan grid, the labels a mask, and `render`
turns (tissue, mask, scanner, noise seed) into the image deterministically: `render_case`
re-renders a case with an edited mask, giving the exact counterfactual image that fidelity
metrics need as ground truth.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from gem3d.io import write_volume
from gem3d.labels import LabelMap, present_values
from gem3d.phantom import abdomen, brain, mni
from gem3d.phantom.common import Kind, Tissue, _coords, _seed, _smooth_noise, _u, case_geometry
from gem3d.phantom.mni import _mni_template  # noqa: F401  (tests clear its cache)
from gem3d.volume import Geometry, Volume

_KIND: Dict[str, Kind] = {"brain": brain.KIND, "abdomen": abdomen.KIND, "mni": mni.KIND}
KINDS = tuple(_KIND)
LABELS: Dict[str, LabelMap] = {k: v.labels for k, v in _KIND.items()}
CHANNELS = {k: v.channel for k, v in _KIND.items()}
SYNTHETIC_NOTE = "SYNTHETIC phantom (gem3d.phantom), not patient data"
SITE_STREAM = 7919                  # keeps site and patient-variation draws apart from the case's own


def _kind(kind: str) -> Kind:
    if kind not in _KIND:
        raise ValueError(f"unknown phantom kind {kind!r}; valid: {', '.join(KINDS)}")
    return _KIND[kind]


def sample_patient(kind: str, rng: np.random.Generator) -> dict:
    """Anatomy (shape, size, organ layout), pose in the scanner, and the scan's coverage."""
    k = _kind(kind)
    scan = {"tilt_deg": _u(rng, -4, 4, 3),
            "centre_mm": [_u(rng, -20, 20), _u(rng, -30, 10), _u(rng, -60, 60)]}
    patient, fov_xy, fov_z = k.sample_patient(rng)
    scan["fov_mm"] = [fov_xy, fov_z]
    patient["scan"] = scan
    return patient


def sample_scanner(kind: str, rng: np.random.Generator) -> dict:
    """Tissue contrasts, label intensities, bias field and noise of one scanner/protocol."""
    return _kind(kind).sample_scanner(rng)


def sample_site(kind: str, site: int, site_seed: int = 0) -> dict:
    """The protocol of site number `site`: the same for every dataset with this `site_seed`,
    so training and held-out datasets (other seeds, other patients) share their sites."""
    site_params = _kind(kind).sample_site(np.random.default_rng([site_seed, SITE_STREAM, site]))
    return {"index": site, "site_seed": site_seed, **site_params}


def sample_lesion(kind: str, patient: dict, rng: np.random.Generator) -> dict:
    """A brain tumour (edema, enhancing core, necrosis) inside the brain and the FOV."""
    sampler = _kind(kind).sample_lesion
    if sampler is None:
        raise ValueError(f"only brain phantoms have lesions (kind {kind!r} labels its organs)")
    return sampler(patient, rng)


def build_anatomy(kind: str, patient: dict, shape, spacing) -> Tissue:
    """Soft tissue fractions (name -> float32 array summing to 1 over names) on the grid."""
    k = _kind(kind)
    voxel = float(np.prod(spacing) ** (1 / 3))
    p = _coords(shape, spacing, patient["pose"])
    tissue = {k.background: np.ones(shape, np.float32)}
    k.build_anatomy(tissue, patient, p, voxel, shape, spacing)
    return tissue


def draw_labels(kind: str, patient: dict, lesion: Optional[dict], tissue: Tissue, spacing) -> np.ndarray:
    """The label mask (uint8): BraTS tumour labels for brains, organ labels for the abdomen."""
    return _kind(kind).draw_labels(patient, lesion, tissue, spacing)


def render(kind: str, tissue: Tissue, mask: np.ndarray, scanner: dict, noise_seed: int) -> np.ndarray:
    """The image of (tissue fractions, label mask, scanner) with seeded texture and noise:
    FLAIR-like float32 MR units, or int16 HU for CT. Deterministic in all its arguments."""
    k = _kind(kind)
    known = {int(v) for v in scanner["labels"]} | {0}
    unknown = sorted(set(present_values(mask)) - known)
    if unknown:
        raise ValueError(f"mask has labels {unknown} unknown to the {kind} phantom (known: {sorted(known)})")
    image = np.zeros(mask.shape, np.float32)
    for name, fraction in tissue.items():
        image += np.float32(scanner["tissues"][name]) * fraction
    for label, value in scanner["labels"].items():
        image[mask == int(label)] = value
    rng = np.random.default_rng(noise_seed)
    return k.render(image, _smooth_noise(rng, mask.shape, 1.5), scanner, rng)


def make_case(kind: str, seed: int = 0, index: int = 0, size: int = 96, slices: int = 64,
              sites: int = 0, site_seed: int = 0) -> Tuple[Volume, Volume, dict]:
    """One case: (image, labels, ground truth). The same (kind, seed, index, grid, sites)
    always gives byte-identical arrays; every label of the kind is present. With `sites` > 0
    the case is scanned at site `index % sites` (see `sample_site`)."""
    k = _kind(kind)
    if sites < 0:
        raise ValueError(f"sites must be 0 (no site variation) or a positive count, got {sites}")
    rng = np.random.default_rng([seed, index])
    shape = (slices, size, size)
    required = set(LABELS[kind].values)
    patient, scanner = sample_patient(kind, rng), sample_scanner(kind, rng)
    if sites:
        variation = np.random.default_rng([seed, index, SITE_STREAM])
        k.vary_patient(patient, variation)
        scanner = k.apply_site(scanner, sample_site(kind, index % sites, site_seed), variation)
    geometry = case_geometry(patient, shape)
    tissue = build_anatomy(kind, patient, shape, geometry.spacing)
    for _ in range(50):                                 # tumours too small for the grid: draw again
        lesion = sample_lesion(kind, patient, rng) if k.sample_lesion else None
        mask = draw_labels(kind, patient, lesion, tissue, geometry.spacing)
        if required <= set(present_values(mask)) or lesion is None:
            break
    missing = required - set(present_values(mask))
    if missing:
        raise ValueError(f"a {size}x{size}x{slices} grid is too coarse for {kind} labels {sorted(missing)} "
                         f"(case {index}, seed {seed}); use a larger --size/--slices")
    groundtruth = {"format": "gem3d-phantom", "version": 1, "note": SYNTHETIC_NOTE,
                   "kind": kind, "case": f"{kind}_{index:03d}", "seed": seed, "index": index,
                   "shape": list(shape), "geometry": geometry.to_dict(),
                   "labels": LABELS[kind].to_dict(),
                   "patient": patient, "scanner": scanner, "lesion": lesion,
                   "noise_seed": _seed(rng)}
    if sites:
        groundtruth["site"] = scanner["site"]["index"]
    image = render(kind, tissue, mask, scanner, groundtruth["noise_seed"])
    return Volume(image, geometry), Volume(mask, geometry), groundtruth


def render_case(groundtruth: dict, mask: np.ndarray) -> np.ndarray:
    """Re-render a written case with another mask (e.g. an edited one): the counterfactual."""
    shape = tuple(groundtruth["shape"])
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} is not the grid {shape} of case {groundtruth['case']}")
    spacing = Geometry.from_dict(groundtruth["geometry"]).spacing
    tissue = build_anatomy(groundtruth["kind"], groundtruth["patient"], shape, spacing)
    return render(groundtruth["kind"], tissue, mask, groundtruth["scanner"], groundtruth["noise_seed"])


def write_dataset(out, kind: str, cases: int, size: int = 96, slices: int = 64, seed: int = 0,
                  overwrite: bool = False, progress: Optional[Callable[[str], None]] = None,
                  sites: int = 0, site_seed: int = 0) -> List[str]:
    """Write an nnU-Net v2 raw dataset of `cases` phantoms (+ groundtruth/<case>.json)."""
    _kind(kind)
    out = Path(out)
    ours = ("imagesTr", "labelsTr", "groundtruth", "dataset.json")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace its dataset")
        for name in ours:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for name in ours[:3]:
        (out / name).mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(cases):
        image, labels, truth = make_case(kind, seed, index, size, slices, sites, site_seed)
        name = truth["case"]
        write_volume(image, out / "imagesTr" / f"{name}_0000.nii.gz", description=SYNTHETIC_NOTE)
        write_volume(labels, out / "labelsTr" / f"{name}.nii.gz", description=SYNTHETIC_NOTE)
        (out / "groundtruth" / f"{name}.json").write_text(json.dumps(truth, indent=1))
        names.append(name)
        if progress:
            site = f" site {truth['site']}" if sites else ""
            progress(f"[{index + 1}/{cases}] {name}:{site} {size}x{size}x{slices} "
                     f"{labels.geometry.describe()}")
    dataset = {"name": f"GEM3DPhantom_{kind}", "channel_names": {"0": CHANNELS[kind]},
               "labels": {"background": 0, **{n: v for v, n in LABELS[kind].names.items()}},
               "numTraining": cases, "file_ending": ".nii.gz",
               "description": f"{SYNTHETIC_NOTE}: {kind} phantoms, seed {seed}"
                              + (f", {sites} sites (site seed {site_seed})" if sites else "") + "; "
                              "groundtruth/<case>.json re-renders each case (gem3d.phantom.render_case)"}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return names
