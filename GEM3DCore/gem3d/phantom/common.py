"""Shared phantom machinery: grid and anatomy frames, smooth deformed shapes, soft tissue
fractions, seeded noise fields, and the per-kind hooks a phantom kind provides.

Coordinates: the grid frame is the scan grid in mm about its centre (x, y, z = array
axes i, j, k); the anatomy frame is the patient's (LPS, mm about the head or body centre)
with `pose` mapping it into the grid frame; `scan` places the grid in physical space.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from gem3d.labels import LabelMap
from gem3d.volume import Geometry

Tissue = Dict[str, np.ndarray]
Block = Tuple[slice, slice, slice]
FULL: Block = (slice(None), slice(None), slice(None))


@dataclass(frozen=True)
class Kind:
    """What one phantom kind provides. Random draws happen in this order (make_case): patient
    anatomy, scanner, lesion; the site hooks draw from their own generators, so phantoms
    without sites stay exactly what they were."""

    labels: LabelMap
    channel: str
    background: str
    sample_patient: Callable       # rng -> (anatomy dict, FOV in-plane mm, FOV z mm)
    sample_scanner: Callable       # rng -> scanner dict
    build_anatomy: Callable        # (tissue, patient, anatomy coords, voxel mm, shape, spacing) -> None
    sample_lesion: Optional[Callable]  # (patient, rng) -> lesion dict, or None: the labels are organs
    draw_labels: Callable          # (patient, lesion, tissue, spacing) -> uint8 mask
    render: Callable               # (image, texture, scanner, rng) -> image: what the scanner adds
    sample_site: Callable          # rng -> site dict (a protocol: contrast, noise, blur, ...)
    vary_patient: Callable         # (patient, rng) -> None: anatomy the mask does not show
    apply_site: Callable           # (scanner, site, rng) -> scanner of this case at this site


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


def _shells(p, blob: dict, insets):
    """Normalised radii of nested copies of a blob whose semi-axes shrink by each inset (mm,
    per axis), all under the blob's one smooth warp so layers keep their thickness."""
    semi = np.asarray(blob["semi"], dtype=np.float32)
    warp = np.exp(-np.float32(blob["amp"]) * _noise(blob["seed"], [p[i] / semi[i] for i in range(3)], 5))
    for inset in insets:
        s = semi - np.asarray(inset, dtype=np.float32)
        yield np.sqrt(sum((p[i] / s[i]) ** 2 for i in range(3))) * warp, s


# ---------------------------------------------------------------- rendering helpers


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



def _psf(image: np.ndarray, site: dict) -> np.ndarray:
    """The site's point spread: in-plane blur and slice thickness (Gaussian sigmas, voxels)."""
    sigma = (site["thickness_vox"], site["blur_vox"], site["blur_vox"])
    return ndimage.gaussian_filter(image, sigma, mode="nearest") if max(sigma) > 0 else image
