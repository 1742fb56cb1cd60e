"""One scene per browser session, each in its own process, started by wslink's launcher.

The page (trame's static client) is served here; the client POSTs to `paraview/`, wslink's
LauncherResource starts `python -m gem3d_web --session-key <secret> --port <port> ...`, waits for
its ready line and hands the client that process's websocket address and secret. A session
process stops when its last browser has been gone for --idle-timeout seconds, and removes its
files; wslink frees its port for the next session.

The access token (access.middleware) guards this server as it guards a single-process one; each
session's websocket also needs the secret wslink generated for it.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

from . import access

SESSION_APP = "trame"  # the application name trame's client asks the launcher for
READY_LINE = "gem3d-web: open"


def static_content():
    """(trame's client folder, {URL prefix: folder}) of the modules the page uses."""
    from trame.app import get_server
    from trame.modules import rca, vuetify3
    from trame_client import module as client

    server = get_server("gem3d_web_static", client_type="vue3")
    for module in (client, vuetify3, rca):
        server.enable_module(module)
    return server._www, dict(server.serve)


def session_command(args, token_file: Optional[str]) -> List[str]:
    command = [sys.executable, "-m", "gem3d_web", "--bundle", os.path.abspath(args.bundle), "--host", args.host,
               "--port", "${port}", "--session-key", "${secret}", "--max-upload-mb", str(args.max_upload_mb),
               "--idle-timeout", str(args.idle_timeout or 60)]
    if args.data_root:
        command += ["--data-root", os.path.abspath(args.data_root)]
    if token_file:
        command += ["--token-file", os.path.abspath(token_file)]
    if args.engine:
        command += ["--engine", args.engine]
    if args.engine_token_file:
        command += ["--engine-token-file", os.path.abspath(args.engine_token_file)]
    return command


def launcher_config(args, work: str) -> dict:
    first = args.session_port or args.port + 1
    return {
        "configuration": {
            "host": args.host, "port": args.port, "endpoint": "paraview", "content": "",
            "proxy_file": os.path.join(work, "proxy-mapping.txt"), "log_dir": work, "timeout": 60, "fields": [],
            "sessionURL": "ws://USE_HOSTNAME:${port}/ws",
            "sanitize": {"secret": {"type": "regexp", "regexp": "^[A-Za-z0-9]{1,64}$", "default": "refused"}},
        },
        "resources": [{"host": args.host, "port_range": [first, first + args.sessions - 1]}],
        "properties": {},
        "apps": {SESSION_APP: {"cmd": session_command(args, args.token_file), "ready_line": READY_LINE}},
    }


def serve_sessions(args, token: Optional[str], work: str) -> int:
    from aiohttp import web
    from wslink.backends.aiohttp.launcher import LauncherResource

    config = launcher_config(args, work)
    with open(os.path.join(work, "launcher.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    resource = LauncherResource(args, config)
    www, serve = static_content()
    app = web.Application(middlewares=[access.middleware(token)] if token else [])

    async def root(request):
        raise web.HTTPFound(f"index.html?{request.query_string}")

    app.router.add_post("/paraview/", resource.handle_post)
    app.router.add_get("/", root)
    for prefix, folder in serve.items():
        app.router.add_static(f"/{prefix}", folder)
    app.router.add_static("/", www)

    async def ready(_app):
        query = f"?token={token}" if token else ""
        print(f"{READY_LINE} http://{args.host}:{args.port}/{query} (one process per browser session, "
              f"at most {args.sessions})", flush=True)

    async def stop_sessions(_app):
        for session_id in list(resource.process_manager.processes):
            resource.process_manager.stopProcess(session_id)

    app.on_startup.append(ready)
    app.on_shutdown.append(stop_sessions)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
