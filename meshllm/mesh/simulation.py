"""An in-process, deterministic simulation of a mesh built from the real cores.

Each simulated node is the very `GossipCore` that `actors/gossiper.py` runs
and the `FailureDetector` that `actors/health_prober.py` runs. This module
holds no protocol logic: it is a virtual clock, a virtual network and the
glue the two actors are, feeding each core what happened and carrying out
the actions it returns (a probe of the detector goes through the gossip
core, a `Suspect` of the gossip core reaches the detector, a `Publish` sets
the detector's members).

Messages are the real `meshllm.mesh.wire` types and every frame is sized with
`wire.encode_frame`, so byte counts are those on the wire, plus the packet
overhead below. The network is a virtual clock and an event queue: each
link is a QUIC connection whose directions are streams (reliable, in order),
so a lost packet is not lost but retransmitted after a PTO, delaying what
follows it on that link.

Per-packet overhead (`PACKET_OVERHEAD_BYTES` = 63):
  IPv4 20 + UDP 8 = 28; QUIC 1-RTT short header 1 (flags) + 8 (aioquic's
  connection id) + 2 (packet number) = 11; AEAD tag 16; STREAM frame header
  1 (type) + 1 (stream id) + 4 (offset) + 2 (length) = 8.
A frame larger than `PACKET_PAYLOAD_BYTES` (aioquic's 1200-byte datagrams
less header, tag and frame header) takes several packets. aioquic delays an
ACK (up to its max_ack_delay, 25 ms), so a frame that the receiving core
answers at once on the same link gets its ACK inside the answer (an ACK
frame of ~`ACK_FRAME_BYTES` = 7); any other frame is answered by an ACK-only
packet (`ACK_PACKET_BYTES` = 28 + 11 + 16 + 7 = 62). Measured against the
endpoints' counters on real nodes, a model with an ACK-only packet for every
frame sent a quarter more datagrams than real nodes do.
Not modelled: handshake bytes of new links, CPU time, the local ZeroMQ hop
between Gossiper and HealthProber, and retransmissions towards a node that
is already dead. `bench/gossip_traffic.py` checks these figures against the
endpoints' own counters on real nodes.

A killed node (kill -9) sends nothing more and its links stay up on the
other side until QUIC's idle timeout; a node that leaves gracefully sends
`PeerGone` for itself and closes its links `LEAVE_LINGER_S` later, as the
Gossiper's `on_stop` does.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.mesh import gossip, health, identity, wire
from meshllm.mesh.gossip import ANTI_ENTROPY_S, LEAVE_LINGER_S
from meshllm.mesh.health import (
    DEFAULT_INTERVAL_S,
    DEFAULT_TIMEOUT_S,
    SLOW_INTERVAL_S,
    SLOW_TIMEOUT_S,
)
from meshllm.mesh.membership import Membership
from meshllm.mesh.quic import IDLE_TIMEOUT_S

# -- the network model --------------------------------------------------------------------

IP_UDP_BYTES = 28
QUIC_SHORT_HEADER_BYTES = 11
AEAD_TAG_BYTES = 16
STREAM_FRAME_HEADER_BYTES = 8
PACKET_OVERHEAD_BYTES = (
    IP_UDP_BYTES + QUIC_SHORT_HEADER_BYTES + AEAD_TAG_BYTES + STREAM_FRAME_HEADER_BYTES
)
ACK_FRAME_BYTES = 7
ACK_PACKET_BYTES = IP_UDP_BYTES + QUIC_SHORT_HEADER_BYTES + AEAD_TAG_BYTES + ACK_FRAME_BYTES
DATAGRAM_BYTES = 1200
PACKET_PAYLOAD_BYTES = (
    DATAGRAM_BYTES - QUIC_SHORT_HEADER_BYTES - AEAD_TAG_BYTES - STREAM_FRAME_HEADER_BYTES
)
MIN_PTO_S = 0.025
"""aioquic's max_ack_delay; a PTO is about one RTT plus this."""
DIAL_RTTS = 3
"""A dial is the QUIC handshake (1 RTT) plus admission (2 RTT)."""

_EPOCH_MS = 1_764_000_000_000
"""Generations look like `boot_generation()` ones so frames have realistic sizes."""


@dataclass(frozen=True)
class NetworkModel:
    latency_s: float = 0.001
    """One-way delay of every packet."""
    jitter_s: float = 0.001
    """Extra one-way delay, uniform in [0, jitter_s)."""
    loss: float = 0.0
    """Probability that a packet is lost (and retransmitted after a PTO)."""

    @property
    def rtt_s(self) -> float:
        return 2 * self.latency_s + self.jitter_s


@dataclass
class Traffic:
    """Bytes and packets one node sent and received, by kind, on the wire (overhead in)."""

    probe_sent: int = 0
    probe_received: int = 0
    probe_packets_sent: int = 0
    gossip_sent: int = 0
    gossip_received: int = 0
    gossip_packets_sent: int = 0
    probe_frame_sent: int = 0
    """Framed bytes of probe messages, without packet overhead."""
    gossip_frame_sent: int = 0
    """Framed bytes of gossip messages, without packet overhead."""


@dataclass
class SimNode:
    """One node: the two cores, and what the network knows about it."""

    core: gossip.GossipCore
    detector: health.FailureDetector
    address: str
    boot_generation: int
    open_links: dict[int, SimNode] = field(default_factory=dict)
    """Link id -> the node at the other end, for each connection open on this side."""
    alive: bool = True
    leaving: bool = False
    paused_until: float = 0.0
    tick_token: int = 0
    """The prober's timer: only the latest armed tick runs."""
    timer_token: int = 0
    """The gossiper's timer: only the latest armed tick runs."""
    timer_at: float = math.inf
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def node_id(self) -> str:
        return self.core.node_id

    @property
    def members(self) -> Membership:
        return self.core.members

    @property
    def links(self) -> dict[str, int]:
        return self.core.links


@dataclass(frozen=True)
class Removal:
    at: float
    by: str
    node_id: str
    generation: int
    false: bool
    """The removed node (this incarnation of it) was alive and well."""


class Simulation:
    """A mesh on a virtual clock; drive it with `run_until` / `run_while`."""

    def __init__(
        self,
        seed: int = 0,
        network: NetworkModel | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        indirect: int = 2,
    ) -> None:
        self.rng = random.Random(seed)
        self.network = network or NetworkModel()
        self.interval = interval
        self.timeout = timeout
        self.indirect = indirect
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.removals: list[Removal] = []
        self.declared_dead: list[Removal] = []
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self._link_ids = 0
        self._by_address: dict[str, str] = {}
        self._channel_free: dict[tuple[int, str], float] = {}
        self._keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        """Each node's key (a restarted node keeps its own): announcements are signed and
        checked as on real nodes, so their sizes and the work are the real ones."""

    # -- clock -----------------------------------------------------------------------

    def _at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, fn, args))

    def run_until(self, until: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= until:
            when, _, fn, args = heapq.heappop(queue)
            self.now = when
            fn(*args)
        self.now = max(self.now, until)

    def run_while(self, condition: Callable[[], bool], deadline: float, step: float = 0.01) -> bool:
        """Run until `condition()` is false (checked every `step`); False at `deadline`."""
        while condition():
            if self.now >= deadline:
                return False
            self.run_until(min(deadline, self.now + step))
        return True

    # -- nodes -----------------------------------------------------------------------

    def _new_node(self, join_via: str | None = None, node_id: str = "", index: int = -1) -> SimNode:
        if not node_id:
            # Keys from the seed: the same seed gives the same ids, hence the same run.
            key = ec.derive_private_key(self.rng.getrandbits(128) + 1, ec.SECP256R1())
            node_id = identity.node_id_of(key)
            self._keys[node_id] = key
        index = index if index >= 0 else len(self.nodes)
        address = f"10.0.{index // 250}.{index % 250 + 1}:40000"
        me = wire.PeerAnnouncement(
            node_id=node_id,
            generation=(_EPOCH_MS + int(self.now * 1000)) << 8,
            version="0.1.0",
            role="host",
            http_port=9337,
            serving="meshllm-demo",
            server_state="ready",
            available_models=("meshllm-demo",),
            vram_bytes=8 << 30,
            addresses=(address,),
            tunnel_port=40001,
            model_sizes={"meshllm-demo": 2_000_000},
        )
        node_rng = random.Random(self.rng.getrandbits(64))
        joins = () if join_via is None else ((self.nodes[join_via].address,),)
        key = self._keys[node_id]
        # Nonces from the node's seeded source: a run with a seed repeats to the byte.
        nonces = functools.partial(node_rng.getrandbits, 63)
        core = gossip.GossipCore(
            me,
            self.now,
            key=key,
            joins=joins,
            rng=node_rng,
            check_timeout=self.timeout,
            nonces=nonces,
        )
        detector = health.FailureDetector(
            interval=self.interval,
            timeout=self.timeout,
            indirect=self.indirect,
            rng=node_rng,
            nonces=nonces,
        )
        # Nodes start at different moments: spread the probe phases.
        detector.next_probe_at = self.now + node_rng.uniform(0, self.interval)
        node = SimNode(core, detector, address, me.generation)
        self.nodes[node_id] = node
        self._by_address[address] = node_id
        return node

    def build_mesh(self, n: int) -> list[str]:
        """`n` nodes that already know and link to each other (as after convergence)."""
        created = [self._new_node() for _ in range(n)]
        seed = created[0]
        for node in created:
            for other in created:
                if other is not node:
                    node.members.merge(other.members.me, self.now)
        for i, a in enumerate(created):
            for b in created[i + 1 :]:
                link = self._new_link(a, b)
                # Both sides hold the same view already: no opening Digest to exchange.
                a.core.link_opened(link, b.node_id, True, self.now, synced=True)
                b.core.link_opened(link, a.node_id, False, self.now, synced=True)
        for node in created:
            if node is not seed:
                # As if it had joined with the first node's token (and so rejoins through it).
                check_at = self.now + gossip.JOIN_CHECK_S
                joined = gossip.JoinState((seed.address,), next_at=check_at, joined=seed.node_id)
                node.core.joins = [joined]
            self._execute(node, node.core.start(self.now))
        return [node.node_id for node in created]

    def join(self, via: str) -> str:
        """A new node starts with a token naming `via` and dials it."""
        node = self._new_node(join_via=via)
        self._execute(node, node.core.start(self.now))
        return node.node_id

    def kill(self, node_id: str) -> None:
        """kill -9: the node goes silent; its peers' links end at QUIC's idle timeout."""
        node = self.nodes[node_id]
        node.alive = False
        for link, peer in node.open_links.items():
            self._at(self.now + IDLE_TIMEOUT_S, self._link_closed, peer, link)

    def restart(self, node_id: str, via: str) -> None:
        """A killed node starts again (same key, so same id; a newer generation) and joins."""
        old = self.nodes[node_id]
        assert not old.alive, "kill it first"
        index = list(self.nodes).index(node_id)
        node = self._new_node(join_via=via, node_id=node_id, index=index)
        self._execute(node, node.core.start(self.now))

    def leave(self, node_id: str) -> None:
        """A graceful stop: `PeerGone` for ourselves to every link, then close them."""
        node = self.nodes[node_id]
        node.leaving = True
        self._execute(node, node.core.leave())
        self._at(self.now + LEAVE_LINGER_S, self._stop, node)

    def pause(self, node_id: str, duration: float) -> None:
        """The node's process freezes (SIGSTOP, swap storm) and then resumes."""
        self.nodes[node_id].paused_until = self.now + duration

    def change(self, node_id: str, **changes: Any) -> None:
        """The node's own state changes (e.g. it starts serving): gossip it at once."""
        node = self.nodes[node_id]
        self._execute(node, node.core.update_self(**changes))

    def live(self) -> list[SimNode]:
        return [node for node in self.nodes.values() if node.alive]

    def _stop(self, node: SimNode) -> None:
        for link in list(node.open_links):
            self._close(node, link)
        node.alive = False

    def _runnable(self, node: SimNode, fn: Callable[..., None], *args: Any) -> bool:
        """False if the node cannot act now (dead, or paused: then the event waits)."""
        if not node.alive:
            return False
        if node.paused_until > self.now:
            self._at(node.paused_until, fn, node, *args)
            return False
        return True

    # -- the network -------------------------------------------------------------------

    def _new_link(self, dialer: SimNode, acceptor: SimNode) -> int:
        self._link_ids += 1
        link = self._link_ids
        dialer.open_links[link] = acceptor
        acceptor.open_links[link] = dialer
        return link

    def _transit(self, link: int, src: str, packets: int) -> float:
        """When something sent now in one direction of `link` is delivered (in order)."""
        net = self.network
        delay = net.latency_s + (self.rng.random() * net.jitter_s if net.jitter_s else 0.0)
        if net.loss:
            pto = net.rtt_s + MIN_PTO_S
            for _ in range(packets):
                backoff = pto
                while self.rng.random() < net.loss:
                    delay += backoff
                    backoff *= 2
        key = (link, src)
        at = max(self.now + delay, self._channel_free.get(key, 0.0))
        self._channel_free[key] = at
        return at

    def _send(self, node: SimNode, link: int, msg: wire.WireMessage, size: int) -> None:
        peer = node.open_links.get(link)
        if peer is None:
            return
        packets = max(1, math.ceil(size / PACKET_PAYLOAD_BYTES))
        on_wire = size + packets * PACKET_OVERHEAD_BYTES
        if self.network.loss:
            # Expected retransmissions: each lost packet is sent again.
            on_wire = round(on_wire / (1 - self.network.loss))
        probe = wire.traffic_kind(msg) == "probe"
        t = node.traffic
        if probe:
            t.probe_sent += on_wire
            t.probe_packets_sent += packets
            t.probe_frame_sent += size
        else:
            t.gossip_sent += on_wire
            t.gossip_packets_sent += packets
            t.gossip_frame_sent += size
        at = self._transit(link, node.node_id, packets)
        self._at(at, self._deliver, peer, node, link, msg, on_wire, probe)

    def _deliver(
        self,
        node: SimNode,
        src: SimNode,
        link: int,
        msg: wire.WireMessage,
        on_wire: int,
        probe: bool,
    ) -> None:
        if not self._runnable(node, self._deliver, src, link, msg, on_wire, probe):
            return
        if link not in node.open_links:
            return  # the connection ended on this side
        actions = node.core.frame_received(link, msg, self.now)
        # The ACK rides in an answer sent at once on the same link, else in a packet of its own.
        answered = any(isinstance(a, gossip.Send) and a.link == link for a in actions)
        ack, packets = (ACK_FRAME_BYTES, 0) if answered else (ACK_PACKET_BYTES, 1)
        if probe:
            node.traffic.probe_received += on_wire
            node.traffic.probe_sent += ack
            node.traffic.probe_packets_sent += packets
            src.traffic.probe_received += ack
        else:
            node.traffic.gossip_received += on_wire
            node.traffic.gossip_sent += ack
            node.traffic.gossip_packets_sent += packets
            src.traffic.gossip_received += ack
        self._execute(node, actions)

    def _dial(self, node: SimNode, dial: gossip.Dial) -> None:
        """Handshake and admission take `DIAL_RTTS` round trips; fail at the dial timeout."""
        target = dial.peer_id or next(
            (self._by_address[a] for a in dial.addresses if a in self._by_address), ""
        )
        done = self.now + DIAL_RTTS * self.network.rtt_s
        self._at(done, self._dial_done, node, dial, target, self.now + dial.timeout)

    def _dial_done(self, node: SimNode, dial: gossip.Dial, target: str, give_up_at: float) -> None:
        if not self._runnable(node, self._dial_done, dial, target, give_up_at):
            return
        peer = self.nodes.get(target)
        if peer is not None and peer.alive and peer.paused_until <= self.now:
            link = self._new_link(node, peer)
            # The acceptor admits first; the dialer learns of it half a round trip later.
            self._execute(peer, peer.core.link_opened(link, node.node_id, False, self.now))
            self._execute(node, node.core.dial_succeeded(dial, link, peer.node_id, self.now))
        elif peer is not None and peer.alive and self.now < give_up_at:
            # The peer is frozen: the dial hangs until it resumes or the dial times out.
            wake = min(peer.paused_until, give_up_at)
            self._at(wake, self._dial_done, node, dial, target, give_up_at)
        elif self.now < give_up_at:
            self._at(give_up_at, self._dial_done, node, dial, target, give_up_at)
        else:
            self._execute(node, node.core.dial_failed(dial, self.now))

    def _close(self, node: SimNode, link: int) -> None:
        """`node` closes its side of `link`; the other side learns of it after a transit."""
        peer = node.open_links.pop(link, None)
        if peer is None:
            return
        self._at(self._transit(link, node.node_id, 1), self._link_closed, peer, link)
        self._execute(node, node.core.link_closed(link, self.now))

    def _link_closed(self, node: SimNode, link: int) -> None:
        """The other side closed `link` (or it timed out): the gossiper's read loop ends."""
        if not self._runnable(node, self._link_closed, link):
            return
        if node.open_links.pop(link, None) is not None:
            self._execute(node, node.core.link_closed(link, self.now))

    # -- the gossiper's glue -----------------------------------------------------------

    def _execute(self, node: SimNode, actions: list[gossip.Action]) -> None:
        sizes: dict[int, int] = {}
        for action in actions:
            match action:
                case gossip.Send(link=link, msg=msg):
                    size = sizes.get(id(msg))
                    if size is None:
                        size = sizes[id(msg)] = len(wire.encode_frame(msg))
                    self._send(node, link, msg, size)
                case gossip.Dial() as dial:
                    self._dial(node, dial)
                case gossip.CloseLink(link=link):
                    self._close(node, link)
                case gossip.Publish():
                    # The MeshView reaches the HealthProber: new member set, and a wake-up.
                    node.detector.set_members(set(node.members.peers))
                    self._wake(node)
                case gossip.Suspect(peer_id=peer_id):
                    self._act(node, node.detector.suspect(peer_id, self.now))
                    self._wake(node)
                case gossip.ProbeAnswered(nonce=nonce):
                    node.detector.on_ack(nonce)
                case gossip.PeerRemoved(node_id=peer_id, generation=generation):
                    self.removals.append(self._removal(node, peer_id, generation))
                case gossip.Refuted() | gossip.UnexpectedFrame():
                    pass
        self._arm(node)

    def _arm(self, node: SimNode) -> None:
        """Re-arm the gossiper's one timer for the core's next tick."""
        at = node.core.next_timer()
        if at != node.timer_at:
            node.timer_at = at
            node.timer_token += 1
            self._at(at, self._gossip_tick, node, node.timer_token)

    def _gossip_tick(self, node: SimNode, token: int) -> None:
        if token != node.timer_token:
            return  # superseded by a later re-arm
        if not self._runnable(node, self._gossip_tick, token):
            return
        node.timer_at = math.inf
        self._execute(node, node.core.tick(self.now))

    # -- the health prober's glue ------------------------------------------------------

    def _wake(self, node: SimNode) -> None:
        """Re-arm the prober's loop to run now (the actor's `wake.set()`)."""
        node.tick_token += 1
        self._at(self.now, self._tick, node, node.tick_token)

    def _tick(self, node: SimNode, token: int) -> None:
        if token != node.tick_token:
            return  # superseded by a later wake-up
        if not self._runnable(node, self._tick, token):
            return
        self._act(node, node.detector.tick(self.now))
        node.tick_token += 1
        self._at(node.detector.next_deadline(), self._tick, node, node.tick_token)

    def _act(self, node: SimNode, actions: list[health.Action]) -> None:
        for action in actions:
            match action:
                case health.SendProbe(node_id=peer_id, nonce=nonce):
                    self._execute(node, node.core.probe(peer_id, nonce, self.now))
                case health.SendProbeRequest(via=via, target=target, nonce=nonce):
                    self._execute(node, node.core.probe_via(via, target, nonce, self.now))
                case health.DeclareDead(node_id=peer_id):
                    ann = node.members.peers.get(peer_id)
                    gen = ann.generation if ann is not None else 0
                    self.declared_dead.append(self._removal(node, peer_id, gen))
                    self._execute(node, node.core.peer_died(peer_id, self.now))

    # -- what tests and the benchmark look at ----------------------------------------

    def _removal(self, by: SimNode, node_id: str, generation: int) -> Removal:
        removed = self.nodes[node_id]
        false = removed.alive and not removed.leaving and generation >= removed.boot_generation
        return Removal(self.now, by.node_id, node_id, generation, false)

    def false_removals(self) -> list[Removal]:
        """Removals of a node that was alive (a newer incarnation does not count)."""
        return [r for r in self.removals if r.false]

    def knows(self, node_id: str, peer_id: str) -> bool:
        return peer_id in self.nodes[node_id].members.peers

    def converged(self) -> bool:
        """Every live node knows exactly the other live nodes, with their latest generation."""
        live = self.live()
        latest = {node.node_id: node.members.me.generation for node in live}
        for node in live:
            want = {k: v for k, v in latest.items() if k != node.node_id}
            have = {k: a.generation for k, a in node.members.peers.items()}
            if have != want:
                return False
        return True


# -- measurements -----------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeTraffic:
    nodes: int
    interval_s: float
    timeout_s: float
    duration_s: float
    probe_bytes_per_s: float
    """Mean over nodes of probe bytes sent per second (probes, acks, QUIC ACKs)."""
    probe_bytes_per_s_max: float
    """The busiest node's probe bytes sent per second."""
    probe_in_out_bytes_per_s: float
    """Mean over nodes of probe bytes sent plus received per second."""
    probe_packets_per_s: float
    """Mean over nodes of probe packets sent per second."""
    gossip_bytes_per_s: float
    """Mean over nodes of gossip bytes sent per second (fingerprints, digests, answers)."""
    gossip_in_out_bytes_per_s: float
    """Mean over nodes of gossip bytes sent plus received per second."""
    packets_per_s: float
    """Mean over nodes of packets sent per second (gossip and probes, ACKs included)."""
    probe_frame_bytes_per_s: float
    """Mean over nodes of framed probe bytes sent per second (no packet overhead)."""
    gossip_frame_bytes_per_s: float
    """Mean over nodes of framed gossip bytes sent per second (no packet overhead)."""
    false_removals: int


@dataclass(frozen=True)
class Detection:
    nodes: int
    interval_s: float
    timeout_s: float
    first_declared_after_s: float
    """From the kill until some node declared the victim dead."""
    removed_everywhere_after_s: float
    """From the kill until the last live node removed the victim (inf: never)."""
    false_removals: int


@dataclass(frozen=True)
class JoinConvergence:
    nodes: int
    known_by_all_after_s: float
    """From the first dial until every node knows the newcomer (inf: never)."""
    knows_all_after_s: float
    """Until the newcomer knows every node."""
    linked_to_all_after_s: float
    """Until the newcomer has a direct link to every node."""
    converged_after_s: float
    """Until every node holds every other's latest generation."""
    gossip_bytes_per_node: float
    """Gossip bytes each node sent on average, from the dial until convergence."""


@dataclass(frozen=True)
class Leave:
    nodes: int
    removed_everywhere_after_s: float


def measure_probe_traffic(
    n: int,
    interval: float = DEFAULT_INTERVAL_S,
    timeout: float = DEFAULT_TIMEOUT_S,
    duration: float = 60.0,
    seed: int = 0,
    network: NetworkModel | None = None,
) -> ProbeTraffic:
    """Steady-state traffic per node in a converged mesh of `n` nodes."""
    sim = Simulation(seed, network, interval, timeout)
    sim.build_mesh(n)
    # Let every prober pass its first (randomly placed) probe before counting.
    sim.run_until(max(interval, ANTI_ENTROPY_S))
    before = {node_id: Traffic(**asdict(node.traffic)) for node_id, node in sim.nodes.items()}
    start = sim.now
    sim.run_until(start + duration)
    span = sim.now - start
    rates: dict[str, list[float]] = {}
    for node_id, node in sim.nodes.items():
        t, b = asdict(node.traffic), asdict(before[node_id])
        d = {k: (t[k] - b[k]) / span for k in t}
        d["probe_in_out"] = d["probe_sent"] + d["probe_received"]
        d["gossip_in_out"] = d["gossip_sent"] + d["gossip_received"]
        d["packets"] = d["probe_packets_sent"] + d["gossip_packets_sent"]
        for k, v in d.items():
            rates.setdefault(k, []).append(v)
    sent = rates["probe_sent"]
    return ProbeTraffic(
        nodes=n,
        interval_s=interval,
        timeout_s=timeout,
        duration_s=duration,
        probe_bytes_per_s=statistics.fmean(sent),
        probe_bytes_per_s_max=max(sent),
        probe_in_out_bytes_per_s=statistics.fmean(rates["probe_in_out"]),
        probe_packets_per_s=statistics.fmean(rates["probe_packets_sent"]),
        gossip_bytes_per_s=statistics.fmean(rates["gossip_sent"]),
        gossip_in_out_bytes_per_s=statistics.fmean(rates["gossip_in_out"]),
        packets_per_s=statistics.fmean(rates["packets"]),
        probe_frame_bytes_per_s=statistics.fmean(rates["probe_frame_sent"]),
        gossip_frame_bytes_per_s=statistics.fmean(rates["gossip_frame_sent"]),
        false_removals=len(sim.false_removals()),
    )


def measure_detection(
    n: int,
    interval: float = DEFAULT_INTERVAL_S,
    timeout: float = DEFAULT_TIMEOUT_S,
    seed: int = 0,
    network: NetworkModel | None = None,
    deadline: float = 120.0,
) -> Detection:
    """Kill one node (kill -9) in a converged mesh; time until all others removed it."""
    sim = Simulation(seed, network, interval, timeout)
    ids = sim.build_mesh(n)
    sim.run_until(sim.rng.uniform(interval, interval + ANTI_ENTROPY_S))
    victim = sim.rng.choice(ids[1:])
    sim.kill(victim)
    killed_at = sim.now

    def someone_knows() -> bool:
        return any(sim.knows(node.node_id, victim) for node in sim.live())

    sim.run_while(someone_knows, killed_at + deadline)
    removed = [r.at for r in sim.removals if r.node_id == victim]
    declared = [r.at for r in sim.declared_dead if r.node_id == victim]
    return Detection(
        nodes=n,
        interval_s=interval,
        timeout_s=timeout,
        first_declared_after_s=min(declared, default=math.inf) - killed_at,
        removed_everywhere_after_s=(
            math.inf if someone_knows() else max(removed, default=killed_at) - killed_at
        ),
        false_removals=len(sim.false_removals()),
    )


def measure_join(
    n: int,
    interval: float = DEFAULT_INTERVAL_S,
    timeout: float = DEFAULT_TIMEOUT_S,
    seed: int = 0,
    network: NetworkModel | None = None,
    deadline: float = 60.0,
) -> JoinConvergence:
    """A node joins a converged mesh of `n` through one member's token."""
    sim = Simulation(seed, network, interval, timeout)
    ids = sim.build_mesh(n)
    sim.run_until(sim.rng.uniform(interval, interval + ANTI_ENTROPY_S))
    sent_before = sum(node.traffic.gossip_sent for node in sim.nodes.values())
    start = sim.now
    newcomer = sim.join(sim.rng.choice(ids))
    end = start + deadline
    times: dict[str, float] = {}

    def check() -> bool:
        if "known" not in times and all(sim.knows(i, newcomer) for i in ids):
            times["known"] = sim.now
        if "knows" not in times and all(sim.knows(newcomer, i) for i in ids):
            times["knows"] = sim.now
        if "linked" not in times and all(i in sim.nodes[newcomer].links for i in ids):
            times["linked"] = sim.now
        if "converged" not in times and sim.converged():
            times["converged"] = sim.now
        return len(times) < 4

    sim.run_while(check, end, step=0.005)
    sent = sum(node.traffic.gossip_sent for node in sim.nodes.values()) - sent_before
    return JoinConvergence(
        nodes=n,
        known_by_all_after_s=times.get("known", math.inf) - start,
        knows_all_after_s=times.get("knows", math.inf) - start,
        linked_to_all_after_s=times.get("linked", math.inf) - start,
        converged_after_s=times.get("converged", math.inf) - start,
        gossip_bytes_per_node=sent / (n + 1),
    )


def measure_leave(
    n: int,
    seed: int = 0,
    network: NetworkModel | None = None,
    deadline: float = 30.0,
) -> Leave:
    """One node stops gracefully; time until every other node removed it."""
    sim = Simulation(seed, network)
    ids = sim.build_mesh(n)
    sim.run_until(sim.rng.uniform(0.5, 2.5))
    leaver = sim.rng.choice(ids[1:])
    sim.leave(leaver)
    start = sim.now
    sim.run_while(
        lambda: any(sim.knows(node.node_id, leaver) for node in sim.live()), start + deadline
    )
    gone = not any(sim.knows(node.node_id, leaver) for node in sim.live())
    last = max((r.at for r in sim.removals if r.node_id == leaver), default=start)
    return Leave(nodes=n, removed_everywhere_after_s=(last - start) if gone else math.inf)


def standard_figures(sizes: tuple[int, ...] = (10, 50, 100), seed: int = 0) -> dict[str, Any]:
    """The figures the README quotes: traffic, detection, join and leave at each size."""
    settings = {
        "default": (DEFAULT_INTERVAL_S, DEFAULT_TIMEOUT_S),
        "slow": (SLOW_INTERVAL_S, SLOW_TIMEOUT_S),
    }
    out: dict[str, Any] = {
        "packet_overhead_bytes": PACKET_OVERHEAD_BYTES,
        "ack_packet_bytes": ACK_PACKET_BYTES,
        "network": asdict(NetworkModel()),
    }
    for name, (interval, timeout) in settings.items():
        duration = max(60.0, 8 * interval)
        out[name] = {
            str(n): {
                "traffic": asdict(measure_probe_traffic(n, interval, timeout, duration, seed)),
                "detection": asdict(measure_detection(n, interval, timeout, seed)),
            }
            for n in sizes
        }
    out["join"] = {str(n): asdict(measure_join(n, seed=seed)) for n in sizes}
    out["leave"] = {str(n): asdict(measure_leave(n, seed=seed)) for n in sizes}
    return out


if __name__ == "__main__":
    print(json.dumps(standard_figures(), indent=2))
