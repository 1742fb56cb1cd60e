"""Edits of a 3D label mask for counterfactuals and augmentation: flip, rotate, translate,
scale, move toward the centre, relabel, copy another case's lesion.

Every edit works on the whole label Volume and returns one on the same grid (nearest
neighbour, geometry kept). A "lesion" is the non-zero voxels of the chosen `labels`
(default: all non-zero); geometric edits lift it out, move it, and paste it back over the
rest of the mask. Lesion voxels moved out of the volume are dropped with a
`LesionClippedWarning`.

Edits are also JSON-able specs ({"op": "translate", "mm": [10, 0, 0]}) so the edits behind a
synthetic volume can be recorded and replayed: `apply_edits` runs a list of them, drawing
any value left open (a rotate spec's "max_degrees", a move_toward_center spec without
"fraction"), and returns the specs with the values it drew.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from gem3d import typed
from gem3d.labels import MAX_LABEL
from gem3d.volume import Volume

ARRAY_AXES = {"x": 2, "y": 1, "z": 0}          # numpy axis of each index axis (arrays are z, y, x)
PHYSICAL_AXES = {"LR": 0, "AP": 1, "SI": 2}     # LPS component of each physical axis


class LesionClippedWarning(UserWarning):
    """Lesion voxels were moved outside the volume and dropped."""


def lesion(mask: Volume, labels: Optional[Iterable[int]] = None) -> np.ndarray:
    """Boolean array of the lesion voxels: the given labels, or every non-zero label."""
    if labels is None:
        return mask.array != 0
    labels = [int(v) for v in labels]
    found = np.isin(mask.array, labels)
    if not found.any():
        raise ValueError(f"the mask has no voxels with labels {labels} "
                         f"(present: {sorted(np.unique(mask.array).tolist())})")
    return found


def centroid_mm(mask: Volume, labels: Optional[Iterable[int]] = None) -> np.ndarray:
    """Physical (LPS mm) centroid of the lesion."""
    zyx = np.argwhere(lesion(mask, labels))
    if len(zyx) == 0:
        raise ValueError("the mask is empty: a lesion centroid needs non-zero voxels")
    return mask.geometry.index_to_physical(zyx.mean(0)[::-1])


def _points_mm(mask: Volume, where: np.ndarray) -> np.ndarray:
    """Physical positions (N, 3) of the voxels in `where`."""
    g = mask.geometry
    ijk = np.argwhere(where)[:, ::-1].astype(np.float64)
    return np.asarray(g.origin) + (ijk * np.asarray(g.spacing)) @ g.direction.T


def _count_outside(mask: Volume, points: np.ndarray) -> int:
    """How many physical points fall outside the grid of `mask`."""
    g = mask.geometry
    ijk = np.linalg.solve(g.direction, (points - np.asarray(g.origin)).T).T / np.asarray(g.spacing)
    size = np.asarray(mask.shape[::-1])
    return int(np.sum(np.any((ijk < -0.5) | (ijk > size - 0.5), axis=1)))


def _warn_dropped(dropped: int, total: int, op: str) -> None:
    if dropped:
        warnings.warn(f"{op}: {dropped} of {total} lesion voxels moved outside the volume "
                      "and were dropped", LesionClippedWarning, stacklevel=3)


def _paste(mask: Volume, removed: np.ndarray, moved: np.ndarray) -> Volume:
    """The mask without the `removed` voxels, with the non-zero `moved` labels on top."""
    out = np.where(removed, 0, mask.array).astype(mask.array.dtype)
    np.copyto(out, moved.astype(mask.array.dtype), where=moved != 0)
    return mask.with_array(out)


def _affine_lesion(mask: Volume, labels, op: str, matrix, translation=(0, 0, 0), center=None) -> Volume:
    """Move the lesion by the physical map p -> matrix (p - c) + c + translation, where c is
    `center` (mm) or the lesion centroid."""
    les = lesion(mask, labels)
    if not les.any():
        return mask.with_array(mask.array.copy())
    if center is None:
        center = mask.geometry.index_to_physical(np.argwhere(les).mean(0)[::-1])
    matrix, center = np.asarray(matrix, float), np.asarray(center, float)
    translation = np.asarray(translation, float)
    forward = sitk.AffineTransform(matrix.reshape(-1).tolist(), translation.tolist(), center.tolist())
    source = mask.with_array(np.where(les, mask.array, 0).astype(mask.array.dtype)).to_sitk()
    moved = sitk.Resample(source, source, forward.GetInverse(), sitk.sitkNearestNeighbor, 0,
                          source.GetPixelID())
    points = _points_mm(mask, les)
    _warn_dropped(_count_outside(mask, (points - center) @ matrix.T + center + translation),
                  len(points), op)
    return _paste(mask, les, sitk.GetArrayFromImage(moved))


def _index_axis(mask: Volume, axis: str) -> int:
    """The numpy axis of an index axis ('x', 'y', 'z') or physical axis ('LR', 'AP', 'SI')."""
    if axis.lower() in ARRAY_AXES:
        return ARRAY_AXES[axis.lower()]
    if axis.upper() in PHYSICAL_AXES:
        row = np.abs(mask.geometry.direction[PHYSICAL_AXES[axis.upper()]])
        return 2 - int(np.argmax(row))          # the index axis that runs most along it
    raise ValueError(f"unknown axis {axis!r}; valid: x, y, z, LR, AP, SI")


def flip(mask: Volume, axis: str, labels: Optional[Sequence[int]] = None) -> Volume:
    """Mirror the lesion across the middle of the grid along an array or physical axis."""
    numpy_axis = _index_axis(mask, axis)
    les = lesion(mask, labels)
    moved = np.flip(np.where(les, mask.array, 0), numpy_axis)
    return _paste(mask, les, moved)


def rotate(mask: Volume, degrees: Sequence[float] = (0.0, 0.0, 0.0), center=None,
           labels: Optional[Sequence[int]] = None) -> Volume:
    """Rotate the lesion by (rx, ry, rz) degrees about the physical x, y, z (LPS) axes
    (ITK Euler3D convention), about its centroid unless `center` (mm) is given."""
    euler = sitk.Euler3DTransform((0.0, 0.0, 0.0), *np.radians(np.asarray(degrees, float)).tolist())
    return _affine_lesion(mask, labels, "rotate", np.reshape(euler.GetMatrix(), (3, 3)), center=center)


def translate(mask: Volume, mm: Sequence[float] = (0.0, 0.0, 0.0),
              labels: Optional[Sequence[int]] = None) -> Volume:
    """Move the lesion by (dx, dy, dz) physical mm (LPS)."""
    return _affine_lesion(mask, labels, "translate", np.eye(3), translation=mm)


def scale(mask: Volume, factor: float, labels: Optional[Sequence[int]] = None, center=None) -> Volume:
    """Scale the lesion isotropically by `factor` about its centroid (or `center`, mm)."""
    if not factor > 0 or not np.isfinite(factor):
        raise ValueError(f"scale factor must be a positive number, got {factor}")
    voxels = int(lesion(mask, labels).sum())
    if voxels * factor ** 3 >= mask.array.size:
        raise ValueError(f"scale factor {factor:g} would grow the lesion ({voxels} voxels) to "
                         f"{voxels * factor ** 3:.3g} voxels, more than the whole volume ({mask.array.size}); "
                         "use a smaller factor")
    return _affine_lesion(mask, labels, "scale", factor * np.eye(3), center=center)


def move_toward_center(mask: Volume, max_px: float = 60, fraction: Optional[float] = None,
                       rng: Optional[np.random.Generator] = None,
                       labels: Optional[Sequence[int]] = None) -> Volume:
    """Shift the lesion along the line from its centroid to the 3D centre of the grid by
    `fraction` x min(max_px, distance) voxels (the GEM-3D paper's translation augmentation;
    `fraction` is drawn uniformly from [0, 1] when not given)."""
    les = lesion(mask, labels)
    if not les.any():
        return mask.with_array(mask.array.copy())
    if fraction is None:
        fraction = float((rng or np.random.default_rng()).uniform(0, 1))
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    toward = (np.asarray(mask.shape) - 1) / 2 - np.argwhere(les).mean(0)
    distance = float(np.linalg.norm(toward))
    if distance == 0:
        return mask.with_array(mask.array.copy())
    shift = np.rint(toward / distance * fraction * min(max_px, distance)).astype(int)
    part = np.where(les, mask.array, 0)
    moved = np.zeros_like(part)
    src = tuple(slice(max(0, -s), n - max(0, s)) for s, n in zip(shift, part.shape))
    dst = tuple(slice(max(0, s), n - max(0, -s)) for s, n in zip(shift, part.shape))
    moved[dst] = part[src]
    _warn_dropped(int(les.sum() - np.count_nonzero(moved)), int(les.sum()), "move_toward_center")
    return _paste(mask, les, moved)


def relabel(mask: Volume, mapping: Dict) -> Volume:
    """Replace label values ({old: new}; JSON string keys accepted); others stay."""
    out = mask.array.copy()
    for old, new in mapping.items():
        new = int(new)
        if out.dtype.kind in "iu" and not np.iinfo(out.dtype).min <= new <= np.iinfo(out.dtype).max:
            raise ValueError(f"label {new} does not fit the mask's {out.dtype} voxels")
        out[mask.array == int(old)] = new
    return mask.with_array(out)


def copy_lesion(mask: Volume, source_mask: Volume, labels: Optional[Sequence[int]] = None,
                offset_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> Volume:
    """Paste the lesion of another case at its physical position (+ `offset_mm`), resampled
    into this grid; it goes over whatever this mask holds there."""
    les = lesion(source_mask, labels)
    offset = np.asarray(offset_mm, float)
    source = source_mask.with_array(np.where(les, source_mask.array, 0).astype(mask.array.dtype)).to_sitk()
    shift = sitk.TranslationTransform(3, (-offset).tolist())
    pasted = sitk.Resample(source, mask.to_sitk(), shift, sitk.sitkNearestNeighbor, 0, source.GetPixelID())
    points = _points_mm(source_mask, les)
    _warn_dropped(_count_outside(mask, points + offset), len(points), "copy_lesion")
    return _paste(mask, np.zeros(mask.shape, bool), sitk.GetArrayFromImage(pasted))


OPS = {"flip": flip, "rotate": rotate, "translate": translate, "scale": scale,
       "move_toward_center": move_toward_center, "relabel": relabel, "copy_lesion": copy_lesion}


MAX_MM = 1e6
LABEL_LIST = {"labels": lambda v, w, n: [typed.number(x, w, f"{n}[{i}]", 1, MAX_LABEL, integer=True)
                                         for i, x in enumerate(typed.array(v, w, n))]}
CENTER = {"center": lambda v, w, n: v if v is None else typed.numbers(v, w, n, 3, low=-MAX_MM, high=MAX_MM)}
FIELDS = {  # the type and range of each field of each op (the typed layer's rules for edits)
    "flip": {"axis": lambda v, w, n: typed.choice(v, w, n, ("x", "y", "z", "LR", "AP", "SI")), **LABEL_LIST},
    "rotate": {"degrees": lambda v, w, n: typed.numbers(v, w, n, 3, low=-360, high=360),
               "max_degrees": lambda v, w, n: typed.number(v, w, n, 0, 180) if not isinstance(v, list)
               else typed.numbers(v, w, n, 3, low=0, high=180), **CENTER, **LABEL_LIST},
    "translate": {"mm": lambda v, w, n: typed.numbers(v, w, n, 3, low=-MAX_MM, high=MAX_MM), **LABEL_LIST},
    "scale": {"factor": lambda v, w, n: typed.number(v, w, n, 1e-3, 1e3), **CENTER, **LABEL_LIST},
    "move_toward_center": {"max_px": lambda v, w, n: typed.number(v, w, n, 0, 1e5),
                           "fraction": lambda v, w, n: v if v is None else typed.number(v, w, n, 0, 1),
                           **LABEL_LIST},
    "relabel": {"mapping": lambda v, w, n: _mapping(v, w, n)},
    "copy_lesion": {"source": typed.string,
                    "offset_mm": lambda v, w, n: typed.numbers(v, w, n, 3, low=-MAX_MM, high=MAX_MM), **LABEL_LIST},
}


def _mapping(value, where: str, name: str) -> dict:
    for key, new in typed.obj(value, where, name).items():
        old = int(key) if isinstance(key, str) and key.lstrip("-").isdigit() else key
        typed.number(old, where, f"{name} key {key}", 0, MAX_LABEL, integer=True)
        typed.number(new, where, f"{name}.{key}", 0, MAX_LABEL, integer=True)
    return value


def check_edit(spec, where: str) -> dict:
    """An edit spec's op, field names, types, finiteness and ranges (DocumentError naming `where`
    and the field), before any of it is used."""
    if not isinstance(spec, dict) or spec.get("op") not in OPS:
        op = spec.get("op") if isinstance(spec, dict) else spec
        raise typed.DocumentError(f"{where}: unknown mask edit {typed.show(op)}; valid ops: {', '.join(OPS)}")
    required = [name for name, p in inspect.signature(OPS[spec["op"]]).parameters.items()
                if p.default is inspect.Parameter.empty and name not in ("mask", "source_mask")]
    required += ["source"] if spec["op"] == "copy_lesion" else []
    missing = [name for name in required if name not in spec]
    if missing:
        raise typed.DocumentError(f"{where}: {spec['op']} needs field(s) {missing}")
    for name, value in spec.items():
        if name != "op" and name in FIELDS[spec["op"]]:
            FIELDS[spec["op"]][name](value, where, name)
    return spec


def read_edits(path) -> List[dict]:
    """Edit specs from a JSON file: a list, or a sidecar of an earlier edit-mask run ({"edits": [...]})."""
    data = typed.load_json(path, "edits file")
    specs = data.get("edits") if isinstance(data, dict) else data
    typed.array(specs, str(path), "edits")
    return [check_edit(spec, f"{path}: edit {i + 1}") for i, spec in enumerate(specs)]


def _resolve(spec: dict, rng: np.random.Generator, where: str = "edit") -> dict:
    """The spec with every open value drawn from `rng`, as plain JSON types."""
    spec = dict(check_edit(spec, where))
    op = spec["op"]
    if op == "rotate" and "max_degrees" in spec:
        limit = np.broadcast_to(np.asarray(spec.pop("max_degrees"), float), 3)
        spec["degrees"] = [float(rng.uniform(-m, m)) for m in limit]
    if op == "move_toward_center" and spec.get("fraction") is None:
        spec["fraction"] = float(rng.uniform(0, 1))
    allowed = set(inspect.signature(OPS[op]).parameters) - {"mask", "rng", "source_mask"}
    allowed |= {"source"} if op == "copy_lesion" else set()
    unknown = set(spec) - allowed - {"op"}
    if unknown:
        raise ValueError(f"{op}: unknown fields {sorted(unknown)}; valid: {sorted(allowed)}")
    return {k: (np.asarray(v).tolist() if isinstance(v, (tuple, np.ndarray)) else v) for k, v in spec.items()}


def apply_edits(mask: Volume, specs: Sequence[dict], rng: Optional[np.random.Generator] = None,
                sources: Optional[Dict[str, Volume]] = None) -> Tuple[Volume, List[dict]]:
    """Apply edit specs in order. Returns the edited mask and the specs with the values
    drawn from `rng`: replaying those gives the same mask without any rng. A copy_lesion
    spec names its source mask in `sources` by its "source" field."""
    rng = rng if rng is not None else np.random.default_rng()
    applied = []
    for i, spec in enumerate(specs):
        spec = _resolve(spec, rng, f"edit {i + 1}")
        kwargs = {k: v for k, v in spec.items() if k not in ("op", "source")}
        if spec["op"] == "copy_lesion":
            name = spec.get("source")
            if not sources or name not in sources:
                raise ValueError(f"copy_lesion: source {name!r} not given (have: {sorted(sources or {})})")
            kwargs["source_mask"] = sources[name]
        mask = OPS[spec["op"]](mask, **kwargs)
        applied.append(spec)
    return mask, applied


def paper_augmentation(rng: np.random.Generator, kind: str = "brain") -> List[dict]:
    """The GEM-3D paper's mask augmentation as concrete specs. Brain (BraTS): a random
    left-right flip, rotation uniform in +-2.5 degrees per axis, and a move toward the 3D
    centre by a uniform fraction of up to 60 voxels. Abdomen CT: the rotation only."""
    if kind not in ("brain", "abdomen"):
        raise ValueError(f"unknown kind {kind!r} for the paper augmentation; valid: brain, abdomen")
    specs = []
    if kind == "brain" and rng.uniform() < 0.5:
        specs.append({"op": "flip", "axis": "LR"})
    specs.append({"op": "rotate", "degrees": [float(v) for v in rng.uniform(-2.5, 2.5, 3)]})
    if kind == "brain":
        specs.append({"op": "move_toward_center", "max_px": 60, "fraction": float(rng.uniform(0, 1))})
    return specs
