"""The OpenAI front (meshllm.http.proxy.ProxyApp), driven in-process.

Most tests call the ASGI app directly with a scripted `receive`, against the
tiny upstream server of `tests.test_upstream`; a few run it under uvicorn on
port 0 to check the same behaviour over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import uvicorn

from meshllm.http.proxy import RETRY_AFTER_S, ProxyApp, machine_names
from meshllm.runtime.messages import ModelRoute, RouteTable, RouteTarget
from meshllm.testing import websocket_attempt
from tests.test_upstream import (
    CHUNKED_HEAD,
    WAIT_S,
    FakeServer,
    Request,
    Responder,
    chunk,
    closed_port,
    ok,
    response,
    wait_eof,
)
from tests.test_upstream import run as run_with_deadline

CHAT = "/v1/chat/completions"
T = TypeVar("T")
_apps: list[ProxyApp] = []


def new_app(**kwargs: Any) -> ProxyApp:
    """A ProxyApp whose upstream connections `run` closes when the test ends."""
    app = ProxyApp(**kwargs)
    _apps.append(app)
    return app


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def body() -> T:
        try:
            return await coro
        finally:
            for app in _apps:
                app.pools.retain(set())
            _apps.clear()
            await asyncio.sleep(0.01)  # let the closed transports go

    return run_with_deadline(body())


def local_table(port: int, model: str = "demo", node: str = "n1") -> RouteTable:
    return RouteTable((ModelRoute(model, (RouteTarget(node, True, port),), (node,)),))


def app_for(port: int, **kwargs: Any) -> ProxyApp:
    app = new_app(**kwargs)
    app.set_table(local_table(port))
    return app


@dataclass
class Call:
    """One HTTP request played into the ASGI app; the response is recorded."""

    app: ProxyApp
    method: str
    path: str
    parts: list[bytes]
    headers: list[tuple[bytes, bytes]]
    disconnect: asyncio.Event = field(default_factory=asyncio.Event)
    sent: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    messages: list[dict[str, Any]] = field(default_factory=list)

    async def receive(self) -> dict[str, Any]:
        if self.parts:
            body = self.parts.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(self.parts)}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.sent.put_nowait(message)

    async def __call__(self) -> None:
        path, _, query = self.path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": self.headers,
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 9337),
        }
        await self.app(scope, self.receive, self.send)

    async def next_message(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.sent.get(), WAIT_S)

    @property
    def status(self) -> int:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return int(start["status"])

    @property
    def response_headers(self) -> dict[bytes, bytes]:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return dict(start["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"].endswith("body"))

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    app: ProxyApp,
    path: str = CHAT,
    body: bytes | list[bytes] | dict[str, Any] = b"",
    method: str = "POST",
    declare_length: bool = True,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> Call:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    parts = body if isinstance(body, list) else [body]
    hdrs = [(b"host", b"127.0.0.1:9337"), (b"content-type", b"application/json")]
    if declare_length:
        hdrs.append((b"content-length", str(sum(map(len, parts))).encode()))
    return Call(app, method, path, parts, [*hdrs, *(headers or [])])


async def complete(c: Call) -> Call:
    await asyncio.wait_for(c(), WAIT_S)
    return c


def assert_openai_error(c: Call, status: int, code: str) -> dict[str, Any]:
    assert c.status == status, c.body
    assert c.response_headers[b"content-type"] == b"application/json"
    error = c.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] is None
    return dict(error)


CHAT_BODY = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


# -- forwarding ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/embeddings"])
def test_forwards_request_and_response(path: str) -> None:
    answer = b'{"id": "x", "choices": []}'

    async def main() -> None:
        async with FakeServer(ok(answer, "X-Request-Id: 7", "Connection: keep-alive")) as srv:
            c = await complete(call(app_for(srv.port), path, CHAT_BODY))
            assert c.status == 200
            assert c.body == answer
            headers = c.response_headers
            assert headers[b"x-request-id"] == b"7"
            assert headers[b"content-length"] == str(len(answer)).encode()
            assert b"connection" not in headers
            (req,) = srv.requests
            assert (req.method, req.path) == ("POST", path)
            assert json.loads(req.body) == CHAT_BODY
            assert req.headers["content-type"] == "application/json"

    run(main())


def test_body_in_several_parts_is_forwarded_whole() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            raw = json.dumps(CHAT_BODY).encode()
            parts = [raw[:5], raw[5:20], raw[20:]]
            c = await complete(call(app_for(srv.port), CHAT, parts, declare_length=False))
            assert c.status == 200 and srv.requests[0].body == raw

    run(main())


def test_upstream_status_and_error_body_pass_through() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(b'{"error": {"message": "ctx"}}', status="400 Bad Request"))
        return True

    async def main() -> None:
        async with FakeServer(respond) as srv:
            c = await complete(call(app_for(srv.port), CHAT, CHAT_BODY))
            assert c.status == 400 and c.json() == {"error": {"message": "ctx"}}

    run(main())


def test_upstream_connection_is_reused_across_requests() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port)
            for _ in range(3):
                assert (await complete(call(app, CHAT, CHAT_BODY))).status == 200
            assert srv.connections == 1

    run(main())


def test_streaming_passes_through_chunk_by_chunk() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            w.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
            await w.drain()
            await asyncio.wait_for(release.wait(), WAIT_S)
            w.write(chunk(b"data: 2\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await w.drain()
            return True

        async with FakeServer(respond) as srv:
            c = call(app_for(srv.port), CHAT, {**CHAT_BODY, "stream": True})
            task = asyncio.ensure_future(c())
            start = await c.next_message()
            assert start["type"] == "http.response.start" and start["status"] == 200
            headers = dict(start["headers"])
            assert headers[b"content-type"] == b"text/event-stream"
            assert b"content-length" not in headers and b"transfer-encoding" not in headers
            first = await c.next_message()
            assert first == {
                "type": "http.response.body",
                "body": b"data: 1\n\n",
                "more_body": True,
            }
            assert not task.done()
            release.set()
            await asyncio.wait_for(task, WAIT_S)
            bodies = [m for m in c.messages if m["type"] == "http.response.body"]
            assert [m["body"] for m in bodies] == [
                b"data: 1\n\n",
                b"data: 2\n\n",
                b"data: [DONE]\n\n",
                b"",
            ]
            assert not bodies[-1].get("more_body", False)

    run(main())


def test_upstream_breaking_mid_stream_ends_with_an_error_event() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD + chunk(b"data: 1\n\n") + b"40\r\ncut short")
        await w.drain()
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            c = await complete(call(app_for(srv.port), CHAT, {**CHAT_BODY, "stream": True}))
            assert c.status == 200
            assert c.body.startswith(b"data: 1\n\ndata: {")
            event = c.body.split(b"\n\n")[1].removeprefix(b"data: ")
            assert json.loads(event)["error"]["code"] == "502"
            assert c.messages[-1] == {"type": "http.response.body", "body": b""}

    run(main())


def stream_then_watch_for_eof() -> tuple[Responder, asyncio.Event]:
    """An upstream that sends one SSE event, then sets the event when the proxy hangs up."""
    saw_eof = asyncio.Event()

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
        await w.drain()
        if await wait_eof(r):
            saw_eof.set()
        return False

    return respond, saw_eof


def test_client_disconnect_mid_stream_closes_the_upstream_connection() -> None:
    async def main() -> None:
        respond, saw_eof = stream_then_watch_for_eof()

        async with FakeServer(respond) as srv:
            app = app_for(srv.port)
            c = call(app, CHAT, {**CHAT_BODY, "stream": True})
            task = asyncio.ensure_future(c())
            assert (await c.next_message())["type"] == "http.response.start"
            assert (await c.next_message())["body"] == b"data: 1\n\n"
            c.disconnect.set()
            await asyncio.wait_for(task, WAIT_S)
            await asyncio.wait_for(saw_eof.wait(), WAIT_S)
            assert app.pools.get("127.0.0.1", srv.port).idle == []

    run(main())


# -- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"model": "demo"', b"\xff\xfe"])
def test_invalid_json_is_400(body: bytes) -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            c = await complete(call(app_for(srv.port), CHAT, body))
            assert_openai_error(c, 400, "invalid_json")
            assert srv.requests == []

    run(main())


@pytest.mark.parametrize(
    "body", [b"[1, 2]", b'"a string"', b"42", b"null", b'{"model": 5}', b'{"stream": "yes"}']
)
def test_json_that_is_not_a_request_object_is_400(body: bytes) -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            c = await complete(call(app_for(srv.port), CHAT, body))
            assert_openai_error(c, 400, "invalid_body")
            assert srv.requests == []

    run(main())


def test_json_nested_thousands_deep_is_400() -> None:
    depth = 100_000
    body = b'{"model": "demo", "x": ' + b"[" * depth + b"]" * depth + b"}"

    async def main() -> None:
        async with FakeServer(ok()) as srv:
            c = await complete(call(app_for(srv.port), CHAT, body))
            assert_openai_error(c, 400, "invalid_json")
            assert srv.requests == []

    run(main())


def test_invalid_content_length_is_400() -> None:
    async def main() -> None:
        app = app_for(closed_port())
        c = call(app, CHAT, b"{}", declare_length=False, headers=[(b"content-length", b"many")])
        assert_openai_error(await complete(c), 400, "400")

    run(main())


def test_declared_body_over_the_limit_is_413_without_reading_it() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, max_body_bytes=100)
            c = call(app, CHAT, b"x" * 101)
            await complete(c)
            error = assert_openai_error(c, 413, "body_too_large")
            assert "100 bytes" in error["message"]
            assert c.parts == [b"x" * 101], "the body was read although declared too large"
            assert srv.requests == []

    run(main())


def test_undeclared_body_over_the_limit_is_413() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, max_body_bytes=100)
            c = call(app, CHAT, [b"{" + b" " * 60, b" " * 60 + b"}"], declare_length=False)
            assert_openai_error(await complete(c), 413, "body_too_large")
            assert srv.requests == []

    run(main())


def test_body_at_the_limit_is_accepted() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            body = b'{"model": "demo"}'
            app = app_for(srv.port, max_body_bytes=len(body))
            assert (await complete(call(app, CHAT, body))).status == 200
            app2 = app_for(srv.port, max_body_bytes=len(body))
            c = call(app2, CHAT, [body[:4], body[4:]], declare_length=False)
            assert (await complete(c)).status == 200

    run(main())


# -- routing outcomes ------------------------------------------------------------------------


def test_unknown_model_falls_back_to_the_first_target() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port)
            bodies: list[dict[str, Any]] = [
                {"model": "who-knows"},
                {"messages": []},
                {"model": None},
            ]
            for body in bodies:
                assert (await complete(call(app, CHAT, body))).status == 200
            assert len(srv.requests) == 3

    run(main())


def test_strict_models_answers_404_for_an_unknown_model() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, strict_models=True)
            c = await complete(call(app, CHAT, {"model": "who-knows"}))
            error = assert_openai_error(c, 404, "model_not_found")
            assert "who-knows" in error["message"]
            assert (await complete(call(app, CHAT, CHAT_BODY))).status == 200
            assert len(srv.requests) == 1

    run(main())


@pytest.mark.parametrize("strict", [False, True])
def test_no_model_ready_is_503_with_retry_after(strict: bool) -> None:
    async def main() -> None:
        app = new_app(strict_models=strict, load_wait_s=0)
        cases: list[tuple[RouteTable, dict[str, Any]]] = [
            (RouteTable(), {"messages": []}),
            (RouteTable((ModelRoute("demo"),)), CHAT_BODY),  # known to the mesh, but cold
            # An empty table means nothing is known yet: not ready, even in strict mode.
            (RouteTable(), CHAT_BODY),
        ]
        for table, body in cases:
            app.set_table(table)
            c = await complete(call(app, CHAT, body))
            assert_openai_error(c, 503, "model_not_ready")
            assert c.response_headers[b"retry-after"] == str(RETRY_AFTER_S).encode()

    run(main())


def test_a_request_for_a_cold_model_waits_for_its_load() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = new_app(load_wait_s=30)
            app.set_table(RouteTable((ModelRoute("demo", loadable=True),)))  # known, cold
            pending = asyncio.ensure_future(complete(call(app, CHAT, CHAT_BODY)))
            await asyncio.sleep(0.05)
            assert not pending.done()
            assert set(app.demand.snapshot(time.time())) == {"demo"}  # asked for
            app.set_table(local_table(srv.port))  # a node loaded it
            c = await asyncio.wait_for(pending, 10)
            assert c.status == 200

    run(main())


def test_a_cold_model_not_loaded_in_time_is_503_and_unknown_names_are_not_demand() -> None:
    async def main() -> None:
        app = new_app(load_wait_s=0.2)
        app.set_table(RouteTable((ModelRoute("demo", loadable=True),)))
        c = await complete(call(app, CHAT, CHAT_BODY))
        error = assert_openai_error(c, 503, "model_not_ready")
        assert "waited 0.2 s for a node to load it" in error["message"]
        assert c.response_headers[b"retry-after"] == str(RETRY_AFTER_S).encode()
        await complete(call(app, CHAT, {**CHAT_BODY, "model": "no-such-model"}))
        assert set(app.demand.snapshot(time.time())) == {"demo"}

    run(main())


def test_a_cold_model_nobody_can_load_is_503_at_once() -> None:
    async def main() -> None:
        app = new_app(load_wait_s=30)
        app.set_table(RouteTable((ModelRoute("demo"),)))  # e.g. a backend's, now down
        c = await complete(call(app, CHAT, CHAT_BODY))
        assert_openai_error(c, 503, "model_not_ready")
        assert not app.loading

    run(main())


def test_requests_waiting_for_a_load_are_bounded_and_reads_do_not_wait() -> None:
    async def main() -> None:
        app = new_app(load_wait_s=30, max_queued=2)
        app.set_table(RouteTable((ModelRoute("demo", loadable=True),)))
        parked = [asyncio.ensure_future(complete(call(app, CHAT, CHAT_BODY))) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert app.loading == {"demo": 2}
        third = await complete(call(app, CHAT, CHAT_BODY))
        error = assert_openai_error(third, 503, "model_not_ready")
        assert "2 requests already wait" in error["message"]
        # A read of a cold model answers at once, and is no demand.
        app.demand = type(app.demand)()
        props = await complete(call(app, "/props?model=demo", b"", method="GET"))
        assert_openai_error(props, 503, "model_not_ready")
        assert app.demand.snapshot(time.time()) == {}
        for task in parked:
            task.cancel()
        await asyncio.gather(*parked, return_exceptions=True)
        assert not app.loading  # a client that left stops waiting

    run(main())


def test_upstream_refused_is_503_with_retry_after() -> None:
    async def main() -> None:
        c = await complete(call(app_for(closed_port()), CHAT, CHAT_BODY))
        error = assert_openai_error(c, 503, "model_not_ready")  # down, not this request's fault
        assert "cannot connect" in error["message"]
        assert int(c.response_headers[b"retry-after"]) >= 1

    run(main())


def test_malformed_upstream_response_is_502() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"NOT HTTP\r\n\r\n")
        await w.drain()
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            c = await complete(call(app_for(srv.port), CHAT, CHAT_BODY))
            assert_openai_error(c, 502, "upstream_error")

    run(main())


def test_remote_target_without_a_tunnel_is_503() -> None:
    async def main() -> None:
        app = new_app()
        app.set_table(
            RouteTable((ModelRoute("demo", (RouteTarget("far", False, 9337),), ("far",)),))
        )
        assert_openai_error(await complete(call(app, CHAT, CHAT_BODY)), 503, "no_tunnel")

    run(main())


def test_new_table_switches_target_and_drops_old_pools() -> None:
    async def main() -> None:
        async with FakeServer(ok(b"one")) as one, FakeServer(ok(b"two")) as two:
            app = app_for(one.port)
            assert (await complete(call(app, CHAT, CHAT_BODY))).body == b"one"
            app.set_table(local_table(two.port))
            assert (await complete(call(app, CHAT, CHAT_BODY))).body == b"two"
            assert set(app.pools.pools) == {("127.0.0.1", two.port)}
            await one.wait_closed(0)  # the old pool's idle connection was closed

    run(main())


# -- small endpoints -------------------------------------------------------------------------


def test_models_lists_warm_and_cold_models() -> None:
    async def main() -> None:
        app = new_app()
        app.set_table(
            RouteTable(
                (
                    ModelRoute(
                        "a",
                        (RouteTarget("n1", True, 8001), RouteTarget("n2", False, 9337)),
                        ("n1", "n2"),
                    ),
                    ModelRoute("b-cold"),
                )
            )
        )
        c = await complete(call(app, "/v1/models", method="GET"))
        assert c.status == 200
        body = c.json()
        assert body["object"] == "list"
        assert [m["id"] for m in body["data"]] == ["a", "b-cold"]
        for model in body["data"]:
            assert model["object"] == "model"
            assert model["owned_by"] == "meshllm"
            assert isinstance(model["created"], int) and model["created"] > 1_600_000_000
        assert body["data"][0]["meshllm"] == {"status": "warm", "nodes": ["n1", "n2"]}
        assert body["data"][1]["meshllm"] == {"status": "cold", "nodes": []}

    run(main())


def test_models_before_any_table() -> None:
    async def main() -> None:
        c = await complete(call(new_app(), "/v1/models", method="GET"))
        assert (c.status, c.json()) == (200, {"object": "list", "data": []})

    run(main())


def test_health() -> None:
    async def main() -> None:
        app = new_app()
        c = await complete(call(app, "/health", method="GET"))
        assert c.status == 503 and c.json() == {"status": "no model ready", "models": []}
        app.set_table(RouteTable((ModelRoute("cold"),)))
        assert (await complete(call(app, "/health", method="GET"))).status == 503
        app.set_table(local_table(8001))
        c = await complete(call(app, "/health", method="GET"))
        assert c.status == 200 and c.json() == {"status": "ok", "models": ["demo"]}

    run(main())


# -- over real sockets (uvicorn on port 0) ---------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: ProxyApp) -> AsyncIterator[int]:
    """Run `app` under uvicorn on 127.0.0.1, port 0; yields the port; always stops it."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.ensure_future(server.serve())
    try:
        async with asyncio.timeout(WAIT_S):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, WAIT_S)


async def http_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One raw request on a fresh connection; reads until the server closes or the body ends."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)
        }
        async with asyncio.timeout(WAIT_S):
            if headers.get("transfer-encoding") == "chunked":
                body = b""
                while size := int(await reader.readuntil(b"\r\n"), 16):
                    body += (await reader.readexactly(size + 2))[:-2]
            else:
                body = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body
    finally:
        writer.close()


def test_over_http_forwarding_and_chunked_upload_limit() -> None:
    async def main() -> None:
        async with FakeServer(ok(b'{"ok": true}')) as srv:
            app = app_for(srv.port, max_body_bytes=1000)
            async with serving(app) as port:
                body = json.dumps(CHAT_BODY).encode()
                status, _, answer = await http_exchange(
                    port,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
                )
                assert (status, answer) == (200, b'{"ok": true}')
                big = chunk(b"{" + b" " * 600) + chunk(b" " * 600 + b"}") + b"0\r\n\r\n"
                status, _, answer = await http_exchange(
                    port,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + big,
                )
                assert status == 413, answer
                assert json.loads(answer)["error"]["code"] == "body_too_large"
                assert len(srv.requests) == 1

    run(main())


def test_over_http_client_disconnect_mid_stream_closes_upstream() -> None:
    async def main() -> None:
        respond, saw_eof = stream_then_watch_for_eof()

        async with FakeServer(respond) as srv, serving(app_for(srv.port)) as port:
            body = json.dumps({**CHAT_BODY, "stream": True}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = b""
            async with asyncio.timeout(WAIT_S):
                while b"data: 1" not in received:
                    more = await reader.read(4096)
                    assert more, f"proxy closed early; got {received!r}"
                    received += more
            assert received.startswith(b"HTTP/1.1 200")
            writer.close()
            await asyncio.wait_for(saw_eof.wait(), WAIT_S)

    run(main())


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"127.0.0.1:9337", True),
        (b"localhost:9337", True),
        (b"LOCALHOST", True),
        (b"[::1]:9337", True),
        (b"127.0.0.2", True),
        (b"evil.example:9337", False),
        (b"127.evil.example", False),
        (b"10.0.0.1:9337", False),
    ],
)
def test_loopback_api_answers_only_to_loopback_host_names(host: bytes, allowed: bool) -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, loopback_only=True)
            c = call(app, CHAT, CHAT_BODY)
            c.headers = [(k, host if k == b"host" else v) for k, v in c.headers]
            await complete(c)
            if allowed:
                assert c.status == 200
            else:
                assert_openai_error(c, 421, "421")
                assert not srv.requests

    run(main())


# -- browsers: cross-site requests (meshllm.http.origin) ------------------------------------

APP_ORIGIN = b"https://app.example.com"


def acao(c: Call) -> list[bytes]:
    start = next(m for m in c.messages if m["type"] == "http.response.start")
    return [v for k, v in start["headers"] if k.lower() == b"access-control-allow-origin"]


@pytest.mark.parametrize(
    "browser",
    [
        [(b"origin", b"https://evil.example"), (b"sec-fetch-site", b"cross-site")],
        [(b"origin", b"https://evil.example")],
        [(b"sec-fetch-site", b"cross-site")],
        [(b"origin", b"http://127.0.0.1:3131"), (b"sec-fetch-site", b"same-site")],
        [(b"origin", b"null")],
    ],
)
@pytest.mark.parametrize("path", [CHAT, "/v1/models", "/health"])
def test_cross_site_request_is_403_and_never_forwarded(
    browser: list[tuple[bytes, bytes]], path: str
) -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, loopback_only=True, cors_origins=["https://app.example.com"])
            method = "POST" if path == CHAT else "GET"
            c = await complete(call(app, path, CHAT_BODY, method=method, headers=browser))
            error = assert_openai_error(c, 403, "cross_site_refused")
            assert "--cors-origin" in error["message"]
            assert not acao(c)
            assert not srv.requests

    run(main())


@pytest.mark.parametrize(
    "browser",
    [
        [],
        [(b"origin", b"http://127.0.0.1:9337"), (b"sec-fetch-site", b"same-origin")],
        [(b"sec-fetch-site", b"none")],
    ],
)
def test_requests_without_browser_headers_or_same_origin_are_unaffected(
    browser: list[tuple[bytes, bytes]],
) -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, loopback_only=True)
            c = await complete(call(app, CHAT, CHAT_BODY, headers=browser))
            assert c.status == 200 and len(srv.requests) == 1
            assert not acao(c)
            assert b"vary" not in c.response_headers

    run(main())


@pytest.mark.parametrize(
    ("allowed", "origin"),
    [(["https://app.example.com"], APP_ORIGIN), (["*"], b"https://any.example")],
)
def test_allowed_origin_gets_cors_headers_replacing_the_upstreams(
    allowed: list[str], origin: bytes
) -> None:
    async def main() -> None:
        async with FakeServer(ok(b"{}", "Access-Control-Allow-Origin: *")) as srv:
            app = app_for(srv.port, cors_origins=allowed)
            browser = [(b"origin", origin), (b"sec-fetch-site", b"cross-site")]
            c = await complete(call(app, CHAT, CHAT_BODY, headers=browser))
            assert c.status == 200 and c.body == b"{}"
            assert acao(c) == [origin]
            assert c.response_headers[b"vary"] == b"Origin"
            # The page's Origin is not passed to llama-server.
            assert "origin" not in srv.requests[0].headers

    run(main())


def test_allowed_origin_streaming_response_gets_cors_headers() -> None:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD + chunk(b"data: 1\n\n") + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await w.drain()
        return True

    async def main() -> None:
        async with FakeServer(respond) as srv:
            app = app_for(srv.port, cors_origins=["https://app.example.com"])
            browser = [(b"origin", APP_ORIGIN), (b"sec-fetch-site", b"cross-site")]
            c = await complete(call(app, CHAT, {**CHAT_BODY, "stream": True}, headers=browser))
            assert c.status == 200
            assert c.response_headers[b"content-type"] == b"text/event-stream"
            assert acao(c) == [APP_ORIGIN]
            assert c.response_headers[b"vary"] == b"Origin"
            assert c.body == b"data: 1\n\ndata: [DONE]\n\n"

    run(main())


def test_allowed_origin_also_gets_cors_headers_on_errors() -> None:
    async def main() -> None:
        app = app_for(closed_port(), cors_origins=["https://app.example.com"])
        browser = [(b"origin", APP_ORIGIN)]
        c = await complete(call(app, CHAT, {"model": "demo"}, headers=browser))
        assert_openai_error(c, 503, "model_not_ready")
        assert acao(c) == [APP_ORIGIN]

    run(main())


def preflight(app: ProxyApp, origin: bytes, requested: bytes | None = None) -> Call:
    headers = [
        (b"host", b"127.0.0.1:9337"),
        (b"origin", origin),
        (b"sec-fetch-site", b"cross-site"),
        (b"access-control-request-method", b"POST"),
    ]
    if requested is not None:
        headers.append((b"access-control-request-headers", requested))
    return Call(app, "OPTIONS", CHAT, [b""], headers)


def test_preflight_of_an_allowed_origin() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, loopback_only=True, cors_origins=["https://app.example.com"])
            c = await complete(preflight(app, APP_ORIGIN, b"content-type, authorization"))
            assert c.status == 204 and c.body == b""
            headers = c.response_headers
            assert headers[b"access-control-allow-origin"] == APP_ORIGIN
            assert b"POST" in headers[b"access-control-allow-methods"]
            assert headers[b"access-control-allow-headers"] == b"content-type, authorization"
            assert headers[b"vary"] == b"Origin"
            assert not srv.requests

    run(main())


def test_preflight_of_another_origin_is_403() -> None:
    async def main() -> None:
        app = app_for(closed_port(), cors_origins=["https://app.example.com"])
        c = await complete(preflight(app, b"https://evil.example", b"content-type"))
        assert_openai_error(c, 403, "cross_site_refused")
        assert not acao(c)

    run(main())


def test_rebinding_page_still_gets_421_before_the_origin_check() -> None:
    async def main() -> None:
        app = app_for(closed_port(), loopback_only=True)
        c = call(app, CHAT, CHAT_BODY, headers=[(b"origin", b"http://evil.example:9337")])
        c.headers = [(k, b"evil.example:9337" if k == b"host" else v) for k, v in c.headers]
        await complete(c)
        assert_openai_error(c, 421, "421")

    run(main())


def test_over_http_cross_site_is_403_and_allowed_origin_gets_cors() -> None:
    async def main() -> None:
        async with FakeServer(ok(b"{}")) as srv:
            app = app_for(srv.port, loopback_only=True, cors_origins=["https://app.example.com"])
            body = json.dumps(CHAT_BODY).encode()
            async with serving(app) as port:

                def request(origin: bytes) -> bytes:
                    return (
                        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                        b"Origin: %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                        % (port, origin, len(body), body)
                    )

                status, headers, _ = await http_exchange(port, request(b"https://evil.example"))
                assert status == 403 and not srv.requests
                status, headers, _ = await http_exchange(port, request(APP_ORIGIN))
                assert status == 200
                assert headers["access-control-allow-origin"] == APP_ORIGIN.decode()

    run(main())


# -- browser-facing leftovers: other scopes, form posts, rebinding beyond loopback ----------


@pytest.mark.parametrize("loopback_only", [True, False])
def test_a_websocket_scope_is_closed_and_never_reaches_the_app(loopback_only: bool) -> None:
    # Even one that would pass every check: no kind of request skips them by not being "http".
    async def main() -> None:
        app = app_for(closed_port(), loopback_only=loopback_only)
        headers = [(b"host", b"evil.example"), (b"origin", b"https://evil.example")]
        sent, reached = await asyncio.wait_for(
            websocket_attempt(app, "/v1/models", headers), WAIT_S
        )
        assert sent == [{"type": "websocket.close", "code": 1008}]
        assert not reached

    run(main())


@pytest.mark.parametrize(
    "kind",
    [b"text/plain", b"text/plain;charset=UTF-8", b"application/x-www-form-urlencoded"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_a_form_content_type_is_415_and_never_forwarded(kind: bytes, path: str) -> None:
    # An old browser posts an HTML form cross-site with neither Origin nor Sec-Fetch-Site.
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, loopback_only=True)
            c = call(app, path, CHAT_BODY)
            c.headers = [(k, kind if k == b"content-type" else v) for k, v in c.headers]
            await complete(c)
            error = assert_openai_error(c, 415, "unsupported_media_type")
            assert "application/json" in error["message"]
            assert not srv.requests

    run(main())


def test_no_content_type_is_still_forwarded() -> None:
    # curl and scripts that omit it keep working: a form always sends one.
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, loopback_only=True)
            c = call(app, CHAT, CHAT_BODY)
            c.headers = [(k, v) for k, v in c.headers if k != b"content-type"]
            await complete(c)
            assert c.status == 200 and len(srv.requests) == 1

    run(main())


NODE_NAMES = frozenset({b"localhost", b"gpu-box", b"gpu-box.local"})


@pytest.mark.parametrize(
    ("host", "browser", "allowed"),
    [
        # a rebinding page: its own name, its own origin (so "same-origin")
        (b"evil.example:9337", [(b"origin", b"http://evil.example:9337")], False),
        (b"evil.example:9337", [(b"sec-fetch-site", b"same-origin")], False),
        # the machine by address or by its own names
        (b"192.168.1.5:9337", [(b"sec-fetch-site", b"none")], True),
        (b"[fe80::1]:9337", [(b"sec-fetch-site", b"none")], True),
        (b"gpu-box:9337", [(b"origin", b"http://gpu-box:9337")], True),
        (b"gpu-box.local:9337", [(b"sec-fetch-site", b"none")], True),
        # a page --cors-origin allows, calling the node by a DNS name
        (b"llm.example:9337", [(b"origin", b"https://app.example.com")], True),
        # not a browser (SDKs, curl, a service name in a container network)
        (b"meshllm:9337", [], True),
    ],
)
def test_beyond_loopback_a_browser_must_name_the_machine(
    host: bytes, browser: list[tuple[bytes, bytes]], allowed: bool
) -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(
                srv.port,
                loopback_only=False,
                own_names=NODE_NAMES,
                cors_origins=["https://app.example.com"],
            )
            c = call(app, CHAT, CHAT_BODY, headers=browser)
            c.headers = [(k, host if k == b"host" else v) for k, v in c.headers]
            await complete(c)
            if allowed:
                assert c.status == 200 and len(srv.requests) == 1
            else:
                assert_openai_error(c, 421, "untrusted_host")
                assert not srv.requests

    run(main())


def test_machine_names_include_localhost_and_the_host_name() -> None:
    names = machine_names()
    assert b"localhost" in names
    assert socket.gethostname().lower().encode() in names


# -- balancing, failover, admission (meshllm.http.balance in the Proxy) ----------------------


def replicas(*ports: int, model: str = "demo") -> RouteTable:
    """One model served by local targets on `ports` (node ids r0, r1, ...)."""
    targets = tuple(RouteTarget(f"r{i}", True, port, model) for i, port in enumerate(ports))
    return RouteTable((ModelRoute(model, targets, tuple(t.node_id for t in targets)),))


def held(release: asyncio.Event, body: bytes = b"held") -> Responder:
    """Answers only once `release` is set (a replica busy with a long generation)."""

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await release.wait()
        w.write(response(body))
        await w.drain()
        return True

    return respond


def status_of(code: str, body: bytes = b"{}") -> Responder:
    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(body, code))
        await w.drain()
        return True

    return respond


def test_requests_go_to_the_replica_with_the_fewest_in_flight() -> None:
    async def main() -> None:
        release = asyncio.Event()
        async with FakeServer(held(release, b"a")) as a, FakeServer(held(release, b"b")) as b:
            app = new_app()
            app.set_table(replicas(a.port, b.port))
            # No prompt, so no affinity key: least in flight alone decides.
            calls = [call(app, body={"model": "demo"}) for _ in range(4)]
            tasks = [asyncio.ensure_future(c()) for c in calls]
            await run_until(lambda: len(a.requests) + len(b.requests) == 4)
            assert (len(a.requests), len(b.requests)) == (2, 2)  # spread, not piled on one
            release.set()
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
            assert sorted(c.body for c in calls) == [b"a", b"a", b"b", b"b"]
            assert app.balancer.in_flight(replicas(a.port).models[0].targets[0]) == 0

    run(main())


def test_a_replica_that_refuses_is_skipped_and_cools_down() -> None:
    async def main() -> None:
        dead = closed_port()
        async with FakeServer(ok(b"alive")) as alive:
            app = new_app()
            app.set_table(replicas(dead, alive.port))
            dead_target = app.routes.by_name["demo"].targets[0]
            tried = False
            for _ in range(20):  # ties break at random: the dead one comes up soon
                c = await complete(call(app, body={"model": "demo"}))
                assert (c.status, c.body) == (200, b"alive")  # never the client's problem
                tried = tried or app.balancer.cooling(dead_target, time.monotonic())
            assert tried
            assert len(alive.requests) == 20

    run(main())


def test_a_busy_or_failing_answer_before_any_byte_fails_over() -> None:
    async def main() -> None:
        async with (
            FakeServer(status_of("503 Service Unavailable")) as loading,
            FakeServer(ok(b"served")) as ready,
        ):
            app = new_app()
            app.set_table(replicas(loading.port, ready.port))
            for _ in range(3):
                c = await complete(call(app, body=CHAT_BODY))
                assert (c.status, c.body) == (200, b"served")

    run(main())


def test_with_every_replica_down_the_answer_is_503_with_retry_after() -> None:
    async def main() -> None:
        app = new_app()
        app.set_table(replicas(closed_port(), closed_port()))
        first = await complete(call(app, body=CHAT_BODY))
        assert_openai_error(first, 503, "model_not_ready")  # both tried, both refused
        assert "every server of 'demo' is down" in first.json()["error"]["message"]
        again = await complete(call(app, body=CHAT_BODY))
        assert_openai_error(again, 503, "model_not_ready")  # cooling: not tried again
        assert int(again.response_headers[b"retry-after"]) >= 1

    run(main())


def test_admission_queues_then_refuses_with_429() -> None:
    async def main() -> None:
        release = asyncio.Event()
        async with FakeServer(held(release)) as srv:
            app = new_app(max_in_flight=1, max_queued=1, queue_wait_s=5.0)
            app.set_table(replicas(srv.port))
            first, queued, refused = (call(app, body=CHAT_BODY) for _ in range(3))
            running = asyncio.ensure_future(first())
            await run_until(lambda: len(srv.requests) == 1)
            waiting = asyncio.ensure_future(queued())
            await run_until(lambda: app.admission.queued("demo") == 1)
            await complete(refused)
            assert_openai_error(refused, 429, "too_many_requests")
            assert int(refused.response_headers[b"retry-after"]) >= 1
            assert len(srv.requests) == 1  # the queued one has not gone yet
            release.set()
            await asyncio.wait_for(asyncio.gather(running, waiting), WAIT_S)
            assert first.status == queued.status == 200
            assert app.admission.in_flight("demo") == 0 and app.admission.queued("demo") == 0

    run(main())


def test_a_queued_request_gives_up_at_its_deadline() -> None:
    async def main() -> None:
        release = asyncio.Event()
        async with FakeServer(held(release)) as srv:
            app = new_app(max_in_flight=1, max_queued=4, queue_wait_s=0.2)
            app.set_table(replicas(srv.port))
            first, late = call(app, body=CHAT_BODY), call(app, body=CHAT_BODY)
            running = asyncio.ensure_future(first())
            await run_until(lambda: len(srv.requests) == 1)
            await complete(late)
            assert_openai_error(late, 429, "too_many_requests")
            release.set()
            await asyncio.wait_for(running, WAIT_S)
            assert app.admission.queued("demo") == 0 and app.admission.in_flight("demo") == 0

    run(main())


async def run_until(done: Any) -> None:
    for _ in range(int(WAIT_S / 0.01)):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_a_conversation_stays_on_the_replica_that_has_its_prompt() -> None:
    async def main() -> None:
        async with FakeServer(ok(b"a")) as a, FakeServer(ok(b"b")) as b:
            app = new_app()
            app.set_table(replicas(a.port, b.port))
            for turn in range(6):
                # The same system prompt and first message, a growing conversation.
                messages = [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "hi"},
                    *[{"role": "assistant", "content": f"turn {i}"} for i in range(turn)],
                ]
                await complete(call(app, body={"model": "demo", "messages": messages}))
            assert sorted((len(a.requests), len(b.requests))) == [0, 6]

    run(main())


def test_a_request_that_makes_servers_drop_it_is_not_sent_down_every_connection() -> None:
    """A body that makes a server close the connection without answering: sent to a
    replica at most twice (one kept-alive connection, then a fresh one), tried on at
    most the balancer's attempts, and no replica is cooled down for it."""

    def drops_poison() -> Responder:
        async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            if b"poison" in req.body:
                return False  # closed, no answer
            w.write(response(b"fine", headers=("Connection: keep-alive",)))
            await w.drain()
            return True

        return respond

    async def main() -> None:
        async with FakeServer(drops_poison()) as a, FakeServer(drops_poison()) as b:
            app = new_app()
            app.set_table(replicas(a.port, b.port))
            warm = [call(app, body={"model": "demo"}) for _ in range(8)]
            await asyncio.wait_for(asyncio.gather(*(c() for c in warm)), WAIT_S)
            poison = await complete(call(app, body={"model": "demo", "user": "poison"}))
            assert_openai_error(poison, 502, "upstream_error")
            for srv in (a, b):
                assert sum(b"poison" in r.body for r in srv.requests) <= 2
            now = time.monotonic()
            assert not any(app.balancer.cooling(t, now) for t in app.routes.by_name["demo"].targets)
            fine = await complete(call(app, body={"model": "demo"}))
            assert (fine.status, fine.body) == (200, b"fine")

    run(main())


def test_a_cold_model_whose_server_failed_is_503_at_once_with_the_reason() -> None:
    async def main() -> None:
        app = new_app(load_wait_s=30)
        app.set_table(RouteTable((ModelRoute("demo", note="n1: out of memory", loadable=True),)))
        c = await complete(call(app, CHAT, CHAT_BODY))
        error = assert_openai_error(c, 503, "model_not_ready")
        assert "out of memory" in error["message"] and not app.loading

    run(main())
