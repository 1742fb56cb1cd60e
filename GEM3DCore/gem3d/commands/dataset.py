"""`gem3d dataset`: look at a training dataset before spending GPU hours on it."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ..datasets import CaseReport, inspect_case, open_dataset
from ..labels import PRESETS, preset
from ..outputs import check_outputs, write_text_atomically

COLUMNS = (("shape(z,y,x)", 14), ("spacing(x,y,z)", 20), ("labels", 10))


@click.group()
def dataset():
    """Datasets: nnU-Net raw, MSD Task01, BraTS 2021/2023, AbdomenCT-1K."""


@dataset.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the report (every case, every problem) to this JSON file.")
@click.option("--label-map", type=click.Choice(sorted(PRESETS)),
              help="Check masks against this preset instead of the dataset's own label map.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --json file.")
@click.pass_context
def inspect(ctx, path, json_out, label_map, overwrite):
    """Check every case of the dataset at PATH.

    Detects the layout, then reads each image and mask once and reports missing or
    unreadable files, non-3D images, image/mask shape or geometry mismatches, empty
    masks, labels outside the label map and NaN/inf voxels. Exits with code 1 when any
    case has a problem.
    """
    try:
        data = open_dataset(path, preset(label_map) if label_map else None)
        if json_out is not None:
            check_outputs({"--json": json_out}, overwrite=overwrite, protected=[data.root])
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error))
    click.echo(f"{data.format} dataset at {data.root}: {len(data.cases)} case(s); label map: {data.label_map}")
    width = max(len("case"), *(len(case.case_id) for case in data.cases))
    click.echo(_line(width, "case", *(title for title, _ in COLUMNS), "problems"))
    reports = []
    for case in data.cases:
        report = inspect_case(case, data.label_map)
        reports.append(report)
        click.echo(_row(width, report))
    bad = [report for report in reports if report.problems]
    for report in bad:
        for problem in report.problems:
            click.echo(f"{report.case}: {problem}", err=True)
    click.echo(f"{len(reports)} case(s) inspected, {len(bad)} with problems")
    if json_out is not None:
        write_text_atomically(json_out, json.dumps({
            "path": str(data.root), "format": data.format, "label_map": data.label_map.to_dict(),
            "cases": [asdict(report) for report in reports]}, indent=2))
    ctx.exit(1 if bad else 0)


def _line(width: int, case: str, *cells: str) -> str:
    *fixed, last = cells
    return " ".join([case.ljust(width)] + [c.ljust(w) for c, (_, w) in zip(fixed, COLUMNS)] + [last]).rstrip()


def _row(width: int, report: CaseReport) -> str:
    shape = "x".join(map(str, report.shape)) if report.shape else "-"
    spacing = "x".join(f"{s:.3g}" for s in report.spacing) if report.spacing else "-"
    labels = ",".join(map(str, report.labels)) or "-"
    return _line(width, report.case, shape, spacing, labels, "; ".join(report.problems) or "ok")
