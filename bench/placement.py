"""Section `placement`: a simulated week of demand-driven placement against static placement.

Sans-I/O (`meshllm.placement.simulation`): 20 nodes with 8 to 80 GB, 8 models of 1 to
40 GB, each node running its own election core as a ``--join`` node does, and a week of
bursty requests entering through one lite client (issue 12, "Usage-aware placement").
The same mesh and the same requests are played twice: demand-driven (the default
``--idle-unload``) and static (``--idle-unload 0``, placement before issue 12). What
counts is whether nodes flap (switches per node per day, and the most one node made in
an hour) and what the requests got (a ready server at once, one after waiting for a
load, or none within the wait). `--quick` plays one day.

The same is played on a scarce mesh (6 nodes, 8 models), where what is served has to
follow demand. Writes `placement.json` under the results directory (no plot).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.common import Context, RunRecord, Section, machine_note, publish, table
from meshllm.placement.simulation import SimConfig, SimReport, Simulation, Switch


def _play(config: SimConfig) -> tuple[SimReport, float, float]:
    """One run: its report, wall seconds and CPU seconds."""
    wall, cpu = time.monotonic(), time.process_time()
    report = Simulation(config).run()
    return report, time.monotonic() - wall, time.process_time() - cpu


SCENARIOS = {
    "20 nodes x 8 models": SimConfig(),
    "6 nodes x 8 models": SimConfig(nodes=6),
}
"""The issue's mesh (every model fits somewhere, and 20 nodes can serve all 8 at once)
and a scarce one (fewer nodes than models: what is served has to follow demand)."""


def run(ctx: Context) -> str:
    record = RunRecord("placement", ctx.quick)
    scenarios: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        config = replace(scenario, days=1.0) if ctx.quick else scenario
        runs: dict[str, Any] = {}
        for label, cfg in (("demand", config), ("static", replace(config, idle_unload_s=0.0))):
            print(f"placement: {name}, {label}, {cfg.days:g} days", file=sys.stderr, flush=True)
            report, wall_s, cpu_s = _play(cfg)
            runs[label] = {
                **report.summary(),
                "wall_s": round(wall_s, 1),
                "cpu_s": round(cpu_s, 1),
                "switch_log": [_line(s) for s in report.switch_log[:LOG_MAX]],
            }
        scenarios[name] = {"config": asdict(config), "runs": runs}
    result: dict[str, Any] = {**record.header(), "scenarios": scenarios}
    return publish(ctx, "placement", result, render_table, _no_plot)


LOG_MAX = 200
"""Switches listed per run in the JSON (the first ones; their number is `switches`)."""


def _line(s: Switch) -> str:
    return f"{s.at:.0f} s {s.node_id}: {s.from_model} -> {s.to_model} ({s.reason})"


def _share(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.2f}%)" if total else str(n)


def render_table(r: dict[str, Any]) -> str:
    rows = []
    for name, scenario in r["scenarios"].items():
        for label, s in scenario["runs"].items():
            total = s["requests"]
            rows.append(
                [
                    name,
                    f"{label} (idle-unload {s['idle_unload_s']:g} s)",
                    str(s["switches"]),
                    f"{s['switches_per_node_day']:.2f}",
                    str(s["max_switches_node_hour"]),
                    str(s["max_switches_node_day"]),
                    f"{s['demand_loads']} / {s['hot_loads']}",
                    _share(s["served_at_once"], total),
                    _share(s["served_after_load"], total),
                    _share(s["not_served"], total),
                    f"{s['peak_rpm_per_server']:.0f}",
                    f"{s['hot_minutes']:.0f}",
                    f"{s['cpu_s']:.0f} s",
                ]
            )
    head = [
        "mesh",
        "placement",
        "switches",
        "per node-day",
        "max node-hour",
        "max node-day",
        "loads demand / hot",
        "served at once",
        "after a load",
        "not served",
        "peak rpm/server",
        "hot minutes",
        "CPU",
    ]
    c = next(iter(r["scenarios"].values()))["config"]
    requests = ", ".join(
        f"{name}: {s['runs']['demand']['requests']}" for name, s in r["scenarios"].items()
    )
    note = (
        f"Simulated (sans-I/O): {c['days']:g} days in {c['step_s']:g} s steps, seed {c['seed']}; "
        f"requests: {requests}; a request waits up to {c['load_wait_s']:g} s for a load; "
        f"hot: over {c['hot_rpm']:g} rpm per server (hot minutes: model-minutes spent so), "
        f"a replica after {c['hot_hold_s']:g} s of it.\n" + machine_note(r)
    )
    return table(rows, head) + "\n\n" + note


def _no_plot(r: dict[str, Any], out: Path) -> None:
    """No plot: the table says it all."""


SECTION = Section(
    "placement", "simulated week of bursty demand: demand-driven vs static placement", run
)
