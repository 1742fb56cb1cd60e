"""`gem3d bundle info`: what a model bundle holds, or how big a configuration's networks are;
`gem3d bundle calibrate`: a copy of a bundle with its through-plane filter calibrated."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import click


@click.group()
def bundle():
    """Model bundles (bundle.json + safetensors weights)."""


def _echo_counts(counts: Dict[str, int]) -> None:
    click.echo("parameters:")
    for name, count in counts.items():
        click.echo(f"  {name:<26} {count:>13,}")


def _summary(loaded) -> None:
    from gem3d.sampler_settings import resolve_sampler

    info, diffusion = loaded.info, loaded.config.diffusion
    prov = info["provenance"]
    default_sampler, default_steps = resolve_sampler(diffusion)
    rows = [("name", info["name"]), ("modality", info["modality"]),
            ("labels", str(loaded.label_map)), ("intensity", info["intensity"]["kind"]),
            ("slice size", info["slice_size"]), ("window length", info["window_length"]),
            ("latent scale", f"{info['latent_scale']:.6g}"), ("informed slice", info["informed_slice"]),
            ("sampler", f"{default_sampler}, {default_steps} steps by default; "
                        f"other samplers {diffusion.sampling_steps} steps unless --steps is given"),
            ("volumetric", info["volumetric"]),
            ("weights", ", ".join(info["weights"]))]
    if "command" in prov:
        rows.append(("trained with", prov["command"]))
    rows += [(f"note {key}", text) for key, text in prov.get("notes", {}).items()]
    if "dataset" in prov:
        rows.append(("dataset", f"{prov['dataset']['path']} ({prov['dataset']['cases']} cases)"))
    losses = prov.get("final_losses")
    if losses:
        rows.append(("final losses", ", ".join(f"{k} {v:.4g}" for k, v in losses.items() if v is not None)))
    if "wall_s" in prov:
        machine = prov.get("machine", {})
        rows.append(("training time", f"{prov['wall_s']:.0f} s on {machine.get('device', '?')} "
                                      f"({machine.get('cpus', '?')} CPUs, {machine.get('processes', 1)} process(es))"))
    for key, value in rows:
        click.echo(f"{key + ':':<15} {value}")


@bundle.command()
@click.argument("path", required=False, type=click.Path(path_type=Path))
@click.option("--config", help="No bundle: count the parameters of this preset or config file's networks.")
def info(path, config):
    """Summarise the bundle at PATH and count its parameters (all weights are loaded and checked).

    With --config instead of PATH, the networks are built on the meta device (no memory, no
    weights) just to count their parameters, e.g. `gem3d bundle info --config paper`."""
    import torch

    from gem3d.bundle import BundleError, load_bundle, parameter_counts
    from gem3d.config import load_config
    from gem3d.models import build_slice_model, build_unet, build_vae

    if (path is None) == (config is None):
        raise click.UsageError("give either a bundle folder or --config")
    if config is not None:
        try:
            cfg = load_config(config)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        with torch.device("meta"):
            modules = {"vae": build_vae(cfg), "unet": build_unet(cfg, volumetric=True),
                       "slice_model": build_slice_model(cfg)}
        click.echo(f"config {cfg.name}: {cfg.data.slice_size} px slices, windows of {cfg.window_length}")
        _echo_counts(parameter_counts(modules))
        return
    try:
        loaded = load_bundle(path)
    except BundleError as err:
        raise click.ClickException(str(err)) from None
    _summary(loaded)
    _echo_counts(parameter_counts({"vae": loaded.vae, "unet": loaded.unet, "slice_model": loaded.slice_model}))


@bundle.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--dataset", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Scans like those the bundle will generate (a dataset with masks, nnU-Net or gem3d layout); "
                   "its first 8 labelled cases are used.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the calibrated copy (PATH itself is never changed).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def calibrate(path, dataset, out, device, overwrite):
    """Calibrate the through-plane filter (the stripe fix) of the bundle at PATH on a dataset.

    For bundles made before `gem3d train` calibrated it, and for imported official checkpoints
    (both have no filter): the copy in --out smooths its outputs along z as much as its VAE needs
    (README, "Model bundles")."""
    from gem3d.bundle import BundleError, load_bundle, save_bundle
    from gem3d.engine import resolve_device
    from gem3d.through_plane import CALIBRATION_CASES, calibrate_vae
    from gem3d.training.data import load_training_set

    if out.resolve() == path.resolve():
        raise click.UsageError("--out is the bundle itself; give a new folder (the input bundle is never changed)")
    if out.exists() and not overwrite:
        raise click.ClickException(f"{out} exists; choose another --out folder or pass --overwrite")
    try:
        loaded = load_bundle(path, resolve_device(device))
        volumes = [case.image for case in load_training_set(dataset, loaded.config, CALIBRATION_CASES).cases]
    except (BundleError, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    cfg = loaded.config
    before = cfg.vae.through_plane
    cfg.vae.through_plane = calibrate_vae(loaded.vae, cfg.vae.scale, volumes)
    provenance = dict(loaded.info["provenance"])
    provenance["notes"] = dict(provenance.get("notes", {}), through_plane=(
        f"calibrated to {cfg.vae.through_plane:g} by gem3d bundle calibrate on {len(volumes)} cases of {dataset}"))
    modules = {"vae": loaded.vae, "unet": loaded.unet}
    if loaded.slice_model is not None:
        modules["slice_model"] = loaded.slice_model
    save_bundle(out, cfg, modules, provenance, overwrite=True)
    click.echo(f"through-plane filter a = {cfg.vae.through_plane:g} (was {before:g}); the calibrated bundle: {out}")
