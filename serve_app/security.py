"""What the ingress checks before a route runs: the API key, the origin of state-changing requests, the body size.

A pure ASGI middleware (`Guard`), so the body limit counts the bytes as they stream in (chunked uploads included)
and stops reading at the limit, before a multipart parser spools the rest to disk.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

OPEN_PATHS = frozenset({"/healthz", "/"})  # the demo page itself asks for the key
STATE_CHANGING = frozenset({("POST", "/items"), ("POST", "/stats/reset")})
FORM_ROUTES = frozenset({"/search", "/embed", "/items"})
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def key_digest(key: str | None) -> bytes | None:
    """SHA-256 of the key: what the ingress holds and compares (the key itself is never stored or logged)."""
    return hashlib.sha256(key.encode()).digest() if key else None


def resolve_api_key(configured: str | None) -> str | None:
    """`CMAN_API_KEY` if set (non-empty), else `serve.api_key`."""
    return os.environ.get("CMAN_API_KEY") or configured or None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GuardSettings:
    key_sha256: bytes | None = None
    bind_host: str = "127.0.0.1"
    max_body_bytes: int = 31 * 1024 * 1024

    def authorized(self, headers: dict[str, str]) -> bool:
        if self.key_sha256 is None:
            return True
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(presented.strip().encode()).digest()
        return hmac.compare_digest(digest, self.key_sha256) and scheme.lower() == "bearer"

    def state_change_refusal(self, headers: dict[str, str]) -> str | None:
        """Why a state-changing request is refused (403), or None."""
        if self.key_sha256 is None and not is_loopback(self.bind_host):
            return (
                f"this service listens on {self.bind_host} without an API key: adding items and resetting stats "
                "are refused; set CMAN_API_KEY (or serve.api_key) and send Authorization: Bearer <key>"
            )
        host = headers.get("host", "")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return f"cross-origin request from {origin!r} refused: state-changing routes accept same-origin requests"
        hostname = urlsplit(f"//{host}").hostname or ""
        if is_loopback(self.bind_host) and not is_loopback(hostname):
            return f"Host {host!r} is not a loopback name for a service bound to {self.bind_host}"
        return None


def route_path(scope: dict) -> str:
    """The path below the application's route prefix (Serve passes the prefix as `root_path`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


class BodyTooLarge(Exception):
    pass


async def send_error(send: Any, status: int, message: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: 401 without the key, 403 for refused state changes, 413 once the body passes the limit."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        settings = getattr(scope.get("app").state, "guard", None) if scope.get("app") is not None else None
        if scope["type"] != "http" or settings is None:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = route_path(scope), scope.get("method", "GET")
        if path not in OPEN_PATHS and not settings.authorized(headers):
            message = "missing or wrong API key: send Authorization: Bearer <key>"
            await send_error(send, 401, message, {"www-authenticate": "Bearer"})
            return
        if (method, path) in STATE_CHANGING:
            refusal = settings.state_change_refusal(headers)
            if refusal:
                await send_error(send, 403, refusal)
                return
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and path in FORM_ROUTES and ctype not in FORM_TYPES:
            message = f"content type {ctype or 'none'!r} is not supported: send multipart/form-data (curl -F k=v)"
            await send_error(send, 415, message)
            return
        await self._limited(scope, receive, send, settings.max_body_bytes, headers.get("content-length"))

    async def _limited(self, scope: dict, receive: Any, send: Any, limit: int, length: str | None) -> None:
        if length and length.isdigit() and int(length) > limit:
            await send_error(send, 413, f"request body of {int(length):,} bytes is over the {limit:,}-byte limit")
            return
        state = {"received": 0, "over": False, "started": False}

        async def counted_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: dict) -> None:
            if state["over"]:
                return  # the app's answer to a body cut short is replaced by the 413 below
            state["started"] = True
            if message["type"] == "http.response.start" and scope.get("state", {}).get("retried"):
                message = {**message, "headers": [*message.get("headers", []), (b"x-cman-retried", b"1")]}
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            pass
        if state["over"] and not state["started"]:
            message = f"request body is over the {limit:,}-byte limit (counted while streaming); send less"
            await send_error(send, 413, message)
