"""Section `probes`: simulated probe and gossip traffic, detection and join at N = 10, 50, 100.

Cheap and in-process: `meshllm.mesh.simulation` runs the real sans-I/O cores
(`GossipCore`, `FailureDetector`) of N nodes on a virtual clock, with every
frame sized by the real wire encoder plus per-packet overhead (IP/UDP, QUIC
short header, AEAD tag, STREAM frame header, and an ACK packet per frame;
see that module's docstring). Two probe settings: the node's defaults
(probe every 0.5 s, 1 s timeout) and the gentler slow-link ones (15 s, 5 s).

- traffic: steady state of a converged mesh, per node: probe bytes sent per
  second (mean and busiest node), sent + received, packets, and gossip upkeep
  (anti-entropy) bytes per second (section `traffic` checks these against
  the endpoints' counters on real nodes);
- detection: one node killed (kill -9) in a converged mesh; time until the
  first node declares it dead and until every node removed it, over several
  random seeds (median and worst);
- join: a node joins through one member's token; time until every node holds
  every other's latest announcement, and the gossip bytes per node it cost
  (median over seeds); graceful leave likewise.

Targets: a kill -9 is gone everywhere within 5 s (default
settings); probe traffic stays small at N = 100 (stated, no number given).
Writes `probes.json` and `probes.png` under the results directory.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    Context,
    RunRecord,
    Section,
    median,
    publish,
    pyplot,
    table,
)
from meshllm.mesh import simulation as sim

SETTINGS = {
    "default": (sim.DEFAULT_INTERVAL_S, sim.DEFAULT_TIMEOUT_S),
    "slow": (sim.SLOW_INTERVAL_S, sim.SLOW_TIMEOUT_S),
}
TARGET_KILL_S = 5.0


@dataclass(frozen=True)
class Plan:
    sizes: tuple[int, ...]
    seeds: int
    traffic_s: float


FULL = Plan(sizes=(10, 50, 100), seeds=5, traffic_s=60.0)
QUICK = Plan(sizes=(10, 50, 100), seeds=2, traffic_s=30.0)


def _say(msg: str) -> None:
    print(f"  [probes] {msg}", file=sys.stderr, flush=True)


def measure(plan: Plan) -> dict[str, Any]:
    seeds = range(plan.seeds)
    out: dict[str, Any] = {}
    for name, (interval, timeout) in SETTINGS.items():
        per_n: dict[str, Any] = {}
        for n in plan.sizes:
            _say(f"{name} ({interval:g} s / {timeout:g} s), N={n}")
            duration = max(plan.traffic_s, 8 * interval)
            traffic = sim.measure_probe_traffic(n, interval, timeout, duration, seed=0)
            detections = [sim.measure_detection(n, interval, timeout, seed=s) for s in seeds]
            removed = [d.removed_everywhere_after_s for d in detections]
            per_n[str(n)] = {
                "traffic": asdict(traffic),
                "detection": {
                    "first_declared_s_median": median(
                        [d.first_declared_after_s for d in detections]
                    ),
                    "gone_everywhere_s_median": median(removed),
                    "gone_everywhere_s_max": max(removed),
                    "false_removals": sum(d.false_removals for d in detections),
                    "runs": [asdict(d) for d in detections],
                },
            }
        out[name] = {"interval_s": interval, "timeout_s": timeout, "sizes": per_n}
    joins: dict[str, Any] = {}
    leaves: dict[str, Any] = {}
    for n in plan.sizes:
        _say(f"join and leave, N={n}")
        runs = [sim.measure_join(n, seed=s) for s in seeds]
        joins[str(n)] = {
            "converged_s_median": median([j.converged_after_s for j in runs]),
            "converged_s_max": max(j.converged_after_s for j in runs),
            "linked_to_all_s_median": median([j.linked_to_all_after_s for j in runs]),
            "gossip_bytes_per_node_median": median([j.gossip_bytes_per_node for j in runs]),
            "runs": [asdict(j) for j in runs],
        }
        gone = [sim.measure_leave(n, seed=s).removed_everywhere_after_s for s in seeds]
        leaves[str(n)] = {"gone_everywhere_s_median": median(gone), "max": max(gone)}
    return {
        "model": {
            "packet_overhead_bytes": sim.PACKET_OVERHEAD_BYTES,
            "ack_packet_bytes": sim.ACK_PACKET_BYTES,
            "datagram_bytes": sim.DATAGRAM_BYTES,
            "network": asdict(sim.NetworkModel()),
        },
        "settings": out,
        "join": joins,
        "leave": leaves,
    }


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("probes", ctx.quick)
    figures = measure(plan)
    result: dict[str, Any] = {
        **record.header(),
        "source": "meshllm.mesh.simulation (in-process, virtual clock, real cores and wire sizes)",
        "plan": asdict(plan),
        **figures,
    }
    default = result["settings"]["default"]["sizes"]
    worst = max(s["detection"]["gone_everywhere_s_max"] for s in default.values())
    largest = str(max(plan.sizes))
    result["targets"] = {
        "kill_gone_everywhere_s": {
            "value": worst,
            "target": f"<= {TARGET_KILL_S} (default settings, every N and seed)",
            "met": worst <= TARGET_KILL_S,
        },
        f"probe_bytes_per_s_per_node_n{largest}": {
            "value": default[largest]["traffic"]["probe_bytes_per_s"],
            "target": "small (stated)",
        },
    }
    return publish(ctx, "probes", result, render_table, plot)


def render_table(r: dict[str, Any]) -> str:
    rows = []
    for name, setting in r["settings"].items():
        label = f"{name} ({setting['interval_s']:g} s / {setting['timeout_s']:g} s)"
        for n, s in setting["sizes"].items():
            t, d = s["traffic"], s["detection"]
            rows.append(
                [
                    label,
                    n,
                    f"{t['probe_bytes_per_s']:.0f} B/s (max {t['probe_bytes_per_s_max']:.0f})",
                    f"{t['probe_in_out_bytes_per_s']:.0f} B/s",
                    f"{t['probe_packets_per_s']:.2f}",
                    f"{t['gossip_bytes_per_s']:.0f} B/s",
                    f"{d['gone_everywhere_s_median']:.2f} s (max {d['gone_everywhere_s_max']:.2f})",
                ]
            )
    head = [
        "probes (interval / timeout)",
        "N",
        "probe sent per node",
        "probe in+out",
        "packets/s",
        "gossip upkeep",
        "kill -9 gone everywhere",
    ]
    join = ", ".join(
        f"N={n}: {j['converged_s_median'] * 1000:.0f} ms, "
        f"{j['gossip_bytes_per_node_median'] / 1000:.1f} kB/node"
        for n, j in r["join"].items()
    )
    leave = ", ".join(
        f"N={n}: {v['gone_everywhere_s_median'] * 1000:.0f} ms" for n, v in r["leave"].items()
    )
    note = (
        f"Simulated (meshllm.mesh.simulation, "
        f"{r['model']['network']['latency_s'] * 1000:g} ms one-way "
        f"+ jitter). Detection: median (worst) of {r['plan']['seeds']} seeds. "
        f"Join, all agree: {join}. Graceful leave, gone everywhere: {leave}."
    )
    return table(rows, head) + "\n\n" + note


def plot(r: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    colors = {"default": "#dd8452", "slow": "#4c72b0"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for name, setting in r["settings"].items():
        ns = [int(n) for n in setting["sizes"]]
        probe = [s["traffic"]["probe_bytes_per_s"] for s in setting["sizes"].values()]
        gossip = [s["traffic"]["gossip_bytes_per_s"] for s in setting["sizes"].values()]
        label = f"{name} ({setting['interval_s']:g} s / {setting['timeout_s']:g} s)"
        ax.plot(ns, probe, "o-", color=colors.get(name), label=f"probes, {label}")
        ax.plot(ns, gossip, "s--", color=colors.get(name), alpha=0.6, label=f"gossip, {label}")
    ax.set_yscale("log")
    ax.set_xlabel("nodes in the mesh")
    ax.set_ylabel("bytes sent per second per node")
    ax.set_title("Steady-state traffic per node (simulated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center right")

    ax = axes[1]
    for name, setting in r["settings"].items():
        ns = [int(n) for n in setting["sizes"]]
        med = [s["detection"]["gone_everywhere_s_median"] for s in setting["sizes"].values()]
        worst = [s["detection"]["gone_everywhere_s_max"] for s in setting["sizes"].values()]
        ax.plot(ns, med, "o-", color=colors.get(name), label=f"{name}: median")
        ax.plot(ns, worst, "v:", color=colors.get(name), label=f"{name}: worst")
    ax.axhline(TARGET_KILL_S, color="#c44e52", linestyle="--", linewidth=1, label="target 5 s")
    ax.set_yscale("log")
    ax.set_xlabel("nodes in the mesh")
    ax.set_ylabel("seconds from kill -9 to gone everywhere")
    ax.set_title("Failure detection (simulated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(f"meshllm probes and gossip, simulated ({r['started']})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


SECTION = Section(
    "probes", "simulated probe/gossip traffic, detection and join at N = 10..100", run
)
