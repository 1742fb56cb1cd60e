"""Phantom datasets with known ground truth: FLAIR-like brain MRI with BraTS-labelled
tumours (a synthetic head, or the MNI152 template nilearn ships) and abdominal CT with
organ labels.

A case is drawn as a patient (anatomy, pose, scan coverage), a scanner (contrasts, bias,
noise) and, for brains, a lesion. The anatomy becomes soft tissue fractions on the scan
grid, the labels a mask, and `render` turns (tissue, mask, scanner, noise seed) into the
image deterministically: `render_case` re-renders a case with an edited mask, giving the
exact counterfactual image that fidelity metrics need as ground truth.

Coordinates: the grid frame is the scan grid in mm about its centre (x, y, z = array
axes i, j, k); the anatomy frame is the patient's (LPS, mm about the head or body centre)
with `pose` mapping it into the grid frame; `scan` places the grid in physical space.
"""
from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from gem3d.io import write_volume
from gem3d.labels import ABDOMEN_CT1K, BRATS, LabelMap, present_values
from gem3d.volume import Geometry, Volume

KINDS = ("brain", "abdomen", "mni")
LABELS: Dict[str, LabelMap] = {"brain": BRATS, "mni": BRATS, "abdomen": ABDOMEN_CT1K}
CHANNELS = {"brain": "FLAIR", "mni": "FLAIR", "abdomen": "CT"}
SYNTHETIC_NOTE = "SYNTHETIC phantom (gem3d.phantom), not patient data"

Tissue = Dict[str, np.ndarray]
Block = Tuple[slice, slice, slice]
FULL: Block = (slice(None), slice(None), slice(None))


# ---------------------------------------------------------------- geometry helpers

def _rotation(degrees) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles (degrees) about the x, y, z axes."""
    ax, ay, az = np.radians(np.asarray(degrees, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def case_geometry(patient: dict, shape) -> Geometry:
    """The scan grid: FOV / matrix size as spacing, tilted by `tilt_deg`, centred at `centre_mm`."""
    scan = patient["scan"]
    nz, ny, nx = shape
    fov_xy, fov_z = scan["fov_mm"]
    spacing = np.array([fov_xy / nx, fov_xy / ny, fov_z / nz])
    direction = _rotation(scan["tilt_deg"])
    half = (np.array([nx, ny, nz]) - 1) / 2
    origin = np.asarray(scan["centre_mm"]) - direction @ (spacing * half)
    return Geometry(tuple(spacing), tuple(origin), direction)


def _coords(shape, spacing, pose, block: Block = FULL) -> List[np.ndarray]:
    """Anatomy-frame mm (x, y, z arrays, float32) of the voxel centres in `block`."""
    axes = []
    for n, sp, sl in zip(shape[::-1], spacing, block[::-1]):
        axes.append(((np.arange(n, dtype=np.float32)[sl] - (n - 1) / 2) * np.float32(sp)))
    g = [axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]]
    rot = _rotation(pose["rotation_deg"]).astype(np.float32)
    t = [np.float32(v) for v in pose["shift_mm"]]
    return [rot[0, i] * (g[0] - t[0]) + rot[1, i] * (g[1] - t[1]) + rot[2, i] * (g[2] - t[2])
            for i in range(3)]


def _block(shape, spacing, pose, centre, half) -> Block:
    """Index block holding the anatomy-frame box `centre` +- `half` mm (a scalar: a cube)."""
    corners = np.array(np.meshgrid(*[[-1, 1]] * 3)).reshape(3, -1).T * np.broadcast_to(half, 3)
    g = (corners + np.asarray(centre)) @ _rotation(pose["rotation_deg"]).T + np.asarray(pose["shift_mm"])
    block = []
    for n, sp, lo, hi in zip(shape[::-1], spacing, g.min(0), g.max(0)):
        start = int(np.clip(np.floor(lo / sp + (n - 1) / 2), 0, n))
        block.append(slice(start, int(np.clip(np.ceil(hi / sp + (n - 1) / 2) + 1, start, n))))
    return tuple(block[::-1])


# ---------------------------------------------------------------- shapes

@lru_cache(maxsize=256)
def _lattice(seed: int, cells: int) -> np.ndarray:
    """Unit-variance smooth noise on a 48^3 lattice with about `cells` features per side."""
    white = np.random.default_rng(seed).standard_normal((48,) * 3).astype(np.float32)
    field = ndimage.gaussian_filter(white, 48 / (2.5 * cells), mode="wrap")
    return (field - field.mean()) / field.std()


def _noise(seed: int, q, cells: int, extent: float = 1.5) -> np.ndarray:
    """Smooth noise at points q (3 arrays in [-extent, extent]), softly bounded to +-2.5."""
    lattice = _lattice(seed, cells)
    s = (lattice.shape[0] - 1) / (2 * extent)
    shape = np.broadcast_shapes(*(qi.shape for qi in q))
    idx = np.stack([np.broadcast_to((qi + extent) * s, shape) for qi in q])
    out = ndimage.map_coordinates(lattice, idx, order=1, mode="nearest", output=np.float32)
    return 2.5 * np.tanh(out / 2.5)


def _warp(r, amp: float, seed: int, q, cells: int, within: float, extent: float = 1.5) -> np.ndarray:
    """Deform a normalised radius field by exp(-amp * noise), in place. The noise is looked up
    only where r < within * e^(2.5 amp): elsewhere the deformed field stays >= within anyway."""
    near = r < within * np.exp(2.5 * amp)
    pts = [np.broadcast_to(qi, r.shape)[near] for qi in q]
    r[near] *= np.exp(-np.float32(amp) * _noise(seed, pts, cells, extent))
    return r


def _radius(p, blob: dict, cells: int = 8, within: float = 1.5) -> np.ndarray:
    """Normalised radius (< 1 inside) of a smoothly deformed, rotated ellipsoid; exact
    where it is below `within` (1.5 keeps one-voxel soft edges of blobs wider than a voxel)."""
    rot = _rotation(blob.get("rotation_deg", (0, 0, 0))).astype(np.float32)
    c, semi = blob["centre"], blob["semi"]
    d = [p[k] - np.float32(c[k]) for k in range(3)]
    q = [(rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2]) / np.float32(semi[i])
         for i in range(3)]
    r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    if blob.get("amp"):
        _warp(r, blob["amp"], blob["seed"], q, cells, within, extent=2.5)
    return r


def _reach(blob: dict) -> float:
    """Radius (mm) of a sphere that holds the deformed blob and its soft edge."""
    return float(1.5 * max(blob["semi"]) * np.exp(2.5 * blob.get("amp", 0.0)))


def _soft(r, radius_mm: float, voxel_mm: float) -> np.ndarray:
    """Partial-volume fraction of the region r < 1 (edges one voxel wide)."""
    return np.clip(0.5 + (1 - r) * np.float32(radius_mm / voxel_mm), 0, 1)


def _paint(tissue: Tissue, name: str, amount, block: Block = FULL) -> None:
    """Put `amount` of tissue `name` over what is there, keeping the fractions summing to 1."""
    keep = 1 - amount
    for fraction in tissue.values():
        fraction[block] *= keep
    if name not in tissue:
        tissue[name] = np.zeros_like(next(iter(tissue.values())))
    tissue[name][block] += amount


def _u(rng, lo, hi, n=None):
    """Plain-float uniform draws (JSON-able ground truth)."""
    if n is None:
        return float(rng.uniform(lo, hi))
    return [float(v) for v in rng.uniform(lo, hi, n)]


def _seed(rng) -> int:
    return int(rng.integers(2 ** 31))


# ---------------------------------------------------------------- MNI152 template

@lru_cache(maxsize=1)
def _mni_template():
    """The MNI152 T1 template nilearn ships (a package file, no download), 2 mm, RAS."""
    try:
        from nilearn.datasets import load_mni152_template
    except ImportError as error:
        raise ImportError("--kind mni needs nilearn's MNI152 template: pip install nilearn "
                          "(or pip install 'gem3d[mni]')") from error
    image = load_mni152_template(resolution=2)
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    inside = (data > 0.05).astype(np.float32)           # the template's background holds denormals
    data *= inside
    ijk = np.argwhere(inside)
    lo, hi = image.affine[:3, :3] @ ijk.min(0), image.affine[:3, :3] @ ijk.max(0)
    centre_ras = image.affine[:3, 3] + (lo + hi) / 2
    extent = np.abs(hi - lo) + 2
    return data, inside, np.linalg.inv(image.affine), centre_ras, extent


def _mni_sample(h, scale, *arrays) -> List[np.ndarray]:
    """Template values at anatomy-frame points h (LPS mm about the brain centre)."""
    _, _, inverse, centre_ras, _ = _mni_template()
    ras = [centre_ras[0] - h[0] * scale[0], centre_ras[1] - h[1] * scale[1],
           centre_ras[2] + h[2] * scale[2]]
    shape = np.broadcast_shapes(*(np.shape(a) for a in ras))
    idx = np.stack([np.broadcast_to(sum(inverse[i, k] * ras[k] for k in range(3)) + inverse[i, 3],
                                    shape) for i in range(3)])
    return [ndimage.map_coordinates(a, idx, order=1, cval=0.0, output=np.float32) for a in arrays]


# ---------------------------------------------------------------- sampling

def sample_patient(kind: str, rng: np.random.Generator) -> dict:
    """Anatomy (shape, size, organ layout), pose in the scanner, and the scan's coverage."""
    _check_kind(kind)
    scan = {"tilt_deg": _u(rng, -4, 4, 3),
            "centre_mm": [_u(rng, -20, 20), _u(rng, -30, 10), _u(rng, -60, 60)]}
    if kind == "brain":
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
    elif kind == "mni":
        extent = _mni_template()[4]
        scale = _u(rng, 0.92, 1.08, 3)
        fov_xy = max(extent[0] * scale[0], extent[1] * scale[1]) * _u(rng, 1.12, 1.3)
        fov_z = extent[2] * scale[2] * _u(rng, 1.02, 1.12)
        patient = {"scale": scale,
                   "pose": {"rotation_deg": _u(rng, -6, 6, 3),
                            "shift_mm": [_u(rng, -8, 8), _u(rng, -8, 8), _u(rng, -6, 6)]}}
    else:
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
    scan["fov_mm"] = [fov_xy, fov_z]
    patient["scan"] = scan
    return patient


def sample_scanner(kind: str, rng: np.random.Generator) -> dict:
    """Tissue contrasts, label intensities, bias field and noise of one scanner/protocol."""
    _check_kind(kind)
    if kind == "abdomen":
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
    gain = _u(rng, 0.8, 1.25)
    base = {"background": 0, "scalp": 380, "skull": 40, "csf": 60, "ventricle": 60,
            "gm": 430, "wm": 350}
    tissues = {k: v * gain * _u(rng, 0.93, 1.07) for k, v in base.items()}
    labels = {k: v * gain * _u(rng, 0.92, 1.08) for k, v in {"1": 230, "2": 700, "4": 560}.items()}
    directions = rng.standard_normal((3, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bias = {"amplitude": _u(rng, 0.05, 0.2), "frequency": _u(rng, 0.4, 1.2),
            "directions": directions.tolist(), "phases": _u(rng, 0, 2 * np.pi, 3)}
    return {"modality": "MR", "tissues": tissues, "labels": labels, "bias": bias,
            "noise_sigma": _u(rng, 6, 18), "texture": _u(rng, 0.02, 0.05)}


def sample_lesion(kind: str, patient: dict, rng: np.random.Generator) -> dict:
    """A brain tumour: edema around an enhancing core around a necrotic centre, each a
    smoothly deformed ellipsoid, centred inside the brain and inside the FOV."""
    if kind not in ("brain", "mni"):
        raise ValueError(f"only brain phantoms have lesions (kind {kind!r} labels its organs)")
    radius = _u(rng, 20, 36)
    rot = _rotation(patient["pose"]["rotation_deg"])
    half = np.array(patient["scan"]["fov_mm"])[[0, 0, 1]] / 2 - 12
    for _ in range(1000):
        if kind == "brain":
            brain = np.array(patient["head"]["semi"]) - patient["scalp_mm"] - patient["skull_mm"]
            centre = rng.uniform(-0.6, 0.6, 3) * brain
            inside = np.sum((centre / brain) ** 2) < 0.36
        else:
            centre = rng.uniform(-1, 1, 3) * np.array([60, 75, 55])
            probe = centre[:, None] + np.vstack([np.zeros(3), 12 * np.eye(3), -12 * np.eye(3)]).T
            inside = _mni_sample(probe, patient["scale"], _mni_template()[1])[0].min() > 0.99
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


# ---------------------------------------------------------------- anatomy and labels

def build_anatomy(kind: str, patient: dict, shape, spacing) -> Tissue:
    """Soft tissue fractions (name -> float32 array summing to 1 over names) on the grid."""
    _check_kind(kind)
    voxel = float(np.prod(spacing) ** (1 / 3))
    p = _coords(shape, spacing, patient["pose"])
    tissue = {"background" if kind != "abdomen" else "air": np.ones(shape, np.float32)}
    if kind == "brain":
        _brain_anatomy(tissue, patient, p, voxel, shape, spacing)
    elif kind == "mni":
        t, inside = _mni_sample(p, patient["scale"], *_mni_template()[:2])
        tn = t / np.maximum(inside, 1e-3)               # undo partial volume with background
        csf = np.clip((0.66 - tn) / 0.36, 0, 1)
        wm = np.clip((tn - 0.66) / 0.19, 0, 1)
        tissue["background"] = 1 - inside
        tissue["csf"], tissue["gm"], tissue["wm"] = inside * csf, inside * (1 - csf - wm), inside * wm
    else:
        _abdomen_anatomy(tissue, patient, p, voxel, shape, spacing)
    return tissue


def _shells(p, blob: dict, insets):
    """Normalised radii of nested copies of a blob whose semi-axes shrink by each inset (mm,
    per axis), all under the blob's one smooth warp so layers keep their thickness."""
    semi = np.asarray(blob["semi"], dtype=np.float32)
    warp = np.exp(-np.float32(blob["amp"]) * _noise(blob["seed"], [p[i] / semi[i] for i in range(3)], 5))
    for inset in insets:
        s = semi - np.asarray(inset, dtype=np.float32)
        yield np.sqrt(sum((p[i] / s[i]) ** 2 for i in range(3))) * warp, s


def _brain_anatomy(tissue: Tissue, patient: dict, p, voxel: float, shape, spacing) -> None:
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


def _abdomen_anatomy(tissue: Tissue, patient: dict, p, voxel: float, shape, spacing) -> None:
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


def draw_labels(kind: str, patient: dict, lesion: Optional[dict], tissue: Tissue, spacing) -> np.ndarray:
    """The label mask (uint8): BraTS tumour labels for brains, organ labels for the abdomen."""
    shape = next(iter(tissue.values())).shape
    mask = np.zeros(shape, np.uint8)
    pose = patient["pose"]
    if kind in ("brain", "mni"):
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


# ---------------------------------------------------------------- rendering

def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian noise correlated over `sigma` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / field.std()


def _bias_field(bias: dict, shape) -> np.ndarray:
    """Smooth multiplicative MR bias: exp of a sum of three low-frequency plane waves."""
    nz, ny, nx = shape
    u = [np.linspace(-0.5, 0.5, nx, dtype=np.float32)[None, None, :],
         np.linspace(-0.5, 0.5, ny, dtype=np.float32)[None, :, None],
         np.linspace(-0.5, 0.5, nz, dtype=np.float32)[:, None, None]]
    log = np.zeros(shape, np.float32)
    for d, phase in zip(bias["directions"], bias["phases"]):
        log += np.cos(np.float32(2 * np.pi * bias["frequency"]) * (d[0] * u[0] + d[1] * u[1] + d[2] * u[2])
                      + np.float32(phase))
    return np.exp(np.float32(bias["amplitude"] / np.sqrt(1.5)) * log)


def render(kind: str, tissue: Tissue, mask: np.ndarray, scanner: dict, noise_seed: int) -> np.ndarray:
    """The image of (tissue fractions, label mask, scanner) with seeded texture and noise:
    FLAIR-like float32 MR units, or int16 HU for CT. Deterministic in all its arguments."""
    _check_kind(kind)
    known = {int(k) for k in scanner["labels"]} | {0}
    unknown = sorted(set(present_values(mask)) - known)
    if unknown:
        raise ValueError(f"mask has labels {unknown} unknown to the {kind} phantom (known: {sorted(known)})")
    image = np.zeros(mask.shape, np.float32)
    for name, fraction in tissue.items():
        image += np.float32(scanner["tissues"][name]) * fraction
    for label, value in scanner["labels"].items():
        image[mask == int(label)] = value
    rng = np.random.default_rng(noise_seed)
    texture = _smooth_noise(rng, mask.shape, 1.5)
    if kind == "abdomen":
        image += np.float32(scanner["texture"]) * texture
        image += np.float32(scanner["noise_sigma"]) * _smooth_noise(rng, mask.shape, 0.6)
        return np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    image *= (1 + np.float32(scanner["texture"]) * texture) * _bias_field(scanner["bias"], mask.shape)
    sigma = np.float32(scanner["noise_sigma"])
    real = image + sigma * rng.standard_normal(mask.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(mask.shape, dtype=np.float32)
    return np.sqrt(real ** 2 + imaginary ** 2)                  # Rician magnitude


# ---------------------------------------------------------------- cases and datasets

def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; valid: {', '.join(KINDS)}")


def make_case(kind: str, seed: int = 0, index: int = 0, size: int = 96,
              slices: int = 64) -> Tuple[Volume, Volume, dict]:
    """One case: (image, labels, ground truth). The same (kind, seed, index, grid) always
    gives byte-identical arrays; every label of the kind is present."""
    _check_kind(kind)
    rng = np.random.default_rng([seed, index])
    shape = (slices, size, size)
    required = set(LABELS[kind].values)
    patient, scanner = sample_patient(kind, rng), sample_scanner(kind, rng)
    geometry = case_geometry(patient, shape)
    tissue = build_anatomy(kind, patient, shape, geometry.spacing)
    for _ in range(50):                                 # tumours too small for the grid: draw again
        lesion = sample_lesion(kind, patient, rng) if kind != "abdomen" else None
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
                  overwrite: bool = False, progress: Optional[Callable[[str], None]] = None) -> List[str]:
    """Write an nnU-Net v2 raw dataset of `cases` phantoms (+ groundtruth/<case>.json)."""
    _check_kind(kind)
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
        image, labels, truth = make_case(kind, seed, index, size, slices)
        name = truth["case"]
        write_volume(image, out / "imagesTr" / f"{name}_0000.nii.gz", description=SYNTHETIC_NOTE)
        write_volume(labels, out / "labelsTr" / f"{name}.nii.gz", description=SYNTHETIC_NOTE)
        (out / "groundtruth" / f"{name}.json").write_text(json.dumps(truth, indent=1))
        names.append(name)
        if progress:
            progress(f"[{index + 1}/{cases}] {name}: {size}x{size}x{slices} "
                     f"{labels.geometry.describe()}")
    dataset = {"name": f"GEM3DPhantom_{kind}", "channel_names": {"0": CHANNELS[kind]},
               "labels": {"background": 0, **{n: v for v, n in LABELS[kind].names.items()}},
               "numTraining": cases, "file_ending": ".nii.gz",
               "description": f"{SYNTHETIC_NOTE}: {kind} phantoms, seed {seed}; "
                              "groundtruth/<case>.json re-renders each case (gem3d.phantom.render_case)"}
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return names
