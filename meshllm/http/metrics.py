"""The node's `GET /metrics`: Prometheus text made with prometheus-client.

The Proxy counts on its hot path in plain dicts and lists (`RequestMetrics`: a
dict update and a `bisect` per request, no lock, no label lookup), and
prometheus-client turns them into metric families only when `/metrics` is
scraped (`MetricsCollector`). What other actors know (peers alive, probes, the
gossip endpoint's traffic, the local llama-server's restarts and download) arrives as
the bus messages the Proxy subscribes to (`NodeMetrics`), each published at most every
few seconds, never per request. Label values are route names and node ids, never a client's
text: an unknown model is not counted under its own name.

Tokens come from llama-server's `usage` (`usage_of`), else its `timings`: a JSON
body's, or a stream's last data event that carries one, read from at most
`TAIL_BYTES` of the body's end once the response is over.
"""

from __future__ import annotations

import collections
import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from meshllm.placement.demand import mesh_rpm
from meshllm.runtime.messages import (
    GossipTraffic,
    LocalServerState,
    MeshView,
    PeerRtts,
    ProbeCounts,
)

__all__ = ["CONTENT_TYPE_LATEST"]

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
"""Seconds: upper bounds of the latency and time-to-first-byte buckets (+Inf last)."""

TAIL_BYTES = 1 << 20
"""At most this much of a response's end is kept for its `usage` (a JSON body longer
than this is not read for tokens)."""
USAGE_EVENTS = 4
"""A stream's last events (that mention `usage`) looked at, newest first."""


class Histogram:
    """Bucket counts (not cumulative; the last is +Inf) and the sum of observations."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for bound, count in zip((*LATENCY_BUCKETS, math.inf), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == math.inf else repr(bound), float(total)))
        return out


MAX_SERIES = 4096
"""Label sets one metric keeps. Models and nodes come and go over a node's life (and a
member can make up both): past this, a new one is counted under `OTHER`."""
OTHER = "_other"


def _bounded(table: dict[Any, Any], key: Any, other: Any) -> Any:
    """`key` while `table` has room for it (or has it), else `other`."""
    return key if key in table or len(table) < MAX_SERIES else other


class RequestMetrics:
    """What the Proxy counts per model request (sans-I/O: plain numbers), at most
    `MAX_SERIES` label sets per metric."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int, str], int] = {}
        """(model, node, status, key name) -> requests answered. Node "": answered by the
        Proxy itself (429, or 502/503 when no server answered)."""
        self.latency: dict[str, Histogram] = {}
        self.first_byte: dict[str, Histogram] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens: dict[str, int] = {}
        self.upstream_failures: dict[tuple[str, str], int] = {}
        """(model, node) -> attempts that failed before a byte went to the client."""
        self.retries: dict[str, int] = {}
        """Model -> attempts on another target after one failed (failovers)."""

    def answered(
        self,
        model: str,
        node: str,
        status: int,
        key: str,
        seconds: float,
        first_byte_s: float | None = None,
        usage: tuple[int, int] | None = None,
    ) -> None:
        """A request ended: `seconds` since it arrived (its wait for admission
        included), `first_byte_s` until the first body byte went to the client."""
        k = _bounded(self.requests, (model, node, status, key), (OTHER, OTHER, status, key))
        self.requests[k] = self.requests.get(k, 0) + 1
        model = _bounded(self.latency, model, OTHER)
        hist = self.latency.get(model)
        if hist is None:
            hist = self.latency[model] = Histogram()
        hist.observe(seconds)
        if first_byte_s is not None:
            hist = self.first_byte.get(model)
            if hist is None:
                hist = self.first_byte[model] = Histogram()
            hist.observe(first_byte_s)
        if usage is not None:
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + usage[0]
            self.completion_tokens[model] = self.completion_tokens.get(model, 0) + usage[1]

    def refused(self, model: str, status: int, key: str) -> None:
        """Answered by the Proxy without a server's answer (no latency observed)."""
        k = _bounded(self.requests, (model, "", status, key), (OTHER, "", status, key))
        self.requests[k] = self.requests.get(k, 0) + 1

    def failed_attempt(self, model: str, node: str) -> None:
        k = _bounded(self.upstream_failures, (model, node), (OTHER, OTHER))
        self.upstream_failures[k] = self.upstream_failures.get(k, 0) + 1

    def retried(self, model: str) -> None:
        model = _bounded(self.retries, model, OTHER)
        self.retries[model] = self.retries.get(model, 0) + 1


NodeMessage = MeshView | LocalServerState | PeerRtts | ProbeCounts | GossipTraffic
"""What other actors publish that `/metrics` shows."""


class NodeMetrics:
    """What other actors published that `/metrics` shows (the last message of each)."""

    def __init__(self) -> None:
        self.mesh: MeshView | None = None
        self.local: LocalServerState | None = None
        self.rtts: PeerRtts | None = None
        self.probes: ProbeCounts | None = None
        self.traffic: GossipTraffic | None = None
        self.downloads: dict[str, tuple[int, int]] = {}
        """Model -> (bytes done, total or 0) of its download's last progress: kept once
        the download ended, so a scrape that missed the end still sees where it got."""

    def update(self, msg: NodeMessage) -> None:
        match msg:
            case MeshView():
                self.mesh = msg
            case LocalServerState():
                self.local = msg
                if msg.state == "downloading" and (msg.downloaded or msg.download_total):
                    self.downloads[msg.model] = (msg.downloaded, msg.download_total)
            case PeerRtts():
                self.rtts = msg
            case ProbeCounts():
                self.probes = msg
            case GossipTraffic():
                self.traffic = msg


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    input_tokens: int = 0
    """Anthropic's names (`/v1/messages`)."""
    output_tokens: int = 0


class _Timings(msgspec.Struct):
    """llama-server's own counts, in a stream's last event even when the client did not
    ask for `usage` (`stream_options.include_usage`)."""

    prompt_n: int = 0
    predicted_n: int = 0


class _WithUsage(msgspec.Struct):
    usage: _Usage | None = None
    timings: _Timings | None = None


_usage = msgspec.json.Decoder(_WithUsage)


class BodyTail:
    """The last chunks of a response body: those of its last `limit` bytes, and the
    one that goes over it (kept as they are, not copied)."""

    __slots__ = ("chunks", "limit", "size", "truncated")

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.limit = limit
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.size > self.limit and len(self.chunks) > 1:
            self.size -= len(self.chunks.popleft())
            self.truncated = True

    def usage(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens the body reports, if it does."""
        if not self.chunks:
            return None
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        return usage_of(data, whole=not self.truncated)


def usage_of(data: bytes, whole: bool = True) -> tuple[int, int] | None:
    """The (prompt, completion) tokens of a response body's `usage` (else llama-server's
    `timings`): a JSON object's (when `whole`: the body is complete), else the last
    data event of a stream that carries one (among its last `USAGE_EVENTS` that
    mention it). None: none found."""
    if whole and data[:1] == b"{":
        try:
            return _tokens(_usage.decode(data))
        except (msgspec.DecodeError, RecursionError):
            return None
    return _event_tokens(data, b'"usage"') or _event_tokens(data, b'"timings"')


def _event_tokens(data: bytes, key: bytes) -> tuple[int, int] | None:
    end = len(data)
    for _ in range(USAGE_EVENTS):
        at = data.rfind(key, 0, end)
        if at < 0:
            return None
        start = data.rfind(b"data:", 0, at)
        if start < 0:
            return None
        stop = data.find(b"\n", at)
        try:
            found = _tokens(_usage.decode(data[start + 5 : stop if stop >= 0 else len(data)]))
        except (msgspec.DecodeError, RecursionError):
            found = None
        if found is not None:
            return found
        end = start
    return None


def _tokens(body: _WithUsage) -> tuple[int, int] | None:
    usage, timings = body.usage, body.timings
    if usage is not None:
        return (
            usage.prompt_tokens or usage.input_tokens,
            usage.completion_tokens or usage.output_tokens,
        )
    if timings is not None:
        return timings.prompt_n, timings.predicted_n
    return None


class MetricsCollector(Collector):
    """Turns the bookkeeping into metric families when `/metrics` is scraped.

    `gauges` is called then for (model, in flight, queued) of each model, from the
    Proxy's admission."""

    def __init__(
        self,
        requests: RequestMetrics,
        node: NodeMetrics,
        gauges: Callable[[], Iterable[tuple[str, int, int]]],
    ) -> None:
        self.requests = requests
        self.node = node
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        r = self.requests
        c = CounterMetricFamily(
            "meshllm_requests",
            "Model requests answered, by model, target node (empty: answered by the node "
            "itself), HTTP status and API key name",
            labels=["model", "node", "status", "key"],
        )
        for (model, node, status, key), n in r.requests.items():
            c.add_metric([model, node, str(status), key], n)
        yield c
        for name, doc, hists in (
            (
                "meshllm_request_duration_seconds",
                "Time from a model request's arrival (admission wait included) to its end",
                r.latency,
            ),
            (
                "meshllm_time_to_first_byte_seconds",
                "Time from a model request's arrival to its first body byte sent to the "
                "client (for a stream, the first token's event)",
                r.first_byte,
            ),
        ):
            h = HistogramMetricFamily(name, doc, labels=["model"])
            for model, hist in hists.items():
                h.add_metric([model], hist.cumulative(), hist.sum)
            yield h
        for name, doc, counts in (
            ("meshllm_prompt_tokens", "Prompt tokens, from llama-server's usage", r.prompt_tokens),
            (
                "meshllm_completion_tokens",
                "Completion tokens, from llama-server's usage",
                r.completion_tokens,
            ),
            ("meshllm_retries", "Attempts on another server after one failed", r.retries),
        ):
            c = CounterMetricFamily(name, doc, labels=["model"])
            for model, n in counts.items():
                c.add_metric([model], n)
            yield c
        c = CounterMetricFamily(
            "meshllm_upstream_failures",
            "Attempts on a server that failed before any byte went to the client",
            labels=["model", "node"],
        )
        for (model, node), n in r.upstream_failures.items():
            c.add_metric([model, node], n)
        yield c
        in_flight = GaugeMetricFamily(
            "meshllm_in_flight", "Model requests admitted and not yet done", labels=["model"]
        )
        queued = GaugeMetricFamily(
            "meshllm_queued", "Model requests waiting for admission", labels=["model"]
        )
        for model, flying, waiting in self.gauges():
            in_flight.add_metric([model], flying)
            queued.add_metric([model], waiting)
        yield in_flight
        yield queued
        yield from self._node()

    def _node(self) -> Iterator[Metric]:
        mesh, local = self.node.mesh, self.node.local
        if mesh is not None:
            peers = GaugeMetricFamily(
                "meshllm_peers_alive", "Other nodes this node's gossip counts as alive"
            )
            peers.add_metric([], len(mesh.peers))
            yield peers
            demand = GaugeMetricFamily(
                "meshllm_demand_requests_per_minute",
                "Requests per model in the last minute, as every node announced them "
                "(what usage-aware placement follows)",
                labels=["model"],
            )
            announced = [*mesh.peers, *([mesh.me] if mesh.me is not None else [])]
            rates = sorted(mesh_rpm(announced).items(), key=lambda item: -item[1])
            for model, rate in rates[: MAX_SERIES - 1]:
                demand.add_metric([model], rate)
            if rest := rates[MAX_SERIES - 1 :]:  # names members make up are bounded too
                demand.add_metric([OTHER], sum(rate for _, rate in rest))
            yield demand
        if self.node.rtts is not None:
            rtt = GaugeMetricFamily(
                "meshllm_peer_rtt_seconds",
                "Round-trip time of the health probes to each peer (smoothed)",
                labels=["peer"],
            )
            for peer, ms in self.node.rtts.rtt_ms.items():
                rtt.add_metric([peer], ms / 1000)
            yield rtt
        if local is not None:
            restarts = CounterMetricFamily(
                "meshllm_server_restarts",
                "Restarts of this node's llama-server (since the node started)",
            )
            restarts.add_metric([], local.restarts)
            yield restarts
            state = GaugeMetricFamily(
                "meshllm_server_state",
                "1 for the state of this node's llama-server (stopped, downloading, "
                "starting, ready, failed...) and the model it is for",
                labels=["model", "state"],
            )
            state.add_metric([local.model, local.state], 1)
            for extra in local.extras:  # `--models-dir`: its other llama-servers
                state.add_metric([extra.model, extra.state], 1)
            yield state
        yield from self._probes()
        yield from self._traffic()
        yield from self._downloads()

    def _probes(self) -> Iterator[Metric]:
        probes = self.node.probes
        if probes is None:
            return
        for name, doc, n in (
            ("meshllm_probes_sent", "Direct health probes sent to peers", probes.sent),
            (
                "meshllm_probes_answered",
                "Health probes acknowledged, directly or through a helper",
                probes.answered,
            ),
            (
                "meshllm_probes_timed_out",
                "Direct health probes not acknowledged in time (the peer became suspect)",
                probes.timed_out,
            ),
            (
                "meshllm_indirect_probes_sent",
                "Requests to another peer to probe a suspect for this node",
                probes.indirect_sent,
            ),
            (
                "meshllm_peers_declared_dead",
                "Peers this node's failure detection declared dead",
                probes.declared_dead,
            ),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], n)
            yield c

    def _traffic(self) -> Iterator[Metric]:
        t = self.node.traffic
        if t is None:
            return
        frames = CounterMetricFamily(
            "meshllm_gossip_frames",
            "Frames on the gossip endpoint's links, by direction and kind (gossip, probe, other)",
            labels=["direction", "kind"],
        )
        frame_bytes = CounterMetricFamily(
            "meshllm_gossip_frame_bytes",
            "Bytes of those frames (length header included, QUIC overhead not)",
            labels=["direction", "kind"],
        )
        for family, sent, received in (
            (frames, t.frames_sent, t.frames_received),
            (frame_bytes, t.frame_bytes_sent, t.frame_bytes_received),
        ):
            for direction, counts in (("sent", sent), ("received", received)):
                for kind, n in sorted(counts.items()):
                    family.add_metric([direction, kind], n)
            yield family
        datagrams = CounterMetricFamily(
            "meshllm_gossip_datagrams",
            "UDP datagrams of the gossip endpoint, by direction",
            labels=["direction"],
        )
        datagrams.add_metric(["sent"], t.datagrams_sent)
        datagrams.add_metric(["received"], t.datagrams_received)
        yield datagrams
        udp = CounterMetricFamily(
            "meshllm_gossip_udp_bytes",
            "Bytes of those datagrams (QUIC headers, retransmissions and acks included; "
            "IP and UDP headers not)",
            labels=["direction"],
        )
        udp.add_metric(["sent"], t.udp_bytes_sent)
        udp.add_metric(["received"], t.udp_bytes_received)
        yield udp

    def _downloads(self) -> Iterator[Metric]:
        if not self.node.downloads:
            return
        done = GaugeMetricFamily(
            "meshllm_download_bytes",
            "Bytes of a model file this node downloaded so far (its download's last progress)",
            labels=["model"],
        )
        size = GaugeMetricFamily(
            "meshllm_download_size_bytes",
            "Size of a model file this node downloads, when the server said it",
            labels=["model"],
        )
        for model, (n, total) in self.node.downloads.items():
            done.add_metric([model], n)
            if total:
                size.add_metric([model], total)
        yield done
        yield size


class Metrics:
    """A node's metrics: the bookkeeping, and its exposition in Prometheus text."""

    def __init__(
        self, gauges: Callable[[], Iterable[tuple[str, int, int]]], process: bool = True
    ) -> None:
        self.requests = RequestMetrics()
        self.node = NodeMetrics()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(self.requests, self.node, gauges))
        if process:
            # CPU seconds, memory and open files of the Proxy's process.
            ProcessCollector(namespace="meshllm_proxy", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
