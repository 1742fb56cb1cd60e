"""`gem3d edit-mask`: edit a label mask on its own grid and record the edits beside it."""
from __future__ import annotations

import json
from pathlib import Path

import click

IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def sidecar_path(path) -> Path:
    """OUT's provenance file: the image name with its image suffix replaced by .json."""
    path = Path(path)
    for suffix in IMAGE_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.with_name(path.name[: -len(suffix)] + ".json")
    return path.with_name(path.name + ".json")


def _read_mask(path):
    from gem3d.io import read_volume
    from gem3d.labels import label_array

    mask = read_volume(path)
    return mask.with_array(label_array(mask.array, str(path))) if mask.array.dtype.kind == "f" else mask


@click.command("edit-mask")
@click.option("--mask", "mask_path", type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True)
@click.option("--edits", "edits_path", type=click.Path(exists=True, dir_okay=False),
              help="JSON list of edit specs (or a sidecar of an earlier edit-mask run, to replay it); "
                   "a copy_lesion spec's \"source\" is a mask path relative to this file.")
@click.option("--flip", type=click.Choice(["x", "y", "z", "LR", "AP", "SI"]), help="Array or physical axis.")
@click.option("--rotate", nargs=3, type=float, metavar="RX RY RZ", help="Degrees about the physical axes.")
@click.option("--translate", nargs=3, type=float, metavar="DX DY DZ", help="Physical mm (LPS).")
@click.option("--scale", type=float, metavar="F", help="Isotropic lesion scaling about its centroid.")
@click.option("--move-to-centre", "--move-to-center", "move_to_center", type=float, metavar="PX",
              help="Move the lesion PX voxels toward the volume centre (at most to the centre).")
@click.option("--relabel", multiple=True, metavar="A:B", help="Replace label A by B (repeatable).")
@click.option("--labels", type=str, metavar="L1,L2",
              help="Lesion labels the geometric edits move (default: all non-zero).")
@click.option("--augment", type=click.Choice(["paper", "paper-ct"]),
              help="The GEM-3D paper's random augmentation (paper-ct: rotation only).")
@click.option("--seed", type=int, help="Seed of the random values (recorded in the sidecar).")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (never the input mask).")
def edit_mask(mask_path, out_path, edits_path, flip, rotate, translate, scale, move_to_center,
              relabel, labels, augment, seed, overwrite):
    """Edit MASK and write OUT plus OUT's sidecar JSON with the applied edits. Order: the
    --edits file, then --flip, --rotate, --translate, --scale, --move-to-centre, --relabel,
    then --augment."""
    import numpy as np

    from gem3d.io import input_files, write_volume
    from gem3d.mask_edits import apply_edits, paper_augmentation, read_edits
    from gem3d.outputs import Landing, check_outputs, write_text_atomically

    try:
        lesion = {"labels": [int(v) for v in labels.split(",")]} if labels else {}
    except ValueError:
        raise click.BadParameter(f"{labels!r} is not a comma-separated list of labels", param_hint="--labels")
    try:
        specs = read_edits(edits_path) if edits_path else []
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if flip:
        specs.append({"op": "flip", "axis": flip, **lesion})
    if rotate:
        specs.append({"op": "rotate", "degrees": list(rotate), **lesion})
    if translate:
        specs.append({"op": "translate", "mm": list(translate), **lesion})
    if scale is not None:
        specs.append({"op": "scale", "factor": scale, **lesion})
    if move_to_center is not None:
        specs.append({"op": "move_toward_center", "max_px": move_to_center, "fraction": 1.0, **lesion})
    for pair in relabel:
        try:
            old, new = (int(v) for v in pair.split(":"))
        except ValueError:
            raise click.BadParameter(f"{pair!r} is not A:B with integer labels", param_hint="--relabel")
        specs.append({"op": "relabel", "mapping": {str(old): new}})
    rng = np.random.default_rng(seed)
    if augment:
        drawn = paper_augmentation(rng, "brain" if augment == "paper" else "abdomen")
        specs += [{**spec, **lesion} for spec in drawn]
    if not specs:
        raise click.UsageError("no edit given (see --help)")
    base = Path(edits_path).parent if edits_path else Path.cwd()
    source_paths = {spec["source"]: base / str(spec["source"]) for spec in specs
                     if isinstance(spec, dict) and spec.get("op") == "copy_lesion" and "source" in spec}
    inputs = [str(f) for p in (mask_path, *source_paths.values()) for f in input_files(p)] + [edits_path]
    try:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        check_outputs({"--out": out_path, "sidecar": sidecar_path(out_path)}, inputs, overwrite)
        mask = _read_mask(mask_path)
        sources = {name: _read_mask(path) for name, path in source_paths.items()}
        edited, applied = apply_edits(mask, specs, rng, sources)
        provenance = {"tool": "gem3d edit-mask", "input": str(mask_path), "seed": seed, "edits": applied}
        with Landing() as landed:
            landed.add(write_volume(edited, out_path, overwrite=overwrite))
            write_text_atomically(sidecar_path(out_path), json.dumps(provenance, indent=1))
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {out_path} ({len(applied)} edits)")
