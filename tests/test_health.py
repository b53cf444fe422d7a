"""Failure detection (meshllm.mesh.health): probes, indirect probes, declarations of death."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshllm.mesh.health import (
    Action,
    DeclareDead,
    FailureDetector,
    SendProbe,
    SendProbeRequest,
)

INTERVAL, TIMEOUT = 0.5, 1.0


def detector(members: int = 5, seed: int = 0, indirect: int = 2) -> FailureDetector:
    d = FailureDetector(INTERVAL, TIMEOUT, indirect, rng=random.Random(seed))
    d.set_members({f"n{i}" for i in range(members)})
    return d


def probes(actions: list[Action]) -> list[SendProbe]:
    return [a for a in actions if isinstance(a, SendProbe)]


def test_round_robin_covers_every_member_once_per_cycle() -> None:
    d = detector(members=7)
    now = 0.0
    seen: list[str] = []
    for _ in range(3 * 7):
        for probe in probes(d.tick(now)):
            seen.append(probe.node_id)
            d.on_ack(probe.nonce)
        now += INTERVAL
    assert len(seen) == 21
    for cycle in range(3):
        assert sorted(seen[cycle * 7 : (cycle + 1) * 7]) == sorted(d.members), seen
    # and the order is shuffled, not the same every cycle
    assert seen[:7] != seen[7:14] or seen[7:14] != seen[14:21]


def test_one_probe_per_interval_however_often_tick_runs() -> None:
    d = detector(members=50)
    sent = 0
    for step in range(1000):  # 10 s in 10 ms steps
        for probe in probes(d.tick(step * 0.01)):
            sent += 1
            d.on_ack(probe.nonce)
    assert sent == 20


def test_ack_clears_the_probe() -> None:
    d = detector()
    (probe,) = d.tick(0.0)
    assert isinstance(probe, SendProbe)
    d.on_ack(probe.nonce)
    assert d.pending == {}
    d.on_ack(probe.nonce)  # a late duplicate is harmless
    d.on_ack(12345)  # so is an unknown nonce
    assert not any(isinstance(a, (DeclareDead, SendProbeRequest)) for a in d.tick(5 * TIMEOUT))


def test_direct_acks_measure_round_trips_smoothed_indirect_ones_do_not() -> None:
    d = detector(members=1)
    (probe,) = probes(d.tick(0.0))
    d.on_ack(probe.nonce, 0.004)
    assert d.rtt_ms == {"n0": 4.0}
    (probe,) = probes(d.tick(INTERVAL))
    d.on_ack(probe.nonce, INTERVAL + 0.012)
    assert d.rtt_ms["n0"] == pytest.approx(5.0)  # one sample of 12 moves 4 an eighth
    # A probe that went indirect proves the peer alive, not how near it is.
    (probe,) = probes(d.tick(2 * INTERVAL))
    d.tick(2 * INTERVAL + TIMEOUT)
    d.on_ack(probe.nonce, 2 * INTERVAL + TIMEOUT + 0.5)
    assert d.rtt_ms["n0"] == pytest.approx(5.0)
    d.set_members(set())
    assert d.rtt_ms == {}


def test_no_ack_asks_helpers_then_declares_dead() -> None:
    d = detector(members=5)
    (probe,) = d.tick(0.0)
    assert isinstance(probe, SendProbe)
    target = probe.node_id
    d.next_probe_at = 100.0  # keep round-robin probes out of the way
    assert d.tick(TIMEOUT - 0.01) == []
    requests = d.tick(TIMEOUT)
    assert len(requests) == 2
    for request in requests:
        assert isinstance(request, SendProbeRequest)
        assert request.target == target and request.nonce == probe.nonce
        assert request.via != target and request.via in d.members
    assert len({r.via for r in requests if isinstance(r, SendProbeRequest)}) == 2
    assert d.tick(2 * TIMEOUT - 0.01) == []
    assert d.tick(2 * TIMEOUT) == [DeclareDead(target)]
    assert target not in d.pending
    assert d.tick(10 * TIMEOUT) == []  # declared once


def test_an_indirect_ack_saves_the_peer() -> None:
    d = detector(members=5)
    (probe,) = d.tick(0.0)
    assert isinstance(probe, SendProbe)
    d.next_probe_at = 100.0
    assert len(d.tick(TIMEOUT)) == 2
    d.on_ack(probe.nonce)  # relayed back by a helper
    assert d.tick(3 * TIMEOUT) == []


def test_helpers_are_limited_by_the_members_available() -> None:
    # two members: only one can help; one member: nobody helps but death still comes
    for members, helpers in ((2, 1), (1, 0)):
        d = detector(members=members)
        (probe,) = d.tick(0.0)
        assert isinstance(probe, SendProbe)
        d.next_probe_at = 100.0
        requests = d.tick(TIMEOUT)
        assert len(requests) == helpers
        assert d.tick(2 * TIMEOUT) == [DeclareDead(probe.node_id)]


def test_helpers_exclude_peers_that_are_themselves_suspect() -> None:
    d = detector(members=3)
    d.next_probe_at = 100.0
    a = d.suspect("n0", 0.0)
    b = d.suspect("n1", 0.0)
    assert [p.node_id for p in probes(a + b)] == ["n0", "n1"]
    requests = d.tick(TIMEOUT)
    vias = {r.via for r in requests if isinstance(r, SendProbeRequest)}
    assert vias == {"n2"}


def test_suspect_probes_at_once() -> None:
    d = detector()
    d.next_probe_at = 100.0
    (probe,) = d.suspect("n3", 7.0)
    assert isinstance(probe, SendProbe) and probe.node_id == "n3"
    assert d.pending["n3"].deadline == 7.0 + TIMEOUT
    assert d.suspect("n3", 7.5) == []  # already out
    assert d.suspect("stranger", 7.5) == []
    assert d.next_deadline() == 7.0 + TIMEOUT


def test_set_members_drops_pending_probes_of_removed_nodes() -> None:
    d = detector(members=4)
    d.next_probe_at = 100.0
    d.suspect("n1", 0.0)
    d.suspect("n2", 0.0)
    d.set_members({"n0", "n2", "n3"})
    assert set(d.pending) == {"n2"}
    actions = d.tick(2 * TIMEOUT) + d.tick(3 * TIMEOUT)
    assert DeclareDead("n1") not in actions
    assert DeclareDead("n2") in actions
    assert all(a.via != "n1" for a in actions if isinstance(a, SendProbeRequest))
    # a removed node is not probed in the round-robin either
    d.set_members({"n0"})
    d.next_probe_at = 0.0
    for step in range(10):
        for probe in probes(d.tick(10.0 + step)):
            assert probe.node_id == "n0"
            d.on_ack(probe.nonce)


def test_next_deadline_is_the_earliest_of_probe_and_waits() -> None:
    d = detector()
    assert d.next_deadline() == 0.0
    (probe,) = probes(d.tick(0.0))
    assert d.next_deadline() == INTERVAL
    d.next_probe_at = 50.0
    assert d.next_deadline() == TIMEOUT
    d.on_ack(probe.nonce)
    assert d.next_deadline() == 50.0
    empty = FailureDetector(INTERVAL, TIMEOUT, rng=random.Random(0))
    assert empty.tick(0.0) == []
    assert empty.next_deadline() == INTERVAL


def test_two_hundred_members_in_process() -> None:
    """200 detectors probe each other; 3 are killed; only they are declared dead, fast."""
    rng = random.Random(42)
    ids = [f"node{i:03d}" for i in range(200)]
    nodes = {i: FailureDetector(INTERVAL, TIMEOUT, rng=random.Random(rng.random())) for i in ids}
    for node_id, d in nodes.items():
        d.set_members(set(ids) - {node_id})
        d.next_probe_at = rng.uniform(0, INTERVAL)
    dead = set(rng.sample(ids, 3))
    killed_at = 2.0
    declared: dict[str, list[tuple[float, str]]] = {}
    sent: Counter[str] = Counter()
    step, now = 0.02, 0.0
    while now < 8.0:
        alive = set(ids) if now < killed_at else set(ids) - dead
        for node_id in sorted(alive):
            d = nodes[node_id]
            for action in d.tick(now):
                match action:
                    case SendProbe(node_id=target, nonce=nonce):
                        sent[node_id] += 1
                        if target in alive:  # delivered and acked within the step
                            d.on_ack(nonce)
                    case SendProbeRequest(via=via, target=target, nonce=nonce):
                        sent[node_id] += 1
                        if via in alive and target in alive:
                            d.on_ack(nonce)
                    case DeclareDead(node_id=target):
                        declared.setdefault(target, []).append((now, node_id))
        now = round(now + step, 6)
    assert set(declared) == dead, f"declared {sorted(declared)}, killed {sorted(dead)}"
    for victim in dead:
        first = min(at for at, _ in declared[victim])
        # first probe of the victim within ~a few intervals, then two timeouts
        assert first - killed_at <= 2 * TIMEOUT + 4 * INTERVAL, (victim, first)
    # traffic per node stays about one probe per interval whatever the mesh size
    per_node = sum(sent[i] for i in ids if i not in dead) / (len(ids) - len(dead))
    assert per_node <= 8.0 / INTERVAL * 1.1, per_node


def test_nonces_cannot_be_guessed() -> None:
    """A member that acks nonces it never saw (counting up, say) clears no probe."""
    d = detector()
    first = probes(d.tick(0.0))
    for guess in range(1, 1000):
        d.on_ack(guess)
    assert set(d.pending) == {p.node_id for p in first}
    nonces = [p.nonce for p in probes(d.tick(0.0))] + [d.nonces() for _ in range(100)]
    assert len(set(nonces)) == len(nonces) and max(nonces) > 1 << 56
