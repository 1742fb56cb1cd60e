"""`gem3d train {vae,stage1,stage2,slice,all}`: train from one config on one dataset.

Multi-GPU / multi-node: start the same command with torchrun, e.g.
`torchrun --nproc_per_node 4 -m gem3d train all --config small --dataset D --out RUN`.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from gem3d.cli import threads_option

STAGE_HELP = {
    "vae": "Train the slice VAE (L1 + KL) and measure its latent scale.",
    "stage1": "Train the 2D UNet on windows (one timestep per slice). Needs the VAE.",
    "stage2": "Add volumetric layers to the stage-1 UNet and train only them. Needs stage1.",
    "slice": "Train the position-conditioned slice model. Needs the VAE.",
    "all": "Train vae -> stage1 -> stage2 -> slice, then write RUN_DIR/bundle.",
}


@click.group()
def train():
    """Train GEM-3D models; every stage resumes from its last checkpoint in RUN_DIR."""


def _notes(values) -> dict:
    notes = {}
    for value in values:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r}: expected KEY=TEXT", param_hint="--note")
        notes[key] = text
    return notes


def command_line() -> str:
    """This command as typed (under torchrun: as torchrun would be called)."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launcher = f"torchrun --nnodes {world // local} --nproc_per_node {local} -m gem3d" if world > 1 else "gem3d"
    return f"{launcher} {shlex.join(sys.argv[1:])}"


def _command(what: str) -> click.Command:
    @threads_option()
    @click.option("--config", "config", required=True,
                  help="A preset name (tiny, small, paper) or a YAML/JSON config file.")
    @click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="Training dataset folder (any layout `gem3d dataset inspect` reads).")
    @click.option("--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                  help="Run folder: config, checkpoints, previews, stage weights, bundle.")
    @click.option("--resume/--no-resume", default=True, show_default=True,
                  help="Continue from the last checkpoint (--no-resume deletes the stage's checkpoints).")
    @click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
    @click.option("--vae-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Pretrained VAE (diffusers AutoencoderKL safetensors), used when train.vae_steps is 0.")
    @click.option("--note", multiple=True, metavar="KEY=TEXT",
                  help="Recorded in the bundle's provenance (e.g. how the dataset was made); repeatable.")
    def command(config, dataset, run_dir, resume, device, vae_weights, note):
        from gem3d.config import load_config
        from gem3d.datasets import open_dataset

        notes = _notes(note)
        try:
            cfg = load_config(config)
            open_dataset(dataset)
        except (ValueError, OSError) as err:
            raise click.ClickException(str(err)) from None
        from gem3d.training import Run, init  # torch: only once the config and the dataset read
        from gem3d.training import train as run_training

        try:
            ctx = init(device)
            run = Run(cfg, dataset, run_dir, ctx, resume, vae_weights)
            results = run_training(run, what, command_line(), notes)
        except (ValueError, OSError, FloatingPointError) as err:
            raise click.ClickException(str(err)) from None
        if ctx.main:
            for name, result in results.items():
                if result:
                    click.echo(f"{name}: {result['steps']} steps, final loss {result.get('final_loss', 'n/a')}, "
                               f"{result.get('wall_s', 0)} s")
            if what == "all":
                click.echo(f"bundle: {run_dir / 'bundle'}")

    command.__doc__ = STAGE_HELP[what]
    return train.command(what)(command)


for _what in STAGE_HELP:
    _command(_what)
