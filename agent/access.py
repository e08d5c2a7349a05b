"""Who may use the server's admin endpoints (drain, placing calls) and read its call records.

One secret, the admin token, from the environment (never the agent file, which is often committed):

    CHROMA_AGENTS_ADMIN_TOKEN=... chroma-agent serve agent.yaml

A request carries it as `Authorization: Bearer TOKEN` (or `?token=TOKEN`, for an audio player or a
link, which cannot set headers). Admin endpoints always need it; with no token set they answer 403
and say how to set one. Read-only views (call records) are open while the server listens on
loopback only, and need the token as soon as it listens beyond it.

    @app.post("/admin/drain", dependencies=[Depends(require_admin)])
    @app.get("/api/records", dependencies=[Depends(require_viewer)])
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from fastapi import HTTPException, Request

ADMIN_TOKEN_ENV = "CHROMA_AGENTS_ADMIN_TOKEN"


def admin_token() -> str | None:
    """The configured token, or None when unset or blank."""
    token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    return token or None


def is_loopback(host: str) -> bool:
    """Whether an address to listen on reaches this machine only ('localhost', 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard other than loopback: treat as reachable from outside


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query_params.get("token") or None


def _check(request: Request) -> None:
    token = admin_token()
    if token is None:
        raise HTTPException(403, f"no admin token is set on this server; set {ADMIN_TOKEN_ENV} and restart it")
    presented = _presented(request)
    if presented is None:
        raise HTTPException(
            401, "missing admin token: send 'Authorization: Bearer TOKEN' (or ?token=TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise HTTPException(401, "wrong admin token", headers={"WWW-Authenticate": "Bearer"})


async def require_admin(request: Request) -> None:
    """FastAPI dependency for endpoints that change what the server does."""
    _check(request)


async def require_viewer(request: Request) -> None:
    """FastAPI dependency for read-only views of call data: open on loopback, else the admin token.

    The address the server listens on is `app.state.listen_host` (set by `serve`; tests' apps
    listen nowhere and default to loopback)."""
    host = getattr(request.app.state, "listen_host", "127.0.0.1")
    if not is_loopback(host):
        _check(request)
