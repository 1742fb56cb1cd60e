"""Who may use a GEM-3D server (`gem3d serve`, `gem3d-web`): the rules both share.

Loopback addresses need no token; any other address needs one, read from a file (never from
the command line, where other users of the machine could read it in the process list), and
compared in constant time. No web framework here: both servers import it.
"""
from __future__ import annotations

import hmac
import ipaddress
import os

MIN_TOKEN_LENGTH = 16
MAKE_ONE = "make one with: python -c \"import secrets; print(secrets.token_urlsafe(32))\""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: str, option: str = "--token-file") -> str:
    """The token in the file at ``path``: one word of at least `MIN_TOKEN_LENGTH` characters
    (surrounding white space, such as a final newline, is dropped). ValueError: one sentence."""
    if not os.path.isfile(path):
        raise ValueError(f"{option} {path} does not exist")
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ValueError(f"{option} {path}: the token must be one word of at least {MIN_TOKEN_LENGTH} "
                         f"characters; {MAKE_ONE}")
    return token


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison (a timing side channel does not reveal the token)."""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
