"""The gossip core (meshllm.mesh.gossip), cores driven against each other in memory.

Like aioquic's `client_and_server()` and `transfer()`: a tiny in-memory net
delivers what each core sends, in order, until nothing is in flight, with a
bound on the messages it will deliver.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import pytest

from meshllm.mesh import gossip, wire
from meshllm.mesh.gossip import ANTI_ENTROPY_S, REDIAL_AFTER_S, GossipCore

MAX_DELIVERIES = 1000


def ann(node_id: str, generation: int = 100, **fields: Any) -> wire.PeerAnnouncement:
    return wire.PeerAnnouncement(
        node_id=node_id, generation=generation, addresses=(f"{node_id}:1",), **fields
    )


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
    net.execute("a", net.core("a").probe_via("b", "c", 7))
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
