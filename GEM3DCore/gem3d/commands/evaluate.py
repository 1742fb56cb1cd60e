"""`gem3d evaluate`: compare a synthetic dataset with a real one (GEM-3D's metrics)."""
from __future__ import annotations

from pathlib import Path

import click

from gem3d.cli import threads_option
from gem3d.outputs import check_folder, check_outputs


@click.command()
@threads_option()
@click.option("--real", required=True, type=click.Path(exists=True, file_okay=False),
              help="Real dataset (any layout `gem3d dataset inspect` reads).")
@click.option("--synthetic", required=True, type=click.Path(exists=True, file_okay=False),
              help="Synthetic dataset, e.g. the output of `gem3d enhance`.")
@click.option("--paired", is_flag=True,
              help="Also compare each synthetic case slice by slice with its real case (<case>_synNN -> <case>).")
@click.option("--extractor", default="default", show_default=True,
              help="FID features: 'default' (fixed random conv net, no weights) or 'radimagenet:PATH'.")
@click.option("--planes", "planes_per_volume", type=click.IntRange(2), default=32, show_default=True,
              help="Planes per volume and orientation for the Frechet distances.")
@click.option("--segmenter", default="auto", show_default=True,
              help="Mask adherence: auto (phantom rule for gem3d brain phantoms), none, phantom-brain, "
                   "net:PATH (a saved gem3d segmenter) or train[:STEPS] (train one on --real first).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report as JSON.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write the metrics as CSV.")
@click.option("--overwrite", is_flag=True, help="Replace existing --json / --csv files.")
def evaluate(real, synthetic, paired, extractor, planes_per_volume, segmenter, json_out, csv_out, overwrite):
    """FID-A/C/S, volumetric consistency, paired PSNR/SSIM/MS-SSIM and mask Dice."""
    reports = {name: path for name, path in (("--json", json_out), ("--csv", csv_out)) if path}
    try:
        for path in reports.values():
            check_folder(Path(path).resolve().parent)
        check_outputs(reports, overwrite=overwrite, protected=[real, synthetic])
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    from gem3d.evaluation.report import evaluate as run, table, write_csv, write_json  # torch

    try:
        report = run(real, synthetic, paired, extractor, planes_per_volume, segmenter,
                     progress=lambda text: click.echo(text, err=True))
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(table(report))
    if json_out:
        write_json(report, json_out)
    if csv_out:
        write_csv(report, csv_out)
