"""Tensor split planning (meshllm.placement.split): when, who, which shares, and stability."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshllm.placement.split import (
    RTT_LIMIT_MS,
    GroupMember,
    Member,
    NoFit,
    PartHold,
    Solo,
    Split,
    SplitRole,
    Waiting,
    group_host,
    host_of,
    needed_bytes,
    plan,
    role_of,
)

GB = 10**9


def members(**memory_gb: float) -> list[Member]:
    return [Member(node_id, int(gb * GB)) for node_id, gb in memory_gb.items()]


def test_a_model_one_member_holds_is_served_solo_by_the_largest() -> None:
    # 10 GB of model needs 11 GB: b holds it alone.
    assert plan(10 * GB, members(a=8, b=12, c=11.5), {"a": 1, "c": 1}) == Solo("b")


def test_a_model_no_member_holds_is_split_over_the_fewest_nearest_workers() -> None:
    group = members(host=8.5, far_big=8, near_small=2, near_mid=4, nearest_tiny=1)
    rtt = {"far_big": 30.0, "near_small": 2.0, "near_mid": 5.0, "nearest_tiny": 0.5}
    # 10 GB needs 11 GB; the host holds 8.5; one worker of 2.5 GB or more is enough.
    result = plan(10 * GB, group, rtt)
    assert isinstance(result, Split)
    assert result.host == "host"
    assert result.workers == ("near_mid",)  # one worker suffices: the nearest that can
    assert result.shares == pytest.approx((8.5 / 12.5, 4 / 12.5))


def test_two_workers_when_one_is_not_enough_nearest_first() -> None:
    group = members(host=6, w1=3, w2=3, w3=3)
    rtt = {"w1": 9.0, "w2": 1.0, "w3": 4.0}
    result = plan(10 * GB, group, rtt)  # needs 11: 6 + 3 + 3
    assert isinstance(result, Split)
    assert result.workers == ("w2", "w3")
    assert sum(result.shares) == pytest.approx(1.0)


def test_members_beyond_the_rtt_limit_or_unmeasured_are_never_workers() -> None:
    group = members(host=9, far=8, unmeasured=8)
    # The unmeasured member would make it fit: wait for its round trip, not give up.
    result = plan(10 * GB, group, {"far": RTT_LIMIT_MS + 1})
    assert isinstance(result, Waiting) and "1 member" in result.reason
    result = plan(10 * GB, members(host=9, far=8, unmeasured=0), {"far": RTT_LIMIT_MS + 1})
    assert isinstance(result, NoFit) and "1 more beyond" in result.reason
    near = plan(10 * GB, group, {"far": 20.0}, rtt_limit_ms=25.0)
    assert isinstance(near, Split) and near.workers == ("far",)


def test_a_model_too_big_even_pooled_is_reported_not_retried() -> None:
    result = plan(100 * GB, members(a=8, b=8), {"b": 1.0})
    assert isinstance(result, NoFit)
    assert (
        "needs 110.00 GB" in result.reason and "2 members in reach hold 16.00 GB" in result.reason
    )
    assert isinstance(plan(GB, [], {}), NoFit)


def test_split_on_request_takes_the_nearest_worker_even_when_the_host_holds_it() -> None:
    result = plan(GB, members(a=16, b=8, c=8), {"b": 5.0, "c": 1.0}, force_split=True)
    assert isinstance(result, Split)
    assert (result.host, result.workers) == ("a", ("c",))
    assert result.shares == pytest.approx((16 / 24, 8 / 24))


def test_a_working_split_is_kept_when_a_member_comes_back_or_a_nearer_one_joins() -> None:
    group = members(host=8, w1=4)
    first = plan(10 * GB, group, {"w1": 10.0})
    assert isinstance(first, Split) and first.workers == ("w1",)
    # A nearer member with more memory joins: the split that serves stays.
    grown = members(host=8, w1=4, w2=6)
    assert plan(10 * GB, grown, {"w1": 10.0, "w2": 1.0}, current=first) == first
    # Without a plan in force the same mesh would be planned otherwise.
    assert plan(10 * GB, grown, {"w1": 10.0, "w2": 1.0}) != first


def test_a_split_is_replanned_when_a_worker_leaves_or_moves_out_of_reach() -> None:
    first = plan(10 * GB, members(host=8, w1=4, w2=4), {"w1": 1.0, "w2": 2.0})
    assert isinstance(first, Split) and first.workers == ("w1",)
    without_w1 = plan(10 * GB, members(host=8, w2=4), {"w2": 2.0}, current=first)
    assert isinstance(without_w1, Split) and without_w1.workers == ("w2",)
    far = plan(10 * GB, members(host=8, w1=4, w2=4), {"w1": 500.0, "w2": 2.0}, current=first)
    assert isinstance(far, Split) and far.workers == ("w2",)


def test_a_split_becomes_solo_once_one_member_holds_the_model() -> None:
    first = plan(10 * GB, members(host=8, w1=4), {"w1": 1.0})
    assert isinstance(first, Split)
    big = members(host=8, w1=4, big=20)
    assert plan(10 * GB, big, {"w1": 1.0, "big": 1.0}, current=first) == Solo("big")


def test_a_solo_host_is_kept_when_a_larger_member_joins() -> None:
    first = plan(GB, members(a=4), {})
    assert first == Solo("a")
    assert plan(GB, members(a=4, b=40), {"b": 1.0}, current=first) == first


def test_the_host_is_the_member_with_the_most_memory() -> None:
    # Known before planning: its health prober's round trips are the ones to pass.
    assert host_of(members(a=4, b=16, c=16)) == Member("b", 16 * GB)
    assert host_of([]) is None


def test_ties_break_by_node_id_so_every_node_plans_the_same() -> None:
    group = members(b=8, a=8, d=4, c=4)
    result = plan(10 * GB, group, {"b": 1.0, "c": 1.0, "d": 1.0})
    assert isinstance(result, Split)
    # a and b tie for host (a: the lower id); b, c and d are equally near and each
    # would do: b, the lower id.
    assert (result.host, result.workers) == ("a", ("b",))
    assert plan(10 * GB, list(reversed(group)), {"b": 1.0, "c": 1.0, "d": 1.0}) == result


@given(
    st.integers(min_value=1, max_value=200 * GB),
    st.lists(st.integers(min_value=0, max_value=64 * GB), min_size=1, max_size=8),
    st.lists(st.floats(min_value=0.1, max_value=200.0), min_size=8, max_size=8),
)
def test_any_plan_fits_uses_the_fewest_workers_and_respects_the_limit(
    model: int, memory: list[int], rtts: list[float]
) -> None:
    group = [Member(f"n{i}", m) for i, m in enumerate(memory)]
    rtt = {f"n{i}": r for i, r in enumerate(rtts)}
    result = plan(model, group, rtt)
    need = needed_bytes(model)
    held = {m.node_id: m.memory_bytes for m in group}
    if isinstance(result, Solo):
        assert held[result.host] >= need
    elif isinstance(result, Split):
        assert max(held.values()) < need  # split only when no one member holds it
        assert sum(held[n] for n in result.members) >= need
        assert all(rtt[w] <= RTT_LIMIT_MS for w in result.workers)
        assert math.isclose(sum(result.shares), 1.0)
        # No smaller set of reachable workers would do.
        reachable = sorted(
            (held[n] for n in held if n != result.host and rtt[n] <= RTT_LIMIT_MS), reverse=True
        )
        fewer = len(result.workers) - 1
        assert held[result.host] + sum(reachable[:fewer]) < need
    else:
        within = [n for n in held if rtt[n] <= RTT_LIMIT_MS]
        assert sum(held[n] for n in within) < need


# -- who plays which part (role_of) ----------------------------------------------------


def group(**memory_gb: float) -> list[GroupMember]:
    return [GroupMember(node_id, int(gb * GB)) for node_id, gb in memory_gb.items()]


def test_the_host_plans_the_others_follow_its_announced_plan() -> None:
    # 10 GB needs 11: a (6) and b (5.5) together; c (5) stands by.
    members = group(a=6, b=5.5, c=5)
    part, current = role_of("a", 10 * GB, members, {"b": 2.0, "c": 9.0})
    assert part.part == "host" and part.workers == ("b",)
    assert isinstance(current, Split)
    # Until a announces its plan, b and c cannot know theirs: they stand by for a.
    assert role_of("b", 10 * GB, members, {})[0] == SplitRole(
        "standby", "a", note="standing by; a plans the split"
    )
    announced = [GroupMember("a", 6 * GB, True, ("b",)), *members[1:]]
    assert role_of("b", 10 * GB, announced, {})[0] == SplitRole("worker", host="a")
    assert role_of("c", 10 * GB, announced, {})[0].part == "standby"


def test_a_bigger_member_that_joins_does_not_take_over_a_claimed_split() -> None:
    members = [GroupMember("a", 6 * GB, True, ("b",)), *group(b=5.5, big=9)]
    assert group_host(members) == "a"
    part, _ = role_of("big", 10 * GB, members, {})
    assert part.part == "standby"
    # Without a claim (the host died), the member with the most memory hosts.
    assert group_host(group(b=5.5, big=9)) == "big"


def test_a_working_split_is_kept_when_a_nearer_member_appears() -> None:
    members = group(a=6, b=5.5, c=5.5)
    _, current = role_of("a", 10 * GB, members, {"b": 5.0})
    assert isinstance(current, Split) and current.workers == ("b",)
    part, again = role_of("a", 10 * GB, members, {"b": 5.0, "c": 0.5}, current=current)
    assert part.workers == ("b",) and again == current
    # The worker leaves: c takes its place.
    part, _ = role_of("a", 10 * GB, group(a=6, c=5.5), {"c": 0.5}, current=current)
    assert part.workers == ("c",)


def test_the_host_reports_no_fit_and_waits_for_round_trips() -> None:
    part, _ = role_of("a", 100 * GB, group(a=6, b=5), {"b": 1.0})
    assert part.part == "nofit" and "needs 110.00 GB" in part.note
    part, _ = role_of("a", 10 * GB, group(a=6, b=5), {})
    assert part.part == "standby" and "measuring round trips" in part.note


def test_asked_to_split_alone_the_host_serves_the_model_alone() -> None:
    part, current = role_of("a", GB, group(a=6), {}, force_split=True)
    assert part == SplitRole("host", "a", shares=(1.0,)) and isinstance(current, Solo)


def test_a_group_keeps_its_incumbent_host_against_a_bigger_claimer() -> None:
    members = [
        GroupMember("a", 6 * GB, True, ("b",)),
        GroupMember("h", 10**15, True, ("b",)),
        *group(b=5.5),
    ]
    assert group_host(members) == "h"  # without memory of who hosted: the biggest claimer
    assert group_host(members, incumbent="a") == "a"
    part, _ = role_of("b", 10 * GB, members, {}, incumbent="a")
    assert part == SplitRole("worker", host="a")
    # The incumbent stopped claiming (it left, or stood down): the others choose again.
    assert group_host([members[1], *members[2:]], incumbent="a") == "h"


def test_a_running_part_is_held_unless_a_member_it_needs_left() -> None:
    hold = PartHold(hold_s=10.0)
    worker = SplitRole("worker", host="a")
    standby = SplitRole("standby", host="h", note="standing by; h plans the split")
    assert hold.settle(worker, {"a", "b", "h"}, 0.0) == worker
    # Announcements flip: the change waits for the hold, whatever comes meanwhile.
    assert hold.settle(standby, {"a", "b", "h"}, 1.0) == worker
    assert hold.due() == 10.0
    assert hold.settle(worker, {"a", "b", "h"}, 2.0) == worker
    assert hold.settle(standby, {"a", "b", "h"}, 10.0) == standby and hold.due() is None
    # From a part that runs nothing, at once; and when the host left, at once.
    assert hold.settle(worker, {"a", "b"}, 10.5) == worker
    other = SplitRole("worker", host="b")
    assert hold.settle(other, {"b"}, 11.0) == other
