"""The node's `GET /metrics` (meshllm.http.metrics): the bookkeeping alone, then the
Proxy counting requests in-process and answering a scrape (parsed with
prometheus-client's own parser); what other actors count for it (probes, the gossip
endpoint's traffic, a download's progress) and publish. A real node's requests are
scraped in tests/test_node.py; two real nodes' probes and gossip traffic here."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.gossiper import traffic_message
from actors.server_supervisor import ServerSupervisor
from meshllm.http.metrics import (
    LATENCY_BUCKETS,
    BodyTail,
    Histogram,
    Metrics,
    RequestMetrics,
    usage_of,
)
from meshllm.mesh import wire
from meshllm.mesh.health import DeclareDead, FailureDetector, SendProbe, SendProbeRequest
from meshllm.mesh.quic import Traffic
from meshllm.models import download as download_mod
from meshllm.models.download import DownloadError
from meshllm.runtime import messages as m
from meshllm.runtime.config import ModelSpec, NodeConfig
from meshllm.runtime.messages import (
    GossipTraffic,
    LocalServerState,
    MeshView,
    ModelRoute,
    PeerRtts,
    ProbeCounts,
    RouteTable,
    RouteTarget,
)
from meshllm.testing import NodeProcess, scrape_metrics, token_of, wait_for
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


def test_scrape_shows_the_meshs_demand_and_every_llama_server() -> None:
    from meshllm.mesh.wire import Demand, PeerAnnouncement
    from meshllm.runtime.messages import ExtraServer

    metrics = Metrics(lambda: [], process=False)
    me = PeerAnnouncement(node_id="a" * 16, generation=1, demand={"m": Demand(3.0, 5)})
    peer = PeerAnnouncement(node_id="b" * 16, generation=1, demand={"m": Demand(4.0, 9)})
    metrics.node.mesh = MeshView("a" * 16, (peer,), me)
    extra = ExtraServer("x", "loading", 5)
    metrics.node.local = LocalServerState(model="m", state="ready", extras=(extra,))
    s = parse(metrics.render().decode())
    assert value(s, "meshllm_demand_requests_per_minute", model="m") == 7
    assert value(s, "meshllm_server_state", model="x", state="loading") == 1


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


# -- what other actors count for it ----------------------------------------------------------


def test_the_detector_counts_its_probes() -> None:
    d = FailureDetector(0.5, 1.0, 2, rng=random.Random(0))
    d.set_members({"a", "b", "c"})
    (first,) = d.tick(0.0)
    assert isinstance(first, SendProbe)
    d.on_ack(first.nonce, 0.01)
    d.on_ack(first.nonce, 0.02)  # a duplicate ack clears nothing: not counted again
    (second,) = d.tick(0.5)
    assert isinstance(second, SendProbe)
    assert (d.stats.sent, d.stats.answered, d.stats.timed_out) == (2, 1, 0)
    # No ack: the timeout makes the peer suspect and two helpers probe it for us...
    helpers = [a for a in d.tick(1.5) if isinstance(a, SendProbeRequest)]
    assert len(helpers) == 2
    assert (d.stats.timed_out, d.stats.indirect_sent) == (1, 2)
    # ...and with no ack through them either, it is declared dead.
    assert DeclareDead(second.node_id) in d.tick(2.6)
    assert d.stats.declared_dead == 1
    assert d.stats.answered == 1


def test_the_endpoint_counts_frames_and_bytes_by_kind() -> None:
    t = Traffic()
    t.frame_sent(wire.Probe(1), 12)
    t.frame_sent(wire.Probe(2), 12)
    t.frame_received(wire.ProbeAck(1), 10)
    t.frame_received(wire.PeerGone("n", 1, "sig"), 40)
    t.udp_bytes_sent, t.datagrams_sent = 300, 2
    msg = traffic_message(t)
    assert msg.frames_sent == {"probe": 2} and msg.frame_bytes_sent == {"probe": 24}
    assert msg.frames_received == {"probe": 1, "gossip": 1}
    assert msg.frame_bytes_received == {"probe": 10, "gossip": 40}
    assert (msg.udp_bytes_sent, msg.datagrams_sent) == (300, 2)
    # A copy: what was published does not move with the endpoint's counters.
    t.frame_sent(wire.Probe(3), 12)
    assert msg.frames_sent == {"probe": 2}
    assert m.decode(m.encode(msg)) == msg


def test_scrape_shows_probes_gossip_traffic_and_downloads() -> None:
    metrics = Metrics(lambda: [], process=False)
    # Nothing published yet: no families, not zeros that claim a count.
    s = parse(metrics.render().decode())
    assert not any(name.startswith(("meshllm_probes", "meshllm_gossip")) for name, _ in s)
    node = metrics.node
    node.update(ProbeCounts(sent=9, answered=7, timed_out=2, indirect_sent=4, declared_dead=1))
    node.update(
        GossipTraffic(
            frames_sent={"gossip": 3, "probe": 9},
            frames_received={"probe": 8},
            frame_bytes_sent={"gossip": 900, "probe": 180},
            frame_bytes_received={"probe": 160},
            datagrams_sent=12,
            datagrams_received=11,
            udp_bytes_sent=2000,
            udp_bytes_received=1900,
        )
    )
    downloading = LocalServerState("m", state="downloading", downloaded=50, download_total=200)
    node.update(downloading)
    node.update(LocalServerState("u", state="downloading", downloaded=10))  # size unknown
    s = parse(metrics.render().decode())
    assert value(s, "meshllm_probes_sent_total") == 9
    assert value(s, "meshllm_probes_answered_total") == 7
    assert value(s, "meshllm_probes_timed_out_total") == 2
    assert value(s, "meshllm_indirect_probes_sent_total") == 4
    assert value(s, "meshllm_peers_declared_dead_total") == 1
    assert value(s, "meshllm_gossip_frames_total", direction="sent", kind="gossip") == 3
    assert value(s, "meshllm_gossip_frames_total", direction="received", kind="probe") == 8
    assert value(s, "meshllm_gossip_frame_bytes_total", direction="sent", kind="gossip") == 900
    assert value(s, "meshllm_gossip_frame_bytes_total", direction="received", kind="probe") == 160
    assert value(s, "meshllm_gossip_datagrams_total", direction="received") == 11
    assert value(s, "meshllm_gossip_udp_bytes_total", direction="sent") == 2000
    assert value(s, "meshllm_download_bytes", model="m") == 50
    assert value(s, "meshllm_download_size_bytes", model="m") == 200
    assert value(s, "meshllm_download_bytes", model="u") == 10
    assert ("meshllm_download_size_bytes", frozenset({("model", "u")})) not in s
    # Done and loading: the last progress stays (a scrape may have missed the end).
    node.update(LocalServerState("m", state="downloading", downloaded=200, download_total=200))
    node.update(LocalServerState("m", state="loading"))
    s = parse(metrics.render().decode())
    assert value(s, "meshllm_download_bytes", model="m") == 200
    assert value(s, "meshllm_server_state", model="m", state="loading") == 1


def test_the_new_messages_cross_the_bus() -> None:
    for msg in (
        ProbeCounts(1, 2, 3, 4, 5),
        GossipTraffic({"probe": 1}, {"gossip": 2}, {"probe": 12}, {"gossip": 40}, 1, 2, 3, 4),
        LocalServerState("m", state="downloading", downloaded=5, download_total=9),
    ):
        assert m.decode(m.encode(msg)) == msg


class _Published:
    """Stands in for the supervisor's bus: keeps the states it publishes."""

    def __init__(self) -> None:
        self.states: list[LocalServerState] = []
        self.changed = asyncio.Event()

    async def publish(self, topic: str, msg: m.Message) -> None:
        assert topic == "local" and isinstance(msg, LocalServerState)
        self.states.append(msg)
        self.changed.set()

    async def until(self, predicate: Callable[[list[LocalServerState]], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate(self.states):
                self.changed.clear()
                await self.changed.wait()


def test_the_supervisor_publishes_a_downloads_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download's progress callback puts bytes done and total in the published state;
    the download then fails for good, so no llama-server is started."""

    def download(url: str, dest: Path, progress: Callable[[int, int | None], None], **_: object):
        progress(40, 100)
        progress(100, 100)  # the end is always reported, however soon after
        raise DownloadError("the server said no", permanent=True)

    monkeypatch.setattr(download_mod, "download_file", download)
    config = NodeConfig(home=str(tmp_path), run_dir=str(tmp_path), node_id="n")
    spec = ModelSpec("x", url="http://127.0.0.1:1/x.gguf", target=str(tmp_path / "x.gguf"))
    metrics = Metrics(lambda: [], process=False)

    async def scenario() -> None:
        sup = ServerSupervisor(config)
        sup.bus = published = _Published()  # type: ignore[assignment]
        await sup.on_start()
        try:
            await sup.on_topic("wanted", m.ServeModel(spec, "test"))
            await published.until(
                lambda states: (
                    any(s.state == "failed" for s in states)
                    and any(s.downloaded == 100 for s in states)
                )
            )
        finally:
            await sup.on_stop()
        progress = [
            (s.downloaded, s.download_total) for s in published.states if s.state == "downloading"
        ]
        assert (40, 100) in progress and (100, 100) in progress
        assert set(progress) <= {(0, 0), (40, 100), (100, 100)}
        for state in published.states:
            metrics.node.update(state)

    asyncio.run(scenario())
    s = parse(metrics.render().decode())
    assert value(s, "meshllm_download_bytes", model="x") == 100
    assert value(s, "meshllm_download_size_bytes", model="x") == 100


# -- two real nodes ----------------------------------------------------------------------------

LOOPBACK = ("--bind", "127.0.0.1:0")


@pytest.mark.integration
def test_two_real_nodes_show_their_probes_and_gossip_traffic(
    start_node: Callable[..., NodeProcess],
) -> None:
    """Two nodes that run no llama-server (A fronts an external backend that is down,
    B is a lite client): each one's `/metrics` counts the probes it sent and had
    answered, and the gossip and probe frames its endpoint carried."""
    backend = f"http://127.0.0.1:{closed_port()}"
    a = start_node("--backend-url", backend, "--model", "external", *LOOPBACK, name="a")
    b = start_node("--client", "--join", token_of(a), *LOOPBACK, name="b")

    def counted(node: NodeProcess) -> dict[str, float] | None:
        s = scrape_metrics(node.port)
        seen = {
            "probes sent": value(s, "meshllm_probes_sent_total"),
            "probes answered": value(s, "meshllm_probes_answered_total"),
            "gossip bytes sent": value(
                s, "meshllm_gossip_frame_bytes_total", direction="sent", kind="gossip"
            ),
            "gossip bytes received": value(
                s, "meshllm_gossip_frame_bytes_total", direction="received", kind="gossip"
            ),
            "probe frames received": value(
                s, "meshllm_gossip_frames_total", direction="received", kind="probe"
            ),
            "udp bytes sent": value(s, "meshllm_gossip_udp_bytes_total", direction="sent"),
        }
        return seen if all(seen.values()) else None

    for node in (a, b):
        seen = wait_for(partial(counted, node), 30, f"counts in {node.home}'s /metrics")
        assert seen["probes answered"] <= seen["probes sent"]
        s = scrape_metrics(node.port)
        assert value(s, "meshllm_peers_alive") == 1
        assert value(s, "meshllm_peers_declared_dead_total") == 0


def test_label_sets_are_bounded_as_models_and_nodes_come_and_go() -> None:
    from meshllm.http.metrics import MAX_SERIES, OTHER

    r = RequestMetrics()
    for i in range(MAX_SERIES + 50):
        r.answered(f"m{i}", f"n{i}", 200, "", 0.1, 0.05, (1, 1))
        r.failed_attempt(f"m{i}", f"n{i}")
        r.retried(f"m{i}")
    assert len(r.requests) <= MAX_SERIES + 1 and len(r.latency) <= MAX_SERIES + 1
    assert len(r.upstream_failures) <= MAX_SERIES + 1 and len(r.retries) <= MAX_SERIES + 1
    assert r.requests[(OTHER, OTHER, 200, "")] == 50
    assert r.completion_tokens[OTHER] == 50
    r.answered("m0", "n0", 200, "", 0.1)  # a known one is still counted as itself
    assert r.requests[("m0", "n0", 200, "")] == 2
