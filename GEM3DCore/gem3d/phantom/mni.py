"""MNI phantoms: BraTS-labelled tumours in the MNI152 T1 template nilearn ships, scaled per
patient, with the brain kind's FLAIR scanner and sites."""
from __future__ import annotations

from functools import lru_cache
from typing import List

import numpy as np
from scipy import ndimage

from gem3d.phantom.brain import mr_kind, tumour_sampler
from gem3d.phantom.common import Tissue, _u


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


def sample_patient(rng: np.random.Generator):
    """A per-axis scale of the template, the pose, and a FOV that holds the scaled brain."""
    extent = _mni_template()[4]
    scale = _u(rng, 0.92, 1.08, 3)
    fov_xy = max(extent[0] * scale[0], extent[1] * scale[1]) * _u(rng, 1.12, 1.3)
    fov_z = extent[2] * scale[2] * _u(rng, 1.02, 1.12)
    patient = {"scale": scale,
               "pose": {"rotation_deg": _u(rng, -6, 6, 3),
                        "shift_mm": [_u(rng, -8, 8), _u(rng, -8, 8), _u(rng, -6, 6)]}}
    return patient, fov_xy, fov_z


def build_anatomy(tissue: Tissue, patient: dict, p, voxel: float, shape, spacing) -> None:
    """CSF, grey and white matter fractions from the template's T1 intensities."""
    t, inside = _mni_sample(p, patient["scale"], *_mni_template()[:2])
    tn = t / np.maximum(inside, 1e-3)               # undo partial volume with background
    csf = np.clip((0.66 - tn) / 0.36, 0, 1)
    wm = np.clip((tn - 0.66) / 0.19, 0, 1)
    tissue["background"] = 1 - inside
    tissue["csf"], tissue["gm"], tissue["wm"] = inside * csf, inside * (1 - csf - wm), inside * wm


def _template_centre(patient: dict, rng: np.random.Generator):
    centre = rng.uniform(-1, 1, 3) * np.array([60, 75, 55])
    probe = centre[:, None] + np.vstack([np.zeros(3), 12 * np.eye(3), -12 * np.eye(3)]).T
    return centre, _mni_sample(probe, patient["scale"], _mni_template()[1])[0].min() > 0.99


def vary_patient(patient: dict, rng: np.random.Generator) -> None:
    """The template is one brain: a patient is its scale (already drawn), nothing more."""


KIND = mr_kind(sample_patient=sample_patient, build_anatomy=build_anatomy,
               sample_lesion=tumour_sampler(_template_centre), vary_patient=vary_patient)
