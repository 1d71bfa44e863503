"""Bearer-token authentication: where the token comes from, and the check on each request."""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import Header, HTTPException

TOKEN_ENV = "CONTMERGE_TOKEN"


class AuthSetupError(ValueError):
    """The server was asked to start with a missing, empty or unsafe authentication setup."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_token(token_file: str | None, insecure_no_auth: bool, host: str) -> str | None:
    """The token to require, or None when authentication is off (loopback only)."""
    if insecure_no_auth:
        if token_file or os.environ.get(TOKEN_ENV):
            raise AuthSetupError("--insecure-no-auth cannot be combined with a token")
        if not is_loopback(host):
            raise AuthSetupError(
                f"--insecure-no-auth is only allowed on a loopback host, not {host!r}"
            )
        return None
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise AuthSetupError(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
        source = f"--token-file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        source = f"${TOKEN_ENV}"
        if not token:
            raise AuthSetupError(
                f"no token: give --token-file FILE or set {TOKEN_ENV} "
                "(or --insecure-no-auth on a loopback host)"
            )
    if not token:
        raise AuthSetupError(f"the token from {source} is empty")
    if len(token) < 16:
        raise AuthSetupError(f"the token from {source} is shorter than 16 characters")
    return token


def bearer_check(token: str | None) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency: 401 without a bearer token, 403 with a wrong one."""
    expected = token.encode() if token is not None else None

    async def check(authorization: str | None = Header(default=None)) -> None:
        if expected is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(
                401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        # constant-time comparison: the time taken says nothing about how much matched
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise HTTPException(403, "invalid token")

    return check
