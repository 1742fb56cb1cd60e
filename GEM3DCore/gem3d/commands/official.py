"""`gem3d import-official`: the published GEM-3D checkpoints -> a model bundle."""
from __future__ import annotations

import shlex
from pathlib import Path

import click

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _command_line() -> str:
    """This invocation, rebuilt from its parsed options (for the bundle's provenance)."""
    args = ["gem3d", "import-official"]
    for name, value in click.get_current_context().params.items():
        flag = "--" + {"region": "preset", "slice_model": "slice", "base": "config"}.get(name, name).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value not in (None, False, ()):
            args += [flag, *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return shlex.join(args)


@click.command("import-official")
@click.option("--volume", required=True, type=FILE,
              help="Stage-2 volume model (Lightning .ckpt, e.g. <model>/checkpoints/last.ckpt).")
@click.option("--vae", type=FILE, help="LDM kl-f8 model.ckpt. Default: the copy stored in the --volume checkpoint.")
@click.option("--slice", "slice_model", type=FILE, help="Position-conditioned slice model (.ckpt), optional.")
@click.option("--preset", "region", required=True, type=click.Choice(["brain", "abdomen"]),
              help="Which published model: data conventions (labels, modality, intensity) to record.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bundle folder to write.")
@click.option("--nnunet-plans", type=FILE,
              help="abdomen: nnUNetPlans.json or dataset_fingerprint.json of the training data; its foreground "
                   "0.5/99.5 HU percentiles are the CT window the model was trained with.")
@click.option("--ct-window", nargs=2, type=float, metavar="LOW HIGH", help="abdomen: that HU window, given directly.")
@click.option("--weights", type=click.Choice(["auto", "ema", "raw"]), default="auto", show_default=True,
              help="UNet weights: the EMA copy where the checkpoint has one (auto), or insist on one kind.")
@click.option("--conventions", type=click.Choice(["gem3d", "official"]), default="gem3d", show_default=True,
              help="Inference conventions recorded as the bundle's default for `generate`: ours, or the official "
                   "scripts' (raw slice-model weights, VAE channel 0, LDM's final alpha-bar, posterior-sampled "
                   "conditioning, slice position at the start slice). README: 'Official conventions'.")
@click.option("--config", "base", default="paper", show_default=True,
              help="Architecture preset or config file (for re-trained variants of other sizes).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
def import_official(volume, vae, slice_model, region, out, nnunet_plans, ct_window, weights, conventions, base,
                    overwrite):
    """Import official GEM-3D checkpoints (HKU-MedAI/GEM-3D) into a bundle for `gem3d generate` and Slicer.

    The checkpoints are read with a restricted unpickler: no code stored in them runs."""
    from gem3d.official import ct_window_from_plans
    from gem3d.official import import_official as run_import

    if nnunet_plans is not None and ct_window:
        raise click.UsageError("give --nnunet-plans or --ct-window, not both")
    try:
        window = tuple(ct_window) if ct_window else None
        if nnunet_plans is not None:
            window = ct_window_from_plans(nnunet_plans)
        path = run_import(out, volume, region, vae=vae, slice_model=slice_model, base=base,
                          use_ema={"auto": None, "ema": True, "raw": False}[weights], ct_window=window,
                          command=_command_line(), overwrite=overwrite, conventions=conventions)
    except (ValueError, FileExistsError) as err:
        raise click.ClickException(str(err)) from None
    from gem3d.bundle import read_info

    info = read_info(path)
    click.echo(f"wrote {path}")
    click.echo(f"  conventions: {info['provenance']['conventions']['name']}")
    for role, entry in info["provenance"]["files"].items():
        kind = f"; {entry['weights']}" if "weights" in entry else ""
        click.echo(f"  {role:<7}{entry['file']}: {entry['used']}{kind}")
