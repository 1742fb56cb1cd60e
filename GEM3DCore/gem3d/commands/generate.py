"""`gem3d generate` (one volume) and `gem3d worker` (the stdio engine Slicer talks to)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from gem3d.bundle_format import DEMO_BUNDLE, read_info
from gem3d.cli import threads_option
from gem3d.preflight import check_request
from gem3d.request import INFORMED_SOURCES, GenerateRequest, InformedSpec, RequestError
from gem3d.sampler_settings import SAMPLERS

STRENGTH_HELP = ("How far from the reference sampling starts (SDEdit): 1 samples from pure noise; lower "
                 "starts from the reference's own latents noised part of the way and keeps more of the "
                 "patient. In (0, 1].")


def run_request(engine, request: GenerateRequest, quiet: bool = False) -> dict:
    """Run one request with a progress bar over windows; the `finished` event, or ClickException."""
    from tqdm import tqdm

    bar = None
    for event in engine.generate(request):
        kind = event["event"]
        if kind == "started":
            bar = tqdm(total=len(event["plan"]), unit="window", desc=Path(request.out).name,
                       disable=quiet, file=sys.stderr)
        elif kind == "window":
            bar.update(1)
        elif kind == "finished":
            if bar is not None:
                bar.close()
            return event
        else:
            if bar is not None:
                bar.close()
            raise click.ClickException(event.get("message", kind))
    raise click.ClickException("the engine stopped without finishing")


@click.command()
@threads_option()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="Model bundle folder (default: the demo bundle shipped with gem3d).")
@click.option("--mask", required=True, type=click.Path(exists=True), help="Label volume (the bundle's labels).")
@click.option("--reference", required=True, type=click.Path(exists=True),
              help="Reference scan: output geometry and intensity units, and the 'same' informed slice.")
@click.option("--informed", type=click.Choice(INFORMED_SOURCES), default="same", show_default=True,
              help="Where the informed slice comes from.")
@click.option("--informed-from", type=click.Path(exists=True), default=None,
              help="Scan of the informed slice for --informed other/fixed.")
@click.option("--informed-slice", type=int, default=None,
              help="Index of the informed slice along that scan's slice axis (default: the first window's height).")
@click.option("--informed-position", type=click.FloatRange(0, 1), default=None,
              help="Normalised height of the informed slice (instead of --informed-slice).")
@click.option("--start", type=click.FloatRange(0, 1), default=None,
              help="Start position p of the first window in [0, 1] (default: random, seeded).")
@click.option("--edits", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON list of mask edits applied before sampling (see gem3d edit-mask).")
@click.option("--augment", type=click.Choice(["paper"]), default=None, help="The paper's mask augmentation.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None, help="Default: dpm++ (fast).")
@click.option("--steps", type=click.IntRange(1, 1000), default=None, help="Sampler steps (default 20 for dpm++).")
@click.option("--eta", type=float, default=None, help="DDIM eta (ddim only).")
@click.option("--strength", type=float, default=1.0, show_default=True, help=STRENGTH_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Output volume (.nii.gz, .nii, .nrrd or .mha); a .provenance.json is written beside it.")
@click.option("--mask-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the mask that was used (after edits).")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (never an input).")
@click.option("--allow-empty-mask", is_flag=True, help="Accept a mask without labels (a healthy counterfactual).")
@click.option("--conventions", type=click.Choice(["gem3d", "official"]), default=None,
              help="Inference conventions (default: the bundle's, else gem3d): official = the GEM-3D scripts' "
                   "exactly (VAE channel 0, LDM's final alpha-bar, posterior-sampled conditioning, slice-model "
                   "position at the start slice). README: 'Official conventions'.")
def generate(bundle, mask, reference, informed, informed_from, informed_slice, informed_position, start, edits,
             augment, sampler, steps, eta, strength, seed, device, out, mask_out, overwrite, allow_empty_mask,
             conventions):
    """Generate a synthetic volume from a mask and an informed slice."""
    from gem3d.mask_edits import read_edits
    from gem3d.outputs import check_outputs

    try:
        request = GenerateRequest(
            reference=reference, mask=mask, out=out, mask_out=mask_out, bundle=bundle,
            informed=InformedSpec(informed, informed_from, informed_slice, informed_position),
            start=start, edits=read_edits(edits) if edits else [], augment=augment,
            sampler=sampler, steps=steps, eta=eta, strength=strength, seed=seed, device=device, overwrite=overwrite,
            allow_empty_mask=allow_empty_mask)
        if edits:  # the edits file is an input too
            check_outputs(request.outputs(), [edits], overwrite=True)
        check_request(request)
        read_info(bundle or DEMO_BUNDLE)
        from gem3d.engine import Engine  # torch: only once the request passed its checks

        engine = Engine(bundle or DEMO_BUNDLE, device, conventions)
    except (RequestError, ValueError, OSError) as err:
        raise click.ClickException(str(err))
    finished = run_request(engine, request)
    for name, path in finished["outputs"].items():
        click.echo(f"{name}: {path}")
    click.echo(f"time: {finished['timings']['total']:.1f} s (first window "
               f"{finished['timings']['first_window']:.1f} s)")


@click.command()
@threads_option()
@click.option("--bundle", type=click.Path(exists=True, file_okay=False), default=None,
              help="Bundle for requests that name none (default: the demo bundle).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--heartbeat", type=click.FloatRange(min=0.05), default=5.0, show_default=True,
              help="Seconds between heartbeat events while a job runs.")
def worker(bundle, device, heartbeat):
    """Serve generation requests: JSON lines on stdin, events on stdout (docs/worker-protocol.md)."""
    try:
        read_info(bundle or DEMO_BUNDLE)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err))
    from gem3d.worker import main

    sys.exit(main(str(bundle or DEMO_BUNDLE), device, heartbeat))
