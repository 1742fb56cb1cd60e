"""Brain FLAIR phantoms: a synthetic head, BraTS-labelled tumours, and the MR scanner and
site (protocol) model that the MNI kind shares."""
from __future__ import annotations

from typing import Callable

import numpy as np

from gem3d.labels import BRATS
from gem3d.phantom.common import (Kind, Tissue, _block, _coords, _paint, _psf, _radius, _reach,
                                  _rotation, _seed, _shells, _soft, _u, _warp, _bias_field)


def sample_patient(rng: np.random.Generator):
    """Head shape, scalp/skull/CSF layers, sulci, white matter, ventricles, deep grey, pose."""
    head = [_u(rng, 68, 78), _u(rng, 88, 100), _u(rng, 80, 90)]
    fov_xy, fov_z = 2 * max(head) * _u(rng, 1.12, 1.25), _u(rng, 158, 175)
    fov_top = _u(rng, -8, 12)                       # vertex to top of the FOV, mm
    patient = {
        "head": {"centre": [0, 0, 0], "semi": head, "amp": _u(rng, 0.02, 0.04),
                 "seed": _seed(rng)},
        "scalp_mm": _u(rng, 4, 7), "skull_mm": _u(rng, 5, 8), "csf_mm": _u(rng, 2, 4),
        "folds": {"amp": _u(rng, 0.03, 0.05), "seed": _seed(rng)},
        "white_matter": {"ratio": _u(rng, 0.86, 0.9), "amp": _u(rng, 0.08, 0.12),
                         "seed": _seed(rng)},
        "ventricle": {"centre": [_u(rng, 5, 8), _u(rng, -8, 0), _u(rng, 8, 16)],
                      "semi": [_u(rng, 5, 8), _u(rng, 22, 30), _u(rng, 8, 12)],
                      "rotation_deg": [0, 0, _u(rng, -12, -4)],
                      "amp": _u(rng, 0.1, 0.2), "seed": _seed(rng)},
        "deep_grey": {"centre": [_u(rng, 14, 20), _u(rng, -4, 4), _u(rng, -6, 2)],
                      "semi": [_u(rng, 7, 10), _u(rng, 13, 17), _u(rng, 9, 13)],
                      "amp": 0.1, "seed": _seed(rng)},
        "pose": {"rotation_deg": [_u(rng, -8, 8), _u(rng, -6, 6), _u(rng, -8, 8)],
                 "shift_mm": [_u(rng, -10, 10), _u(rng, -10, 10), fov_z / 2 - fov_top - head[2]]},
    }
    return patient, fov_xy, fov_z


def vary_patient(patient: dict, rng: np.random.Generator) -> None:
    """Anatomy the tumour mask does not show, widened to adult ranges (docs/phantoms.md):
    ventricle size (x0.6-2.2 per axis, ageing and atrophy), sulcal depth and pattern, CSF
    layer, white-matter extent, head width and depth."""
    v = patient["ventricle"]
    grow = _u(rng, 0.6, 2.2)
    v["semi"] = [s * grow * _u(rng, 0.85, 1.15) for s in v["semi"]]
    v["amp"], v["seed"] = _u(rng, 0.1, 0.3), _seed(rng)
    patient["folds"] = {"amp": _u(rng, 0.02, 0.09), "seed": _seed(rng)}
    patient["csf_mm"] = _u(rng, 1.5, 6)
    patient["white_matter"]["ratio"] = _u(rng, 0.8, 0.92)
    head = patient["head"]["semi"]
    patient["head"]["semi"] = [head[0] * _u(rng, 0.94, 1.05), head[1] * _u(rng, 0.94, 1.05), head[2]]


def build_anatomy(tissue: Tissue, patient: dict, p, voxel: float, shape, spacing) -> None:
    depths = np.cumsum([0, patient["scalp_mm"], patient["skull_mm"], patient["csf_mm"]])
    layers = zip(("scalp", "skull", "csf", "gm"), _shells(p, patient["head"], [[d] * 3 for d in depths]))
    for name, (r, semi) in layers:
        if name == "gm":                                # sulci: the brain surface folds
            folds = patient["folds"]
            _warp(r, folds["amp"], folds["seed"], [p[i] / semi[i] for i in range(3)], 14, 1.1)
            brain_r, brain = r, _soft(r, semi.mean(), voxel)
        _paint(tissue, name, _soft(r, semi.mean(), voxel))
    wm = patient["white_matter"]
    r = _warp(brain_r / np.float32(wm["ratio"]), wm["amp"], wm["seed"], p, 18, 1.1 / wm["ratio"], 100)
    _paint(tissue, "wm", np.minimum(_soft(r, semi.mean() * wm["ratio"], voxel), brain))
    for name, key in (("gm", "deep_grey"), ("ventricle", "ventricle")):
        blob = patient[key]                             # one blob each, mirrored to both hemispheres
        half = abs(blob["centre"][0]) + _reach(blob)
        block = _block(shape, spacing, patient["pose"], [0, *blob["centre"][1:]], half)
        q = _coords(shape, spacing, patient["pose"], block)
        s = _soft(_radius([np.abs(q[0]), q[1], q[2]], blob), min(blob["semi"]), voxel)
        _paint(tissue, name, np.minimum(s, brain[block]), block)
    fissure = np.clip(0.5 + (1.2 - np.abs(p[0])) / voxel, 0, 1) * np.clip(p[2] / 20, 0, 1)
    _paint(tissue, "csf", fissure * brain)


def _head_centre(patient: dict, rng: np.random.Generator):
    brain = np.array(patient["head"]["semi"]) - patient["scalp_mm"] - patient["skull_mm"]
    centre = rng.uniform(-0.6, 0.6, 3) * brain
    return centre, np.sum((centre / brain) ** 2) < 0.36


def tumour_sampler(centre_in_brain: Callable) -> Callable:
    """sample_lesion(patient, rng) for a brain whose `centre_in_brain(patient, rng)` draws a
    candidate tumour centre and says whether it lies inside the brain."""

    def sample_lesion(patient: dict, rng: np.random.Generator) -> dict:
        """A brain tumour: edema around an enhancing core around a necrotic centre, each a
        smoothly deformed ellipsoid, centred inside the brain and inside the FOV."""
        radius = _u(rng, 20, 36)
        rot = _rotation(patient["pose"]["rotation_deg"])
        half = np.array(patient["scan"]["fov_mm"])[[0, 0, 1]] / 2 - 12
        for _ in range(1000):
            centre, inside = centre_in_brain(patient, rng)
            grid = rot @ centre + np.asarray(patient["pose"]["shift_mm"])
            if inside and np.all(np.abs(grid) < half):
                break
        else:
            raise ValueError("found no tumour position inside both the brain and the FOV")
        core = centre + rng.uniform(-0.2, 0.2, 3) * radius
        core_r = radius * _u(rng, 0.5, 0.75)
        necrosis = core + rng.uniform(-0.15, 0.15, 3) * core_r

        def blob(c, r, amp):
            return {"centre": [float(v) for v in c], "semi": [r * s for s in _u(rng, 0.8, 1.2, 3)],
                    "rotation_deg": _u(rng, -180, 180, 3), "amp": amp, "seed": _seed(rng)}

        return {"edema": blob(centre, radius, _u(rng, 0.12, 0.22)),
                "core": blob(core, core_r, _u(rng, 0.1, 0.2)),
                "necrosis": blob(necrosis, core_r * _u(rng, 0.45, 0.7), _u(rng, 0.1, 0.2))}

    return sample_lesion


def draw_labels(patient: dict, lesion: dict, tissue: Tissue, spacing) -> np.ndarray:
    """BraTS tumour labels (1 necrosis, 2 edema, 4 enhancing), only inside the brain."""
    shape = next(iter(tissue.values())).shape
    mask = np.zeros(shape, np.uint8)
    pose = patient["pose"]
    outside = sum(tissue[n] for n in ("background", "scalp", "skull") if n in tissue)
    block = _block(shape, spacing, pose, lesion["edema"]["centre"], _reach(lesion["edema"]))
    p = _coords(shape, spacing, pose, block)
    r_edema, r_core, r_necrosis = (_radius(p, lesion[part], within=1.0)
                                   for part in ("edema", "core", "necrosis"))
    core = (r_core < 1) & (r_edema < 0.9)
    necrosis = (r_necrosis < 1) & core & (r_core < 0.75)
    labels = np.where(necrosis, 1, np.where(core, 4, np.where(r_edema < 1, 2, 0)))
    mask[block] = np.where(outside[block] < 0.5, labels, 0)
    return mask


# ---------------------------------------------------------------- the MR scanner and sites

BASE = {"background": 0, "scalp": 380, "skull": 40, "csf": 60, "ventricle": 60, "gm": 430, "wm": 350}
LESION = {"1": 230, "2": 700, "4": 560}


def sample_scanner(rng: np.random.Generator) -> dict:
    """Tissue contrasts, label intensities, bias field and noise of one scanner/protocol."""
    gain = _u(rng, 0.8, 1.25)
    tissues = {k: v * gain * _u(rng, 0.93, 1.07) for k, v in BASE.items()}
    labels = {k: v * gain * _u(rng, 0.92, 1.08) for k, v in LESION.items()}
    directions = rng.standard_normal((3, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bias = {"amplitude": _u(rng, 0.05, 0.2), "frequency": _u(rng, 0.4, 1.2),
            "directions": directions.tolist(), "phases": _u(rng, 0, 2 * np.pi, 3)}
    return {"modality": "MR", "tissues": tissues, "labels": labels, "bias": bias,
            "noise_sigma": _u(rng, 6, 18), "texture": _u(rng, 0.02, 0.05)}


def sample_site(rng: np.random.Generator) -> dict:
    """One MR protocol: tissue contrast relative to white matter, an intensity nonlinearity,
    bias strength, noise, in-plane blur and slice thickness (ranges: docs/phantoms.md)."""
    contrast = {"gm": _u(rng, 0.88, 1.3), "csf": _u(rng, 0.4, 3.0), "scalp": _u(rng, 0.5, 1.6),
                "skull": _u(rng, 0.6, 2.0), "1": _u(rng, 0.7, 1.5), "2": _u(rng, 0.75, 1.3),
                "4": _u(rng, 0.7, 1.4)}
    return {"contrast": contrast, "gamma": _u(rng, 0.7, 1.4), "bias_scale": _u(rng, 1.0, 2.5),
            "noise_scale": _u(rng, 0.6, 2.2), "blur_vox": _u(rng, 0.0, 1.0),
            "thickness_vox": _u(rng, 0.0, 1.5)}


def apply_site(scanner: dict, site: dict, rng: np.random.Generator) -> dict:
    """This patient's scanner at `site`: the site's contrast ratios (with +-5 % per case),
    bias strength and noise; nonlinearity and blur are applied in `render`."""
    c = site["contrast"]
    factor = {"gm": c["gm"], "csf": c["csf"], "ventricle": c["csf"], "scalp": c["scalp"], "skull": c["skull"]}
    tissues = {k: v * factor.get(k, 1.0) * _u(rng, 0.95, 1.05) for k, v in scanner["tissues"].items()}
    labels = {k: v * c[k] * _u(rng, 0.95, 1.05) for k, v in scanner["labels"].items()}
    bias = dict(scanner["bias"], amplitude=scanner["bias"]["amplitude"] * site["bias_scale"])
    return dict(scanner, tissues=tissues, labels=labels, bias=bias,
                noise_sigma=scanner["noise_sigma"] * site["noise_scale"], site=site)


def render(image: np.ndarray, texture: np.ndarray, scanner: dict, rng: np.random.Generator) -> np.ndarray:
    """Texture, bias field, the site's nonlinearity and point spread, then Rician noise."""
    image *= (1 + np.float32(scanner["texture"]) * texture) * _bias_field(scanner["bias"], image.shape)
    site = scanner.get("site")
    if site:
        reference = np.float32(scanner["tissues"]["wm"])
        image = reference * (np.maximum(image, 0) / reference) ** np.float32(site["gamma"])
        image = _psf(image, site)
    sigma = np.float32(scanner["noise_sigma"])
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real ** 2 + imaginary ** 2)                  # Rician magnitude


def mr_kind(**anatomy) -> Kind:
    """A FLAIR brain kind from its anatomy hooks, with the MR scanner and sites."""
    return Kind(labels=BRATS, channel="FLAIR", background="background", draw_labels=draw_labels,
                sample_scanner=sample_scanner, render=render, sample_site=sample_site,
                apply_site=apply_site, **anatomy)


KIND = mr_kind(sample_patient=sample_patient, build_anatomy=build_anatomy,
               sample_lesion=tumour_sampler(_head_centre), vary_patient=vary_patient)
