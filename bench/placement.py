"""Section `placement`: a simulated week of demand-driven placement against static placement.

Sans-I/O (`meshllm.placement.simulation`): 20 nodes with 8 to 80 GB, 8 models of 1 to
40 GB, each node running its own election core as a ``--join`` node does, and a week of
bursty requests entering through one lite client (issue 12, "Usage-aware placement").
The same mesh and the same requests are played twice: demand-driven (the default
``--idle-unload``) and static (``--idle-unload 0``, placement before issue 12). What
counts is whether nodes flap (switches per node per day, and the most one node made in
an hour) and what the requests got (a ready server at once, one after waiting for a
load, or none within the wait). `--quick` plays one day.

Writes `placement.json` under the results directory (no plot).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.common import Context, RunRecord, Section, machine_note, publish, table
from meshllm.placement.simulation import SimConfig, SimReport, Simulation


def _play(config: SimConfig) -> tuple[SimReport, float, float]:
    """One run: its report, wall seconds and CPU seconds."""
    wall, cpu = time.monotonic(), time.process_time()
    report = Simulation(config).run()
    return report, time.monotonic() - wall, time.process_time() - cpu


def run(ctx: Context) -> str:
    record = RunRecord("placement", ctx.quick)
    config = SimConfig(days=1.0) if ctx.quick else SimConfig()
    runs: dict[str, Any] = {}
    for label, cfg in (("demand", config), ("static", replace(config, idle_unload_s=0.0))):
        print(f"placement: {label}, {cfg.days:g} days", file=sys.stderr, flush=True)
        report, wall_s, cpu_s = _play(cfg)
        runs[label] = {
            **report.summary(),
            "wall_s": round(wall_s, 1),
            "cpu_s": round(cpu_s, 1),
            "switch_log": [asdict(s) for s in report.switch_log],
        }
    result: dict[str, Any] = {
        **record.header(),
        "config": asdict(config),
        "runs": runs,
    }
    return publish(ctx, "placement", result, render_table, _no_plot)


def _share(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.2f}%)" if total else str(n)


def render_table(r: dict[str, Any]) -> str:
    rows = []
    for label, s in r["runs"].items():
        total = s["requests"]
        rows.append(
            [
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
                f"{s['cpu_s']:.0f} s",
            ]
        )
    head = [
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
        "CPU",
    ]
    c = r["config"]
    note = (
        f"Simulated (sans-I/O): {c['nodes']} nodes, {c['models']} models, {c['days']:g} days in "
        f"{c['step_s']:g} s steps, seed {c['seed']}; {r['runs']['demand']['requests']} requests; "
        f"a request waits up to {c['load_wait_s']:g} s for a load; hot over {c['hot_rpm']:g} "
        f"rpm per server for {c['hot_hold_s']:g} s.\n" + machine_note(r)
    )
    return table(rows, head) + "\n\n" + note


def _no_plot(r: dict[str, Any], out: Path) -> None:
    """No plot: the table says it all."""


SECTION = Section(
    "placement", "simulated week, 20 nodes x 8 models: demand-driven vs static placement", run
)
