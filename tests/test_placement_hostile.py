"""Placement against flapping and hostile members: claims that flip, nodes paused in
turn, servers that turn free together, spare replicas, a paused node's own moves, the
demand gauge's bound, and what `ext` may hold.

Sans-I/O only (Electors driven by hand-built views, the metrics bookkeeping): no
process, no socket, no clock.
"""

from __future__ import annotations

from dataclasses import replace

import msgspec
import pytest

from meshllm import PROTOCOL_VERSION
from meshllm.http.metrics import MAX_SERIES, Metrics
from meshllm.mesh import wire
from meshllm.mesh.wire import Demand, PeerAnnouncement
from meshllm.placement.demand import ModelDemand
from meshllm.placement.election import Decision, Elector, Reason
from meshllm.runtime.messages import MeshView
from tests.test_election import ann, on_disk, online, view
from tests.test_metrics import parse

NOW = 1_000_000.0
TTL = 600.0
A, B, C, L = "a" * 16, "b" * 16, "c" * 16, "1" * 16


# -- 1. a member flipping `also_serving` makes an idle node switch every cold grace -------


def test_a_member_flipping_also_serving_cannot_make_a_node_switch_every_cold_grace() -> None:
    core = Elector(idle_unload_s=TTL)
    models = [on_disk("p", 1), on_disk("q", 1)]

    def liar(claims: str) -> PeerAnnouncement:
        # Runs servers (memory, host of a model of its own), so its claim is believed;
        # the most memory, so it is the elected host of whatever it claims.
        return msgspec.structs.replace(ann(L, "l", vram=100), also_serving=(claims,))

    serving = "p"
    switches = 0
    t = NOW
    core.update(view(B, 10, models, [ann(B, serving, vram=10, disk=("p", "q")), liar("p")]), t)
    # Ten minutes, nobody asks for anything; the member always claims what B serves.
    while t < NOW + TTL:
        t += 1.0
        anns = [ann(B, serving, vram=10, disk=("p", "q")), liar(serving)]
        d = core.update(view(B, 10, models, anns), t)
        if d is not None and d.model is not None and d.model != serving:
            serving = d.model
            switches += 1
    assert switches <= 2, f"{switches} switches in {TTL:g} s"


def test_nodes_paused_in_turn_do_not_drag_a_node_back_and_forth() -> None:
    core = Elector(idle_unload_s=TTL)
    models = [on_disk("x", 1), on_disk("y", 1)]
    serving = "x"
    switches = 0
    t = NOW
    while t < NOW + TTL:
        x_paused = int((t - NOW) // 90) % 2 == 1
        anns = [
            msgspec.structs.replace(ann(A, "x", vram=20, requested=("x",)), paused=x_paused),
            msgspec.structs.replace(ann(L, "y", vram=20, requested=("y",)), paused=not x_paused),
            ann(B, serving, vram=10, disk=("x", "y")),
        ]
        d = core.update(view(B, 10, models, anns), t)
        if d is not None and d.model is not None and d.model != serving:
            serving = d.model
            switches += 1
        t += 1.0
    assert switches <= 2, f"{switches} switches in {TTL:g} s"


# -- 2. a redundant replica of a model in light use starves a model that is asked for -----


def test_a_spare_replica_of_a_lightly_used_model_goes_to_a_model_asked_for() -> None:
    core = Elector(idle_unload_s=TTL, hot_rpm=60)
    models = [on_disk("x", 1), on_disk("z", 1)]
    # A hosts x (more memory), B is its second server; z is on B's disk, nobody serves it.
    anns = [ann(A, "x", vram=20), ann(B, "x", vram=10, disk=("x", "z"))]
    t = NOW
    moved: Decision | None = None
    while t < NOW + 3 * TTL and moved is None:
        # x: one request a minute (one server is plenty); z: asked for all along, and
        # every request for it waits --load-wait and gets 503.
        demand = {"x": ModelDemand(1.0, t - 1), "z": ModelDemand(5.0, t - 1)}
        d = core.update(replace(view(B, 10, models, anns), demand=demand), t)
        if d is not None and d.model == "z":
            moved = d
        t += 10.0
    assert moved is not None, "z was asked for for 30 minutes and never got a server"


def test_control_an_idle_replica_does_go_to_the_model_asked_for() -> None:
    """The same mesh with x idle: B moves to z at once (so the setup allows the move)."""
    core = Elector(idle_unload_s=TTL, hot_rpm=60)
    models = [on_disk("x", 1), on_disk("z", 1)]
    anns = [ann(A, "x", vram=20), ann(B, "x", vram=10, disk=("x", "z"))]
    core.update(view(B, 10, models, anns), NOW)
    demand = {"z": ModelDemand(5.0, NOW)}
    d = core.update(replace(view(B, 10, models, anns), demand=demand), NOW + 1)
    assert d is not None and (d.model, d.reason) == ("z", Reason.DEMAND)


# -- 3. the demand gauge's label sets are not bounded ---------------------------------------


def test_the_demand_gauge_keeps_at_most_max_series_label_sets() -> None:
    metrics = Metrics(lambda: [], process=False)
    peers = tuple(
        PeerAnnouncement(
            node_id=f"{i:016x}",
            generation=1,
            demand={f"made-up-{i}-{j}": Demand(1.0, 5) for j in range(256)},
        )
        for i in range(1, 21)
    )
    me = PeerAnnouncement(node_id="a" * 16, generation=1)
    metrics.node.mesh = MeshView("a" * 16, peers, me)
    s = parse(metrics.render().decode())
    series = [k for k in s if k[0] == "meshllm_demand_requests_per_minute"]
    assert len(series) <= MAX_SERIES + 1


# -- 4. `ext` is said to be a msgpack map, but any bytes cross every node -------------------


@pytest.mark.parametrize("ext", [b"\xc1", b"\x91" * 8000 + b"\xc0", b"\x92\x01\x02"])
def test_an_ext_that_is_no_shallow_msgpack_map_is_refused(ext: bytes) -> None:
    with pytest.raises(ValueError, match="ext must be a msgpack map"):
        PeerAnnouncement(node_id="a" * 16, generation=1, ext=ext)
    fields = msgspec.msgpack.decode(
        msgspec.msgpack.encode(PeerAnnouncement(node_id="a" * 16, generation=1))
    )
    fields["ext"] = ext
    payload = msgspec.msgpack.encode(
        [PROTOCOL_VERSION, {"type": "Sync", "announcements": [fields]}]
    )
    with pytest.raises(wire.WireError):
        wire.decode_payload(payload)
    salvaged = wire.salvage_sync(payload)
    assert salvaged is not None and salvaged[0].announcements == ()  # that one alone goes
    good = msgspec.msgpack.encode({"v4": {"a": [1, {"b": 2}]}})
    assert PeerAnnouncement(node_id="a" * 16, generation=1, ext=good).ext == good


# -- 5. free nodes that turn free together all take the same long-wanted model -------------


def test_servers_that_turn_idle_together_send_one_of_them_to_a_wanted_model() -> None:
    ids = ["a" * 16, "b" * 16, "c" * 16]
    served = dict(zip(ids, ["x", "y", "w"], strict=True))
    models = [online(name, 1) for name in ("x", "y", "w", "z")]
    cores = {i: Elector(idle_unload_s=TTL) for i in ids}
    keeps_z = ann("f" * 16, "k", vram=0.5, disk=("z",), requested=("k",))

    def round_at(t: float, demand: dict[str, ModelDemand]) -> dict[str, Decision]:
        snapshot = [ann(i, served[i], vram=10) for i in ids] + [keeps_z]
        out = {}
        for i in ids:
            d = cores[i].update(replace(view(i, 10, models, snapshot), demand=demand), t)
            if d is not None:
                out[i] = d
        for i, d in out.items():
            served[i] = d.model or served[i]
        return out

    # One user's session used x, y and w together, and asked for z (nobody serves it).
    round_at(NOW, {name: ModelDemand(1.0, NOW) for name in ("x", "y", "w", "z")})
    # An idle period later x, y and w are idle; z is still asked for.
    later = NOW + TTL + 1
    demand = {name: ModelDemand(0.0, NOW) for name in ("x", "y", "w")}
    moved = round_at(later, {**demand, "z": ModelDemand(5.0, later)})
    to_z = sorted(i for i, d in moved.items() if d.model == "z")
    assert len(to_z) == 1, f"{len(to_z)} nodes left their models for z at once"


# -- 6. a paused node still fills gaps on paper ------------------------------------------------


def test_a_paused_node_does_not_take_a_cold_model_the_others_take() -> None:
    models = [on_disk("x", 1), on_disk("z", 1)]
    # A hosts x; B (paused) and C are its other servers; z is on B's and C's disks.
    paused_b = msgspec.structs.replace(ann(B, "x", vram=10, disk=("x", "z")), paused=True)
    served = {B: "x", C: "x"}
    cores = {B: Elector(idle_unload_s=TTL), C: Elector(idle_unload_s=TTL)}
    t = NOW
    while t < NOW + 120:
        anns = [
            ann(A, "x", vram=20),
            msgspec.structs.replace(paused_b, serving=served[B]),
            ann(C, served[C], vram=10, disk=("x", "z")),
        ]
        for node, core in cores.items():
            d = core.update(view(node, 10, models, anns), t)
            if d is not None and d.model is not None:
                served[node] = d.model
        t += 1.0
    assert served == {B: "x", C: "z"}
