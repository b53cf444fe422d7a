"""The node's `GET /metrics` (meshllm.http.metrics): the bookkeeping alone, then the
Proxy counting requests in-process and answering a scrape (parsed with
prometheus-client's own parser). A real node's is scraped in tests/test_node.py."""

from __future__ import annotations

import asyncio
import json

from prometheus_client.parser import text_string_to_metric_families

from meshllm.http.metrics import (
    LATENCY_BUCKETS,
    BodyTail,
    Histogram,
    Metrics,
    RequestMetrics,
    usage_of,
)
from meshllm.runtime.messages import (
    LocalServerState,
    MeshView,
    ModelRoute,
    PeerRtts,
    RouteTable,
    RouteTarget,
)
from tests.test_proxy_app import (
    CHAT,
    CHAT_BODY,
    app_for,
    call,
    complete,
    new_app,
    replicas,
    run,
)
from tests.test_upstream import CHUNKED_HEAD, FakeServer, Request, chunk, closed_port, ok

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


USAGE = b'"usage":{"completion_tokens":7,"prompt_tokens":11,"total_tokens":18}'


# -- bookkeeping ---------------------------------------------------------------------------


def test_usage_of_a_json_body_and_of_a_stream() -> None:
    assert usage_of(b'{"id":"x","choices":[],' + USAGE + b',"timings":{}}') == (11, 7)
    assert usage_of(b'{"id":"x"}') is None
    assert usage_of(b"[1, 2]") is None  # not an object: no usage, no error
    assert usage_of(b'{"usage": "many"}') is None
    assert usage_of(b"") is None
    anthropic = b'{"usage":{"input_tokens":3,"output_tokens":4}}'
    assert usage_of(anthropic) == (3, 4)
    # A stream: the last data event that carries usage (a later null one is skipped).
    stream = (
        b'data: {"choices":[{"delta":{"content":"\\"usage\\""}}]}\n\n'
        b'data: {"choices":[],' + USAGE + b"}\n\n"
        b'data: {"choices":[],"usage":null}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage_of(stream, whole=False) == (11, 7)
    assert usage_of(b'data: {"choices":[]}\n\ndata: [DONE]\n\n', whole=False) is None
    assert usage_of(b'event: message_delta\ndata: {"usage":{"output_tokens":9}}\n\n') == (0, 9)
    # No usage asked for: llama-server's timings in the stream's last event.
    timings = b'data: {"choices":[],"timings":{"prompt_n":5,"predicted_n":6}}\n\n'
    assert usage_of(timings + b"data: [DONE]\n\n", whole=False) == (5, 6)
    assert usage_of(stream.replace(b"data: [DONE]", timings), whole=False) == (11, 7)
    # A body cut at its front is not read as JSON, only as events.
    assert usage_of(b'{"id":"x",' + USAGE + b"}", whole=False) is None


def test_body_tail_keeps_only_the_end() -> None:
    tail = BodyTail(limit=64)
    tail.add(b"data: " + b"x" * 100 + b"\n\n")
    tail.add(b'data: {"choices":[],' + USAGE + b"}\n\n")
    assert tail.truncated and len(tail.chunks) == 1
    assert tail.usage() == (11, 7)
    whole = BodyTail()
    whole.add(b'{"a":1,')
    whole.add(USAGE + b"}")
    assert whole.usage() == (11, 7)
    assert BodyTail().usage() is None


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    h = Histogram()
    for v in (0.001, LATENCY_BUCKETS[0], 0.02, 1e6):
        h.observe(v)
    cumulative = dict(h.cumulative())
    assert cumulative[repr(LATENCY_BUCKETS[0])] == 2  # le: less than or equal
    assert cumulative["0.025"] == 3
    assert cumulative["+Inf"] == 4
    assert h.sum == 0.001 + LATENCY_BUCKETS[0] + 0.02 + 1e6


def test_scrape_shows_the_bookkeeping() -> None:
    metrics = Metrics(lambda: [("m", 2, 1)], process=False)
    r: RequestMetrics = metrics.requests
    r.answered("m", "n1", 200, "", 0.5, 0.1, (11, 7))
    r.answered("m", "n1", 200, "", 0.2, None, None)
    r.refused("m", 429, "")
    r.failed_attempt("m", "n2")
    r.retried("m")
    metrics.node.mesh = MeshView("me")
    metrics.node.local = LocalServerState(model="m", state="ready", restarts=3)
    metrics.node.rtts = PeerRtts({"peer1": 2.5})
    s = parse(metrics.render().decode())
    assert value(s, "meshllm_requests_total", model="m", node="n1", status="200", key="") == 2
    assert value(s, "meshllm_requests_total", model="m", node="", status="429", key="") == 1
    assert value(s, "meshllm_request_duration_seconds_count", model="m") == 2
    assert value(s, "meshllm_request_duration_seconds_sum", model="m") == 0.7
    assert value(s, "meshllm_request_duration_seconds_bucket", model="m", le="0.25") == 1
    assert value(s, "meshllm_time_to_first_byte_seconds_count", model="m") == 1
    assert value(s, "meshllm_prompt_tokens_total", model="m") == 11
    assert value(s, "meshllm_completion_tokens_total", model="m") == 7
    assert value(s, "meshllm_upstream_failures_total", model="m", node="n2") == 1
    assert value(s, "meshllm_retries_total", model="m") == 1
    assert value(s, "meshllm_in_flight", model="m") == 2
    assert value(s, "meshllm_queued", model="m") == 1
    assert value(s, "meshllm_peers_alive") == 0
    assert value(s, "meshllm_server_restarts_total") == 3
    assert value(s, "meshllm_peer_rtt_seconds", peer="peer1") == 0.0025
    assert value(s, "meshllm_server_state", model="m", state="ready") == 1


# -- the Proxy counting ----------------------------------------------------------------------


async def scraped(app: object) -> Samples:
    from meshllm.http.proxy import ProxyApp

    assert isinstance(app, ProxyApp)
    c = await complete(call(app, "/metrics", method="GET"))
    assert c.status == 200
    assert c.response_headers[b"content-type"].startswith(b"text/plain; version=")
    return parse(c.body.decode())


def test_proxy_counts_requests_tokens_and_latency() -> None:
    json_body = b'{"id":"x","choices":[],' + USAGE + b"}"

    async def streamed(req: Request, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(CHUNKED_HEAD + chunk(b'data: {"choices":[]}\n\n'))
        w.write(chunk(b'data: {"choices":[],' + USAGE + b"}\n\n") + chunk(b"data: [DONE]\n\n"))
        w.write(b"0\r\n\r\n")
        await w.drain()
        return True

    async def main() -> None:
        async with FakeServer(ok(json_body)) as plain, FakeServer(streamed) as stream:
            app = app_for(plain.port)
            for _ in range(2):
                assert (await complete(call(app, CHAT, CHAT_BODY))).status == 200
            app.set_table(
                RouteTable((ModelRoute("demo", (RouteTarget("n2", True, stream.port),), ("n2",)),))
            )
            c = await complete(call(app, CHAT, {**CHAT_BODY, "stream": True}))
            assert c.status == 200 and b"[DONE]" in c.body
            s = await scraped(app)
        labels = {"model": "demo", "key": "", "status": "200"}
        assert value(s, "meshllm_requests_total", node="n1", **labels) == 2
        assert value(s, "meshllm_requests_total", node="n2", **labels) == 1
        assert value(s, "meshllm_prompt_tokens_total", model="demo") == 33
        assert value(s, "meshllm_completion_tokens_total", model="demo") == 21
        assert value(s, "meshllm_request_duration_seconds_count", model="demo") == 3
        assert value(s, "meshllm_time_to_first_byte_seconds_count", model="demo") == 3
        assert value(s, "meshllm_in_flight", model="demo") == 0
        assert value(s, "meshllm_queued", model="demo") == 0
        # the scrape itself is not a model request, and went to no server
        assert sum(v for (n, _), v in s.items() if n == "meshllm_requests_total") == 3
        assert (len(plain.requests), len(stream.requests)) == (2, 1)

    run(main())


def test_proxy_counts_failovers_and_its_own_errors() -> None:
    async def main() -> None:
        app = new_app()
        app.set_table(replicas(closed_port(), closed_port()))
        # both tried (one retry), both refused: the node answers 503 itself
        assert (await complete(call(app, CHAT, CHAT_BODY))).status == 503
        s = await scraped(app)
        assert value(s, "meshllm_upstream_failures_total", model="demo", node="r0") == 1
        assert value(s, "meshllm_upstream_failures_total", model="demo", node="r1") == 1
        assert value(s, "meshllm_retries_total", model="demo") == 1
        own = {"model": "demo", "node": "", "status": "503", "key": ""}
        assert value(s, "meshllm_requests_total", **own) == 1
        assert value(s, "meshllm_request_duration_seconds_count", model="demo") == 0

    run(main())


def test_metrics_with_a_model_is_that_llama_servers() -> None:
    async def main() -> None:
        async with FakeServer(ok(b"llamacpp:requests_processing 0\n")) as srv:
            app = app_for(srv.port)
            c = await complete(call(app, "/metrics?model=demo", method="GET"))
            assert (c.status, c.body) == (200, b"llamacpp:requests_processing 0\n")
            (req,) = srv.requests
            assert req.path == "/metrics?model=demo"
            # without a model: the node's own, and llama-server sees nothing
            s = await scraped(app)
            assert ("meshllm_in_flight", frozenset({("model", "demo")})) in s
            assert len(srv.requests) == 1
            app.metrics.node.local = LocalServerState(model="demo", state="ready")
            assert value(await scraped(app), "meshllm_server_state", model="demo", state="ready")

    run(main())


def test_unknown_models_are_not_label_values() -> None:
    async def main() -> None:
        app = app_for(closed_port(), strict_models=True)
        body = json.dumps({**CHAT_BODY, "model": "x" * 100}).encode()
        assert (await complete(call(app, CHAT, body))).status == 404
        s = await scraped(app)
        assert not any("x" * 100 in v for _, labels in s for _, v in labels)

    run(main())
