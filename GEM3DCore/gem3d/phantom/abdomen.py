"""Abdominal CT phantoms with AbdomenCT-1K organ labels (1 liver, 2 kidney, 3 spleen,
4 pancreas). HU are absolute, so sites differ in contrast phase, dose (noise),
reconstruction kernel and slice thickness, and patients in anatomy and liver fat."""
from __future__ import annotations

import numpy as np

from gem3d.labels import ABDOMEN_CT1K
from gem3d.phantom.common import (Kind, Tissue, _block, _coords, _noise, _paint, _psf, _radius, _reach,
                                  _seed, _shells, _smooth_noise, _soft, _u)


def sample_patient(rng: np.random.Generator):
    """Body outline, fat and muscle wall, bowel, diaphragm, spine, organs, pose."""
    body = [_u(rng, 140, 175), _u(rng, 100, 130)]
    fat, wall = _u(rng, 8, 35), _u(rng, 8, 14)
    cavity = [body[0] - fat - wall, body[1] - fat - wall]
    vb = {"y": body[1] - fat - _u(rng, 58, 68), "r": _u(rng, 16, 20),
          "period": _u(rng, 30, 36), "phase": _u(rng, 0, 1), "disc_mm": _u(rng, 7, 10)}
    fov_xy, fov_z = 2 * body[0] * _u(rng, 1.08, 1.2), _u(rng, 290, 340)
    kidney_x, kidney_y = _u(rng, 55, 68), vb["y"] - _u(rng, 0, 10)

    def organ(centre, semi, rotation, amp=0.06):
        return {"centre": centre, "semi": semi, "rotation_deg": rotation, "amp": amp,
                "seed": _seed(rng)}

    liver_x = -cavity[0] * _u(rng, 0.35, 0.5)
    patient = {
        "body": {"centre": [0, 0, 0], "semi": [body[0], body[1], 420], "amp": 0.03,
                 "seed": _seed(rng)},
        "fat_mm": fat, "wall_mm": wall, "bowel": {"threshold": _u(rng, 0.2, 0.8),
                                                  "seed": _seed(rng)},
        "diaphragm_mm": _u(rng, 135, 150), "spine": vb,
        "liver": [organ([liver_x, _u(rng, -15, 5), _u(rng, 65, 80)],
                        [_u(rng, 75, 90), _u(rng, 65, 80), _u(rng, 65, 80)],
                        [0, 0, _u(rng, -15, 15)]),
                  organ([liver_x + _u(rng, 60, 75), _u(rng, -45, -35), _u(rng, 75, 90)],
                        [_u(rng, 40, 55), _u(rng, 25, 35), _u(rng, 35, 45)], [0, 0, 0])],
        "spleen": organ([cavity[0] * _u(rng, 0.62, 0.72), vb["y"] - _u(rng, 0, 15),
                         _u(rng, 60, 80)], [_u(rng, 20, 28), _u(rng, 45, 60), _u(rng, 45, 60)],
                        [0, 0, _u(rng, 25, 40)]),
        "kidneys": [organ([-kidney_x, kidney_y, _u(rng, -25, -5)],
                          [_u(rng, 24, 30), _u(rng, 27, 33), _u(rng, 48, 58)],
                          [0, _u(rng, -12, -4), _u(rng, 15, 25)]),
                    organ([kidney_x, kidney_y, _u(rng, -15, 5)],
                          [_u(rng, 24, 30), _u(rng, 27, 33), _u(rng, 48, 58)],
                          [0, _u(rng, 4, 12), _u(rng, -25, -15)])],
        "pancreas": {"points": [[_u(rng, -35, -25), vb["y"] - _u(rng, 45, 55), _u(rng, 10, 20)],
                                [_u(rng, -5, 5), vb["y"] - _u(rng, 55, 65), _u(rng, 20, 30)],
                                [_u(rng, 60, 75), vb["y"] - _u(rng, 20, 30), _u(rng, 30, 40)]],
                     "radius": _u(rng, 10, 14), "amp": 0.1, "seed": _seed(rng)},
        "pose": {"rotation_deg": [_u(rng, -3, 3), _u(rng, -3, 3), _u(rng, -5, 5)],
                 "shift_mm": [_u(rng, -10, 10), _u(rng, -10, 10), -_u(rng, 20, 60)]},
    }
    return patient, fov_xy, fov_z


def vary_patient(patient: dict, rng: np.random.Generator) -> None:
    """Anatomy the organ mask does not show, widened: subcutaneous fat (x0.6-1.5 within the
    5-35 mm the organ layout allows), bowel content and pattern, diaphragm height."""
    patient["fat_mm"] = float(np.clip(patient["fat_mm"] * _u(rng, 0.6, 1.5), 5, 35))
    patient["bowel"] = {"threshold": _u(rng, -0.2, 1.2), "seed": _seed(rng)}
    patient["diaphragm_mm"] = _u(rng, 125, 160)


def build_anatomy(tissue: Tissue, patient: dict, p, voxel: float, shape, spacing) -> None:
    fat, wall = patient["fat_mm"], patient["wall_mm"]
    insets = [[0, 0, 0], [fat, fat, 0], [fat + wall, fat + wall, 0]]
    for name, (r, semi) in zip(("fat", "muscle", "fat"), _shells(p, patient["body"], insets)):
        cavity = _soft(r, semi[:2].mean(), voxel)
        _paint(tissue, name, cavity)
    bowel = patient["bowel"]
    mix = _noise(bowel["seed"], [p[i] / 60 for i in range(3)], 12, 6.0)
    _paint(tissue, "bowel", cavity * np.clip(0.5 + (mix - np.float32(bowel["threshold"])) * 2, 0, 1))
    dome = patient["diaphragm_mm"] - 0.006 * (np.abs(p[0]) - 70) ** 2 - 0.004 * p[1] ** 2
    _paint(tissue, "lung", cavity * np.clip(0.5 + (p[2] - dome) / voxel, 0, 1))
    heart = {"centre": [15, -30, patient["diaphragm_mm"] + 45], "semi": [65, 55, 60]}
    _paint(tissue, "muscle", cavity * _soft(_radius(p, heart), 55, voxel))
    vb = patient["spine"]
    y, r = vb["y"], vb["r"]
    column = [("muscle", [r + 18, y + r + 22], [24, 22]), ("muscle", [-(r + 18), y + r + 22], [24, 22]),
              ("muscle", [r + 14, y - 4], [14, 17]), ("muscle", [-(r + 14), y - 4], [14, 17]),
              ("bone", [0, y], [r, r]), ("marrow", [0, y], [r - 2.5, r - 2.5]),
              ("bone", [0, y + r + 10], [r * 0.6 + 4, r * 0.6 + 4]),
              ("bone", [0, y + r + 30], [5, 20]), ("fluid", [0, y + r + 10], [r * 0.4, r * 0.4]),
              ("vessel", [18, y - r - 12], [11, 11]), ("vessel", [-24, y - r - 10], [13, 10])]
    block = _block(shape, spacing, patient["pose"], [0, y + 15, 0], [r + 45, r + 45, 400])
    q = _coords(shape, spacing, patient["pose"], block)
    level = ((q[2] / np.float32(vb["period"]) + np.float32(vb["phase"])) % 1) * np.float32(vb["period"])
    disc = np.clip(0.5 + (vb["disc_mm"] / 2 - np.abs(level - vb["disc_mm"] / 2)) / voxel, 0, 1)
    for name, (cx, cy), (a, b) in column:
        s = _soft(_radius(q, {"centre": [cx, cy, 0], "semi": [a, b, 1e4]}), min(a, b), voxel)
        if name == "marrow":                            # intervertebral discs between bodies
            _paint(tissue, "disc", s * disc, block)
            s = s * (1 - disc)
        _paint(tissue, name, s, block)


def _tube(p, tube: dict) -> np.ndarray:
    """Normalised distance (< 1 inside) to a polyline of the given radius, smoothly deformed."""
    pts = np.asarray(tube["points"], dtype=np.float32)
    best = None
    for a, b in zip(pts[:-1], pts[1:]):
        ab = b - a
        t = sum((p[i] - a[i]) * ab[i] for i in range(3)) / np.float32(ab @ ab)
        t = np.clip(t, 0, 1)
        d2 = sum((p[i] - a[i] - t * ab[i]) ** 2 for i in range(3))
        best = d2 if best is None else np.minimum(best, d2)
    warp = np.exp(-np.float32(tube["amp"]) * _noise(tube["seed"], [p[i] / 60 for i in range(3)], 8, 4.0))
    return np.sqrt(best) / np.float32(tube["radius"]) * warp


def draw_labels(patient: dict, lesion, tissue: Tissue, spacing) -> np.ndarray:
    """Organ labels inside the abdominal cavity; earlier organs win where they overlap."""
    shape = next(iter(tissue.values())).shape
    mask = np.zeros(shape, np.uint8)
    pose = patient["pose"]
    cavity = 1 - sum(tissue[n] for n in ("air", "muscle", "bone", "marrow", "disc", "fluid"))
    organs = [(4, patient["pancreas"], _tube), (2, patient["kidneys"][0], _radius),
              (2, patient["kidneys"][1], _radius), (3, patient["spleen"], _radius),
              (1, patient["liver"][0], _radius), (1, patient["liver"][1], _radius)]
    for label, organ, distance in organs:
        if distance is _tube:
            pts = np.asarray(organ["points"])
            centre = (pts.min(0) + pts.max(0)) / 2
            reach = np.linalg.norm(pts.max(0) - pts.min(0)) / 2 + _reach({"semi": [organ["radius"]], **organ})
        else:
            centre, reach = organ["centre"], _reach(organ)
        block = _block(shape, spacing, pose, centre, reach)
        inside = (distance(_coords(shape, spacing, pose, block), organ) < 1) & (cavity[block] > 0.5)
        mask[block][inside & (mask[block] == 0)] = label
    return mask


# ---------------------------------------------------------------- the CT scanner and sites

def sample_scanner(rng: np.random.Generator) -> dict:
    """Tissue and organ HU, noise and texture of one scanner."""
    shift = _u(rng, -12, 12)                        # scanner calibration offset, HU
    tissues = {"air": -1000.0, "lung": _u(rng, -870, -820), "fat": _u(rng, -110, -85) + shift,
               "muscle": _u(rng, 40, 55) + shift, "bowel": _u(rng, 15, 35) + shift,
               "bone": _u(rng, 650, 900), "marrow": _u(rng, 200, 320),
               "disc": _u(rng, 70, 95) + shift, "fluid": _u(rng, 5, 15) + shift,
               "vessel": _u(rng, 100, 170) + shift}
    labels = {"1": _u(rng, 52, 68) + shift, "2": _u(rng, 130, 180) + shift,
              "3": _u(rng, 45, 58) + shift, "4": _u(rng, 32, 48) + shift}
    return {"modality": "CT", "tissues": tissues, "labels": labels,
            "noise_sigma": _u(rng, 8, 25), "texture": _u(rng, 3, 8)}


# Organ HU: unenhanced, and the enhancement (HU above it) per contrast phase; typical adult
# values (docs/phantoms.md). "blood" is the aorta/IVC ("vessel" tissue).
UNENHANCED = {"1": 55.0, "2": 32.0, "3": 48.0, "4": 45.0, "blood": 42.0}
PHASES = {"non-contrast": {"1": 0, "2": 0, "3": 0, "4": 0, "blood": 0},
          "arterial": {"1": 15, "2": 130, "3": 70, "4": 70, "blood": 260},
          "portal-venous": {"1": 55, "2": 130, "3": 65, "4": 55, "blood": 130},
          "delayed": {"1": 35, "2": 90, "3": 40, "4": 30, "blood": 70}}


def sample_site(rng: np.random.Generator) -> dict:
    """One CT protocol: contrast phase, dose (noise), kernel sharpness, slice thickness."""
    sharpness = _u(rng, 0, 1)                       # 0: soft-tissue kernel, 1: sharp kernel
    return {"phase": sorted(PHASES)[int(rng.integers(len(PHASES)))], "sharpness": sharpness,
            "noise_scale": _u(rng, 0.6, 2.0) * (0.8 + 0.6 * sharpness),
            "noise_corr_vox": 0.9 - 0.5 * sharpness, "blur_vox": 0.9 * (1 - sharpness),
            "thickness_vox": _u(rng, 0.0, 1.5)}


def apply_site(scanner: dict, site: dict, rng: np.random.Generator) -> dict:
    """This patient's scan at `site`: organ and blood HU of the site's phase, the enhancement
    scaled x0.75-1.25 per patient (timing, cardiac output, dose per kg), liver fat lowering
    the liver by 0-40 HU (mostly little), muscle and bowel wall enhancing with the blood."""
    enhancement = {k: v * _u(rng, 0.75, 1.25) for k, v in PHASES[site["phase"]].items()}
    steatosis = 40 * _u(rng, 0, 1) ** 2
    labels = {k: UNENHANCED[k] + enhancement[k] for k in scanner["labels"]}
    labels["1"] -= steatosis
    tissues = dict(scanner["tissues"], vessel=UNENHANCED["blood"] + enhancement["blood"])
    tissues["muscle"] += 0.08 * enhancement["blood"]
    tissues["bowel"] += 0.25 * enhancement["blood"]
    return dict(scanner, tissues=tissues, labels=labels,
                noise_sigma=scanner["noise_sigma"] * site["noise_scale"], site=site)


def render(image: np.ndarray, texture: np.ndarray, scanner: dict, rng: np.random.Generator) -> np.ndarray:
    """Texture, the site's point spread, correlated noise; int16 HU."""
    image += np.float32(scanner["texture"]) * texture
    site = scanner.get("site")
    correlation = 0.6
    if site:
        image = _psf(image, site)
        correlation = site["noise_corr_vox"]
    image += np.float32(scanner["noise_sigma"]) * _smooth_noise(rng, image.shape, correlation)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


KIND = Kind(labels=ABDOMEN_CT1K, channel="CT", background="air", sample_patient=sample_patient,
            sample_scanner=sample_scanner, build_anatomy=build_anatomy, sample_lesion=None,
            draw_labels=draw_labels, render=render, sample_site=sample_site,
            vary_patient=vary_patient, apply_site=apply_site)
