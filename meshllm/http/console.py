"""The web console (an ASGI app run by the Console actor).

Serves the page and its assets (shipped in `meshllm/console/`, no build step),
the mesh status as JSON (`/api/status`), the same status as a live stream of
server-sent events (`/api/events`), and a same-origin pass-through of the
node's own OpenAI API (`/v1/*`) and metrics (`/api/metrics`), so the page's
chat and its live charts need no CORS.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from importlib import resources

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Route

from meshllm.http.origin import Policy, from_browser
from meshllm.http.proxy import (
    Receive,
    Scope,
    Send,
    browser_request,
    forward_until_disconnect,
    read_body,
    refuse_scope,
    wait_disconnect,
)
from meshllm.http.upstream import Pool
from meshllm.mesh.status import MeshStatus
from meshllm.runtime.procutil import loopback_peer_uid

log = logging.getLogger("meshllm.console")

KEEPALIVE_S = 15.0
"""A comment line this often keeps idle event streams open through proxies."""
RECONNECT_MS = 1000
"""How soon a browser reconnects its event stream after losing it."""

ASSETS = {
    "/": ("index.html", b"text/html; charset=utf-8"),
    "/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "/style.css": ("style.css", b"text/css; charset=utf-8"),
}
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
FORWARDED_HEADERS = (b"content-type", b"accept", b"authorization")

_json = msgspec.json.Encoder()


def load_assets() -> dict[str, tuple[bytes, bytes]]:
    """The page's files, read once from the installed package: path -> (body, type)."""
    folder = resources.files("meshllm.http") / "static"
    return {
        path: (folder.joinpath(name).read_bytes(), kind) for path, (name, kind) in ASSETS.items()
    }


class _Raw:
    """Marks a handler as a plain ASGI app (Starlette would wrap a bare function)."""

    def __init__(self, handler: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class ConsoleApp:
    """Holds the latest `MeshStatus` and wakes every event stream when it changes."""

    def __init__(
        self,
        api_host: str,
        api_port: int,
        max_body_bytes: int = 16 * 1024 * 1024,
        loopback_only: bool = True,
        cors_origins: tuple[str, ...] | list[str] = (),
        api_key: str = "",
        peer_uid: Callable[[int, int], int | None] = loopback_peer_uid,
    ) -> None:
        self.assets = load_assets()
        self.api_key = api_key
        """The console's own key to the API (`meshllm up --api-key` with `--console`):
        sent for the page when it sends none itself (empty: the API needs no key), and
        only to a page of this node's own user (`key_headers`)."""
        self.peer_uid = peer_uid
        self.cors = Policy(cors_origins)
        self.upstream = Pool(api_host, api_port)
        self.max_body_bytes = max_body_bytes
        self.status_body = b"{}"
        self.version = 0
        self.closing = False
        self._changed = asyncio.Event()
        # Bound to loopback, only loopback names are accepted: a web page elsewhere
        # cannot reach the console by DNS rebinding.
        middleware = (
            [Middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)]
            if loopback_only
            else []
        )
        routes = [Route(path, _Raw(self.asset), methods=["GET", "HEAD"]) for path in self.assets]
        routes += [
            Route("/api/status", _Raw(self.status), methods=["GET"]),
            Route("/api/events", _Raw(self.events), methods=["GET"]),
            Route("/api/metrics", _Raw(self.metrics), methods=["GET"]),
            Route("/v1/{path:path}", _Raw(self.forward), methods=["GET", "POST"]),
        ]
        self.app = Starlette(routes=routes, middleware=middleware)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The page's own requests are same-origin; another site's page is refused
        # (403) unless --cors-origin allows it (meshllm.http.origin). Nothing here
        # speaks anything but HTTP: no other kind of request gets past the check.
        if scope["type"] != "http":
            await refuse_scope(scope, receive, send)
            return
        if from_browser(scope["headers"]):
            answer = await browser_request(scope, send, self.cors)
            if answer is None:
                return
            send = answer
        await self.app(scope, receive, send)  # type: ignore[arg-type]

    def set_status(self, status: MeshStatus) -> bool:
        """Take a new status; True (and every stream woken) if it differs from the last."""
        body = _json.encode(status)
        if body == self.status_body:
            return False
        self.status_body = body
        self.version += 1
        self._wake()
        return True

    def close(self) -> None:
        """End every event stream (the server is shutting down)."""
        self.closing = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- page and status -------------------------------------------------------

    async def asset(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, kind = self.assets[scope["path"]]
        headers = [(b"content-type", kind), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send(
            {"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body}
        )

    async def status(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.status_body})

    async def events(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Server-sent events: the status now, then each new one, and keep-alive comments."""
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        first = b"retry: %d\n" % RECONNECT_MS
        gone = asyncio.ensure_future(wait_disconnect(receive))
        sent = -1
        try:
            while not self.closing:
                changed = self._changed
                if sent != self.version:
                    sent = self.version
                    event = first + b"event: status\ndata: " + self.status_body + b"\n\n"
                    first = b""
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                    continue
                waiter = asyncio.ensure_future(changed.wait())
                done, _ = await asyncio.wait(
                    (waiter, gone), timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                if gone in done:
                    return
                if not done:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b": keep-alive\n\n",
                            "more_body": True,
                        }
                    )
        finally:
            gone.cancel()
        await send({"type": "http.response.body", "body": b""})

    # -- the node's OpenAI API, same origin ------------------------------------

    async def forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a `/v1/*` request to the node's Proxy and stream the answer back."""
        body = await read_body(scope, receive, send, self.max_body_bytes)
        if body is None:
            return
        path = scope["path"]
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        headers = [(k, v) for k, v in scope["headers"] if k in FORWARDED_HEADERS]
        if not any(k == b"authorization" for k, _ in headers):
            headers += self.key_headers(scope)
        # A browser that goes away (the page's Stop button, a closed tab) closes the
        # upstream connection, which makes the Proxy stop the generation too.
        await forward_until_disconnect(
            self.upstream,
            scope["method"],
            path,
            body,
            headers,
            receive,
            send,
            "the node's API",
            "api_unreachable",
        )

    def key_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        """The console's key, for a connection from this node's own user only: another
        user of the machine reaches the loopback console too, and must not get a keyed
        API through it (a connection whose owner /proc cannot tell gets no key)."""
        if not self.api_key:
            return []
        client, server = scope.get("client"), scope.get("server")
        if not client or not server or self.peer_uid(client[1], server[1]) != os.getuid():
            return []
        return [(b"authorization", f"Bearer {self.api_key}".encode())]

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The node's `GET /metrics`, same origin (the page's live charts read it)."""
        await forward_until_disconnect(
            self.upstream,
            "GET",
            "/metrics",
            b"",
            self.key_headers(scope),
            receive,
            send,
            "the node's API",
            "api_unreachable",
        )

    def close_upstream(self) -> None:
        self.upstream.close()
