"""The web console: its status core, its ASGI app in-process, and the page in a real browser.

The browser tests drive Debian's Chromium headless through Playwright (never a
downloaded browser; `tools/setup` installs the package): one against a real
two-node mesh with two models, one against a fixed status served by Playwright's
routing (a split and hostile peer strings, no mesh at all). With
`MESHLLM_CONSOLE_SCREENSHOT=PATH` the first leaves a screenshot there (the
README's is `bench/results/console.png`); a plain test run writes nothing into the
repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import pytest

from meshllm import __version__
from meshllm.http import console as console_app
from meshllm.http.console import ConsoleApp
from meshllm.mesh.status import MeshStatus, NodeCard, SplitCard, build_mesh_status, own_card
from meshllm.mesh.wire import PeerAnnouncement
from meshllm.placement.split import SplitRole
from meshllm.runtime.messages import (
    LocalServerState,
    MeshView,
    ModelRoute,
    RouteTable,
    RouteTarget,
    ServerStateName,
)
from meshllm.runtime.procutil import free_port
from meshllm.testing import NodeProcess, chat, http, wait_for, websocket_attempt

T = TypeVar("T")
GiB = 1024**3
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
SCREENSHOT = os.environ.get("MESHLLM_CONSOLE_SCREENSHOT", "")


def run(coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- the status core (sans-I/O) ---------------------------------------------------


def peer(
    node_id: str, model: str | None, state: str, vram: int, role: str = "host", **split: Any
) -> PeerAnnouncement:
    return PeerAnnouncement(
        node_id=node_id,
        generation=1,
        role=role,  # type: ignore[arg-type]
        serving=model,
        server_state=state,
        vram_bytes=vram,
        http_port=9000,
        **split,
    )


def mesh_status() -> MeshStatus:
    local = LocalServerState(model="alpha", state="ready", port=5000)
    me = own_card("aaaa", client=False, local=local, vram_bytes=8 * GiB, http_port=9337)
    mesh = MeshView(
        "aaaa",
        (
            peer("dddd", None, "stopped", 0, role="client"),
            peer("bbbb", "beta", "ready", 24 * GiB),
            peer("cccc", "beta", "loading", 16 * GiB),
        ),
    )
    routes = RouteTable(
        (
            ModelRoute("alpha", (RouteTarget("aaaa", True, 5000),), ("aaaa",)),
            ModelRoute("beta", (RouteTarget("bbbb", False, 9000),), ("bbbb",)),
            ModelRoute("gamma"),
        )
    )
    return build_mesh_status(me, mesh, routes, "http://127.0.0.1:9337/v1")


def test_status_lists_nodes_models_and_memory() -> None:
    status = mesh_status()
    assert [n.node_id for n in status.nodes] == ["aaaa", "bbbb", "cccc", "dddd"]
    me = status.nodes[0]
    assert (me.this_node, me.role, me.state, me.model) == (True, "host", "ready", "alpha")
    assert [(n.role, n.state, n.model) for n in status.nodes[1:]] == [
        ("host", "ready", "beta"),
        ("host", "loading", "beta"),
        ("client", "stopped", None),
    ]
    assert [(m.name, m.status, m.node_count, m.loading) for m in status.models] == [
        ("alpha", "warm", 1, ()),
        ("beta", "warm", 1, ("cccc",)),
        ("gamma", "cold", 0, ()),
    ]
    assert status.memory.total_bytes == 48 * GiB
    assert (status.memory.nodes, status.memory.nodes_without) == (3, 1)


def test_own_card_roles() -> None:
    idle = own_card("n", client=False, local=LocalServerState(), vram_bytes=0, http_port=1)
    client = own_card("n", client=True, local=LocalServerState(), vram_bytes=0, http_port=1)
    failed = own_card(
        "n",
        client=False,
        local=LocalServerState(model="m", state="failed", reason="out of memory"),
        vram_bytes=0,
        http_port=1,
    )
    assert (idle.role, idle.model) == ("idle", None)
    assert client.role == "client"
    assert idle.version == client.version == __version__  # as peers see it in its announcement
    assert (failed.role, failed.state, failed.reason) == ("host", "failed", "out of memory")


HOSTILE_MODEL = '<img src=x onerror="window.owned=1">'
HOSTILE_REASON = "<script>window.owned=2</script> out of memory"
HOSTILE_NOTE = '<b onmouseover="window.owned=3">a1b2</b>: needs 540.00 KB'


def split_status(
    model: str = "alpha", reason: str = "out of memory", note: str = "fits nowhere"
) -> MeshStatus:
    """A model split over three nodes (aaaa hosts, bbbb and cccc work), a standby, a
    failed peer and a cold model with a note; the strings can be hostile."""
    a, b, c, d, e = (ch * 16 for ch in "abcde")
    shares = (0.5, 0.3, 0.2)
    split = SplitRole("host", host=a, workers=(b, c), shares=shares)
    local = LocalServerState(model=model, state="ready", port=5000, split=split)
    me = own_card(a, client=False, local=local, vram_bytes=8 * GiB, http_port=9337)
    mesh = MeshView(
        a,
        (
            peer(b, model, "ready", 4 * GiB, role="worker", split_group=True, split_host=a),
            peer(c, model, "ready", 2 * GiB, role="worker", split_group=True, split_host=a),
            peer(d, model, "waiting", 1 * GiB, role="standby", split_group=True),
            peer(e, "beta", "failed", 1 * GiB, server_reason=reason),
        ),
    )
    target = RouteTarget(a, True, 5000, model, (b, c), shares)
    routes = RouteTable((ModelRoute(model, (target,), (a,)), ModelRoute("beta", note=note)))
    return build_mesh_status(me, mesh, routes, "http://127.0.0.1:9337/v1")


def test_status_shows_a_split_model_its_members_and_shares() -> None:
    a, b, c, d, e = (ch * 16 for ch in "abcde")
    status = split_status()
    alpha, beta = status.models
    assert (alpha.name, alpha.status, alpha.nodes) == ("alpha", "warm", (a,))
    assert alpha.splits == (SplitCard(host=a, members=(a, b, c), shares=(0.5, 0.3, 0.2)),)
    assert (beta.status, beta.splits, beta.note) == ("cold", (), "fits nowhere")
    cards = {n.node_id: n for n in status.nodes}
    assert (cards[a].role, cards[a].workers, cards[a].shares) == ("host", (b, c), (0.5, 0.3, 0.2))
    assert cards[a].split_host == ""
    for worker in (b, c):
        assert (cards[worker].role, cards[worker].split_host) == ("worker", a)
        assert (cards[worker].workers, cards[worker].shares) == ((), ())
    assert (cards[d].role, cards[d].state, cards[d].split_host) == ("standby", "waiting", "")
    assert (cards[e].state, cards[e].reason) == ("failed", "out of memory")  # a peer's reason


def test_status_a_solo_server_is_no_split() -> None:
    """Only targets with workers are splits; a model served solo elsewhere lists none."""
    status = mesh_status()
    assert all(m.splits == () for m in status.models)
    assert all((n.split_host, n.workers, n.shares) == ("", (), ()) for n in status.nodes)
    both = RouteTable(
        (
            ModelRoute(
                "alpha",
                (
                    RouteTarget("aaaa", True, 5000, "alpha"),
                    RouteTarget("bbbb", False, 9000, "alpha", ("cccc",), (0.6, 0.4)),
                ),
                ("aaaa", "bbbb"),
            ),
        )
    )
    card = build_mesh_status(status.nodes[0], MeshView("aaaa"), both, status.api).models[0]
    assert card.splits == (SplitCard(host="bbbb", members=("bbbb", "cccc"), shares=(0.6, 0.4)),)


def test_own_card_split_parts() -> None:
    def card(split: SplitRole, state: ServerStateName = "ready") -> NodeCard:
        local = LocalServerState(model="m", state=state, split=split)
        return own_card("n", client=False, local=local, vram_bytes=0, http_port=1)

    worker = card(SplitRole("worker", host="h"))
    standby = card(SplitRole("standby", host="h", note="not needed now"), "waiting")
    nofit = card(SplitRole("nofit", note="needs 540.00 KB"), "waiting")
    alone = card(SplitRole("host", host="n"))  # in a split group, serving alone
    assert (worker.role, worker.split_host, worker.workers) == ("worker", "h", ())
    assert (standby.role, standby.state, standby.split_host) == ("standby", "waiting", "")
    assert nofit.role == "standby"
    assert (alone.role, alone.workers, alone.shares) == ("host", (), ())


# -- the app, in-process ----------------------------------------------------------


class Exchange:
    """One request played into the ASGI app; what it sends is queued for the test."""

    def __init__(
        self,
        app: ConsoleApp,
        method: str,
        path: str,
        body: bytes = b"",
        host: bytes = b"127.0.0.1",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.gone = asyncio.Event()
        self.body_given = False
        path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", host), (b"content-type", b"application/json")] + (headers or []),
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 3131),
        }
        self.body = body
        self.task = asyncio.ensure_future(app(scope, self.receive, self.sent.put))

    async def receive(self) -> dict[str, Any]:
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def next(self, timeout: float = 2.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.sent.get(), timeout)

    async def start(self) -> tuple[int, dict[bytes, bytes]]:
        msg = await self.next()
        assert msg["type"] == "http.response.start", msg
        return msg["status"], dict(msg["headers"])

    async def rest(self, timeout: float = 5.0) -> bytes:
        parts = []
        while True:
            msg = await self.next(timeout)
            parts.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                return b"".join(parts)


def test_page_assets_and_status_json() -> None:
    async def main() -> None:
        app = ConsoleApp("127.0.0.1", 1)
        app.set_status(mesh_status())
        page = Exchange(app, "GET", "/")
        status, headers = await page.start()
        html = await page.rest()
        assert status == 200 and headers[b"content-type"].startswith(b"text/html")
        assert b'src="/app.js"' in html and b'href="/style.css"' in html
        for path, kind in (("/app.js", b"text/javascript"), ("/style.css", b"text/css")):
            asset = Exchange(app, "GET", path)
            status, headers = await asset.start()
            assert status == 200 and headers[b"content-type"].startswith(kind)
            assert len(await asset.rest()) > 1000
        api = Exchange(app, "GET", "/api/status")
        status, headers = await api.start()
        data = json.loads(await api.rest())
        assert status == 200 and headers[b"content-type"] == b"application/json"
        assert data["node_id"] == "aaaa"
        assert [m["status"] for m in data["models"]] == ["warm", "warm", "cold"]
        assert data["memory"] == {"total_bytes": 48 * GiB, "nodes": 3, "nodes_without": 1}

    run(main())


def test_other_host_names_are_refused() -> None:
    """Bound to loopback, the console answers loopback names only (no DNS rebinding)."""

    async def main() -> None:
        app = ConsoleApp("127.0.0.1", 1)
        refused = Exchange(app, "GET", "/api/status", host=b"attacker.example:3131")
        status, _ = await refused.start()
        await refused.rest()
        assert status == 400
        for host in (b"localhost:3131", b"127.0.0.1:3131", b"[::1]:3131"):
            allowed = Exchange(app, "GET", "/api/status", host=host)
            assert (await allowed.start())[0] == 200
            await allowed.rest()

    run(main())


CROSS_SITE = [
    [(b"origin", b"https://evil.example"), (b"sec-fetch-site", b"cross-site")],
    [(b"sec-fetch-site", b"cross-site")],
    [(b"origin", b"http://127.0.0.1:9337"), (b"sec-fetch-site", b"same-site")],
]


@pytest.mark.parametrize("browser", CROSS_SITE)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/api/status"),
        ("GET", "/api/events"),
        ("POST", "/v1/chat/completions"),
    ],
)
def test_cross_site_requests_are_403(
    browser: list[tuple[bytes, bytes]], method: str, path: str
) -> None:
    """Another site's page gets nothing: not the status, not the node's API."""

    async def main() -> None:
        app = ConsoleApp("127.0.0.1", 1, cors_origins=["https://app.example.com"])
        app.set_status(mesh_status())
        refused = Exchange(app, method, path, b'{"model":"m"}', b"127.0.0.1:3131", browser)
        status, headers = await refused.start()
        error = json.loads(await refused.rest())["error"]
        assert status == 403 and headers[b"content-type"] == b"application/json"
        assert error["code"] == "cross_site_refused" and "--cors-origin" in error["message"]
        assert b"access-control-allow-origin" not in headers

    run(main())


def test_a_websocket_scope_is_closed_and_never_reaches_the_page() -> None:
    # No kind of request skips the origin check by not being "http".
    async def main() -> None:
        headers = [(b"host", b"127.0.0.1:1"), (b"origin", b"https://evil.example")]
        attempt = websocket_attempt(ConsoleApp("127.0.0.1", 1), "/api/events", headers)
        sent, reached = await attempt
        assert sent == [{"type": "websocket.close", "code": 1008}]
        assert not reached

    run(main())


def test_the_pages_own_requests_are_same_origin() -> None:
    """What the page itself fetches (status, events, /v1) and the page load keep working."""

    async def main() -> None:
        app = ConsoleApp("127.0.0.1", 1)
        app.set_status(mesh_status())
        own = [(b"origin", b"http://localhost:3131"), (b"sec-fetch-site", b"same-origin")]
        for path, headers in [
            ("/", [(b"sec-fetch-site", b"none")]),
            ("/app.js", [(b"sec-fetch-site", b"same-origin")]),
            ("/api/status", own),
        ]:
            ex = Exchange(app, "GET", path, host=b"localhost:3131", headers=headers)
            status, got = await ex.start()
            await ex.rest()
            assert status == 200 and b"access-control-allow-origin" not in got
        stream = Exchange(app, "GET", "/api/events", host=b"localhost:3131", headers=own)
        assert (await stream.start())[0] == 200
        await stream.next()
        app.close()
        await asyncio.wait_for(stream.task, 1)
        # /v1 from the page reaches the pass-through (here: an API that is down).
        chat = Exchange(app, "POST", "/v1/chat/completions", b"{}", b"localhost:3131", own)
        status, _ = await chat.start()
        assert status == 502 and b"api_unreachable" in await chat.rest()
        app.close_upstream()

    run(main())


def test_allowed_origin_gets_cors_headers_streaming_and_preflight() -> None:
    async def main() -> None:
        origin = b"https://app.example.com"
        app = ConsoleApp("127.0.0.1", 1, cors_origins=["https://app.example.com"])
        app.set_status(mesh_status())
        browser = [(b"origin", origin), (b"sec-fetch-site", b"cross-site")]
        api = Exchange(app, "GET", "/api/status", host=b"127.0.0.1:3131", headers=browser)
        status, headers = await api.start()
        await api.rest()
        assert status == 200
        assert headers[b"access-control-allow-origin"] == origin
        assert headers[b"vary"] == b"Origin"
        stream = Exchange(app, "GET", "/api/events", host=b"127.0.0.1:3131", headers=browser)
        status, headers = await stream.start()
        assert status == 200 and headers[b"content-type"] == b"text/event-stream"
        assert headers[b"access-control-allow-origin"] == origin
        await stream.next()
        app.close()
        await asyncio.wait_for(stream.task, 1)
        ask = [*browser, (b"access-control-request-method", b"POST")]
        ask.append((b"access-control-request-headers", b"content-type"))
        pre = Exchange(app, "OPTIONS", "/v1/chat/completions", host=b"127.0.0.1:3131", headers=ask)
        status, headers = await pre.start()
        assert await pre.rest() == b""
        assert status == 204
        assert headers[b"access-control-allow-origin"] == origin
        assert headers[b"access-control-allow-headers"] == b"content-type"
        assert b"POST" in headers[b"access-control-allow-methods"]
        assert headers[b"vary"] == b"Origin"
        app.close_upstream()

    run(main())


def test_events_push_each_change_and_keep_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_app, "KEEPALIVE_S", 0.2)

    async def main() -> None:
        app = ConsoleApp("127.0.0.1", 1)
        first = mesh_status()
        app.set_status(first)
        stream = Exchange(app, "GET", "/api/events")
        status, headers = await stream.start()
        assert status == 200 and headers[b"content-type"] == b"text/event-stream"
        event = (await stream.next())["body"]
        assert event.startswith(b"retry: 1000\nevent: status\ndata: {")
        assert json.loads(event.split(b"data: ", 1)[1])["node_id"] == "aaaa"

        assert not app.set_status(first)  # the same status again: nothing to push
        assert (await stream.next(1.0))["body"] == b": keep-alive\n\n"

        changed = build_mesh_status(
            first.nodes[0], MeshView("aaaa"), RouteTable((ModelRoute("alpha"),)), first.api
        )
        assert app.set_status(changed)
        event = (await stream.next(1.0))["body"]  # pushed now, not with the next keep-alive
        data = json.loads(event.split(b"data: ", 1)[1])
        assert [(m["name"], m["status"]) for m in data["models"]] == [("alpha", "cold")]

        app.close()  # shutting down ends every stream
        assert (await stream.next())["body"] == b""
        await asyncio.wait_for(stream.task, 1)

        gone = Exchange(app := ConsoleApp("127.0.0.1", 1), "GET", "/api/events")
        await gone.start()
        await gone.next()
        gone.gone.set()  # the browser went away: the stream ends at once
        await asyncio.wait_for(gone.task, 1)

    run(main())


def test_v1_is_passed_through_streaming() -> None:
    """`/v1/*` reaches the node's API with its path, query and body; chunks come back as sent."""

    async def main() -> None:
        seen: list[bytes] = []
        release = asyncio.Event()

        async def api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            seen.append(head + await reader.readexactly(length))
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
            )
            writer.write(b"9\r\ndata: one\r\n")
            await writer.drain()
            await release.wait()
            writer.write(b"9\r\ndata: two\r\n0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(api, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        app = ConsoleApp("127.0.0.1", port)
        try:
            call = Exchange(app, "POST", "/v1/chat/completions?x=1", b'{"model":"m"}')
            status, headers = await call.start()
            assert status == 200 and headers[b"content-type"] == b"text/event-stream"
            assert (await call.next())["body"] == b"data: one"  # before the rest exists
            release.set()
            assert await call.rest() == b"data: two"
            assert seen[0].startswith(b"POST /v1/chat/completions?x=1 HTTP/1.1\r\n")
            assert seen[0].endswith(b'\r\n\r\n{"model":"m"}')

            app.upstream.close()
            server.close()
            await server.wait_closed()
            down = Exchange(app, "GET", "/v1/models")
            status, _ = await down.start()
            assert status == 502
            assert b"api_unreachable" in await down.rest()
        finally:
            app.close_upstream()
            server.close()

    run(main())


def test_api_metrics_is_the_nodes_metrics() -> None:
    """`/api/metrics` (the page's live charts) is the node's `GET /metrics`, and only that."""

    async def main() -> None:
        seen: list[bytes] = []

        async def api(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await reader.readuntil(b"\r\n\r\n"))
            body = b'meshllm_requests_total{model="m"} 1.0\n'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(api, "127.0.0.1", 0)
        app = ConsoleApp("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            call = Exchange(app, "GET", "/api/metrics?model=x")
            status, _ = await call.start()
            assert status == 200
            assert await call.rest() == b'meshllm_requests_total{model="m"} 1.0\n'
            assert seen[0].startswith(b"GET /metrics HTTP/1.1\r\n")  # no query passed on
        finally:
            app.close_upstream()
            server.close()

    run(main())


# -- the page, in Chromium, against a real two-node mesh -----------------------------


def format_bytes(n: int) -> str:
    """What the page shows for `n` bytes (`formatBytes` in app.js)."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    value, unit = float(n), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    digits = 0 if value >= 100 or unit == 0 else 1
    return f"{value:.{digits}f} {units[unit]}"


def invite_token(node: NodeProcess) -> str:
    def find() -> str | None:
        lines = node.log().splitlines()
        for line, after in itertools.pairwise(lines):
            if line.startswith("invite token"):
                return after.strip()
        return None

    token: str = wait_for(find, 10, "the invite token in the first node's log")
    return token


def warm_models(port: int) -> dict[str, list[str]]:
    _, _, body = http(port, "GET", "/v1/models", timeout=2)
    return {
        m["id"]: m["meshllm"]["nodes"]
        for m in json.loads(body)["data"]
        if m["meshllm"]["status"] == "warm"
    }


def console_status(port: int) -> dict[str, Any]:
    _, _, body = http(port, "GET", "/api/status", timeout=2)
    data: dict[str, Any] = json.loads(body)
    return data


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the console tests need Debian's chromium at {CHROMIUM}: run tools/setup")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the console tests need playwright: run tools/setup")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True, timeout=30_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.integration
def test_console_in_a_browser(
    start_node: Callable[..., NodeProcess], demo_model: Path, second_model: Path, browser: Any
) -> None:
    from playwright.sync_api import expect

    first_name, second_name = demo_model.stem, second_model.stem
    console = free_port()
    a = start_node(
        "--model", str(demo_model), "--model", str(second_model),
        "--bind", "127.0.0.1:0", "--console", str(console), name="a",
    )  # fmt: skip
    b = start_node(
        "--model", str(second_model), "--join", invite_token(a),
        "--bind", "127.0.0.1:0", name="b",
    )  # fmt: skip
    wait_for(
        lambda: set(warm_models(a.port)) == {first_name, second_name},
        60,
        "both models warm on the first node",
    )
    wait_for(
        lambda: len(console_status(console)["nodes"]) == 2, 10, "the console to list both nodes"
    )
    status = console_status(console)
    a_id, b_id = (n["node_id"] for n in status["nodes"])

    page = browser.new_page(viewport={"width": 1360, "height": 860})
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"http://127.0.0.1:{console}/")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")

        # Models list: both warm (green), one node each.
        rows = page.locator("#models .model-row")
        expect(rows).to_have_count(2)
        for name in (first_name, second_name):
            row = page.locator(f'#models .model-row[data-model="{name}"]')
            expect(row).to_have_attribute("data-status", "warm")
            expect(row).to_have_attribute("data-node-count", "1")
            expect(row.locator(".count")).to_have_text("1 node")
            dot = row.locator(".dot").evaluate("e => getComputedStyle(e).backgroundColor")
            assert dot in ("rgb(29, 127, 72)", "rgb(79, 197, 138)"), dot  # --warm

        # Node boxes: id, role, state and model of each.
        nodes = page.locator("#nodes .node")
        expect(nodes).to_have_count(2)
        box_a = page.locator(f'.node[data-node-id="{a_id}"]')
        box_b = page.locator(f'.node[data-node-id="{b_id}"]')
        expect(box_a.locator(".id")).to_have_text(a_id[:8])
        expect(box_a.locator(".you")).to_have_text("this node")
        for box, model in ((box_a, first_name), (box_b, second_name)):
            expect(box.locator(".model")).to_have_text(model)
            expect(box.locator(".badge.role")).to_have_text("host")
            expect(box.locator(".badge.state")).to_have_text("ready")

        # Total mesh VRAM: the sum of what the nodes announce, as the JSON says.
        status = console_status(console)
        total = sum(n["vram_bytes"] for n in status["nodes"])
        assert status["memory"]["total_bytes"] == total > 0
        expect(page.locator("#vram-total")).to_have_attribute("data-bytes", str(total))
        expect(page.locator("#vram-total")).to_have_text(format_bytes(total))
        expect(page.locator("#node-total")).to_have_text("2")
        expect(page.locator("#model-total")).to_have_text("2 / 2")

        # The picker lists both models; switching highlights the box serving it.
        picker = page.locator("#model-picker")
        options = picker.locator("option").evaluate_all("os => os.map(o => o.value)")
        assert sorted(options) == sorted([first_name, second_name])
        picker.select_option(second_name)
        expect(box_b).to_have_attribute("data-highlight", "true")
        expect(box_a).to_have_attribute("data-highlight", "false")
        expect(page.locator(f'.model-row[data-model="{second_name}"]')).to_have_attribute(
            "aria-current", "true"
        )
        picker.select_option(first_name)
        expect(box_a).to_have_attribute("data-highlight", "true")
        expect(box_b).to_have_attribute("data-highlight", "false")

        # Chat streams a reply token by token, the same one the API gives.
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "24")
        for model in (first_name, second_name):
            picker.select_option(model)
            page.fill("#prompt", f"hello {model}")
            page.press("#prompt", "Enter")
            reply = page.locator(".msg.assistant").last
            expect(reply).to_have_attribute("data-state", "done", timeout=30_000)
            expected = chat(a.port, model, f"hello {model}", max_tokens=24)
            text = expected["choices"][0]["message"]["content"]
            assert reply.locator(".bubble").text_content() == text
            assert int(reply.get_attribute("data-chunks")) >= 2, "the reply came in one piece"
            page.click("#clear")

        picker.select_option(second_name)
        page.fill("#prompt", "How is the mesh?")
        page.press("#prompt", "Enter")
        expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", "done")
        # Traffic: a row with its two live charts for each model the chats went to
        # (the page reads the node's /metrics every 2 s).
        for model in (first_name, second_name):
            row = page.locator(f'#traffic .traffic-row[data-model="{model}"]')
            expect(row.locator("svg.spark")).to_have_count(2)
        if SCREENSHOT:
            page.screenshot(path=SCREENSHOT)

        # A node dies: its box goes, its model turns cold, without a reload.
        os.killpg(b.proc.pid, signal.SIGKILL)
        wait_for(
            lambda: len(console_status(console)["nodes"]) == 1,
            20,
            "the first node to notice the second one died",
        )
        expect(nodes).to_have_count(1, timeout=2_000)
        expect(page.locator(f'.model-row[data-model="{second_name}"]')).to_have_attribute(
            "data-status", "cold", timeout=2_000
        )
        cold = page.locator(f'.model-row[data-model="{second_name}"]')
        expect(cold.locator(".count")).to_have_text("0 nodes")
        expect(page.locator("#node-total")).to_have_text("1")
        expect(page.locator("#model-total")).to_have_text("1 / 2")
        assert not errors, errors
    finally:
        with contextlib.suppress(Exception):
            page.close()


def test_console_shows_a_split_and_treats_peer_strings_as_text(browser: Any) -> None:
    """The page against a fixed status (no mesh): a split model with its members and
    shares, a worker, a standby, a split host, a failed peer's reason and a cold model's
    note; hostile model names, reasons and notes are shown as text and never run."""
    from playwright.sync_api import Route, expect

    a, b, c, d, e = (ch * 16 for ch in "abcde")
    status = split_status(HOSTILE_MODEL, HOSTILE_REASON, HOSTILE_NOTE)
    event = b"retry: 60000\nevent: status\ndata: " + msgspec.json.encode(status) + b"\n\n"
    assets = console_app.load_assets()

    def serve(route: Route) -> None:
        path = urlsplit(route.request.url).path
        if path == "/api/events":
            route.fulfill(status=200, content_type="text/event-stream", body=event)
        elif path in assets:
            body, kind = assets[path]
            route.fulfill(status=200, headers={"content-type": kind.decode()}, body=body)
        else:
            route.fulfill(status=404, body=b"")

    page = browser.new_page(viewport={"width": 1360, "height": 860})
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.route("**/*", serve)
        page.goto("http://127.0.0.1:9/")
        expect(page.locator("#nodes .node")).to_have_count(5)

        # Models list: the split model with its host then workers, each with a share.
        row = page.locator("#models .model-row").first
        expect(row).to_have_attribute("data-status", "warm")
        expect(row.locator(".name")).to_have_text(HOSTILE_MODEL)
        split = row.locator(".split")
        expect(split).to_have_attribute("data-host", a)
        expect(split).to_have_text("split aaaaaaaa 50% · bbbbbbbb 30% · cccccccc 20%")
        expect(split.locator(".member")).to_have_count(3)
        parts = split.locator(".member").evaluate_all(
            "ms => ms.map(m => [m.dataset.nodeId, m.dataset.part, m.dataset.share])"
        )
        assert parts == [[a, "host", "0.5"], [b, "worker", "0.3"], [c, "worker", "0.2"]]
        cold = page.locator('#models .model-row[data-model="beta"]')
        expect(cold).to_have_attribute("data-status", "cold")
        expect(cold.locator(".note")).to_have_text(HOSTILE_NOTE)
        expect(cold.locator(".split")).to_have_count(0)

        # Node boxes: the host's workers, each worker's host and share, the standby.
        def box(node_id: str) -> Any:
            return page.locator(f'.node[data-node-id="{node_id}"]')

        expect(box(a).locator(".badge.role")).to_have_text("host")
        expect(box(a).locator(".split")).to_have_text(
            "holds 50% · workers bbbbbbbb 30% · cccccccc 20%"
        )
        for worker, share in ((b, "30%"), (c, "20%")):
            expect(box(worker).locator(".badge.role")).to_have_text("worker")
            expect(box(worker).locator(".split")).to_have_text(f"worker for aaaaaaaa · {share}")
            expect(box(worker).locator(".split")).to_have_attribute("data-host", a)
            expect(box(worker)).to_have_attribute("data-highlight", "true")  # serves the pick
        expect(box(d).locator(".badge.role")).to_have_text("standby")
        expect(box(d).locator(".badge.state")).to_have_text("waiting")
        expect(box(d).locator(".split")).to_contain_text("standby")
        expect(box(d)).to_have_attribute("data-highlight", "false")  # serves none of it
        expect(box(e).locator(".badge.state")).to_have_text("failed")
        expect(box(e).locator(".reason")).to_have_text(HOSTILE_REASON)  # a peer's reason
        expect(box(e).locator(".split")).to_have_count(0)

        # Hostile strings stayed text: no element they name exists, no script of theirs ran.
        assert page.locator("#models img, #nodes img, #models b, #nodes script").count() == 0
        assert page.evaluate("window.owned") is None
        assert not errors, errors
    finally:
        with contextlib.suppress(Exception):
            page.close()
