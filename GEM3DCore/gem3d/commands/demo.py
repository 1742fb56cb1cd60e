"""`gem3d demo`: the main job on the embedded default (see gem3d/demo.py)."""
from __future__ import annotations

from pathlib import Path

import click

from gem3d.bundle_format import DEMO_BUNDLE, read_info
from gem3d.cli import threads_option
from gem3d.outputs import check_folder


@click.command()
@threads_option()
@click.option("--out", type=click.Path(file_okay=False), default="demo_out", show_default=True,
              help="Folder for the phantom data and the outputs.")
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model bundle (default: the demo bundle shipped with gem3d).")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out, bundle, device, seed):
    """Phantom brains -> move a tumour -> generate the counterfactual -> NIfTI, provenance, montage PNG."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        check_folder(Path(out))
        read_info(bundle or DEMO_BUNDLE)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err))
    from gem3d.demo import run_demo  # torch: only once the folder and the bundle passed their checks

    try:
        summary = run_demo(out, bundle, device, seed, echo=lambda s: click.echo(s, err=True))
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err))
    for name, path in summary["outputs"].items():
        click.echo(f"{name}: {path}")
    scores = summary["scores"]
    click.echo(f"PSNR vs the true counterfactual: {scores['volume_psnr_synthetic_db']} dB "
               f"(the unedited reference: {scores['volume_psnr_do_nothing_db']} dB); inside the edited region "
               f"{scores['edited_psnr_synthetic_db']} dB (unedited: {scores['edited_psnr_do_nothing_db']} dB); "
               f"generation {summary['timings']['total']:.1f} s")
