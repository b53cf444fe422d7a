"""llama-server's endpoints through the Proxy (`meshllm.http.endpoints`), and the stall
watch that finds a hung server, driven in-process against the tiny upstream servers of
`tests.test_upstream` (real llama-server runs behind a node in tests/test_llama_suite.py
and tests/test_router_faults.py)."""

from __future__ import annotations

import asyncio
import json

import pytest

from meshllm.http.endpoints import (
    LOCAL_PATHS,
    MODEL_PATHS,
    READ_PATHS,
    Kind,
    kind_of,
    query_model,
    request_headers,
    tunnelled,
)
from meshllm.runtime.messages import ModelRoute, RouteTable, RouteTarget
from tests.test_proxy_app import (
    CHAT_BODY,
    assert_openai_error,
    call,
    complete,
    new_app,
    replicas,
    run,
    run_until,
)
from tests.test_upstream import (
    WAIT_S,
    FakeServer,
    Request,
    chunk,
    ok,
)

# -- the table ---------------------------------------------------------------------------


def test_every_kind_of_endpoint_is_told_apart() -> None:
    assert kind_of("POST", "/chat/completions") is Kind.MODEL
    assert kind_of("POST", "/v1/messages/count_tokens") is Kind.MODEL
    assert kind_of("GET", "/props") is Kind.READ
    assert kind_of("POST", "/props") is Kind.LOCAL
    assert kind_of("POST", "/slots/3") is Kind.LOCAL
    for unknown in [
        ("POST", "/slots/0 x"),
        ("POST", "/slots/0/../props"),
        ("POST", "/slots/\u0661"),  # a digit, but not an ASCII one
        ("POST", "/slots/"),
        ("GET", "/tokenize"),
        ("DELETE", "/slots"),
        ("PUT", "/props"),
    ]:
        assert kind_of(*unknown) is None
    assert kind_of("POST", "/v1/stream") is None  # one server's state: not a mesh's
    # through the tunnel: what reads or generates, never what changes a server
    assert all(tunnelled("POST", p) for p in MODEL_PATHS)
    assert all(tunnelled("GET", p + "?model=x") for p in READ_PATHS)
    assert tunnelled("GET", "/health")
    assert not any(tunnelled("POST", p) for p in LOCAL_PATHS)
    assert not tunnelled("POST", "/slots/0?action=erase")


def test_query_model_and_passed_headers() -> None:
    assert query_model(b"") is None
    assert query_model(b"model=a%2Fb&x=1") == "a/b"
    assert query_model(b"fail_on_no_slot=1") is None
    headers = [
        (b"host", b"h"),
        (b"authorization", b"Bearer k"),
        (b"x-api-key", b"k"),
        (b"cookie", b"c"),
        (b"origin", b"http://o"),
        (b"content-length", b"3"),
        (b"anthropic-version", b"2023-06-01"),
    ]
    assert request_headers(headers) == [
        (b"authorization", b"Bearer k"),
        (b"x-api-key", b"k"),
        (b"anthropic-version", b"2023-06-01"),
    ]


# -- passing through -----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(MODEL_PATHS))
def test_every_model_endpoint_passes_through_with_its_headers(path: str) -> None:
    async def main() -> None:
        async with FakeServer(ok(b'{"tokens": [1]}', "X-Served: yes")) as srv:
            app = new_app()
            app.set_table(replicas(srv.port))
            extra = [(b"authorization", b"Bearer secret"), (b"x-api-key", b"k2")]
            c = await complete(call(app, path + "?debug=1", CHAT_BODY, headers=extra))
            assert (c.status, c.body) == (200, b'{"tokens": [1]}')
            assert c.response_headers[b"x-served"] == b"yes"
            (req,) = srv.requests
            assert (req.method, req.path) == ("POST", path + "?debug=1")
            assert req.headers["authorization"] == "Bearer secret"
            assert req.headers["x-api-key"] == "k2"
            assert json.loads(req.body) == CHAT_BODY

    run(main())


def two_models(a: int, b: int, a_local: bool = True) -> RouteTable:
    return RouteTable(
        (
            ModelRoute("ma", (RouteTarget("na", a_local, a, "ma"),), ("na",)),
            ModelRoute("mb", (RouteTarget("nb", True, b, "mb"),), ("nb",)),
        )
    )


def test_reads_go_to_the_model_the_query_names_else_the_first() -> None:
    async def main() -> None:
        async with FakeServer(ok(b"A")) as a, FakeServer(ok(b"B")) as b:
            app = new_app()
            app.set_table(two_models(a.port, b.port))
            first = await complete(call(app, "/props", method="GET"))
            named = await complete(call(app, "/slots?model=mb&fail_on_no_slot=1", method="GET"))
            assert (first.body, named.body) == (b"A", b"B")
            assert b.requests[0].path == "/slots?model=mb&fail_on_no_slot=1"
            # the model in a body routes the aliases as it does /v1/chat/completions
            tok = await complete(call(app, "/tokenize", {"model": "mb", "content": "hi"}))
            assert tok.body == b"B"

    run(main())


def test_what_changes_a_server_goes_only_to_this_nodes_own() -> None:
    async def main() -> None:
        async with FakeServer(ok(b"erased")) as own:
            app = new_app()
            app.set_table(two_models(1, own.port, a_local=False))
            c = await complete(call(app, "/slots/0?action=erase&model=ma", b"{}"))
            assert c.status == 403  # that model's server is another node's
            assert c.json()["error"]["code"] == "not_local"
            c = await complete(call(app, "/slots/0?action=erase&model=mb", b"{}"))
            assert (c.status, c.body) == (200, b"erased")
            assert own.requests[0].path == "/slots/0?action=erase&model=mb"
            # the body's model counts as the query's does
            c = await complete(call(app, "/slots/0?action=erase", {"model": "ma"}))
            assert c.status == 403 and c.json()["error"]["code"] == "not_local"
            # naming no model: this node's own server (not the first model's)
            c = await complete(call(app, "/lora-adapters", b"[]"))
            assert (c.status, c.body) == (200, b"erased")
            assert own.requests[1].path == "/lora-adapters"

    run(main())


def test_node_answers_health_and_models_itself_and_refuses_the_rest() -> None:
    async def main() -> None:
        async with FakeServer(ok(b"upstream")) as srv:
            app = new_app()
            app.set_table(replicas(srv.port))
            for path in ("/health", "/v1/health"):
                c = await complete(call(app, path, method="GET"))
                assert c.status == 200 and c.json()["models"] == ["demo"]
            for path in ("/models", "/v1/models"):
                c = await complete(call(app, path, method="GET"))
                assert [m["id"] for m in c.json()["data"]] == ["demo"]
            assert (await complete(call(app, "/v1/stream", method="GET"))).status == 404
            assert (await complete(call(app, "/props", method="PUT"))).status == 405
            assert (await complete(call(app, "/tokenize", method="GET"))).status == 405
            assert srv.requests == []

    run(main())


def test_too_many_headers_are_431_before_anything_is_sent() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = new_app()
            app.set_table(replicas(srv.port))
            many = [(b"x-h%d" % i, b"v") for i in range(100)]
            c = await complete(call(app, body=CHAT_BODY, headers=many))
            assert_openai_error(c, 431, "headers_too_large")
            assert srv.requests == []

    run(main())


# -- a hung server -------------------------------------------------------------------------


def silent(stop: asyncio.Event) -> object:
    """Takes requests and answers none, `/health` included, until `stop` is set: a
    stopped (SIGSTOP) server, then one continued."""

    async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await stop.wait()
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await w.drain()
        return True

    return respond


def test_a_hung_replica_is_found_its_requests_fail_over_and_it_comes_back() -> None:
    async def main() -> None:
        wake = asyncio.Event()
        async with FakeServer(silent(wake)) as hung, FakeServer(ok(b"alive")) as alive:  # type: ignore[arg-type]
            app = new_app(stall_s=0.2, probe_timeout_s=0.2)
            app.set_table(replicas(hung.port, alive.port))
            hung_target = app.routes.by_name["demo"].targets[0]
            calls = [call(app, body={"model": "demo"}) for _ in range(6)]
            done = await asyncio.wait_for(asyncio.gather(*(complete(c) for c in calls)), WAIT_S)
            # the requests the hung one took waited, then went to the other: none lost
            assert [(c.status, c.body) for c in done] == [(200, b"alive")] * 6
            assert any(r.path == "/health" for r in hung.requests)  # it was probed
            assert app.balancer.cooling(hung_target, asyncio.get_running_loop().time())

            def taken() -> int:
                return sum(r.path != "/health" for r in hung.requests)

            before = taken()
            c = await complete(call(app, body={"model": "demo"}))
            assert c.body == b"alive" and taken() == before  # avoided at once
            wake.set()  # it answers again: the next probe brings it back
            await run_until(lambda: not app.balancer.hung_ids())
            assert not app.balancer.cooling(hung_target, 0)

    run(main())


def test_a_stream_whose_server_hangs_ends_with_an_error_event() -> None:
    async def main() -> None:
        hang = asyncio.Event()

        async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            if req.path == "/health":
                await asyncio.Event().wait()  # never: the server is stopped
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            w.write(b"transfer-encoding: chunked\r\n\r\n" + chunk(b"data: {}\n\n"))
            await w.drain()
            await hang.wait()
            return False

        async with FakeServer(respond) as srv:
            app = new_app(stall_s=0.2, probe_timeout_s=0.2)
            app.set_table(replicas(srv.port))
            c = await complete(call(app, body={"model": "demo", "stream": True}))
            assert c.status == 200
            assert c.body.startswith(b"data: {}\n\n")
            event = json.loads(c.body.split(b"\n\n")[1].removeprefix(b"data: "))
            assert "stopped answering" in event["error"]["message"]

    run(main())


def test_a_slow_server_that_answers_its_probe_is_left_alone() -> None:
    async def main() -> None:
        slow = asyncio.Event()

        async def respond(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            if req.path != "/health":
                await slow.wait()  # a long prompt: silent, but the server is there
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
            await w.drain()
            return True

        async with FakeServer(respond) as srv:
            app = new_app(stall_s=0.1, probe_timeout_s=0.5)
            app.set_table(replicas(srv.port))
            task = asyncio.ensure_future(complete(call(app, body={"model": "demo"})))
            await run_until(lambda: sum(r.path == "/health" for r in srv.requests) >= 2)
            slow.set()
            c = await asyncio.wait_for(task, WAIT_S)
            assert (c.status, c.body) == (200, b"slow")
            assert not app.balancer.hung_ids()

    run(main())


def test_one_replica_hung_and_no_other_is_503_with_retry_after() -> None:
    async def main() -> None:
        async with FakeServer(silent(asyncio.Event())) as hung:  # type: ignore[arg-type]
            app = new_app(stall_s=0.1, probe_timeout_s=0.1)
            app.set_table(replicas(hung.port))
            first = await complete(call(app, body=CHAT_BODY))
            assert_openai_error(first, 503, "model_not_ready")  # after the stall and probe
            again = await complete(call(app, body=CHAT_BODY))
            assert_openai_error(again, 503, "model_not_ready")
            assert int(again.response_headers[b"retry-after"]) >= 1

    run(main())
