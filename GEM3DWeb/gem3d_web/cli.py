"""`gem3d-web`: the browser editor on one port, one scene per server process.

Secure defaults like `gem3d serve`: 127.0.0.1 unless told otherwise, any other host only with
--token-file; the token guards the page and the websocket. The session's files (uploads, job
inputs and outputs, exports) live in a temporary folder removed when the server stops.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from typing import List, Optional

from . import access


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gem3d-web", description="GEM-3D editor in a browser (trame-slicer).")
    p.add_argument("--bundle", required=True, help="model bundle folder (bundle.json + safetensors)")
    p.add_argument("--engine", default="",
                   help="URL of a `gem3d serve` (one engine per GPU, shared by every session); default: a "
                        "local `gem3d worker` per session. --bundle is then a local copy of a bundle it serves")
    p.add_argument("--engine-token-file", help="file holding that server's token")
    p.add_argument("--data-root", help="folder whose scans and .seg.nrrd the page may open (nothing outside it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    p.add_argument("--token-file", help="file holding the access token (required for a non-loopback --host)")
    p.add_argument("--max-upload-mb", type=float, default=200.0, help="largest upload accepted (MB)")
    p.add_argument("--sessions", type=int, default=4,
                   help="browser sessions at once, each with its own scene in its own process "
                        "(wslink's launcher); 0: one scene in this process, shared by every browser")
    p.add_argument("--session-port", type=int, default=0,
                   help="first port of the session processes (default: --port + 1)")
    p.add_argument("--idle-timeout", type=int, default=0,
                   help="stop a session this many seconds after its last browser left (0: never; "
                        "session processes default to 60)")
    p.add_argument("--session-key", help=argparse.SUPPRESS)  # set by the launcher: this process is one session
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    log = logging.getLogger("gem3d_web")  # its own handler: trame's loggers stay quiet
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s gem3d-web %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        token = access.read_token(args.token_file, args.host)
        args.engine_token = (access.read_token(args.engine_token_file, "127.0.0.1", "--engine-token-file")
                             if args.engine_token_file else "")
        from gem3d.bundle_format import read_bundle_info

        read_bundle_info(args.bundle)
        if args.max_upload_mb <= 0:
            raise ValueError("--max-upload-mb must be positive.")
        if args.sessions < 0 or args.sessions and args.port == 0 and not args.session_port:
            raise ValueError("--sessions needs a fixed --port (or --session-port) for its session processes.")
    except ValueError as e:
        print(f"gem3d-web: {e}", file=sys.stderr)
        return 2
    if args.data_root and not os.path.isdir(args.data_root):
        print(f"gem3d-web: --data-root {args.data_root} is not a folder.", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="gem3d-web-")
    try:
        if args.sessions and not args.session_key:
            from .launcher import serve_sessions

            return serve_sessions(args, token, work)
        return serve(args, token, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def serve(args, token: Optional[str], work: str) -> int:
    from trame.app import get_server

    from .app import EditorApp

    # trame parses the command line too: it gets only the secret wslink's launcher gave this session
    sys.argv = sys.argv[:1] + (["--authKey", args.session_key] if args.session_key else [])
    server = get_server("gem3d_web", client_type="vue3")
    server.options["ws_max_msg_size"] = int(args.max_upload_mb * 1024 * 1024) + 1024 * 1024
    app = EditorApp(args.bundle, work, data_root=args.data_root, max_upload_mb=args.max_upload_mb,
                    remote=(args.engine, args.engine_token), server=server)
    if token:
        server.controller.on_server_bind.add(lambda ws: ws.app.middlewares.append(access.middleware(token)))

    def ready(**_):
        query = f"?token={token}" if token else ""
        print(f"gem3d-web: open http://{args.host}:{server.port}/{query}", flush=True)

    server.controller.on_server_ready.add(ready)
    try:
        app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False,
                         timeout=args.idle_timeout)
    finally:
        app.session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
