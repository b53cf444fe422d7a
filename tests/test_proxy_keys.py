"""`--api-key` on the OpenAI front (meshllm.http.proxy.ProxyApp), in-process: who gets in,
what goes on to the servers, and the console in front of a node with keys."""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

import pytest

from meshllm.http.auth import FAILURE_BURST, ApiKey, digest_of, load_keys
from meshllm.http.console import ConsoleApp
from meshllm.http.proxy import ProxyApp
from meshllm.http.upstream import Pool
from meshllm.runtime.messages import ModelRoute, RouteTable, RouteTarget
from tests.test_console import Exchange
from tests.test_proxy_app import (
    CHAT,
    CHAT_BODY,
    WAIT_S,
    Call,
    app_for,
    assert_openai_error,
    call,
    complete,
    new_app,
    preflight,
    run,
    serving,
)
from tests.test_upstream import CHUNKED_HEAD, FakeServer, chunk, ok, wait_eof

KEY = "sk-alice-0123456789"
OTHER = "sk-bob-9876543210"
CAROL = "sk-carol-5555555555"
KEYS = load_keys([f"alice:{KEY}", f"bob:{OTHER}:rpm=1", f"carol:{CAROL}:tpm=30"])
ORIGIN = b"https://app.example.com"


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {key}".encode())]


def test_no_key_or_a_wrong_one_is_401_and_never_forwarded() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            c = await complete(call(app, CHAT, CHAT_BODY))
            assert (
                "Authorization: Bearer" in assert_openai_error(c, 401, "missing_api_key")["message"]
            )
            for headers in (bearer("sk-wrong-000000000"), [(b"x-api-key", b"sk-wrong-00000000")]):
                c = await complete(call(app, CHAT, CHAT_BODY, headers=headers))
                error = assert_openai_error(c, 401, "invalid_api_key")
                assert "sk-wrong" not in error["message"]
            # Every path but the health checks: reads, the model list, unknown paths.
            for method, path in (("GET", "/v1/models"), ("GET", "/props"), ("GET", "/nope")):
                assert (await complete(call(app, path, method=method))).status == 401
            assert not srv.requests

    run(main())


@pytest.mark.parametrize(
    "headers",
    [bearer(KEY), [(b"x-api-key", KEY.encode())], [(b"authorization", b"bearer " + KEY.encode())]],
    ids=["bearer", "x-api-key", "lowercase-scheme"],
)
def test_a_good_key_gets_through_and_no_credential_goes_on(
    headers: list[tuple[bytes, bytes]],
) -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            c = Call(app, "POST", CHAT, [b'{"model": "demo"}'], [(b"host", b"localhost")])
            c.headers += headers
            c = await complete(c)
            assert c.status == 200, c.body
            (req,) = srv.requests
            assert "authorization" not in req.headers and "x-api-key" not in req.headers
            assert (
                await complete(call(app, "/v1/models", method="GET", headers=headers))
            ).status == 200

    run(main())


def test_without_node_keys_the_clients_key_goes_on_to_its_own_server() -> None:
    """llama-server's own `--api-key` (through --llama-arg) keeps working."""

    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port)
            assert (await complete(call(app, CHAT, CHAT_BODY, headers=bearer(KEY)))).status == 200
            assert srv.requests[0].headers["authorization"] == f"Bearer {KEY}"

    run(main())


def test_health_stays_open() -> None:
    async def main() -> None:
        app = app_for(8001, api_keys=KEYS)
        for path in ("/health", "/v1/health"):
            c = await complete(call(app, path, method="GET"))
            assert c.status == 200 and c.json()["status"] == "ok"

    run(main())


def test_a_key_over_its_rpm_gets_429_with_retry_after() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            assert (await complete(call(app, CHAT, CHAT_BODY, headers=bearer(OTHER)))).status == 200
            c = await complete(call(app, CHAT, CHAT_BODY, headers=bearer(OTHER)))
            assert "'bob'" in assert_openai_error(c, 429, "rate_limit_exceeded")["message"]
            assert c.response_headers[b"retry-after"] == b"60"
            assert len(srv.requests) == 1
            # alice has no limit of her own
            for _ in range(3):
                assert (
                    await complete(call(app, CHAT, CHAT_BODY, headers=bearer(KEY)))
                ).status == 200

    run(main())


def test_a_key_over_its_tokens_per_minute_gets_429_once_its_answers_used_them() -> None:
    answer = b'{"choices":[],"usage":{"prompt_tokens":18,"completion_tokens":3,"total_tokens":21}}'

    async def main() -> None:
        async with FakeServer(ok(answer)) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            for _ in range(2):  # 30 a minute: 21 used, 9 left; then 12 in debt
                c = await complete(call(app, CHAT, CHAT_BODY, headers=bearer(CAROL)))
                assert (c.status, c.body) == (200, answer)
            c = await complete(call(app, CHAT, CHAT_BODY, headers=bearer(CAROL)))
            assert (
                "30 tokens per minute"
                in assert_openai_error(c, 429, "rate_limit_exceeded")["message"]
            )
            assert c.response_headers[b"retry-after"] == b"26"  # 13 tokens at 0.5 a second
            assert len(srv.requests) == 2

    run(main())


def test_concurrent_requests_cannot_overdraw_a_keys_tokens_per_minute() -> None:
    """Each request reserves what it may cost as it is let on: carol's 30 tokens a
    minute pay for one request without `max_tokens` at a time, not ten."""
    answer = b'{"choices":[],"usage":{"prompt_tokens":18,"completion_tokens":3,"total_tokens":21}}'

    async def main() -> None:
        async with FakeServer(ok(answer)) as srv:
            app = app_for(srv.port, api_keys=KEYS)  # carol: tpm=30
            calls = [complete(call(app, CHAT, CHAT_BODY, headers=bearer(CAROL))) for _ in range(10)]
            done = await asyncio.gather(*calls)
            served = sum(c.status == 200 for c in done)
            assert served <= 2, f"{served} requests of 21 tokens served on tpm=30"
            assert all(c.status in (200, 429) for c in done)
            # Settled with what was used: 21 of 30, so one more goes on.
            c = await complete(call(app, CHAT, CHAT_BODY, headers=bearer(CAROL)))
            assert c.status == 200, c.body

    run(main())


def test_a_small_max_tokens_reserves_less() -> None:
    """Once the body is read its reservation is its own estimate: a request with a
    small `max_tokens` and prompt leaves room for another at once."""
    answer = b'{"choices":[],"usage":{"total_tokens":9}}'
    body = {**CHAT_BODY, "max_tokens": 1}  # about 1 + 20 tokens: 9 of 30 left

    async def main() -> None:
        async with FakeServer(ok(answer)) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            calls = [complete(call(app, CHAT, body, headers=bearer(CAROL))) for _ in range(4)]
            done = await asyncio.gather(*calls)
            assert [c.status for c in done].count(200) == 2, [c.status for c in done]

    run(main())


def test_a_stream_its_client_leaves_before_the_end_still_costs_tokens() -> None:
    events = 40  # one token each; carol may use 30 a minute

    async def respond(req: object, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD + b"".join(chunk(b'data: {"choices":[]}\n\n') for _ in range(events)))
        await w.drain()
        await wait_eof(r)
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            c = call(app, CHAT, {**CHAT_BODY, "stream": True}, headers=bearer(CAROL))
            task = asyncio.ensure_future(c())
            assert (await c.next_message())["type"] == "http.response.start"
            got = b""
            while got.count(b"data: ") < events:
                got += (await c.next_message())["body"]
            c.disconnect.set()  # leave before the stream's end
            await asyncio.wait_for(task, WAIT_S)
            again = await complete(call(app, CHAT, CHAT_BODY, headers=bearer(CAROL)))
            error = assert_openai_error(again, 429, "rate_limit_exceeded")
            assert "30 tokens per minute" in error["message"]
            # 40 streamed of 30: 10 in debt, then one token more at 0.5 a second.
            assert again.response_headers[b"retry-after"] == b"22"

    run(main())


def test_a_client_that_leaves_before_any_answer_costs_its_reservation() -> None:
    """The server may be working on its prompt: leaving early refunds nothing (carol's
    request without `max_tokens` reserved her whole minute, 30)."""
    got_request = asyncio.Event()

    async def respond(req: object, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        got_request.set()
        await wait_eof(r)  # answers nothing
        return False

    async def main() -> None:
        async with FakeServer(respond) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            c = call(app, CHAT, CHAT_BODY, headers=bearer(CAROL))
            task = asyncio.ensure_future(c())
            await asyncio.wait_for(got_request.wait(), WAIT_S)
            c.disconnect.set()
            await asyncio.wait_for(task, WAIT_S)
            again = await complete(call(app, CHAT, CHAT_BODY, headers=bearer(CAROL)))
            assert_openai_error(again, 429, "rate_limit_exceeded")
            assert again.response_headers[b"retry-after"] == b"2"  # one token at 0.5 a second

    run(main())


class _FromAddress:
    """The app, as a client at another address reaches it."""

    def __init__(self, app: ProxyApp, host: str) -> None:
        self.app, self.host = app, host

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app({**scope, "client": (self.host, 50001)}, receive, send)


def test_an_address_sending_wrong_keys_gets_429_after_a_burst() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            for _ in range(FAILURE_BURST):
                c = await complete(call(app, CHAT, CHAT_BODY, headers=bearer("sk-guess-0000000")))
                assert_openai_error(c, 401, "invalid_api_key")
            for key in ("sk-guess-0000000", KEY):
                c = await complete(call(app, CHAT, CHAT_BODY, headers=bearer(key)))
                assert (
                    "wrong API keys"
                    in assert_openai_error(c, 429, "rate_limit_exceeded")["message"]
                )
                assert c.response_headers[b"retry-after"] == b"3"  # 20 a minute
            assert not srv.requests
            # Another address is not held up by this one's guesses.
            elsewhere = cast(ProxyApp, _FromAddress(app, "127.0.0.2"))
            assert (
                await complete(call(elsewhere, CHAT, CHAT_BODY, headers=bearer(KEY)))
            ).status == 200

    run(main())


def test_a_browser_preflight_needs_no_key_and_a_401_carries_cors_headers() -> None:
    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, api_keys=KEYS, cors_origins=[ORIGIN.decode()])
            c = await complete(preflight(app, ORIGIN, b"content-type, authorization"))
            assert c.status == 204
            page = [(b"origin", ORIGIN), (b"sec-fetch-site", b"cross-site")]
            c = await complete(call(app, CHAT, CHAT_BODY, headers=page))
            assert_openai_error(c, 401, "missing_api_key")
            assert c.response_headers[b"access-control-allow-origin"] == ORIGIN
            c = await complete(call(app, CHAT, CHAT_BODY, headers=[*page, *bearer(KEY)]))
            assert c.status == 200
            assert not any(k == "authorization" for k in srv.requests[0].headers)

    run(main())


def test_a_remote_target_is_sent_no_credential() -> None:
    """A request that leaves for another node is authorised here, where it entered the
    mesh: the other node's tunnel host asks for no key, and is given none."""

    async def main() -> None:
        async with FakeServer(ok()) as srv:
            tunnel = Pool("127.0.0.1", srv.port)  # stands for the tunnel to node n2
            app = new_app(api_keys=KEYS, remote=lambda target: tunnel)
            remote = RouteTarget("n2", False, 1)
            app.set_table(RouteTable((ModelRoute("demo", (remote,), ("n2",)),)))
            headers = [*bearer(KEY), (b"x-api-key", KEY.encode())]
            try:
                c = await complete(call(app, CHAT, CHAT_BODY, headers=headers))
            finally:
                tunnel.close()
            assert c.status == 200
            (req,) = srv.requests
            assert "authorization" not in req.headers and "x-api-key" not in req.headers

    run(main())


# -- the console in front of a node with keys ------------------------------------------


def test_the_console_calls_a_keyed_api_with_its_own_key() -> None:
    console_key = "console-key-0123456789"
    keys = (*KEYS, ApiKey("console", digest_of(console_key)))

    async def main() -> None:
        async with FakeServer(ok()) as srv:
            api = app_for(srv.port, api_keys=keys)
            async with serving(api) as port:
                mine = lambda _peer, _local: os.getuid()  # noqa: E731 (the page is ours)
                page = ConsoleApp("127.0.0.1", port, api_key=console_key, peer_uid=mine)
                bare = ConsoleApp("127.0.0.1", port)
                theirs = ConsoleApp(
                    "127.0.0.1", port, api_key=console_key, peer_uid=lambda _p, _l: 65534
                )
                try:
                    chat = Exchange(page, "POST", CHAT, b'{"model": "demo"}')
                    assert (await chat.start())[0] == 200
                    await chat.rest()
                    # The console's key stops at the node: the server got none.
                    assert "authorization" not in srv.requests[0].headers
                    refused = Exchange(bare, "POST", CHAT, b'{"model": "demo"}')
                    assert (await refused.start())[0] == 401
                    await refused.rest()
                    # Another local user's page gets no key from the console.
                    other = Exchange(theirs, "POST", CHAT, b'{"model": "demo"}')
                    assert (await other.start())[0] == 401
                    await other.rest()
                    # The live charts read the keyed /metrics with the console's key.
                    charts = Exchange(page, "GET", "/api/metrics")
                    assert (await charts.start())[0] == 200
                    await charts.rest()
                    # A key the page sends itself is used instead (and is checked).
                    own = Exchange(page, "POST", CHAT, b"{}", headers=bearer("sk-wrong-000000000"))
                    assert (await own.start())[0] == 401
                    await own.rest()
                finally:
                    for console in (page, bare, theirs):
                        console.close_upstream()

    run(main())


def test_requests_are_counted_by_the_name_of_their_key() -> None:
    from tests.test_metrics import parse

    async def main() -> None:
        async with FakeServer(ok()) as srv:
            app = app_for(srv.port, api_keys=KEYS)
            for _ in range(2):
                assert (
                    await complete(call(app, CHAT, CHAT_BODY, headers=bearer(KEY)))
                ).status == 200
            scrape = await complete(call(app, "/metrics", method="GET", headers=bearer(KEY)))
            samples = parse(scrape.body.decode())
            counted = {
                dict(labels)["key"]: value
                for (name, labels), value in samples.items()
                if name == "meshllm_requests_total"
            }
            assert counted == {"alice": 2.0}  # the name, never the key itself

    run(main())
