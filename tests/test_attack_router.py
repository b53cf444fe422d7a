"""Attacks on the router of issue 11 that once worked: request smuggling through a
percent-encoded path, a query that crashed the Proxy, client keys sent to another
member's node, a member repeating a model to win routing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from meshllm.http.proxy import ProxyApp
from meshllm.http.upstream import Pool
from meshllm.runtime.messages import ModelRoute, RouteTable, RouteTarget
from tests.test_proxy_app import (
    CHAT,
    CHAT_BODY,
    app_for,
    call,
    complete,
    http_exchange,
    new_app,
    run,
    serving,
)
from tests.test_upstream import FakeServer, Request, Responder, response


def echo_path() -> Responder:
    """Answers each request with its own request line, so a desync shows."""

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(response(json.dumps({"saw": f"{req.method} {req.path}"}).encode()))
        await w.drain()
        return True

    return respond


def test_a_percent_encoded_crlf_in_a_slots_path_cannot_smuggle_a_request() -> None:
    async def main() -> None:
        async with FakeServer(echo_path()) as srv:
            app = app_for(srv.port)
            async with serving(app) as port:
                smuggle = (
                    b"/slots/0%20HTTP/1.1%0d%0ahost:%20x%0d%0acontent-length:%200"
                    b"%0d%0a%0d%0aGET%20/smuggled"
                )
                await http_exchange(
                    port,
                    b"POST " + smuggle + b"?action=erase HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 0\r\n\r\n",
                )
                # A later, innocent client on the same pooled connection:
                victim = json.dumps(CHAT_BODY).encode()
                _, _, answer = await http_exchange(
                    port,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(victim), victim),
                )
                print("upstream saw:", [(r.method, r.path, r.conn) for r in srv.requests])
                print("victim got:", answer)
                # Not a slot's path: 404 at the node, and only the victim's request went on.
                assert [(r.method, r.path) for r in srv.requests] == [("POST", CHAT)]
                assert [r.path for r in srv.requests if r.method == "GET"] == []
                assert json.loads(answer)["saw"] == f"POST {CHAT}"

    run(main())


def test_a_query_with_many_fields_is_a_clear_400() -> None:
    async def main() -> None:
        async with FakeServer(echo_path()) as srv:
            app = app_for(srv.port)
            query = "&".join(f"f{i}=1" for i in range(40)) + "&model=demo"
            c = call(app, f"/props?{query}", b"", method="GET")
            try:
                await complete(c)
            except ValueError as exc:
                pytest.fail(f"the app raised {exc!r}")
            assert c.status == 400

    run(main())


class Capture:
    """A remote target's upstream (the tunnel), recording what a member's node would get."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pools: list[Pool] = []

    def __call__(self, target: RouteTarget) -> Pool:
        pool = Pool("127.0.0.1", self.port)
        self.pools.append(pool)
        return pool


def test_client_credentials_do_not_go_to_another_members_node() -> None:
    async def main() -> None:
        async with FakeServer(echo_path()) as member:
            capture = Capture(member.port)
            app = new_app(remote=capture)
            target = RouteTarget("hostile", False, 0, "demo")
            app.set_table(RouteTable((ModelRoute("demo", (target,), ("hostile",)),)))
            c = call(
                app,
                CHAT,
                CHAT_BODY,
                headers=[
                    (b"authorization", b"Bearer sk-real-openai-key"),
                    (b"x-api-key", b"sk-ant-real-key"),
                ],
            )
            await complete(c)
            for pool in capture.pools:
                pool.close()
            assert c.status == 200
            seen = member.requests[0].headers
            print("the member's node got:", seen)
            assert "authorization" not in seen and "x-api-key" not in seen

    run(main())


def test_a_member_repeating_a_backend_model_gets_one_target() -> None:
    import random

    from actors.router import backend_servers
    from meshllm.http.balance import Balancer, target_id
    from meshllm.http.routing import build_route_table
    from meshllm.mesh.wire import MAX_MODELS, PeerAnnouncement
    from meshllm.runtime.messages import BackendsState, LocalServerState, MeshView

    me = "0123456789abcdef"
    honest = PeerAnnouncement(
        node_id="1111111111111111", generation=1, http_port=9400, backend_models=("x",)
    )
    hostile = PeerAnnouncement(
        node_id="2222222222222222",
        generation=1,
        http_port=9401,
        backend_models=("x",) * MAX_MODELS,  # the wire takes it
    )
    servers = backend_servers(me, MeshView(me, (honest, hostile)), BackendsState())
    (route,) = build_route_table(me, LocalServerState(), servers, catalog=("x",)).models
    balancer = Balancer(rng=random.Random(1))
    firsts = [target_id(balancer.order(route.targets, 0.0)[0]) for _ in range(100)]
    attempts = {target_id(t) for t in balancer.order(route.targets, 0.0)}
    print(len(route.targets), "targets;", firsts.count("2222222222222222/x"), "of 100 first")
    assert len(route.targets) == 2
    assert len(attempts) == 2  # a failover reaches the honest replica


def test_a_smuggled_slow_request_cannot_answer_the_next_client() -> None:
    app: ProxyApp | None = None
    victim_sent = asyncio.Event()

    async def backend(scope: dict[str, Any], receive: Any, send: Any) -> None:
        """An external backend (`--backend-url`) on uvicorn, as vLLM is."""
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        path = scope["path"]
        body = json.dumps({"saw": f"{scope['method']} {path}"}).encode()
        if path == "/smuggled":
            # A slow generation: done once the proxy lent this connection to the next client.
            assert app is not None
            async with asyncio.timeout(5):
                await victim_sent.wait()
                while any(pool.idle for pool in app.pools.pools.values()):
                    await asyncio.sleep(0.01)
            body = b'{"choices": [{"message": {"content": "attacker text"}}]}'
        status = 404 if path == "/slots/0" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def main() -> None:
        nonlocal app
        async with serving(backend) as backend_port:  # type: ignore[arg-type]
            app = app_for(backend_port)
            async with serving(app) as port:
                smuggle = (
                    b"/slots/0%20HTTP/1.1%0d%0ahost:%20x%0d%0acontent-length:%200"
                    b"%0d%0a%0d%0aPOST%20/smuggled"
                )
                await http_exchange(
                    port,
                    b"POST " + smuggle + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
                )
                victim = json.dumps(CHAT_BODY).encode()
                victim_sent.set()
                _, _, answer = await http_exchange(
                    port,
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(victim), victim),
                )
                print("victim got:", answer)
                assert b"attacker text" not in answer

    run(main())
