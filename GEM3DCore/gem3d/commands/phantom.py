"""`gem3d phantom`: write a synthetic nnU-Net raw dataset with known ground truth."""
from __future__ import annotations

import click


@click.command()
@click.option("--kind", type=click.Choice(["brain", "abdomen", "mni"]), default="brain", show_default=True,
              help="brain: synthetic head FLAIR + BraTS tumour labels; abdomen: CT + organ labels; "
                   "mni: tumours in nilearn's MNI152 template (needs nilearn).")
@click.option("--cases", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=96, show_default=True,
              help="In-plane matrix size.")
@click.option("--slices", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--sites", type=click.IntRange(min=0), default=0, show_default=True,
              help="Scan case i at site i %% SITES: per-site contrast ratios, nonlinearity, bias, noise, "
                   "blur and slice thickness (CT: contrast phase, dose, kernel), and wider patient "
                   "anatomy. 0: the original phantoms, bit for bit. Ranges: docs/phantoms.md.")
@click.option("--site-seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which sites: datasets with the same --site-seed share their sites (e.g. a "
                   "training and a held-out set with different --seed).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Dataset folder.")
@click.option("--overwrite", is_flag=True,
              help="Replace the dataset (imagesTr, labelsTr, groundtruth, dataset.json) "
                   "in a non-empty --out.")
def phantom(kind, cases, size, slices, seed, sites, site_seed, out, overwrite):
    """Write CASES phantoms as an nnU-Net raw dataset in OUT, with groundtruth/<case>.json
    holding every parameter needed to re-render a case (also with an edited mask)."""
    from gem3d.phantom import write_dataset

    try:
        write_dataset(out, kind, cases, size, slices, seed, overwrite,
                      progress=lambda line: click.echo(line, err=True), sites=sites, site_seed=site_seed)
    except (FileExistsError, ImportError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    at = f" at {sites} sites" if sites else ""
    click.echo(f"wrote {cases} {kind} phantoms{at} to {out}")
