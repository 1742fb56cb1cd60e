"""`gem3d enhance` and `gem3d harmonise` (alias `harmonize`): generate whole datasets, resumable, shardable with torchrun."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from gem3d.cli import threads_option
from gem3d.commands.generate import STRENGTH_HELP
from gem3d.sampler_settings import SAMPLERS


def _distributed():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _run(plan, dataset, out, bundle, device, kind, overwrite):
    from tqdm import tqdm

    from gem3d.bundle_format import DEMO_BUNDLE, read_info
    from gem3d.dataset_generation import check_output_folder, pending, run_jobs, write_dataset_json
    from gem3d.datasets import open_dataset

    rank, world, local_rank = _distributed()
    out = Path(out)
    try:
        check_output_folder(Path(dataset), out, overwrite)
        source = open_dataset(dataset)
        jobs = plan(source, out)
        read_info(bundle or DEMO_BUNDLE)
        import torch  # only once the dataset, the output folder and the bundle passed their checks
        import torch.distributed as dist

        from gem3d.engine import Engine

        if device == "auto" and world > 1 and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        engine = Engine(bundle or DEMO_BUNDLE, device)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err))
    todo = pending(jobs, out, rank, world, overwrite)
    click.echo(f"rank {rank}/{world}: {len(todo)} of {len(jobs)} cases to generate "
               f"({len(jobs) - len(pending(jobs, out, overwrite=overwrite))} already done)", err=True)
    failures = 0
    for job, event in tqdm(run_jobs(engine, todo, out), total=len(todo), unit="case", file=sys.stderr,
                           disable=rank != 0):
        if event is None or event["event"] != "finished":
            failures += 1
            click.echo(f"{job.out_id}: {event.get('message') if event else 'no result'}", err=True)
    if world > 1:
        dist.init_process_group("gloo")
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        try:
            info = write_dataset_json(out, source, engine.cfg.data.modality, jobs, kind)
        except OSError as err:  # a full disk: the OS's words, the cases already written are kept
            raise click.ClickException(str(err)) from None
        if info is None:
            raise click.ClickException(f"no case was generated, so {out / 'dataset.json'} was not written")
        click.echo(f"{out}: {info['numTraining']} of {len(jobs)} synthetic cases")
    if failures:
        raise click.ClickException(f"{failures} case(s) failed on rank {rank}; re-run to retry them")


def _sampling_options(f):
    for option in reversed([
        threads_option(),
        click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Model bundle (default: the demo bundle)."),
        click.option("--sampler", type=click.Choice(SAMPLERS), default=None, help="Default: dpm++."),
        click.option("--steps", type=click.IntRange(1, 1000), default=None),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True),
        click.option("--overwrite", is_flag=True,
                     help="Regenerate every case, replacing existing outputs (default: resume, never replace)."),
    ]):
        f = option(f)
    return f


@click.command()
@click.option("--dataset", required=True, type=click.Path(exists=True), help="Source dataset (any readable format).")
@click.option("--times", type=click.IntRange(1), default=1, show_default=True, help="Re-samples per case.")
@click.option("--augment", type=click.Choice(["paper"]), default=None, help="Also augment each mask.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output nnU-Net raw dataset.")
@_sampling_options
def enhance(dataset, times, augment, out, bundle, sampler, steps, seed, device, overwrite):
    """Re-sample every case K times with informed slices from other cases (same masks)."""
    from gem3d.dataset_generation import plan_enhance

    def plan(source, out_dir):
        return plan_enhance(source, out_dir, times, seed, augment=augment, sampler=sampler, steps=steps,
                            device=device, overwrite=overwrite)

    _run(plan, dataset, out, bundle, device, "enhancement", overwrite)


@click.command()
@click.option("--dataset", required=True, type=click.Path(exists=True), help="Source dataset (any readable format).")
@click.option("--informed-from", required=True, type=click.Path(exists=True), help="Scan of the fixed informed slice.")
@click.option("--informed-slice", type=int, default=None, help="Its index along that scan's slice axis.")
@click.option("--informed-position", type=click.FloatRange(0, 1), default=None,
              help="Or its normalised height (default: each case's first-window height).")
@click.option("--strength", type=float, default=1.0, show_default=True,
              help=STRENGTH_HELP + " Lower keeps each case's anatomy and removes less of its site's look.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output nnU-Net raw dataset.")
@_sampling_options
def harmonize(dataset, informed_from, informed_slice, informed_position, strength, out, bundle, sampler, steps,
              seed, device, overwrite):
    """Generate every case from one fixed informed slice (dataset-level de-enhancement)."""
    from gem3d.dataset_generation import plan_harmonize

    def plan(source, out_dir):
        return plan_harmonize(source, out_dir, informed_from, informed_slice, informed_position, seed,
                              sampler=sampler, steps=steps, strength=strength, device=device, overwrite=overwrite)

    _run(plan, dataset, out, bundle, device, "harmonisation", overwrite)
