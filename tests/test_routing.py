"""Route choice (meshllm.http.routing): table building and the Proxy's lookup."""

from __future__ import annotations

import itertools

from meshllm.http.routing import Routes, Serving, build_route_table
from meshllm.runtime.messages import LocalServerState, ModelRoute, RouteTable, RouteTarget

READY_A = LocalServerState(model="a", path="/m/a.gguf", state="ready", port=8001)


def test_empty_node_has_empty_table() -> None:
    assert build_route_table("me", LocalServerState()) == RouteTable()


def test_local_ready_server_is_a_local_target() -> None:
    table = build_route_table("me", READY_A)
    assert table == RouteTable(
        (ModelRoute("a", (RouteTarget("me", True, 8001, "a"),), ("me",)),),
    )


def test_local_server_not_ready_is_not_a_target() -> None:
    for state in ("stopped", "loading", "failed"):
        local = LocalServerState(model="a", state=state, port=8001)
        assert build_route_table("me", local) == RouteTable(), state
    # ready but without a port (should not happen) is not routable either
    no_port = LocalServerState(model="a", state="ready", port=0)
    assert build_route_table("me", no_port) == RouteTable()


def test_targets_local_first_then_by_node_id() -> None:
    remote = [Serving("a", "zeta", 9001), Serving("a", "alpha", 9002), Serving("a", "mid", 9003)]
    table = build_route_table("me", READY_A, remote)
    (route,) = table.models
    assert [(t.node_id, t.local, t.port) for t in route.targets] == [
        ("me", True, 8001),
        ("alpha", False, 9002),
        ("mid", False, 9003),
        ("zeta", False, 9001),
    ]
    assert route.nodes == ("me", "alpha", "mid", "zeta")


def test_models_sorted_and_cold_models_last() -> None:
    remote = [Serving("c", "n2", 9002), Serving("b", "n1", 9001)]
    table = build_route_table("me", READY_A, remote, catalog=["z-cold", "a", "b", "d-cold"])
    assert [r.name for r in table.models] == ["a", "b", "c", "d-cold", "z-cold"]
    cold = {r.name: r for r in table.models}
    assert cold["d-cold"] == ModelRoute("d-cold")
    assert cold["z-cold"].targets == () and cold["z-cold"].nodes == ()
    # a catalog entry that is also served is warm, not listed twice
    assert [r.name for r in table.models].count("a") == 1


def test_table_is_deterministic_whatever_the_input_order() -> None:
    remote = [
        Serving("a", "n3", 9003),
        Serving("b", "n1", 9001),
        Serving("a", "n2", 9002),
        Serving("c", "n4", 9004),
    ]
    catalog = ["x", "c", "y"]
    tables = {
        build_route_table("me", READY_A, perm, reversed(catalog))
        for perm in itertools.permutations(remote)
    }
    assert len(tables) == 1


def test_every_node_picks_the_same_remote_host() -> None:
    # Nodes that do not serve the model themselves all agree on the first target.
    remote = [Serving("m", "n2", 9002), Serving("m", "n1", 9001)]
    first = {
        build_route_table(me, LocalServerState(), remote).models[0].targets[0]
        for me in ("x", "y", "z")
    }
    assert first == {RouteTarget("n1", False, 9001, "m")}


def _table() -> RouteTable:
    remote = [Serving("b", "n1", 9001), Serving("c", "n2", 9002)]
    return build_route_table("me", READY_A, remote, catalog=["cold"])


def test_choose_known_model() -> None:
    routes = Routes(_table())
    assert routes.choose("a") == (RouteTarget("me", True, 8001, "a"), "")
    assert routes.choose("c") == (RouteTarget("n2", False, 9002, "c"), "")


def test_choose_unknown_model_falls_back_to_first_available() -> None:
    routes = Routes(_table())
    expected = (RouteTarget("me", True, 8001, "a"), "")
    assert routes.choose("nope") == expected
    assert routes.choose(None) == expected
    assert routes.choose("") == expected


def test_fallback_skips_cold_models() -> None:
    table = RouteTable(
        (ModelRoute("aaa-cold"), ModelRoute("b", (RouteTarget("n1", False, 9001),), ("n1",)))
    )
    assert Routes(table).choose("unknown") == (RouteTarget("n1", False, 9001), "")


def test_choose_strict_unknown_model() -> None:
    routes = Routes(_table(), strict=True)
    target, why = routes.choose("nope")
    assert target is None
    assert "'nope'" in why and "does not exist" in why
    # a known model is still served, and a request without a model still falls back
    assert routes.choose("b") == (RouteTarget("n1", False, 9001, "b"), "")
    assert routes.choose(None) == (RouteTarget("me", True, 8001, "a"), "")


def test_choose_cold_model() -> None:
    for strict in (False, True):
        target, why = Routes(_table(), strict=strict).choose("cold")
        assert target is None
        assert "'cold'" in why and "no node serves it yet" in why


def test_choose_with_no_model_ready() -> None:
    for table in (RouteTable(), RouteTable((ModelRoute("cold"),))):
        target, why = Routes(table).choose("anything")
        assert (target, why) == (None, "no model is ready yet")
        assert Routes(table).choose(None) == (None, "no model is ready yet")
