"""Who may open the page: 127.0.0.1 by default; any other host only with a token, which every
HTTP request and the websocket must carry (as ?token= once, then as a same-site cookie).

The same rules as `gem3d serve`; the check is an aiohttp middleware on trame's (wslink's) server.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from gem3d.access import is_loopback, read_token as read_token_file, token_matches  # gem3d serve's rules
from gem3d.io import OutsideRootError, confined_input

COOKIE = "gem3d_web_token"
REFUSED = "This GEM-3D editor needs its access token: open the address gem3d-web printed (it ends in ?token=...)."


class AccessError(ValueError):
    """A start-up refusal, one sentence for the user."""


def read_token(path: Optional[str], host: str, option: str = "--token-file") -> Optional[str]:
    """The token from --token-file (`gem3d.access.read_token`); refused start-up for another host
    without one."""
    if not path:
        if not is_loopback(host):
            raise AccessError(f"--host {host} opens the editor to other machines: give --token-file with a token "
                              "of at least 16 characters.")
        return None
    try:
        return read_token_file(path, option)
    except ValueError as err:
        raise AccessError(f"{err}.") from None


def middleware(token: str):
    """An aiohttp middleware refusing every request (page, assets, websocket) without the token."""
    from aiohttp import web

    @web.middleware
    async def check(request, handler):
        if token_matches(request.query.get("token", ""), token):
            response = await handler(request)
            if not isinstance(response, web.WebSocketResponse):
                response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.secure)
            return response
        if token_matches(request.cookies.get(COOKIE, ""), token):
            return await handler(request)
        return web.Response(status=403, text=REFUSED)

    return check


def confined(root: Optional[Path], relative: str) -> str:
    """A file inside --data-root (links resolved, detached data files inside too), or a refusal naming no path."""
    if root is None:
        raise ValueError("This editor was started without --data-root: there is no data folder to open.")
    try:
        return str(confined_input(relative, root))
    except OutsideRootError:
        raise ValueError("That file is not in the data folder.") from None
