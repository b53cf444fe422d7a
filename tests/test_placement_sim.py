"""The simulated mesh of demand-driven placement (meshllm.placement.simulation).

Small meshes and short runs: what is asserted is behaviour (who serves what, how often
a node switches), never how long the simulation took.
"""

from __future__ import annotations

import dataclasses

import pytest

from meshllm.placement.election import Reason
from meshllm.placement.simulation import (
    GB,
    MINUTE_S,
    SimConfig,
    SimModel,
    SimNode,
    Simulation,
    make_mesh,
)

STEP_S = 60.0


def nodes(*disks: tuple[str, ...], budget_gb: int = 16) -> list[SimNode]:
    return [
        SimNode(f"{i + 1:016x}", budget_gb * GB, frozenset(disk)) for i, disk in enumerate(disks)
    ]


def models(*names: str, gb: float = 2.0) -> list[SimModel]:
    return [SimModel(name, int(gb * GB)) for name in names]


def rpm_from(minute: int, rpm: float, minutes: int) -> list[float]:
    """No requests before `minute`, then `rpm` requests per minute."""
    return [0.0] * minute + [rpm] * (minutes - minute)


def small(**kw: object) -> SimConfig:
    base: dict[str, object] = {"nodes": 6, "models": 4, "days": 0.5, "step_s": STEP_S, "seed": 3}
    return SimConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_the_generated_mesh_puts_every_model_on_a_disk_that_fits() -> None:
    mesh_nodes, mesh_models = make_mesh(SimConfig())
    assert len(mesh_nodes) == 20 and len(mesh_models) == 8
    assert len({n.node_id for n in mesh_nodes}) == 20
    assert all(len(n.node_id) == 16 for n in mesh_nodes)
    for model in mesh_models:
        holders = [n for n in mesh_nodes if model.name in n.disk]
        assert holders, model
        assert all(n.budget_bytes >= model.size_bytes * 1.1 for n in holders)


def test_static_placement_makes_no_switches() -> None:
    report = Simulation(small(idle_unload_s=0.0)).run()
    assert report.switches == 0
    assert report.demand_loads == report.hot_loads == 0
    assert report.requests > 0
    assert report.served_at_once + report.served_after_load + report.not_served == (report.requests)


def test_same_seed_same_run_other_seed_other_run() -> None:
    config = small(days=0.25)
    first = Simulation(config).run()
    again = Simulation(config).run()
    assert first.summary() == again.summary()
    assert first.switch_log == again.switch_log
    other = Simulation(dataclasses.replace(config, seed=4)).run()
    assert other.summary() != first.summary()


def test_a_model_asked_for_after_being_idle_gets_a_server_within_a_few_steps() -> None:
    # Two nodes, three models: z is on a disk but nobody serves it; from minute 30 on it
    # is asked for, while x and y never are.
    minutes = 120
    sim = Simulation(
        SimConfig(nodes=2, models=3, days=minutes * MINUTE_S / 86_400, step_s=STEP_S),
        nodes=nodes(("x", "z"), ("y",)),
        models=models("x", "y", "z"),
        rates={"x": [0.0] * minutes, "y": [0.0] * minutes, "z": rpm_from(30, 20.0, minutes)},
    )
    sim.run_until(30 * MINUTE_S)
    assert sim.serving("z") == []
    sim.run_until(30 * MINUTE_S + 3 * STEP_S)
    assert sim.serving("z", ready=True) == ["0000000000000001"]
    report = sim.run()
    assert [(s.from_model, s.to_model, s.reason) for s in report.switch_log] == [
        ("x", "z", Reason.DEMAND)
    ]
    assert report.demand_loads == 1
    assert report.served_after_load >= 1
    # Nodes decide once a step: the first requests wait up to a step for the decision,
    # and one that came just after a step can miss its load_wait_s.
    assert report.not_served <= 1


def test_a_hot_model_gains_a_replica_and_keeps_it() -> None:
    # x is served twice and never asked for; y gets 100 requests a minute from minute 10:
    # over 60 per server with one server, under with two.
    minutes = 90
    sim = Simulation(
        SimConfig(nodes=3, models=2, days=minutes * MINUTE_S / 86_400, step_s=STEP_S),
        nodes=nodes(("x", "y"), ("x", "y"), ("x", "y")),
        models=models("x", "y"),
        rates={"x": [0.0] * minutes, "y": rpm_from(10, 100.0, minutes)},
    )
    sim.run_until(10 * MINUTE_S)
    assert len(sim.serving("y")) == 1 and len(sim.serving("x")) == 2
    # hot once the last minute is over 60 (a step or two), then for hot_hold_s
    sim.run_until(10 * MINUTE_S + sim.config.hot_hold_s + 4 * STEP_S)
    assert len(sim.serving("y", ready=True)) == 2
    report = sim.run()
    assert len(sim.serving("y")) == 2 and len(sim.serving("x")) == 1
    assert report.hot_loads == 1
    assert report.switches == 1
    assert report.not_served == 0


def flap_scenario() -> Simulation:
    """Two nodes, two models: y is hot and x idle, so x's only server moves to y."""
    minutes = 60
    return Simulation(
        SimConfig(nodes=2, models=2, days=minutes * MINUTE_S / 86_400, step_s=STEP_S),
        nodes=nodes(("x", "y"), ("x", "y")),
        models=models("x", "y"),
        rates={"x": [0.0] * minutes, "y": rpm_from(5, 300.0, minutes)},
    )


def test_a_hot_model_taking_an_idle_models_last_server_switches_it_once_per_idle_period() -> None:
    report = flap_scenario().run()
    assert report.min_switch_gap_s >= report.config.idle_unload_s, report.switch_log


def only(first: int, last: int, rpm: float, minutes: int) -> list[float]:
    """`rpm` requests per minute in minutes `first` to `last - 1`, none otherwise."""
    return [rpm if first <= m < last else 0.0 for m in range(minutes)]


def test_a_node_moved_to_a_model_asked_for_a_while_ago_stays_for_an_idle_period() -> None:
    # x is asked for until minute 10 and y all along, so neither node is free before
    # minute 20; z is asked for in minute 12 only, w in minute 23 only.
    minutes = 60
    sim = Simulation(
        SimConfig(nodes=2, models=4, days=minutes * MINUTE_S / 86_400, step_s=STEP_S),
        nodes=nodes(("w", "x", "y", "z"), ("w", "x", "y", "z")),
        models=models("w", "x", "y", "z"),
        rates={
            "x": only(0, 10, 20.0, minutes),
            "y": only(0, minutes, 20.0, minutes),
            "z": only(12, 13, 5.0, minutes),
            "w": only(23, 24, 5.0, minutes),
        },
    )
    report = sim.run()
    assert report.demand_loads >= 1
    assert report.min_switch_gap_s >= report.config.idle_unload_s, report.switch_log


def test_demand_alone_switches_each_node_at_most_once_per_idle_period() -> None:
    # Without hot moves (hot_rpm 0) only requests for cold models move nodes.
    report = Simulation(small(days=1.0, nodes=5, models=8, hot_rpm=0.0)).run()
    assert report.hot_loads == 0
    assert report.demand_loads == report.switches > 1
    assert report.min_switch_gap_s >= report.config.idle_unload_s, report.switch_log


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one node"):
        SimConfig(nodes=0)
    with pytest.raises(ValueError, match="positive"):
        SimConfig(step_s=0)
    with pytest.raises(ValueError, match=">= 0"):
        SimConfig(idle_unload_s=-1)
    with pytest.raises(ValueError, match="unknown models"):
        Simulation(SimConfig(nodes=2, models=2), rates={"nope": [1.0]})
