"""Who may use `lmlab playground`, and how many models it shows: loopback needs no login; any other address needs
HTTP basic auth with one USER:PASSWORD per tester (--auth), whose user name is stored with their ratings. Kept apart
from the app so the command checks its arguments without importing the model stack."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from lmlab.errors import LmlabError

MAX_COLUMNS = 3  # models side by side
REALM = "lmlab playground"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(values: Sequence[str]) -> dict[str, str]:
    """--auth USER:PASSWORD (repeatable) as {user: password}."""
    users: dict[str, str] = {}
    for value in values:
        user, sep, password = value.partition(":")
        if not sep or not user.strip() or not password:
            raise LmlabError(f"--auth: '{value}' is not USER:PASSWORD (a name, a colon, a password), e.g. "
                             "--auth alice:s3cret")
        if user in users:
            raise LmlabError(f"--auth: user '{user}' is given twice")
        users[user] = password
    return users


def check_access(host: str, auth: dict[str, str] | None) -> None:
    if not is_loopback(host) and not auth:
        raise LmlabError(f"--host {host}: other machines can reach the playground there; give each tester a login "
                         "with --auth USER:PASSWORD (repeatable), or leave --host at 127.0.0.1")


def basic_user(headers: dict[bytes, bytes]) -> tuple[str, str] | None:
    """(user, password) of an 'Authorization: Basic ...' header, None without a readable one."""
    kind, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if kind.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


class BasicAuth:
    """ASGI middleware: every request needs one of the users' name and password (HTTP basic auth), else 401 with the
    challenge that makes a browser ask for them."""

    def __init__(self, app: Any, *, users: dict[str, str]):
        self.app, self.users = app, users

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            given = basic_user(dict(scope["headers"]))
            known = self.users.get(given[0]) if given else None
            if known is None or not secrets.compare_digest(given[1].encode(), known.encode()):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode()),
                                        (b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body",
                            "body": b"401: log in with the user name and password you were given\n"})
                return
        await self.app(scope, receive, send)
