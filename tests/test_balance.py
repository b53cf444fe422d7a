"""Balancing, failover and admission (meshllm.http.balance): the sans-I/O core."""

from __future__ import annotations

import json
import random

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.http.balance import (
    SPLIT_LIST_BYTES,
    Admission,
    Admitted,
    AffinityFields,
    BalancePolicy,
    Balancer,
    Queued,
    Refused,
    affinity_key,
    target_id,
)
from meshllm.runtime.messages import RouteTarget


def remote(node: str) -> RouteTarget:
    return RouteTarget(node, False, 9337, "m")


def body(**fields: object) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


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


# --- affinity ----------------------------------------------------------------------


def keys(n: int) -> list[bytes]:
    return [affinity_key(body(user=f"user-{i}")) or b"" for i in range(n)]


def test_a_key_keeps_its_replica_while_the_targets_stay() -> None:
    targets = ["a", "b", "c"]
    for key in keys(50):
        firsts = {Balancer(rng=random.Random(s)).order(targets, 0.0, key)[0] for s in range(5)}
        assert len(firsts) == 1
    spread = {Balancer().order(targets, 0.0, key)[0] for key in keys(50)}
    assert spread == set(targets)


@given(st.integers(2, 8), st.data())
def test_a_leaving_target_moves_only_its_own_keys(n: int, data: st.DataObject) -> None:
    targets = [f"node-{i}" for i in range(n)]
    gone = data.draw(st.sampled_from(targets))
    balancer = Balancer()
    for key in keys(200):
        before = balancer.order(targets, 0.0, key)[0]
        after = balancer.order([t for t in targets if t != gone], 0.0, key)[0]
        assert after == before or before == gone


def test_a_leaving_target_had_about_one_nth_of_the_keys() -> None:
    targets = [f"node-{i}" for i in range(5)]
    balancer = Balancer()
    moved = sum(balancer.order(targets, 0.0, key)[0] == "node-0" for key in keys(2000))
    assert 300 < moved < 500  # 1/5 of 2000, give or take


def test_an_overloaded_preferred_replica_is_passed_over() -> None:
    key = keys(1)[0]
    balancer = Balancer()
    preferred = balancer.order(["a", "b"], 0.0, key)[0]
    other = "b" if preferred == "a" else "a"
    for _ in range(2):  # min 0 + slack 2: still preferred
        balancer.started(preferred)
    assert balancer.order(["a", "b"], 0.0, key)[0] == preferred
    balancer.started(preferred)
    assert balancer.order(["a", "b"], 0.0, key)[0] == other
    for _ in range(10):  # least 10: 50% slack lets the preferred one run 15
        balancer.started(other)
    for _ in range(12):
        balancer.started(preferred)
    assert balancer.in_flight(preferred) == 15
    assert balancer.order(["a", "b"], 0.0, key)[0] == preferred
    balancer.started(preferred)
    assert balancer.order(["a", "b"], 0.0, key)[0] == other


def test_the_margin_is_a_parameter() -> None:
    key = keys(1)[0]
    balancer = Balancer(BalancePolicy(affinity_slack=0, affinity_slack_ratio=0.0))
    preferred = balancer.order(["a", "b"], 0.0, key)[0]
    balancer.started(preferred)
    assert balancer.order(["a", "b"], 0.0, key)[0] != preferred


def test_a_cooling_preferred_replica_hands_its_keys_to_the_next() -> None:
    balancer = Balancer()
    key = keys(1)[0]
    preferred = balancer.order(["a", "b", "c"], 0.0, key)[0]
    balancer.failed(preferred, 0.0)
    rest = [t for t in "abc" if t != preferred]
    assert balancer.order(["a", "b", "c"], 0.5, key)[0] == balancer.order(rest, 0.5, key)[0]


SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 20}


def chat(*turns: str, system: dict[str, str] = SYSTEM) -> bytes:
    roles = ["user", "assistant"]
    messages = [system] + [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    return body(messages=messages)


def test_a_conversation_keeps_its_key_as_it_grows() -> None:
    first = affinity_key(chat("What is rendezvous hashing?"))
    assert first is not None and len(first) == 16
    assert affinity_key(chat("What is rendezvous hashing?", "It is...", "And why?")) == first
    assert affinity_key(chat("Something else")) != first
    other_system = {"role": "system", "content": "Be terse."}
    assert affinity_key(chat("What is rendezvous hashing?", system=other_system)) != first


def test_explicit_keys_come_first() -> None:
    convo = json.loads(chat("hi"))
    by_cache_key = affinity_key(body(prompt_cache_key="x", user="u", messages=convo["messages"]))
    assert by_cache_key == affinity_key(body(prompt_cache_key="x"))
    by_user = affinity_key(body(user="u", messages=convo["messages"]))
    assert by_user == affinity_key(body(user="u"))
    assert len({by_cache_key, by_user, affinity_key(body(user="x"))}) == 3


def test_completion_prompts_are_keyed_by_their_first_bytes() -> None:
    lead = "Once upon a time " * 200
    key = affinity_key(body(prompt=lead + "there was a router."), prefix_bytes=1024)
    assert key == affinity_key(body(prompt=lead + "it ended."), prefix_bytes=1024)
    assert key != affinity_key(body(prompt="Twice " + lead), prefix_bytes=1024)
    assert affinity_key(body(prompt=[lead, "b"]), 64) == affinity_key(body(prompt=[lead, "c"]), 64)
    assert affinity_key(body(prompt=[1, 2, 3])) is not None


def test_other_apis_prompts() -> None:
    anthropic = affinity_key(body(system="Be kind.", messages=[{"role": "user", "content": "a"}]))
    assert anthropic != affinity_key(
        body(system="Be mean.", messages=[{"role": "user", "content": "a"}])
    )
    responses = affinity_key(body(instructions="Be kind.", input="hello"))
    assert responses is not None
    listed = [{"role": "developer", "content": "x"}, {"role": "user", "content": "y"}]
    assert affinity_key(body(input=listed)) == affinity_key(body(input=[*listed, {"role": "x"}]))


def test_work_is_bounded_by_the_prefix() -> None:
    huge = "x" * 100_000
    a = affinity_key(chat("q", system={"role": "system", "content": huge + "a"}))
    b = affinity_key(chat("q", system={"role": "system", "content": huge + "b"}))
    assert a == b  # only the first PREFIX_BYTES of each part count
    many = [{"role": "system", "content": str(i)} for i in range(1000)]
    assert affinity_key(body(messages=many)) == affinity_key(body(messages=many[:8]))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'"text"',
        b'{"model": "m"}',
        b'{"messages": []}',
        b'{"messages": "x"}',
        b'{"user": null}',
    ],
)
def test_bodies_without_a_key(raw: bytes) -> None:
    assert affinity_key(raw) is None


def test_parsed_fields_give_the_same_key() -> None:
    raw = chat("hello")
    messages = msgspec.Raw(json.dumps(json.loads(raw)["messages"]).encode())
    fields = AffinityFields(messages=messages)
    assert affinity_key(fields) == affinity_key(raw)


# --- admission ---------------------------------------------------------------------


def test_admits_up_to_the_limit_then_queues_then_refuses() -> None:
    gate = Admission(limit=2, queue_limit=2, wait_s=10.0)
    decisions = [gate.request("m", now) for now in (0.0, 0.0, 1.0, 2.0, 4.5)]
    assert [type(d) for d in decisions] == [Admitted, Admitted, Queued, Queued, Refused]
    assert decisions[2] == Queued(3, 11.0)
    assert decisions[4] == Refused(5, 4, "too many requests for 'm'")  # oldest waited 3.5 s
    assert (gate.in_flight("m"), gate.queued("m")) == (2, 2)
    assert isinstance(gate.request("other", 0.0), Admitted)  # each model its own limit


def test_a_release_admits_the_oldest_waiter() -> None:
    gate = Admission(limit=1, queue_limit=5)
    gate.request("m", 0.0)
    queued = [gate.request("m", 0.0).ticket for _ in range(3)]
    assert gate.release("m") == [Admitted(queued[0])]
    gate.cancel("m", queued[1])
    assert gate.release("m") == [Admitted(queued[2])]
    assert gate.release("m") == []
    assert gate.gates == {}


def test_waiters_are_refused_at_their_deadline() -> None:
    gate = Admission(limit=1, queue_limit=5, wait_s=30.0)
    gate.request("m", 0.0)
    first, second = gate.request("m", 1.0), gate.request("m", 2.0)
    assert gate.next_deadline() == 31.0
    assert gate.expire(30.9) == []
    assert gate.expire(31.5) == [Refused(first.ticket, 30, "no slot for 'm' within 30 s")]
    assert gate.next_deadline() == 32.0
    gate.cancel("m", second.ticket)
    assert gate.next_deadline() is None


def test_no_queue_refuses_at_once() -> None:
    gate = Admission(limit=1, queue_limit=0)
    gate.request("m", 0.0)
    assert gate.request("m", 0.0) == Refused(2, 1, "too many requests for 'm'")
    with pytest.raises(ValueError):
        Admission(limit=0)


admission_steps = st.lists(
    st.tuples(st.sampled_from(["request", "release", "cancel", "expire"]), st.sampled_from("mn")),
    max_size=80,
)


@given(admission_steps, st.integers(1, 3), st.integers(0, 3))
def test_admission_invariants(steps: list[tuple[str, str]], limit: int, queue_limit: int) -> None:
    gate = Admission(limit, queue_limit, wait_s=5.0)
    now = 0.0
    waiting: dict[str, list[int]] = {"m": [], "n": []}
    running = {"m": 0, "n": 0}
    done: set[int] = set()

    def admitted(model: str, ticket: int) -> None:
        assert ticket not in done
        done.add(ticket)
        running[model] += 1

    for i, (op, model) in enumerate(steps):
        now += 1.0
        if op == "request":
            decision = gate.request(model, now)
            if isinstance(decision, Admitted):
                admitted(model, decision.ticket)
            elif isinstance(decision, Queued):
                waiting[model].append(decision.ticket)
            else:
                done.add(decision.ticket)
        elif op == "release" and running[model]:
            running[model] -= 1
            for a in gate.release(model):
                assert a.ticket == waiting[model].pop(0)  # first in, first out
                admitted(model, a.ticket)
        elif op == "cancel" and waiting[model]:
            ticket = waiting[model].pop(i % len(waiting[model]))
            gate.cancel(model, ticket)
            done.add(ticket)
        elif op == "expire":
            for r in gate.expire(now):
                assert 1 <= r.retry_after_s <= 5
                for queue in waiting.values():
                    if r.ticket in queue:
                        assert r.ticket == queue.pop(0)
                done.add(r.ticket)
        for m in "mn":
            assert gate.in_flight(m) == running[m] <= limit
            assert gate.queued(m) == len(waiting[m]) <= queue_limit
        assert set(gate.gates) == {m for m in "mn" if running[m] or waiting[m]}


def test_hostile_bodies_give_no_key_or_a_bounded_one_never_an_error() -> None:
    # Objects where lists are expected, and nesting past what the decoder follows.
    for body in (b'{"input": {}}', b'{"prompt": {}}', b'{"messages": {"a": 1}}'):
        affinity_key(body)  # no exception, whatever it returns
    deep = b'{"messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}"
    affinity_key(deep)
    # A long list is not split element by element: its leading bytes stand for it,
    # so two bodies that differ only far down share a key.
    many = b"[" + b",".join([b'{"role":"user","content":"x"}'] * 40_000)
    assert len(many) > SPLIT_LIST_BYTES
    first = affinity_key(b'{"messages": ' + many + b',{"role":"user","content":"a"}]}')
    second = affinity_key(b'{"messages": ' + many + b',{"role":"user","content":"b"}]}')
    assert first is not None and first == second


# --- stalls -------------------------------------------------------------------------


def test_a_target_is_stalled_only_with_requests_in_flight_and_no_byte() -> None:
    b = Balancer()
    a, c = remote("a"), remote("c")
    b.retain([a, c])
    assert b.stalled(100.0, 10) == []
    b.started(a, 100.0)
    b.started(c, 100.0)
    assert b.stalled(109.0, 10) == []
    b.progressed(c, 105.0)  # a byte from c
    assert b.stalled(111.0, 10) == [target_id(a)]
    b.finished(a)
    assert b.stalled(200.0, 10) == [target_id(c)]  # a has nothing in flight any more
    b.started(a, 300.0)  # its clock starts with its next request, not at its last byte
    assert target_id(a) not in b.stalled(305.0, 10)


def test_a_hung_target_stays_out_until_it_is_revived() -> None:
    b = Balancer()
    a, c = remote("a"), remote("c")
    b.retain([a, c])
    b.started(a, 0.0)
    b.hung(a, 20.0)
    assert b.hung_ids() == [target_id(a)]
    assert b.stalled(100.0, 10) == []  # hung: probed by the caller, not stalled again
    assert b.order([a, c], 1000.0) == [c]  # long after any cooldown: still out
    b.revived(a, 1001.0)
    assert b.hung_ids() == []
    assert set(b.order([a, c], 1001.0)) == {a, c}
    # a target that left the route table is not remembered as hung
    b.retain([c])
    b.finished(a)
    b.hung(a, 1002.0)
    assert b.hung_ids() == [] and target_id(a) not in b.states
