"""An in-process, deterministic simulation of a mesh built from the real cores.

Each simulated node is a `Membership` plus a `FailureDetector`, driven the way
`actors/gossiper.py` and `actors/health_prober.py` drive them:

- a new link (either side) sends `Sync` of everything we know;
- our own change goes to every link at once as `Sync((me,))`;
- fresh announcements from a `Sync` are forwarded once to every other link;
- every `ANTI_ENTROPY_S` a `Fingerprint` (a hash of the digest) goes to one
  random link; only when it differs is a full `Digest` sent, answered with
  `Sync(newer_than(digest))` (and a reply digest if the sender knows more);
  the same timer expires tombstones and dials
  known peers that have no link (the lower node id at once, the other after
  `REDIAL_AFTER_S`);
- `PeerGone` removes a node and is forwarded once (never to the removed node
  itself: closing its link discards it); a node told that it is gone refutes
  with a newer generation; a peer that sends its own announcement while we
  hold a tombstone for it is told it is gone;
- `Probe` is answered with `ProbeAck`; `ProbeRequest` is relayed as a probe
  of our own and the ack is passed back; the detector's `DeclareDead` removes
  the peer and floods `PeerGone`; a lost link raises a suspicion; a probe of
  a peer we have no link to dials it and follows on the new link;
- a second link between two nodes: the one dialed by the lower id is kept;
- a node that joined through a token dials its bootstrap node again when that
  link ends.

Messages are the real `meshllm.mesh.wire` types and every frame is sized with
`wire.encode_frame`, so byte counts are those on the wire, plus the packet
overhead below. The network is a virtual clock and an event queue: each
directed link is a QUIC stream (reliable, in order), so a lost packet is not
lost but retransmitted after a PTO, delaying what follows it on that link.

Per-packet overhead (`PACKET_OVERHEAD_BYTES` = 63):
  IPv4 20 + UDP 8 = 28; QUIC 1-RTT short header 1 (flags) + 8 (aioquic's
  connection id) + 2 (packet number) = 11; AEAD tag 16; STREAM frame header
  1 (type) + 1 (stream id) + 4 (offset) + 2 (length) = 8.
A frame larger than `PACKET_PAYLOAD_BYTES` (aioquic's 1200-byte datagrams
less header, tag and frame header) takes several packets. Every frame is
answered by one ACK-only packet (`ACK_PACKET_BYTES` = 28 + 11 + 16 + ~7 of
ACK frame = 62): aioquic acks after 1 ms, so a lone frame gets its own ACK;
piggybacking on a reply is ignored, which errs high. Not modelled: handshake
bytes of new links, CPU time, the local ZeroMQ hop between Gossiper and
HealthProber, and retransmissions towards a node that is already dead.

A killed node (kill -9) sends nothing more and its links stay up on the
other side until QUIC's idle timeout; a node that leaves gracefully sends
`PeerGone` for itself and closes its links 50 ms later, as `on_stop` does.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from meshllm.mesh import health, wire
from meshllm.mesh.membership import Membership

# -- the figures the simulation rests on ----------------------------------------------

IP_UDP_BYTES = 28
QUIC_SHORT_HEADER_BYTES = 11
AEAD_TAG_BYTES = 16
STREAM_FRAME_HEADER_BYTES = 8
PACKET_OVERHEAD_BYTES = (
    IP_UDP_BYTES + QUIC_SHORT_HEADER_BYTES + AEAD_TAG_BYTES + STREAM_FRAME_HEADER_BYTES
)
ACK_PACKET_BYTES = IP_UDP_BYTES + QUIC_SHORT_HEADER_BYTES + AEAD_TAG_BYTES + 7
DATAGRAM_BYTES = 1200
PACKET_PAYLOAD_BYTES = (
    DATAGRAM_BYTES - QUIC_SHORT_HEADER_BYTES - AEAD_TAG_BYTES - STREAM_FRAME_HEADER_BYTES
)

# Mirrors of the actors' constants (actors/gossiper.py, meshllm/mesh/quic.py).
ANTI_ENTROPY_S = 2.0
REDIAL_AFTER_S = 2.0
DIAL_TIMEOUT_S = 3.0
JOIN_BACKOFF_MAX_S = 10.0
IDLE_TIMEOUT_S = 20.0
RELAY_TTL_S = 10.0
LEAVE_LINGER_S = 0.05
MIN_PTO_S = 0.025
"""aioquic's max_ack_delay; a PTO is about one RTT plus this."""

DEFAULT_INTERVAL_S = 0.5
DEFAULT_TIMEOUT_S = 1.0
SEED_INTERVAL_S = 15.0
SEED_TIMEOUT_S = 5.0

PROBE_TYPES = (wire.Probe, wire.ProbeAck, wire.ProbeRequest)
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
    """Bytes and packets one node sent and received, by kind."""

    probe_sent: int = 0
    probe_received: int = 0
    probe_packets_sent: int = 0
    gossip_sent: int = 0
    gossip_received: int = 0


@dataclass
class SimNode:
    """One node: the two cores plus the gossiper's bookkeeping."""

    members: Membership
    detector: health.FailureDetector
    rng: random.Random
    links: dict[str, int] = field(default_factory=dict)
    """peer id -> link id (a link id names one QUIC connection)."""
    dialing: set[str] = field(default_factory=set)
    unlinked_since: dict[str, float] = field(default_factory=dict)
    relays: dict[int, tuple[str, int, float]] = field(default_factory=dict)
    unsent_probes: dict[str, int] = field(default_factory=dict)
    """peer id -> nonce of a probe waiting for the link being dialed."""
    relay_nonce: int = 1 << 40
    boot_generation: int = 0
    join_via: str | None = None
    join_delay: float = 0.2
    alive: bool = True
    leaving: bool = False
    paused_until: float = 0.0
    tick_token: int = 0
    traffic: Traffic = field(default_factory=Traffic)

    @property
    def node_id(self) -> str:
        return self.members.node_id


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
        self._channel_free: dict[tuple[str, str], float] = {}

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
        node_id = node_id or f"{self.rng.getrandbits(64):016x}"
        index = index if index >= 0 else len(self.nodes)
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
            addresses=(f"10.0.{index // 250}.{index % 250 + 1}:40000",),
            tunnel_port=40001,
            model_sizes={"meshllm-demo": 2_000_000},
        )
        node_rng = random.Random(self.rng.getrandbits(64))
        detector = health.FailureDetector(
            interval=self.interval, timeout=self.timeout, indirect=self.indirect, rng=node_rng
        )
        # Nodes start at different moments: spread the probe and digest phases.
        detector.next_probe_at = self.now + node_rng.uniform(0, self.interval)
        node = SimNode(Membership(me), detector, node_rng, join_via=join_via)
        node.boot_generation = me.generation
        self.nodes[node_id] = node
        self._at(self.now + node_rng.uniform(0, ANTI_ENTROPY_S), self._anti_entropy, node)
        self._wake(node)
        return node

    def build_mesh(self, n: int) -> list[str]:
        """`n` nodes that already know and link to each other (as after convergence)."""
        created = [self._new_node() for _ in range(n)]
        seed = created[0].node_id
        for node in created:
            node.join_via = None if node.node_id == seed else seed
            for other in created:
                if other is not node:
                    node.members.merge(other.members.me, self.now)
        for i, a in enumerate(created):
            for b in created[i + 1 :]:
                self._link_ids += 1
                a.links[b.node_id] = b.links[a.node_id] = self._link_ids
        for node in created:
            self._publish(node)
            if node.join_via is not None:
                self._at(self.now + 1.0, self._join_check, node)
        return [node.node_id for node in created]

    def join(self, via: str) -> str:
        """A new node starts with a token naming `via` and dials it."""
        node = self._new_node(join_via=via)
        self._join_attempt(node)
        return node.node_id

    def kill(self, node_id: str) -> None:
        """kill -9: the node goes silent; its peers' links end at QUIC's idle timeout."""
        node = self.nodes[node_id]
        node.alive = False
        for peer_id, link_id in node.links.items():
            self._at(self.now + IDLE_TIMEOUT_S, self._link_closed, peer_id, node_id, link_id)

    def restart(self, node_id: str, via: str) -> None:
        """A killed node starts again (same key, so same id; a newer generation) and joins."""
        old = self.nodes[node_id]
        assert not old.alive, "kill it first"
        node = self._new_node(join_via=via, node_id=node_id, index=list(self.nodes).index(node_id))
        self._join_attempt(node)

    def leave(self, node_id: str) -> None:
        """A graceful stop: `PeerGone` for ourselves to every link, then close them."""
        node = self.nodes[node_id]
        node.leaving = True
        me = node.members.me
        self._forward(node, wire.PeerGone(me.node_id, me.generation, "left"))
        self._at(self.now + LEAVE_LINGER_S, self._stop, node)

    def pause(self, node_id: str, duration: float) -> None:
        """The node's process freezes (SIGSTOP, swap storm) and then resumes."""
        self.nodes[node_id].paused_until = self.now + duration

    def change(self, node_id: str, **changes: Any) -> None:
        """The node's own state changes (e.g. it starts serving): gossip it at once."""
        node = self.nodes[node_id]
        if node.members.update_self(**changes):
            self._forward(node, wire.Sync((node.members.me,)))

    def live(self) -> list[SimNode]:
        return [node for node in self.nodes.values() if node.alive]

    def _stop(self, node: SimNode) -> None:
        for peer_id in list(node.links):
            self._close_link(node, peer_id)
        node.alive = False

    def _runnable(self, node: SimNode, fn: Callable[..., None], *args: Any) -> bool:
        """False if the node cannot act now (dead, or paused: then the event waits)."""
        if not node.alive:
            return False
        if node.paused_until > self.now:
            self._at(node.paused_until, fn, node, *args)
            return False
        return True

    # -- network ---------------------------------------------------------------------

    def _transit(self, src: str, dst: str, packets: int) -> float:
        """When something sent now on the src->dst stream is delivered (in order)."""
        net = self.network
        delay = net.latency_s + (self.rng.random() * net.jitter_s if net.jitter_s else 0.0)
        if net.loss:
            pto = net.rtt_s + MIN_PTO_S
            for _ in range(packets):
                backoff = pto
                while self.rng.random() < net.loss:
                    delay += backoff
                    backoff *= 2
        key = (src, dst)
        at = max(self.now + delay, self._channel_free.get(key, 0.0))
        self._channel_free[key] = at
        return at

    def _send(self, node: SimNode, peer_id: str, msg: wire.WireMessage, size: int = 0) -> None:
        link_id = node.links.get(peer_id)
        if link_id is None:
            return
        size = size or len(wire.encode_frame(msg))
        packets = max(1, math.ceil(size / PACKET_PAYLOAD_BYTES))
        on_wire = size + packets * PACKET_OVERHEAD_BYTES
        if self.network.loss:
            # Expected retransmissions: each lost packet is sent again.
            on_wire = round(on_wire / (1 - self.network.loss))
        probe = isinstance(msg, PROBE_TYPES)
        peer = self.nodes[peer_id]
        if probe:
            node.traffic.probe_sent += on_wire
            node.traffic.probe_packets_sent += packets
            peer.traffic.probe_sent += ACK_PACKET_BYTES
            peer.traffic.probe_packets_sent += 1
        else:
            node.traffic.gossip_sent += on_wire
            peer.traffic.gossip_sent += ACK_PACKET_BYTES
        at = self._transit(node.node_id, peer_id, packets)
        self._at(at, self._deliver, peer, node.node_id, link_id, msg, on_wire, probe)

    def _forward(self, node: SimNode, msg: wire.WireMessage, exclude: str = "") -> None:
        size = len(wire.encode_frame(msg))
        for peer_id in list(node.links):
            if peer_id != exclude:
                self._send(node, peer_id, msg, size)

    def _deliver(
        self,
        node: SimNode,
        src: str,
        link_id: int,
        msg: wire.WireMessage,
        on_wire: int,
        probe: bool,
    ) -> None:
        if not self._runnable(node, self._deliver, src, link_id, msg, on_wire, probe):
            return
        if node.links.get(src) != link_id:
            return  # the link ended on this side
        sender = self.nodes[src].traffic
        if probe:
            node.traffic.probe_received += on_wire
            sender.probe_received += ACK_PACKET_BYTES
        else:
            node.traffic.gossip_received += on_wire
            sender.gossip_received += ACK_PACKET_BYTES
        self._on_frame(node, src, msg)

    def _dial(self, node: SimNode, peer_id: str, then: Callable[[SimNode, bool], None]) -> None:
        """QUIC handshake (1 RTT) plus admission (2 RTT); fails at the dial timeout."""
        node.dialing.add(peer_id)
        done = self.now + 3 * self.network.rtt_s
        self._at(done, self._dial_done, node, peer_id, self.now + DIAL_TIMEOUT_S, then)

    def _dial_done(
        self,
        node: SimNode,
        peer_id: str,
        give_up_at: float,
        then: Callable[[SimNode, bool], None],
    ) -> None:
        if not self._runnable(node, self._dial_done, peer_id, give_up_at, then):
            return
        peer = self.nodes[peer_id]
        if peer.alive and peer.paused_until <= self.now:
            node.dialing.discard(peer_id)
            self._link(node, peer)
            then(node, True)
        elif self.now < give_up_at:
            # The peer is frozen or dead: the dial hangs until its timeout.
            wake = peer.paused_until if peer.alive else give_up_at
            self._at(min(wake, give_up_at), self._dial_done, node, peer_id, give_up_at, then)
        else:
            node.dialing.discard(peer_id)
            then(node, False)

    def _link(self, dialer: SimNode, acceptor: SimNode) -> None:
        """Both sides' `_on_link`, then Sync all (and a probe that waited for the link).

        A side that still holds a link to the other keeps the one dialed by the
        lower node id and closes the other, as the gossiper does.
        """
        self._link_ids += 1
        link_id = self._link_ids
        keep_new = dialer.node_id < acceptor.node_id
        sides = ((dialer, acceptor), (acceptor, dialer))
        rejected = not keep_new and any(y.node_id in x.links for x, y in sides)
        for x, y in sides:
            if rejected and y.node_id in x.links:
                continue  # x closes the new connection at once
            x.links[y.node_id] = link_id
            x.unlinked_since.pop(y.node_id, None)
            self._send(x, y.node_id, wire.Sync(tuple(x.members.all())))
            if (nonce := x.unsent_probes.pop(y.node_id, None)) is not None:
                self._send(x, y.node_id, wire.Probe(nonce))
            if rejected:
                at = self._transit(y.node_id, x.node_id, 1)
                self._at(at, self._link_closed, x.node_id, y.node_id, link_id)

    def _close_link(self, node: SimNode, peer_id: str) -> None:
        link_id = node.links.pop(peer_id, None)
        if link_id is not None:
            at = self._transit(node.node_id, peer_id, 1)
            self._at(at, self._link_closed, peer_id, node.node_id, link_id)

    def _link_closed(self, node_id: str, peer_id: str, link_id: int) -> None:
        """The gossiper's `_read_link` ended: forget the link, suspect the peer."""
        node = self.nodes[node_id]
        if not self._runnable_by_id(node, peer_id, link_id):
            return
        if node.links.get(peer_id) != link_id:
            return
        del node.links[peer_id]
        if peer_id in node.members.peers:
            node.unlinked_since[peer_id] = self.now
            self._act(node, node.detector.suspect(peer_id, self.now))
            self._wake(node)

    def _runnable_by_id(self, node: SimNode, peer_id: str, link_id: int) -> bool:
        if not node.alive:
            return False
        if node.paused_until > self.now:
            self._at(node.paused_until, self._link_closed, node.node_id, peer_id, link_id)
            return False
        return True

    # -- the gossiper ----------------------------------------------------------------

    def _on_frame(self, node: SimNode, src: str, msg: wire.WireMessage) -> None:
        now = self.now
        match msg:
            case wire.Sync(announcements=anns):
                fresh = [a for a in anns if node.members.merge(a, now)]
                stone = node.members.tombstones.get(src)
                if stone and any(a.node_id == src for a in anns):
                    # It talks to us, yet we hold it dead: tell it, so it refutes.
                    self._send(node, src, wire.PeerGone(src, stone[0], "declared dead"))
                if fresh:
                    self._forward(node, wire.Sync(tuple(fresh)), exclude=src)
                    self._changed(node)
            case wire.Fingerprint(value=value):
                if value != node.members.fingerprint():
                    self._send(node, src, wire.Digest(node.members.digest()))
            case wire.Digest(generations=gens, reply=reply):
                missing = node.members.newer_than(gens)
                if missing:
                    self._send(node, src, wire.Sync(tuple(missing)))
                if not reply and node.members.lacks(gens):
                    self._send(node, src, wire.Digest(node.members.digest(), reply=True))
            case wire.PeerGone(node_id=node_id, generation=gen):
                self._remove(node, node_id, gen, exclude=src)
            case wire.Probe(nonce=nonce):
                self._send(node, src, wire.ProbeAck(nonce))
            case wire.ProbeAck(nonce=nonce):
                relay = node.relays.pop(nonce, None)
                if relay is not None:
                    self._send(node, relay[0], wire.ProbeAck(relay[1]))
                else:
                    node.detector.on_ack(nonce)
            case wire.ProbeRequest(target=target, nonce=nonce):
                if target in node.links:
                    node.relay_nonce += 1
                    node.relays[node.relay_nonce] = (src, nonce, now + RELAY_TTL_S)
                    self._send(node, target, wire.Probe(node.relay_nonce))
            case _:
                pass

    def _remove(self, node: SimNode, node_id: str, generation: int, exclude: str = "") -> None:
        if node_id == node.node_id:
            node.members.remove(node_id, generation, self.now)
            self._forward(node, wire.Sync((node.members.me,)))
            return
        if not node.members.remove(node_id, generation, self.now):
            return
        self.removals.append(self._removal(node, node_id, generation))
        # The copy for the removed node itself never leaves: aioquic drops stream data
        # still queued when the connection is closed in the same loop iteration.
        gone = node.links.pop(node_id, None)
        self._forward(node, wire.PeerGone(node_id, generation, ""), exclude=exclude)
        if gone is not None:
            node.links[node_id] = gone
        node.unlinked_since.pop(node_id, None)
        self._close_link(node, node_id)
        self._changed(node)

    def _changed(self, node: SimNode) -> None:
        self._publish(node)
        self._dial_unlinked(node)

    def _publish(self, node: SimNode) -> None:
        """The MeshView reaches the HealthProber: new member set, and a wake-up."""
        node.detector.set_members(set(node.members.peers))
        self._wake(node)

    def _dial_unlinked(self, node: SimNode) -> None:
        now = self.now
        for peer_id in node.members.peers:
            if peer_id in node.links or peer_id in node.dialing:
                continue
            since = node.unlinked_since.setdefault(peer_id, now)
            if node.node_id < peer_id or now - since > REDIAL_AFTER_S:
                self._dial(node, peer_id, _ignore_dial_result)

    def _anti_entropy(self, node: SimNode) -> None:
        if not self._runnable(node, self._anti_entropy):
            return
        now = self.now
        node.members.expire(now)
        node.relays = {k: v for k, v in node.relays.items() if v[2] > now}
        if node.links:
            peer_id = node.rng.choice(list(node.links))
            self._send(node, peer_id, wire.Fingerprint(node.members.fingerprint()))
        self._dial_unlinked(node)
        self._at(now + ANTI_ENTROPY_S, self._anti_entropy, node)

    def _join_attempt(self, node: SimNode) -> None:
        if not self._runnable(node, self._join_attempt):
            return
        assert node.join_via is not None
        self._dial(node, node.join_via, self._joined)

    def _joined(self, node: SimNode, ok: bool) -> None:
        if ok:
            node.join_delay = 0.2
            self._at(self.now + 1.0, self._join_check, node)
        else:
            self._at(self.now + node.join_delay, self._join_attempt, node)
            node.join_delay = min(node.join_delay * 2, JOIN_BACKOFF_MAX_S)

    def _join_check(self, node: SimNode) -> None:
        """The join loop: dial the token's node again once that link is gone."""
        if not self._runnable(node, self._join_check):
            return
        if node.join_via in node.links:
            self._at(self.now + 1.0, self._join_check, node)
        else:
            self._join_attempt(node)

    # -- the health prober -----------------------------------------------------------

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
                    if peer_id in node.links:
                        self._send(node, peer_id, wire.Probe(nonce))
                    elif peer_id in node.members.peers:
                        # No link: dial (a dial is a probe too); the probe follows.
                        node.unsent_probes[peer_id] = nonce
                        if peer_id not in node.dialing:
                            self._dial(node, peer_id, _ignore_dial_result)
                case health.SendProbeRequest(via=via, target=target, nonce=nonce):
                    self._send(node, via, wire.ProbeRequest(target, nonce))
                case health.DeclareDead(node_id=peer_id):
                    ann = node.members.peers.get(peer_id)
                    gen = ann.generation if ann is not None else 0
                    self.declared_dead.append(self._removal(node, peer_id, gen))
                    if ann is not None:
                        self._remove(node, peer_id, ann.generation)

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


def _ignore_dial_result(node: SimNode, ok: bool) -> None:
    pass


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
    """Mean over nodes of gossip bytes sent per second (digests and their answers)."""
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
    sent: list[float] = []
    in_out: list[float] = []
    packets: list[float] = []
    gossip: list[float] = []
    for node_id, node in sim.nodes.items():
        t, b = node.traffic, before[node_id]
        sent.append((t.probe_sent - b.probe_sent) / span)
        in_out.append((t.probe_sent - b.probe_sent + t.probe_received - b.probe_received) / span)
        packets.append((t.probe_packets_sent - b.probe_packets_sent) / span)
        gossip.append((t.gossip_sent - b.gossip_sent) / span)
    return ProbeTraffic(
        nodes=n,
        interval_s=interval,
        timeout_s=timeout,
        duration_s=duration,
        probe_bytes_per_s=statistics.fmean(sent),
        probe_bytes_per_s_max=max(sent),
        probe_in_out_bytes_per_s=statistics.fmean(in_out),
        probe_packets_per_s=statistics.fmean(packets),
        gossip_bytes_per_s=statistics.fmean(gossip),
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
        "seed": (SEED_INTERVAL_S, SEED_TIMEOUT_S),
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
