"""Balancing, failover and admission (meshllm.http.balance): the sans-I/O core."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.http.balance import (
    BalancePolicy,
    Balancer,
    target_id,
)
from meshllm.runtime.messages import RouteTarget


def remote(node: str) -> RouteTarget:
    return RouteTarget(node, False, 9337, "m")


# --- balancing ---------------------------------------------------------------------


def test_least_outstanding_goes_first() -> None:
    balancer = Balancer(rng=random.Random(1))
    for node in ("a", "a", "b"):
        balancer.started(node)
    assert balancer.order(["a", "b", "c"], now=0.0) == ["c", "b", "a"]


def test_local_target_wins_a_tie_but_not_a_lighter_remote() -> None:
    local, other = RouteTarget("me", True, 8080, "m"), remote("peer")
    for seed in range(20):
        assert Balancer(rng=random.Random(seed)).order([other, local], 0.0)[0] == local
    balancer = Balancer()
    balancer.started(local)
    assert balancer.order([other, local], 0.0)[0] == other


def test_ties_are_broken_at_random() -> None:
    firsts = {Balancer(rng=random.Random(seed)).order(["a", "b"], 0.0)[0] for seed in range(20)}
    assert firsts == {"a", "b"}


def test_order_holds_at_most_attempts_targets() -> None:
    balancer = Balancer(BalancePolicy(attempts=2))
    assert len(balancer.order(["a", "b", "c", "d"], 0.0)) == 2


def test_failed_target_is_avoided_until_its_cooldown_ends() -> None:
    balancer = Balancer()
    balancer.started("a")
    assert balancer.failed("a", now=10.0) == 1.0
    assert balancer.in_flight("a") == 0
    assert balancer.order(["a", "b"], 10.5) == ["b"]
    assert set(balancer.order(["a", "b"], 11.0)) == {"a", "b"}


def test_cooldown_doubles_until_a_success_resets_it() -> None:
    balancer = Balancer(BalancePolicy(cooldown_s=1.0, cooldown_max_s=5.0))
    now, delays = 0.0, []
    for _ in range(5):
        delays.append(balancer.failed("a", now))
        now += delays[-1]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    balancer.started("a")
    balancer.finished("a", ok=True)
    assert balancer.failed("a", now) == 1.0


def test_an_unhealthy_ending_keeps_the_backoff() -> None:
    balancer = Balancer()
    assert balancer.failed("a", 0.0) == 1.0
    balancer.started("a")
    balancer.finished("a", ok=False)  # cut midway: no news about its health
    assert balancer.failed("a", 1.0) == 2.0


def test_failures_during_a_cooldown_do_not_lengthen_it() -> None:
    balancer = Balancer()
    for _ in range(5):
        balancer.started("a")
    assert balancer.failed("a", 0.0) == 1.0
    assert [balancer.failed("a", t) for t in (0.25, 0.5, 0.75, 0.9)] == pytest.approx(
        [0.75, 0.5, 0.25, 0.1]
    )
    assert balancer.failed("a", 1.0) == 2.0  # the next try after it ended doubles


def test_with_every_target_cooling_the_order_is_empty_with_a_retry_after() -> None:
    balancer = Balancer()
    balancer.failed("a", 0.0)
    balancer.failed("b", 0.0)
    balancer.failed("b", 1.0)  # b: 2 s more
    assert balancer.order(["a", "b"], 0.2) == []
    assert balancer.retry_after(["a", "b"], 0.2) == 1
    assert balancer.order(["b"], 1.5) == []
    assert balancer.retry_after(["b"], 1.5) == 2
    assert balancer.retry_after([], 0.0) == 1


def test_targets_that_left_the_table_are_forgotten_once_idle() -> None:
    balancer = Balancer()
    balancer.started("a")
    balancer.started("a")
    balancer.failed("b", 0.0)
    balancer.retain(["c"])
    assert set(balancer.states) == {"a"}  # requests still in flight there
    balancer.finished("a")
    balancer.finished("a")
    assert balancer.states == {}
    balancer.retain(["b"])
    assert not balancer.cooling("b", 0.5)  # b came back: a fresh start


def test_route_targets_are_counted_by_node_and_model() -> None:
    balancer = Balancer()
    balancer.started(RouteTarget("n", True, 8080, "m"))
    assert balancer.in_flight(RouteTarget("n", True, 8080, "m")) == 1
    assert balancer.in_flight(RouteTarget("n", True, 8080, "other")) == 0
    assert target_id(RouteTarget("n", False, 1, "m")) == target_id(RouteTarget("n", True, 2, "m"))


events = st.lists(
    st.tuples(
        st.sampled_from(["start", "ok", "cut", "fail", "retain", "tick"]),
        st.sampled_from("abcd"),
        st.floats(0, 3),
    ),
    max_size=60,
)


@given(events, st.booleans())
def test_invariants_under_any_events(steps: list[tuple[str, str, float]], keyed: bool) -> None:
    balancer = Balancer(rng=random.Random(0))
    targets, now, key = ["a", "b", "c", "d"], 0.0, b"k" if keyed else None
    for event, target, dt in steps:
        now += dt
        if event == "start":
            balancer.started(target)
        elif event in ("ok", "cut"):
            balancer.finished(target, ok=event == "ok")
        elif event == "fail":
            assert balancer.failed(target, now) > 0
        elif event == "retain":
            targets = [t for t in "abcd" if t != target]
            balancer.retain(targets)
        assert all(s.in_flight >= 0 for s in balancer.states.values())
        order = balancer.order(targets, now, key)
        healthy = [t for t in targets if not balancer.cooling(t, now)]
        assert not any(balancer.cooling(t, now) for t in order)
        assert bool(order) == bool(healthy)
        if order:
            least = min(balancer.in_flight(t) for t in healthy)
            first = balancer.in_flight(order[0])
            assert first == least or (keyed and not balancer.policy.overloaded(first, least))
        if balancer.current is not None:  # state only for the table and what is in flight
            assert all(t in balancer.current or s.in_flight for t, s in balancer.states.items())
