"""Usage-aware placement, sans-I/O: demand counting (meshllm.placement.demand) and the
rules that follow it (`demand_moves`, `shelf`, `Elector` with `idle_unload_s`)."""

from __future__ import annotations

import math
from dataclasses import replace

import msgspec
import pytest

from meshllm.mesh.wire import RPM_MAX, Demand, PeerAnnouncement
from meshllm.placement.demand import (
    PUBLISH_EVERY_S,
    DemandMeter,
    ModelDemand,
    mesh_demand,
)
from meshllm.placement.election import (
    Elector,
    ModelInfo,
    NodeView,
    Reason,
    demand_moves,
    servers_by_model,
    serving_counts,
    shelf,
)
from tests.test_election import GB, ann, on_disk, online, view

NOW = 1_000_000.0
TTL = 600.0


# -- the meter ---------------------------------------------------------------------------


def test_the_meter_counts_the_last_minute_and_the_latest_request() -> None:
    meter = DemandMeter()
    for i in range(10):
        meter.seen("a", NOW + i)
    meter.seen("b", NOW + 5)
    snap = meter.snapshot(NOW + 10)
    assert snap == {"a": Demand(10.0, int(NOW + 9)), "b": Demand(1.0, int(NOW + 5))}
    later = meter.snapshot(NOW + 80)  # a minute later: no rate, the time stays
    assert later["a"] == Demand(0.0, int(NOW + 9))


def test_the_meter_forgets_the_least_recent_model_beyond_its_bound() -> None:
    meter = DemandMeter(max_models=3)
    for i, name in enumerate(["a", "b", "c", "a", "d"]):
        meter.seen(name, NOW + i)
    assert set(meter.snapshot(NOW + 5)) == {"c", "a", "d"}
    assert set(meter.buckets) == {"c", "a", "d"}


def test_a_new_model_is_announced_at_once_a_drifting_rate_at_most_every_period() -> None:
    meter = DemandMeter()
    assert meter.changed(NOW) is None  # nothing to say
    meter.seen("a", NOW)
    assert meter.changed(NOW) == {"a": Demand(1.0, int(NOW))}
    meter.seen("a", NOW + 1)  # 1 -> 2 requests: doubled, at once
    assert meter.changed(NOW + 1) is not None
    meter.seen("a", NOW + 2)  # 2 -> 3: drift, wait for the period
    assert meter.changed(NOW + 2) is None
    assert meter.changed(NOW + 1 + PUBLISH_EVERY_S) is not None
    meter.seen("b", NOW + 12)  # another model: at once
    assert "b" in (meter.changed(NOW + 12) or {})


def test_mesh_demand_adds_rates_keeps_the_latest_and_moves_to_the_callers_clock() -> None:
    a = replace_demand(ann("a" * 16), {"m": Demand(3.0, int(NOW - 100))})
    b = replace_demand(ann("b" * 16), {"m": Demand(2.0, int(NOW - 10)), "n": Demand(0.0, 0)})
    total = mesh_demand([a, b], wall_now=NOW, now=50.0)
    assert total["m"] == ModelDemand(5.0, 40.0)  # 10 s ago, in a clock where now is 50
    assert total["n"].last == -math.inf and math.isinf(total["n"].idle_s(50.0))


def test_a_members_time_in_the_future_counts_as_now_and_rates_are_bounded() -> None:
    liar = replace_demand(ann("c" * 16), {"m": Demand(RPM_MAX, int(NOW + 10**6))})
    other = replace_demand(ann("d" * 16), {"m": Demand(RPM_MAX, 1)})
    total = mesh_demand([liar, other], wall_now=NOW, now=7.0)
    assert total["m"] == ModelDemand(RPM_MAX, 7.0)


@pytest.mark.parametrize(
    "demand",
    [
        {"m": [-1.0, 5]},
        {"m": [1e12, 5]},
        {"m": [1.0, -5]},
        {"m": [1.0, 2**41]},
        {"../etc": [1.0, 5]},
        {"m": "lots"},
        {f"m{i}": [1.0, 5] for i in range(257)},
    ],
)
def test_an_announcement_with_bad_demand_is_refused(demand: object) -> None:
    good = msgspec.msgpack.encode(ann("e" * 16))
    fields = msgspec.msgpack.decode(good)
    fields["demand"] = demand
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(fields), type=PeerAnnouncement)


def replace_demand(a: PeerAnnouncement, demand: dict[str, Demand]) -> PeerAnnouncement:
    return msgspec.structs.replace(a, demand=demand)


# -- who serves what ----------------------------------------------------------------------


def test_also_served_models_count_as_servers_unless_paused() -> None:
    shelf_node = msgspec.structs.replace(ann("a" * 16, "x", vram=40), also_serving=("y", "z"))
    paused = msgspec.structs.replace(shelf_node, node_id="b" * 16, paused=True)
    assert serving_counts([shelf_node, paused]) == {"x": 1, "y": 1, "z": 1}
    assert set(servers_by_model([shelf_node])) == {"x", "y", "z"}


# -- demand_moves ---------------------------------------------------------------------------


def asked(**ago: float) -> dict[str, ModelDemand]:
    """model -> demand asked `ago` seconds before NOW (rate 1)."""
    return {name: ModelDemand(1.0, NOW - s) for name, s in ago.items()}


def demand_view(me: str, anns: list[PeerAnnouncement], demand: dict[str, ModelDemand]) -> NodeView:
    models = [online("x", 1), online("y", 1), online("z", 1), on_disk("w", 1)]
    return replace(view(me, 10, models, anns), demand=demand)


A, B, C = "a" * 16, "b" * 16, "c" * 16
KEEPS_Z = ann("f" * 16, "x", vram=0.5, disk=("z",), requested=("x",))
"""A node that puts z in the catalog (its disk) and cannot take it."""


def test_an_idle_server_moves_to_a_cold_model_that_was_asked_for() -> None:
    anns = [ann(A, "x", vram=10), ann(B, "y", vram=10, disk=("z",))]
    v = demand_view(A, anns, asked(x=5, y=TTL + 1, z=3))
    # y is idle, z cold and asked for: B moves (and has z on disk).
    assert demand_moves(v, NOW, TTL) == {B: ("z", Reason.DEMAND, False)}
    # Asked for a while ago but not within the TTL: not wanted; y asked for: nobody free.
    assert demand_moves(replace(v, demand=asked(x=5, y=TTL + 1, z=TTL + 1)), NOW, TTL) == {}
    assert demand_moves(replace(v, demand=asked(x=5, y=5, z=3)), NOW, TTL) == {}
    assert demand_moves(v, NOW, 0) == {}  # --idle-unload 0: never


def test_the_server_idle_longest_moves_first_and_each_model_gets_one() -> None:
    anns = [ann(A, "x", vram=10), ann(B, "y", vram=10), ann(C, "w", vram=10), KEEPS_Z]
    v = demand_view(A, anns, asked(x=TTL + 50, y=TTL + 500, z=1))  # w never asked for
    assert demand_moves(v, NOW, TTL) == {C: ("z", Reason.DEMAND, True)}


def test_explicit_split_paused_and_unfitting_nodes_never_move() -> None:
    explicit = ann(A, "x", vram=10, requested=("x",))
    split = msgspec.structs.replace(ann(B, "y", vram=10), split_group=True)
    small = ann(C, "w", vram=0.5)
    paused = msgspec.structs.replace(ann("d" * 16, "w", vram=10), paused=True)
    v = demand_view(A, [explicit, split, small, paused, KEEPS_Z], asked(z=1))
    assert demand_moves(v, NOW, TTL) == {}


def test_a_waiting_node_takes_a_cold_model_instead_of_a_move() -> None:
    anns = [ann(A, "x", vram=10), ann(B, vram=10), KEEPS_Z]
    assert demand_moves(demand_view(A, anns, asked(z=1)), NOW, TTL) == {}


def test_a_hot_model_gains_one_idle_server_per_round() -> None:
    anns = [ann(A, "x", vram=10), ann(B, "y", vram=10), ann(C, "w", vram=10)]
    v = demand_view(A, anns, {"x": ModelDemand(500.0, NOW)})
    moves = demand_moves(v, NOW, TTL, hot={"x"})
    assert moves == {B: ("x", Reason.HOT, True)}  # the smallest id of the equally idle


def test_every_node_plans_the_same_moves() -> None:
    anns = [ann(A, "x", vram=10), ann(B, "y", vram=10), ann(C, "w", vram=10), KEEPS_Z]
    plans = {
        me: demand_moves(demand_view(me, anns[::-1] if me == B else anns, asked(z=1)), NOW, TTL)
        for me in (A, B, C)
    }
    assert len({tuple(sorted(p.items())) for p in plans.values()}) == 1


# -- the Elector: moves and hysteresis -----------------------------------------------------


def test_the_elector_leaves_an_idle_model_for_one_asked_for_and_then_holds() -> None:
    core = Elector(idle_unload_s=TTL)
    me = [ann(A, "y", vram=10), KEEPS_Z]
    first = core.update(demand_view(A, me, {}), NOW)
    assert first is not None and (first.model, first.reason) == ("y", Reason.RESUMED)
    # Its model was just asked for: z waits, however hard it is asked for.
    busy = {"y": ModelDemand(1.0, NOW), "z": ModelDemand(100.0, NOW + 1)}
    assert core.update(demand_view(A, me, busy), NOW + 1) is None
    assert core.next_deadline() == NOW + TTL
    # Idle for the TTL: it moves, once, and says why.
    moved = core.update(demand_view(A, me, busy), NOW + TTL)
    assert moved is not None and (moved.model, moved.reason) == ("z", Reason.DEMAND)
    assert "moved from y (idle 600s)" in moved.detail
    me = [ann(A, "z", vram=10), KEEPS_Z]
    back = {**busy, "y": ModelDemand(5.0, NOW + TTL + 1)}
    assert core.update(demand_view(A, me, back), NOW + TTL + 1) is None


def test_a_model_must_stay_hot_for_the_hold_before_a_replica_is_added() -> None:
    core = Elector(idle_unload_s=TTL, hot_rpm=10, hot_hold_s=120)
    anns = [ann(A, "y", vram=10), ann(B, "x", vram=10, requested=("x",))]
    v = demand_view(A, anns, {"x": ModelDemand(50.0, NOW)})
    core.decision = None
    assert core.update(v, NOW) is not None  # resumes y
    assert core.update(v, NOW + 60) is None  # hot for 60 s only
    assert core.next_deadline() == NOW + 120
    cooled = replace(v, demand={"x": ModelDemand(5.0, NOW + 90)})
    assert core.update(cooled, NOW + 90) is None  # under the threshold: the clock restarts
    assert core.update(v, NOW + 100) is None
    moved = core.update(v, NOW + 220)
    assert moved is not None and (moved.model, moved.reason) == ("x", Reason.HOT)


def test_an_explicit_node_never_follows_demand() -> None:
    core = Elector(idle_unload_s=TTL)
    v = replace(demand_view(A, [ann(A, "x", vram=10)], asked(z=1)), explicit="x")
    first = core.update(v, NOW)
    assert first is not None and first.model == "x"
    assert core.update(v, NOW + 10 * TTL) is None


# -- the shelf (--models-dir) ----------------------------------------------------------------


def shelf_view(budget_gb: float, demand: dict[str, ModelDemand]) -> NodeView:
    models = [on_disk("a", 4), on_disk("b", 3), on_disk("c", 2), online("d", 1)]
    return replace(view(A, budget_gb, models), demand=demand)


def test_the_shelf_takes_what_fits_beside_the_primary_most_asked_for_first() -> None:
    v = shelf_view(8.9, {"c": ModelDemand(9.0, NOW)})
    # 8.9 GB - a (4.4) leaves 4.5: c is asked for (2.2), then b (3.3) no longer fits.
    assert shelf(v, "a", (), NOW, TTL) == ("c",)
    assert shelf(v, None, (), NOW, TTL) == ("a", "c")  # only files on disk, never d
    assert shelf(replace(v, excluded=frozenset({"c"})), "a", (), NOW, TTL) == ("b",)


def test_the_shelf_keeps_what_runs_unless_an_asked_for_model_needs_its_memory() -> None:
    quiet = shelf_view(4.0, {})
    assert shelf(quiet, None, ("b",), NOW, TTL) == ("b",)  # a (larger) does not displace b
    b_idle = {"b": ModelDemand(1.0, NOW - TTL - 1), "a": ModelDemand(1.0, NOW)}
    assert shelf(shelf_view(4.5, b_idle), None, ("b",), NOW, TTL) == ("a",)
    b_busy = {"b": ModelDemand(1.0, NOW - 5), "a": ModelDemand(9.0, NOW)}
    assert shelf(shelf_view(4.5, b_busy), None, ("b",), NOW, TTL) == ("b",)
    assert shelf(shelf_view(4.5, b_idle), None, ("b",), NOW, 0) == ("b",)  # never unloads


def test_models_info_without_size_are_not_shelved() -> None:
    v = NodeView(A, 10 * GB, {"u": ModelInfo("u", None, on_disk=True)})
    assert shelf(v, None, (), NOW, TTL) == ()


def test_ctl_drop_names_a_models_dir_model_instead_of_ending_the_node() -> None:
    from meshllm.runtime import messages as m
    from meshllm.runtime.root import drop_refusal

    server = m.LocalServerState("main", state="ready", extras=(m.ExtraServer("x", "ready", 5),))
    assert "one of this node's --models-dir models" in drop_refusal(False, server, "x")
    assert drop_refusal(False, server, "main") == ""


def test_cold_routes_say_whether_some_node_could_load_them() -> None:
    from meshllm.http.routing import build_route_table
    from meshllm.runtime import messages as m

    table = build_route_table(
        "n1", m.LocalServerState(), (), ["on-disk", "backend"], {}, ["on-disk"]
    )
    assert {r.name: r.loadable for r in table.models} == {"on-disk": True, "backend": False}
