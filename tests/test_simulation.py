"""The in-process mesh simulation (meshllm.mesh.simulation) and what it says about the cores."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshllm.mesh import gossip, wire
from meshllm.mesh import simulation as sim_mod
from meshllm.mesh.simulation import (
    NetworkModel,
    Simulation,
    measure_detection,
    measure_join,
    measure_leave,
    measure_probe_traffic,
)


def not_converged(sim: Simulation) -> Callable[[], bool]:
    return lambda: not sim.converged()


def test_probe_traffic_is_small_and_flat_in_n() -> None:
    small = measure_probe_traffic(10)
    large = measure_probe_traffic(100)
    assert large.probe_bytes_per_s < 2000, large
    assert large.probe_bytes_per_s_max < 2000, large
    assert abs(large.probe_bytes_per_s - small.probe_bytes_per_s) < 0.1 * small.probe_bytes_per_s
    # about one probe and one ack sent per interval, and an ACK-only packet for the
    # ack received (the probe's ACK rides in the ack)
    assert 3 / 0.5 * 0.9 <= large.probe_packets_per_s <= 3 / 0.5 * 1.1, large
    assert large.false_removals == small.false_removals == 0


def test_seed_settings_cut_probe_traffic_by_the_interval_ratio() -> None:
    default = measure_probe_traffic(50)
    seed = measure_probe_traffic(50, interval=15.0, timeout=5.0, duration=150.0)
    ratio = default.probe_bytes_per_s / seed.probe_bytes_per_s
    assert 25 <= ratio <= 35, (default, seed)


@pytest.mark.parametrize("n", [10, 50, 100])
def test_a_killed_node_is_removed_everywhere_within_5_s(n: int) -> None:
    for seed in range(3):
        found = measure_detection(n, seed=seed)
        assert found.removed_everywhere_after_s < 5.0, found
        # at least two timeouts pass before anyone gives up on it
        assert found.first_declared_after_s >= 2 * 1.0, found
        assert found.false_removals == 0, found


def test_detection_survives_packet_loss_without_false_removals() -> None:
    lossy = NetworkModel(latency_s=0.002, jitter_s=0.002, loss=0.1)
    found = measure_detection(30, seed=1, network=lossy)
    assert found.removed_everywhere_after_s < 5.0, found
    assert found.false_removals == 0, found
    traffic = measure_probe_traffic(30, network=lossy, duration=30.0)
    assert traffic.false_removals == 0, traffic


def test_seed_settings_still_detect_a_killed_node() -> None:
    found = measure_detection(20, interval=15.0, timeout=5.0)
    # a probe of it within ~an interval (or the QUIC idle timeout), then two timeouts
    assert found.removed_everywhere_after_s <= sim_mod.IDLE_TIMEOUT_S + 2 * 5.0 + 1, found


@pytest.mark.parametrize("n", [10, 100])
def test_a_join_converges(n: int) -> None:
    joined = measure_join(n)
    assert joined.known_by_all_after_s < 1.0, joined
    assert joined.knows_all_after_s < 1.0, joined
    assert joined.linked_to_all_after_s < 5.0, joined
    assert joined.converged_after_s < 5.0, joined


def test_a_graceful_leave_is_seen_within_1_s() -> None:
    for n in (10, 100):
        left = measure_leave(n)
        assert left.removed_everywhere_after_s < 1.0, left


def test_generations_stay_put_after_a_join() -> None:
    """Regression: an echoed copy of a node's own announcement bumped its generation forever."""
    sim = Simulation(seed=3)
    ids = sim.build_mesh(12)
    before = {i: sim.nodes[i].members.me.generation for i in ids}
    newcomer = sim.join(ids[5])
    sim.run_until(20.0)
    assert sim.converged()
    assert {i: sim.nodes[i].members.me.generation for i in ids} == before
    assert (
        sim.nodes[newcomer].members.me.generation == sim.nodes[newcomer].members.digest()[newcomer]
    )


def test_a_state_change_reaches_everyone_at_once() -> None:
    sim = Simulation(seed=4)
    ids = sim.build_mesh(50)
    sim.run_until(1.0)
    sim.change(ids[7], serving="other-model")
    sim.run_until(1.05)  # far less than a digest round
    for node_id in ids[:7] + ids[8:]:
        assert sim.nodes[node_id].members.peers[ids[7]].serving == "other-model", node_id


def test_a_frozen_node_is_removed_then_refutes_and_comes_back() -> None:
    """A node paused for 5 s is declared dead; on resume it refutes and is back at once.

    Regressions: (1) the PeerGone about it never reaches it (the link closes in the
    same breath), so it never refuted and the others' tombstones kept it out for
    120 s; now a node that hears from a peer it holds dead tells it. (2) With all
    its links closed, its probes were dropped unsent, so it declared every peer
    dead and its PeerGone notices set off removal storms; now it dials them.
    """
    for n in (5, 40):
        sim = Simulation(seed=n)
        ids = sim.build_mesh(n)
        sim.run_until(1.0)
        frozen = ids[n // 2]
        sim.pause(frozen, 5.0)
        sim.run_until(6.0)
        assert not any(sim.knows(i, frozen) for i in ids if i != frozen), "not removed"
        generation = sim.nodes[frozen].members.me.generation
        back = sim.run_while(not_converged(sim), deadline=7.0)
        assert back, f"no convergence 1 s after resuming (n={n})"
        assert sim.nodes[frozen].members.me.generation > generation, "did not refute"
        sim.run_until(15.0)  # past every probe the frozen node had out
        removed = {r.node_id for r in sim.removals}
        assert removed == {frozen}, f"live nodes removed: {sorted(removed - {frozen})}"
        assert sim.converged()
        assert len(sim.nodes[frozen].links) == n - 1


@pytest.mark.parametrize("down_for", [0.3, 10.0])
def test_a_killed_node_that_restarts_rejoins(down_for: float) -> None:
    """Restarted before or after the mesh noticed its death: back, linked to all, in 5 s."""
    for seed in range(3):
        sim = Simulation(seed=seed)
        ids = sim.build_mesh(20)
        sim.run_until(1.0)
        node_id = ids[seed + 1]
        sim.kill(node_id)
        sim.run_until(1.0 + down_for)
        sim.restart(node_id, via=ids[0])
        restarted = sim.now

        def settled(sim: Simulation = sim, ids: list[str] = ids) -> bool:
            return sim.converged() and all(len(sim.nodes[i].links) == 19 for i in ids)

        assert sim.run_while(lambda: not settled(), deadline=restarted + 5.0), (seed, sim.now)
        sim.run_until(sim.now + 10.0)
        assert settled(), "fell apart again"
        boot = sim.nodes[node_id].boot_generation
        assert all(sim.nodes[i].members.peers[node_id].generation >= boot for i in ids[:1]), boot


def test_same_seed_same_story() -> None:
    a = measure_detection(30, seed=9)
    b = measure_detection(30, seed=9)
    assert a == b
    assert measure_join(20, seed=2) == measure_join(20, seed=2)


def test_a_converged_mesh_sends_only_fingerprints() -> None:
    """Upkeep of a converged mesh: one fingerprint per node per round, nothing answers it."""
    traffic = measure_probe_traffic(30, duration=20.0)
    largest = len(wire.encode_frame(wire.Fingerprint(2**63 - 1)))
    assert 0 < traffic.gossip_frame_bytes_per_s <= largest / sim_mod.ANTI_ENTROPY_S, traffic


def test_anti_entropy_repairs_news_that_was_lost() -> None:
    """A change that reached nobody (its Syncs were lost) spreads by fingerprint and digest."""
    sim = Simulation(seed=5)
    ids = sim.build_mesh(20)
    sim.run_until(1.0)
    changed = sim.nodes[ids[3]]
    lost = changed.core.update_self(serving="other-model")
    assert any(isinstance(a, gossip.Send) for a in lost)  # the Syncs that never go out
    assert not sim.converged()
    assert sim.run_while(not_converged(sim), deadline=1.0 + 10 * sim_mod.ANTI_ENTROPY_S)
    assert all(sim.nodes[i].members.peers[ids[3]].serving == "other-model" for i in ids[:3])


def test_the_simulated_nodes_run_the_gossip_core() -> None:
    sim = Simulation(seed=6)
    ids = sim.build_mesh(3)
    assert all(isinstance(sim.nodes[i].core, gossip.GossipCore) for i in ids)
    assert sim.nodes[ids[0]].links.keys() == set(ids[1:])
