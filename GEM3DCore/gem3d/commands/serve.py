"""`gem3d serve`: the engine as an HTTP service for a GPU server (gem3d.server)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import click

from gem3d.access import is_loopback, read_token
from gem3d.cli import threads_option


def bundle_names(paths) -> dict:
    """{folder name: path} of checked bundles; requests name the bundle, never a server path."""
    from gem3d.bundle_format import read_info

    names = {}
    for path in paths:
        path = Path(path).resolve()
        try:
            read_info(path)
        except (ValueError, OSError) as err:
            raise click.ClickException(str(err)) from None
        if path.name in names:
            raise click.ClickException(f"two bundles are called {path.name!r}; give them distinct folder names")
        names[path.name] = path
    return names


@click.command()
@threads_option()
@click.option("--bundle", "bundles", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Model bundle folder to serve (repeat for several; default: the demo bundle). "
                   "Requests name a bundle by its folder name.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback needs --token-file; put TLS in front "
                   "(a reverse proxy, see README).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File holding the bearer token clients must send (Authorization: Bearer ...).")
@click.option("--devices", default="auto", show_default=True,
              help="Comma-separated devices, one engine and one job queue each: cuda:0,cuda:1 / cpu / auto.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder whose files requests may name instead of uploading them (nothing outside it).")
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where uploads and job folders live (default: a new temporary folder).")
@click.option("--max-upload-mb", default=1024.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest accepted upload.")
@click.option("--max-jobs-per-client", default=4, show_default=True, type=click.IntRange(min=1),
              help="Queued or running jobs one client may have.")
@click.option("--max-queued", default=64, show_default=True, type=click.IntRange(min=1),
              help="Queued or running jobs in all.")
@click.option("--keep-results", "keep_s", default=3600.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds a job's results stay downloadable after it ends.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser pages from this origin (repeat); no CORS by default.")
def serve(bundles, host, port, token_file, devices, data_root, work_dir, max_upload_mb, max_jobs_per_client,
          max_queued, keep_s, cors_origins):
    """Serve generation jobs over HTTP (docs/worker-protocol.md, "HTTP")."""
    try:
        token = read_token(token_file) if token_file else None
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if token is None and not is_loopback(host):
        raise click.ClickException(f"refusing to serve on {host} without a token: anyone who can reach it "
                                   "could run jobs; pass --token-file (and put TLS in front)")
    device_list = [d.strip() for d in devices.split(",") if d.strip()]
    if not device_list or len(set(device_list)) != len(device_list):
        raise click.ClickException(f"--devices must list distinct devices, got {devices!r}")
    if not bundles:
        from gem3d.bundle_format import DEMO_BUNDLE

        bundles = (str(DEMO_BUNDLE),)
    names = bundle_names(bundles)
    from gem3d.server import Settings

    logging.basicConfig(level=logging.INFO, format="gem3d-serve %(levelname)s %(message)s")
    from gem3d.server import run, temporary_work_folder

    with contextlib.nullcontext(work_dir) if work_dir else temporary_work_folder() as work:
        settings = Settings(bundles=names, devices=device_list, work_dir=Path(work), token=token,
                            data_root=Path(data_root).resolve() if data_root else None,
                            max_upload_bytes=int(max_upload_mb * 2**20), max_jobs_per_client=max_jobs_per_client,
                            max_queued=max_queued, keep_s=keep_s, cors_origins=list(cors_origins))
        try:
            run(settings, host, port)
        except (ValueError, OSError, RuntimeError) as err:
            raise click.ClickException(str(err))
