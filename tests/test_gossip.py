"""The gossip core (meshllm.mesh.gossip), cores driven against each other in memory.

Like aioquic's `client_and_server()` and `transfer()`: a tiny in-memory net
delivers what each core sends, in order, until nothing is in flight, with a
bound on the messages it will deliver.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshllm.mesh import gossip, identity, wire
from meshllm.mesh.gossip import ANTI_ENTROPY_S, REDIAL_AFTER_S, GossipCore
from meshllm.mesh.membership import sign_announcement, sign_leave
from meshllm.runtime.logs import Throttle

MAX_DELIVERIES = 1000


def ann(node_id: str, generation: int = 100, **fields: Any) -> wire.PeerAnnouncement:
    fields.setdefault("addresses", (f"{node_id}:1",))
    return wire.PeerAnnouncement(node_id=node_id, generation=generation, **fields)


class Net:
    """Cores plus the links between them; dials succeed at once unless told otherwise."""

    def __init__(self, *names: str, joins: dict[str, str] | None = None) -> None:
        self.now = 0.0
        joins = joins or {}
        self.cores = {
            name: GossipCore(
                ann(name),
                self.now,
                joins=((f"{joins[name]}:1",),) if name in joins else (),
                rng=random.Random(i),
            )
            for i, name in enumerate(names)
        }
        self.ends: dict[int, tuple[str, str]] = {}
        self.open: set[tuple[str, int]] = set()
        """(node, link) for each side of a link that is still open."""
        self.in_flight: deque[tuple[str, int, wire.WireMessage]] = deque()
        self.delivered: list[tuple[str, str, wire.WireMessage]] = []
        """(from, to, message) in delivery order."""
        self.events: list[tuple[str, gossip.Action]] = []
        self.dials: list[tuple[str, gossip.Dial]] = []
        self.unreachable: set[str] = set()
        self.pending_dials: list[tuple[str, gossip.Dial]] = []

    def core(self, name: str) -> GossipCore:
        return self.cores[name]

    def execute(self, name: str, actions: list[gossip.Action]) -> None:
        for action in actions:
            match action:
                case gossip.Send(link=link, msg=msg):
                    if (name, link) in self.open:
                        self.in_flight.append((name, link, msg))
                case gossip.CloseLink(link=link):
                    self.close(name, link)
                case gossip.Dial() as dial:
                    self.dials.append((name, dial))
                    self.pending_dials.append((name, dial))
                case _:
                    self.events.append((name, action))

    def other(self, name: str, link: int) -> str:
        a, b = self.ends[link]
        return b if a == name else a

    def connect(self, dialer: str, acceptor: str, dial: gossip.Dial | None = None) -> int:
        link = len(self.ends) + 1
        self.ends[link] = (dialer, acceptor)
        self.open |= {(dialer, link), (acceptor, link)}
        self.execute(acceptor, self.core(acceptor).link_opened(link, dialer, False, self.now))
        if dial is None:
            actions = self.core(dialer).link_opened(link, acceptor, True, self.now)
        else:
            actions = self.core(dialer).dial_succeeded(dial, link, acceptor, self.now)
        self.execute(dialer, actions)
        return link

    def close(self, name: str, link: int) -> None:
        """`name` closes its side; the other side's read loop ends too."""
        for side in (name, self.other(name, link)):
            if (side, link) in self.open:
                self.open.discard((side, link))
                self.execute(side, self.core(side).link_closed(link, self.now))

    def run_dials(self) -> None:
        while self.pending_dials:
            name, dial = self.pending_dials.pop(0)
            target = dial.peer_id or dial.addresses[0].split(":")[0]
            if target in self.unreachable or target not in self.cores:
                self.execute(name, self.core(name).dial_failed(dial, self.now))
            else:
                self.connect(name, target, dial)

    def transfer(self) -> int:
        """Deliver (and dial) until nothing is in flight; how many messages were delivered."""
        count = 0
        while self.in_flight or self.pending_dials:
            self.run_dials()
            while self.in_flight:
                count += 1
                assert count <= MAX_DELIVERIES, f"no end in sight: {self.delivered[-5:]}"
                src, link, msg = self.in_flight.popleft()
                dst = self.other(src, link)
                if (dst, link) in self.open:
                    self.delivered.append((src, dst, msg))
                    self.execute(dst, self.core(dst).frame_received(link, msg, self.now))
        return count

    def tick(self, name: str, now: float) -> None:
        self.now = now
        self.execute(name, self.core(name).tick(now))

    def full_mesh(self) -> None:
        names = sorted(self.cores)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                self.connect(a, b)
        self.transfer()
        self.delivered.clear()

    def agree(self) -> bool:
        digests = [core.members.digest() for core in self.cores.values()]
        return all(d == digests[0] for d in digests)


def test_a_new_link_syncs_both_sides() -> None:
    net = Net("a", "b")
    net.connect("a", "b")
    net.transfer()
    assert net.core("a").members.peers["b"] == ann("b")
    assert net.core("b").members.peers["a"] == ann("a")
    assert ("a", gossip.Publish()) in net.events and ("b", gossip.Publish()) in net.events


def test_equal_fingerprints_end_the_exchange() -> None:
    net = Net("a", "b")
    net.full_mesh()
    net.tick("a", ANTI_ENTROPY_S)
    assert net.transfer() == 1
    ((src, dst, msg),) = net.delivered
    assert (src, dst) == ("a", "b") and isinstance(msg, wire.Fingerprint)


@pytest.mark.parametrize("who_ticks", ["a", "b"])
def test_a_mismatch_always_ends_with_both_sides_equal(who_ticks: str) -> None:
    net = Net("a", "b")
    net.full_mesh()
    a, b = net.core("a"), net.core("b")
    # Each side learnt something the other missed (the news was lost on the way).
    a.members.merge(ann("x", 5), 0)
    b.members.merge(ann("y", 7), 0)
    a.members.merge(ann("z", 1), 0)
    b.members.merge(ann("z", 2, serving="m"), 0)
    assert not net.agree()
    net.tick(who_ticks, ANTI_ENTROPY_S)
    net.transfer()
    assert net.agree()
    assert a.members.peers["z"].serving == "m"
    kinds = [type(m).__name__ for _, _, m in net.delivered]
    assert kinds[:2] == ["Fingerprint", "Digest"], kinds
    # The next round finds nothing to repair.
    net.delivered.clear()
    net.tick(who_ticks, 2 * ANTI_ENTROPY_S)
    assert net.transfer() == 1


def test_a_stale_copy_that_a_tombstone_keeps_out_is_removed_on_the_other_side() -> None:
    net = Net("a", "b")
    net.full_mesh()
    a, b = net.core("a"), net.core("b")
    a.members.merge(ann("x", 5), 0)
    b.members.merge(ann("x", 5), 0)
    b.members.remove("x", 5, 0)  # b heard that x left; a missed the notice
    net.tick("a", ANTI_ENTROPY_S)
    net.transfer()
    assert "x" not in a.members.peers and "x" not in b.members.peers
    assert "x" in a.members.tombstones
    assert net.agree()


def test_a_tombstone_blocks_an_old_copy_until_a_newer_generation() -> None:
    net = Net("a", "b")
    net.full_mesh()
    b = net.core("b")
    link = b.links["a"]
    b.members.merge(ann("x", 5), 0)
    net.execute("b", b.frame_received(link, wire.PeerGone("x", 5, "left"), 0))
    assert "x" not in b.members.peers
    net.in_flight.clear()
    net.execute("b", b.frame_received(link, wire.Sync((ann("x", 5),)), 1))
    assert "x" not in b.members.peers
    # ... and b tells the sender that x is gone.
    assert [m for _, _, m in net.in_flight] == [wire.PeerGone("x", 5, "gone")]
    net.execute("b", b.frame_received(link, wire.Sync((ann("x", 6),)), 2))
    assert b.members.peers["x"].generation == 6


def test_news_is_forwarded_once() -> None:
    net = Net("a", "b", "c", "d")
    net.full_mesh()
    net.execute("a", net.core("a").update_self(serving="m"))
    net.transfer()
    syncs = [(s, d) for s, d, m in net.delivered if isinstance(m, wire.Sync)]
    # a tells its three links; each of the others forwards the news once, to the
    # two links it did not come from, then drops every later copy.
    assert len(syncs) == 3 + 3 * 2
    assert len(set(syncs)) == len(syncs)
    assert all(c.members.peers["a"].serving == "m" for n, c in net.cores.items() if n != "a")


def test_both_sides_keep_the_same_of_two_racing_links() -> None:
    net = Net("a", "b")
    first = net.connect("b", "a")  # b dials a, and at once a dials b
    second = net.connect("a", "b")
    net.transfer()
    assert net.core("a").links == {"b": second} and net.core("b").links == {"a": second}
    assert ("a", first) not in net.open and ("b", first) not in net.open


def test_a_new_link_replaces_one_older_than_the_race() -> None:
    net = Net("a", "b")
    net.connect("a", "b")
    net.transfer()
    net.now = 10.0  # b's Gossiper restarted: its new link must win on both sides
    fresh = net.connect("b", "a")
    net.transfer()
    assert net.core("a").links == {"b": fresh} and net.core("b").links == {"a": fresh}


def test_the_lower_id_dials_at_once_the_other_after_a_while() -> None:
    net = Net("a", "b", "c")
    net.unreachable.add("c")  # a cannot reach c (c can reach a)
    net.connect("a", "b")
    net.connect("b", "c")
    net.transfer()
    # a and c learnt of each other through b: a (lower) dials at once, c waits.
    assert [(n, d.peer_id) for n, d in net.dials] == [("a", "c")]
    net.dials.clear()
    net.tick("c", ANTI_ENTROPY_S)
    assert not [d for n, d in net.dials if n == "c"]
    net.tick("c", 3 * ANTI_ENTROPY_S + REDIAL_AFTER_S)
    assert [(n, d.peer_id) for n, d in net.dials if n == "c"] == [("c", "a")]
    net.transfer()
    assert net.core("a").links.keys() == {"b", "c"}


def test_a_leave_is_seen_everywhere_and_a_false_death_is_refuted() -> None:
    net = Net("a", "b", "c")
    net.full_mesh()
    net.execute("a", net.core("a").leave())
    net.transfer()
    assert all("a" not in net.core(n).members.peers for n in "bc")

    net = Net("a", "b", "c")
    net.full_mesh()
    before = net.core("a").members.me.generation
    net.execute("b", net.core("b").peer_died("a", 0))  # a was only frozen
    net.transfer()
    assert "a" not in net.core("c").members.peers
    # a's links are gone; it redials, is told it is dead, and refutes.
    for link in list(net.core("a").links.values()):
        net.close("a", link)
    net.tick("a", ANTI_ENTROPY_S)
    net.transfer()
    assert any(isinstance(e, gossip.Refuted) for n, e in net.events if n == "a")
    after = net.core("a").members.me.generation
    assert after > before
    assert net.core("b").members.peers["a"].generation == after
    assert net.core("c").members.peers["a"].generation == after


def test_probes_are_relayed_and_wait_for_a_dial() -> None:
    net = Net("a", "b", "c")
    net.full_mesh()
    net.execute("a", net.core("a").probe_via("b", "c", 7, 0.0))
    net.transfer()
    assert ("a", gossip.ProbeAnswered(7)) in net.events
    assert not net.core("b").relays  # the relayed ack came back and was passed on
    # A probe of a peer without a link dials it and follows on the new link.
    net.close("a", net.core("a").links["c"])
    net.events.clear()
    net.execute("a", net.core("a").probe("c", 8, 0))
    net.transfer()
    assert ("a", gossip.ProbeAnswered(8)) in net.events


def test_a_join_redials_with_backoff_and_again_when_its_link_ends() -> None:
    net = Net("a", "b", joins={"b": "a"})
    net.unreachable.add("a")
    b = net.core("b")
    net.execute("b", b.start(0.0))
    net.transfer()
    (join,) = b.joins
    waits = []
    for _ in range(4):
        waits.append(join.next_at - net.now)
        net.tick("b", join.next_at)
        net.transfer()
    assert waits == pytest.approx([0.2, 0.4, 0.8, 1.6])
    net.unreachable.clear()
    net.tick("b", join.next_at)
    net.transfer()
    assert "a" in b.links
    # The seed restarts and knows nobody: b dials it again, after the base delay.
    closed_at = net.now
    net.close("a", b.links["a"])
    assert join.next_at - closed_at == pytest.approx(0.2)
    net.tick("b", join.next_at)
    net.transfer()
    assert "a" in b.links


# -- signed gossip (issue 9, items 2 and 3) --------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def signed_core(key: ec.EllipticCurvePrivateKey, **kwargs: Any) -> GossipCore:
    node_id = identity.node_id_of(key)
    return GossipCore(ann(node_id), 0.0, key=key, rng=random.Random(0), **kwargs)


def deliver(actions: Sequence[gossip.Action], to: GossipCore, link: int, now: float) -> list[Any]:
    """Each frame sent, through the real encoder and decoder, to `to`; what `to` did."""
    out: list[Any] = []
    for action in actions:
        if isinstance(action, gossip.Send):
            frame = wire.encode_frame(action.msg)
            out += to.frame_received(link, wire.decode_payload(frame[wire.HEADER :]), now)
    return out


class Trio:
    """Signed cores a, b, c that know each other (as after convergence), linked in a triangle."""

    def __init__(self) -> None:
        self.keys = [new_key() for _ in range(3)]
        self.a, self.b, self.c = cores = [signed_core(k) for k in self.keys]
        for x in cores:
            for y in cores:
                if x is not y:
                    assert x.members.merge(y.members.me, 0.0)
        for link, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)], 1):
            cores[i].link_opened(link, cores[j].node_id, True, 0.0, synced=True)
            cores[j].link_opened(link, cores[i].node_id, False, 0.0, synced=True)

    def link_of(self, x: GossipCore, y: GossipCore) -> int:
        return x.links[y.node_id]


def test_a_forged_announcement_is_rejected_and_a_forged_signature_closes_the_link() -> None:
    t = Trio()
    forger = new_key()
    victim = t.c.members.me
    forged = wire.PeerAnnouncement(node_id=victim.node_id, generation=victim.generation + 1)
    by_forger = sign_announcement(forged, forger)
    stolen = msgspec.structs.replace(by_forger, public_key=victim.public_key)
    newer_a = t.a.members.me
    t.a.update_self(role="host")
    news = wire.Sync((forged, by_forger, newer_a, stolen, t.a.members.me))
    link = t.link_of(t.b, t.a)
    out = t.b.frame_received(link, news, 0.0)
    rejected = [a.reason for a in out if isinstance(a, gossip.Rejected)]
    assert rejected == [
        "its key does not match its node id",  # unsigned: no key at all
        "its key does not match its node id",
        "its signature does not verify",
    ]
    assert t.b.members.peers[victim.node_id] == victim
    # A signature check that fails costs ~0.3 ms, and honest relays pass on only what they
    # verified: the link is closed at once, the rest of the frame unread, later frames ignored.
    assert gossip.CloseLink(link, t.a.node_id, gossip.FORGED_LINK) in out
    assert t.b.members.peers[t.a.node_id].role != "host"
    assert t.b.frame_received(link, wire.Sync((t.a.members.me,)), 0.1) == []
    assert t.a.node_id not in t.b.links


def test_another_members_death_verdict_is_checked_not_believed() -> None:
    t = Trio()
    c = t.c.node_id
    gen = t.b.members.peers[c].generation
    out = t.b.frame_received(t.link_of(t.b, t.a), wire.PeerGone(c, gen, "died"), 0.0)
    assert c in t.b.members.peers, "removed on another member's word"
    probes = [a for a in out if isinstance(a, gossip.Send)]
    # Our own probe of c, and c's probe through a, both at once.
    assert {type(a.msg) for a in probes} == {wire.Probe, wire.ProbeRequest}
    assert t.b.next_timer() <= gossip.CHECK_TIMEOUT_S
    # c answers: the check is over, c stays, and nothing is passed on.
    (probe,) = [a.msg for a in probes if isinstance(a.msg, wire.Probe)]
    assert t.b.frame_received(t.link_of(t.b, t.c), wire.ProbeAck(probe.nonce), 0.1) == []
    assert not any(isinstance(a, gossip.PeerRemoved) for a in t.b.tick(5.0))
    assert c in t.b.members.peers
    # A second verdict nobody answers: removed on our own evidence, and told as ours.
    t.b.frame_received(t.link_of(t.b, t.a), wire.PeerGone(c, gen, "died"), 10.0)
    out = t.b.tick(10.0 + gossip.CHECK_TIMEOUT_S)
    assert [a.node_id for a in out if isinstance(a, gossip.PeerRemoved)] == [c]
    notices = [a.msg for a in out if isinstance(a, gossip.Send)]
    assert wire.PeerGone(c, gen, "reported gone, and did not answer our probes") in notices


def test_a_leave_signed_by_the_node_removes_it_at_once() -> None:
    t = Trio()
    (leave,) = {a.msg for a in t.c.leave() if isinstance(a, gossip.Send)}
    assert isinstance(leave, wire.PeerGone) and leave.signature
    out = t.b.frame_received(t.link_of(t.b, t.c), leave, 0.0)
    assert [a.node_id for a in out if isinstance(a, gossip.PeerRemoved)] == [t.c.node_id]
    # Passed on as it came, so the next node checks the signature too and removes c at once.
    relayed = [a for a in out if isinstance(a, gossip.Send) and a.msg == leave]
    assert [a.peer_id for a in relayed] == [t.a.node_id]
    out = deliver(relayed, t.a, t.link_of(t.a, t.b), 0.0)
    assert [a.node_id for a in out if isinstance(a, gossip.PeerRemoved)] == [t.c.node_id]
    # The same leave signed by another key is only a verdict.
    t2 = Trio()
    forged = sign_leave(wire.PeerGone(t2.c.node_id, t2.c.members.me.generation, "left"), new_key())
    out = t2.b.frame_received(t2.link_of(t2.b, t2.a), forged, 0.0)
    assert not any(isinstance(a, gossip.PeerRemoved) for a in out)
    assert t2.c.node_id in t2.b.members.peers


def test_a_full_table_is_synced_in_chunks_under_the_frame_cap() -> None:
    """A member holding 5,000 signed announcements; a new node links and learns them all."""
    member, newcomer = signed_core(new_key()), signed_core(new_key())
    for i in range(5000):
        key = ec.derive_private_key(i + 1, ec.SECP256R1())
        node_id = identity.node_id_of(key)
        models = (f"model-{i % 50}", "meshllm-demo")
        peer = ann(node_id, 100 + i, available_models=models)
        assert member.members.merge(sign_announcement(peer, key), 0.0)
    member.link_opened(1, newcomer.node_id, False, 0.0)
    digest = newcomer.link_opened(1, member.node_id, True, 0.0)
    syncs = deliver(digest, member, 1, 0.0)  # the newcomer's digest: it lacks everything
    assert sum(isinstance(a, gossip.Send) and isinstance(a.msg, wire.Sync) for a in syncs) > 1
    out = deliver(syncs, newcomer, 1, 0.0)
    assert not any(isinstance(a, gossip.Rejected) for a in out)
    learned = newcomer.members.digest()
    assert all(learned[node_id] == gen for node_id, gen in member.members.digest().items())
    assert len(newcomer.members.peers) == 5001


def test_a_new_member_beyond_the_table_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meshllm.mesh.membership.MAX_PEERS", 2)
    t = Trio()
    extra_key = new_key()
    extra = sign_announcement(ann(identity.node_id_of(extra_key)), extra_key)
    out = t.b.frame_received(t.link_of(t.b, t.a), wire.Sync((extra,)), 0.0)
    assert [a.reason for a in out if isinstance(a, gossip.Rejected)] == [
        "the membership table is full"
    ]
    assert extra.node_id not in t.b.members.peers


def test_warnings_about_peers_are_rate_limited_per_kind() -> None:
    throttle = Throttle(interval=10.0)
    assert throttle.allow("forged", 0.0) == 0
    assert throttle.allow("forged", 1.0) is None
    assert throttle.allow("forged", 9.9) is None
    assert throttle.allow("malformed", 1.0) == 0  # another kind has its own budget
    assert throttle.allow("forged", 10.0) == 2  # the next line says how many were skipped
    assert throttle.allow("forged", 20.0) == 0


def test_a_throttle_keyed_by_peer_stays_bounded_whatever_ids_a_member_makes() -> None:
    from meshllm.runtime.logs import MAX_KINDS, OTHER_KINDS

    throttle = Throttle(interval=10.0)
    said = [throttle.allow(f"peer-{i}", 0.0) for i in range(10_000)]
    assert len(throttle.next_at) <= MAX_KINDS + 1
    # the first MAX_KINDS peers get a line each, the rest share one
    assert said.count(0) == MAX_KINDS + 1 and OTHER_KINDS in throttle.next_at
    # once their intervals ended, the kinds are forgotten and new peers are heard again
    assert throttle.allow("newcomer", 10.0) == 0
    assert len(throttle.next_at) <= 2


# -- an attacker's review (issue 9): what one hostile member can make a node do --------


def sends(out: Sequence[gossip.Action], kind: type) -> list[Any]:
    return [a.msg for a in out if isinstance(a, gossip.Send) and isinstance(a.msg, kind)]


def test_digests_and_fingerprints_are_answered_once_per_interval_per_link() -> None:
    """A `Digest` that claims to lack everything buys the whole table: not in a loop."""
    net = Net("a", "b", "c")
    net.full_mesh()
    b = net.core("b")
    link = b.links["a"]
    begging = wire.Digest({})
    start = gossip.ANSWER_INTERVAL_S  # the links' own opening digests were answered at 0
    answered = [
        len(sends(b.frame_received(link, begging, start + i * 0.01), wire.Sync)) for i in range(50)
    ]
    assert answered == [1] + [0] * 49
    assert sends(b.frame_received(link, begging, 2 * start), wire.Sync)
    # Another link has its own allowance.
    assert sends(b.frame_received(b.links["c"], begging, start), wire.Sync)
    # A reply digest is answered only after a digest of ours, and once.
    reply = wire.Digest({}, reply=True)
    assert b.frame_received(link, reply, 10.0) == []
    assert sends(b.frame_received(link, wire.Fingerprint(1), 10.0), wire.Digest)
    assert sends(b.frame_received(link, reply, 10.0), wire.Sync)
    assert b.frame_received(link, reply, 10.0) == []
    # Fingerprints, answered with our digest, likewise.
    asked = [
        sends(b.frame_received(link, wire.Fingerprint(i), 10.0), wire.Digest) for i in range(9)
    ]
    assert [len(d) for d in asked] == [0] * 9  # answered at 10.0 already
    assert sends(b.frame_received(link, wire.Fingerprint(1), 10.0 + start), wire.Digest)


def test_an_honest_exchange_still_ends_with_both_sides_equal_at_once() -> None:
    net = Net("a", "b")
    net.full_mesh()
    net.core("a").update_self(role="host")  # not sent: b lacks it until anti-entropy
    net.core("a").members.merge(ann("x"), 0.0)
    net.core("b").members.merge(ann("y"), 0.0)
    net.tick("a", 3.0)
    net.transfer()
    assert net.agree()


def test_a_flood_of_verdicts_on_us_is_refuted_once_per_interval() -> None:
    t = Trio()
    b, link = t.b, t.link_of(t.b, t.a)
    gen = b.members.me.generation
    verdict = wire.PeerGone(b.node_id, gen, "declared dead")
    out: list[gossip.Action] = []
    for i in range(100):
        out += b.frame_received(link, verdict, i * 0.001)
    assert [a for a in out if isinstance(a, gossip.Refuted)] == [gossip.Refuted("declared dead")]
    assert len(sends(out, wire.Sync)) == 2  # to a and to c
    assert b.members.me.generation == gen + 1
    # The verdicts after the refute are answered once more, at the end of the interval.
    assert b.next_timer() == pytest.approx(gossip.REFUTE_INTERVAL_S)
    later = b.tick(gossip.REFUTE_INTERVAL_S)
    assert [a for a in later if isinstance(a, gossip.Refuted)] == [gossip.Refuted("declared dead")]
    assert b.members.me.generation == gen + 2
    assert not any(isinstance(a, gossip.Refuted) for a in b.tick(2 * gossip.REFUTE_INTERVAL_S))


def test_an_ack_counts_only_from_the_peer_probed_or_the_helper_asked() -> None:
    """A member that acks whatever nonce it likes cannot keep a dead node alive."""
    t = Trio()
    b = t.b
    a_id, c_id = t.a.node_id, t.c.node_id
    b.probe(c_id, 1234, 0.0)
    # From a, which was not asked: ignored, and the nonce still counts from c.
    assert b.frame_received(t.link_of(b, t.a), wire.ProbeAck(1234), 0.1) == []
    assert b.frame_received(t.link_of(b, t.c), wire.ProbeAck(1234), 0.1) == [
        gossip.ProbeAnswered(1234)
    ]
    assert b.frame_received(t.link_of(b, t.c), wire.ProbeAck(1234), 0.1) == []  # once
    # The same nonce, passed on by a helper asked to probe c: from the helper, it counts.
    b.probe(c_id, 99, 1.0)
    b.probe_via(a_id, c_id, 99, 2.0)
    assert b.frame_received(t.link_of(b, t.a), wire.ProbeAck(99), 2.1) == [gossip.ProbeAnswered(99)]
    # Relayed probes: the ack must come from the peer we probed for the asker.
    d = signed_core(new_key())
    assert b.members.merge(d.members.me, 0.0)
    b.link_opened(9, d.node_id, False, 0.0, synced=True)
    out = b.frame_received(9, wire.ProbeRequest(c_id, 5), 4.0)
    (relayed,) = sends(out, wire.Probe)
    assert b.frame_received(9, wire.ProbeAck(relayed.nonce), 4.1) == []
    back = b.frame_received(t.link_of(b, t.c), wire.ProbeAck(relayed.nonce), 4.1)
    assert back == [gossip.Send(9, d.node_id, wire.ProbeAck(5))]


def test_probe_nonces_are_random() -> None:
    core = GossipCore(ann("a"), 0.0)
    nonces = [core.nonces() for _ in range(100)]
    assert len(set(nonces)) == 100
    assert max(nonces) > 1 << 56  # 63 random bits, not a count from a known start


def test_dials_are_capped_at_once_and_in_addresses() -> None:
    """500 members announced at once, 8 addresses each: a few dials, two addresses each."""
    net = Net("a")
    a = net.core("a")
    addresses = tuple(f"10.0.0.{i}:{p}" for i, p in enumerate(range(9000, 9008)))
    for i in range(500):
        a.members.merge(ann(f"z{i:03}", addresses=addresses), 0.0)
    out = a.tick(10.0)
    dials = [d for d in out if isinstance(d, gossip.Dial)]
    assert len(dials) == gossip.MAX_DIALS
    assert {d.addresses for d in dials} == {addresses[: gossip.DIAL_ADDRESSES]}
    # A probe of yet another member waits for a free dial, rather than adding one.
    assert a.probe("z499", 1, 10.0) == []
    a.dial_failed(dials[0], 13.0)
    assert [d.peer_id for d in a.probe("z499", 2, 13.0) if isinstance(d, gossip.Dial)] == ["z499"]


def test_helpers_alone_keep_a_silent_peer_alive_only_a_few_times_in_a_row() -> None:
    """A hostile helper that acks every request cannot keep a killed node in the mesh."""
    t = Trio()
    b, a_id, c_id = t.b, t.a.node_id, t.c.node_id

    def saved_by_helper(nonce: int) -> bool:
        b.probe(c_id, nonce, 0.0)  # c never answers: it was killed
        b.probe_via(a_id, c_id, nonce, 0.0)
        return b.frame_received(t.link_of(b, t.a), wire.ProbeAck(nonce), 0.1) != []

    assert [saved_by_helper(n) for n in range(10, 15)] == [True] * gossip.HELPER_SAVES + [False] * (
        5 - gossip.HELPER_SAVES
    )
    # An ack from c itself shows it alive, and helpers count again.
    b.probe(c_id, 20, 0.0)
    assert b.frame_received(t.link_of(b, t.c), wire.ProbeAck(20), 0.1) != []
    assert saved_by_helper(21)
