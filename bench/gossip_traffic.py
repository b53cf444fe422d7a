"""Section `traffic`: gossip and probe bytes per node, real nodes next to the simulation.

Part 1, real: N = 2, 4, 8 nodes on loopback: a host serving the demo model,
the rest lite clients (`meshllm up --client`, no llama-server; their gossip
and probes are those of any node), default probe settings (every 0.5 s, 1 s timeout). The mesh
grows in place; for each N, once every node lists every other and a settle
time has passed (the Syncs of new links are start-up, not upkeep), the
Gossiper's QUIC endpoint counters (`meshllm.mesh.quic.Traffic`, written by
the Gossiper to `traffic.json` in its run directory every second) are read
on every node at the start and the end of a fixed window. Per node and
second: bytes on the wire sent (UDP payload + 28 bytes of IPv4/UDP header
per datagram: QUIC headers, tags, ACK-only packets all in), datagrams sent,
and framed gossip and probe bytes sent (no packet overhead).

Next to each, the simulation (`meshllm.mesh.simulation`: the same
`GossipCore` and `FailureDetector`, virtual clock and network) for the same
N and probe settings, counting the same things; the ratio real / simulated
must be within `AGREEMENT` (25%).

Part 2, simulated only: N = 100, 300, 1000. After a join (through one
member's token): seconds until every node holds every other's latest
announcement; after a kill -9: seconds until every node removed the victim.
Rounds are those seconds over the anti-entropy period (`ANTI_ENTROPY_S`).
Steady-state gossip and probe bytes per node per second.
Writes `traffic.json` and `traffic.png` under the results directory.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import Context, RunRecord, Section, machine_note, publish, pyplot, table
from bench.mesh import (
    LOOPBACK_BIND,
    MeshError,
    MeshNode,
    StatusClient,
    peer_ids,
    start_node,
    stop_all,
    wait_api,
    wait_until,
)
from meshllm.mesh import simulation as sim
from meshllm.runtime.paths import home_from

AGREEMENT = 0.25
"""Real and simulated figures agree when their ratio is within 1 +- this."""
IP_UDP_BYTES = sim.IP_UDP_BYTES
START_TIMEOUT_S = 90.0
CONVERGE_TIMEOUT_S = 60.0
FIRST = (*LOOPBACK_BIND, "--llama-arg=--threads", "--llama-arg=1")
"""A lite client needs a mesh to join: the first node is a host serving the demo model."""


@dataclass(frozen=True)
class Plan:
    real_sizes: tuple[int, ...]
    window_s: float
    """How long the counters run on real nodes (and the simulation) per N."""
    settle_s: float
    sim_sizes: tuple[int, ...]
    sim_window_s: float
    """Simulated seconds of steady state at the large N."""


FULL = Plan(
    real_sizes=(2, 4, 8),
    window_s=20.0,
    settle_s=5.0,
    sim_sizes=(100, 300, 1000),
    sim_window_s=20.0,
)
QUICK = Plan(real_sizes=(2, 4), window_s=8.0, settle_s=4.0, sim_sizes=(100, 300), sim_window_s=10.0)


def _say(msg: str) -> None:
    print(f"  [traffic] {msg}", file=sys.stderr, flush=True)


def read_traffic(node: MeshNode) -> dict[str, Any]:
    """What the node's Gossiper last wrote: its endpoint's counters and when (monotonic)."""
    path = home_from(node.home).run_dir / "traffic.json"
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Per second between two readings of one node's counters."""
    span = after["at"] - before["at"]

    def d(key: str, kind: str = "") -> float:
        a, b = after[key], before[key]
        if kind:
            a, b = a.get(kind, 0), b.get(kind, 0)
        return (a - b) / span

    sent_dgrams = d("datagrams_sent")
    recv_dgrams = d("datagrams_received")
    return {
        "span_s": span,
        "wire_bytes_sent_per_s": d("udp_bytes_sent") + IP_UDP_BYTES * sent_dgrams,
        "wire_bytes_received_per_s": d("udp_bytes_received") + IP_UDP_BYTES * recv_dgrams,
        "datagrams_sent_per_s": sent_dgrams,
        "probe_frame_bytes_sent_per_s": d("frame_bytes_sent", "probe"),
        "gossip_frame_bytes_sent_per_s": d("frame_bytes_sent", "gossip"),
        "other_frame_bytes_sent_per_s": d("frame_bytes_sent", "other"),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


async def measure_real(ctx: Context, plan: Plan, nodes: list[MeshNode]) -> dict[str, Any]:
    status = StatusClient()
    base: list[MeshNode] = []
    token = ""
    out: dict[str, Any] = {}
    try:
        for n in plan.real_sizes:
            new: list[MeshNode] = []
            while len(base) + len(new) < n:
                index = len(base) + len(new)
                args = (*LOOPBACK_BIND, "--join", token, "--client") if token else FIRST
                node = start_node(f"client-{index}", *args, repo=ctx.node_repo)
                nodes.append(node)
                new.append(node)
                if not token:
                    await wait_api(node, START_TIMEOUT_S)
                    token = await wait_until("the invite token", [node], 10, node.token)
            for node in new:
                await wait_api(node, START_TIMEOUT_S)
            base += new

            async def agreed(base: list[MeshNode] = base) -> bool:
                statuses = await status.statuses(base)
                if any(st is None for st in statuses):
                    return False
                ids = {x.node_id for x in base}
                return all(
                    peer_ids(st) == ids - {x.node_id} for x, st in zip(base, statuses, strict=True)
                )

            _say(f"N={n}: waiting for agreement")
            await wait_until(f"{n} nodes to agree", base, CONVERGE_TIMEOUT_S, agreed)
            await asyncio.sleep(plan.settle_s)
            _say(f"N={n}: counting for {plan.window_s:g} s")
            before = [read_traffic(x) for x in base]
            await asyncio.sleep(plan.window_s + 1.0)  # the files are rewritten every second
            after = [read_traffic(x) for x in base]
            for x in base:
                x.check_alive()
            per_node = [rates(b, a) for b, a in zip(before, after, strict=True)]
            keys = [k for k in per_node[0] if k != "span_s"]
            out[str(n)] = {
                **{k: _mean([p[k] for p in per_node]) for k in keys},
                "links_per_node": _mean([a["links"] for a in after]),
                "per_node": per_node,
            }
    finally:
        status.close()
    return out


def simulated(n: int, window_s: float) -> dict[str, float]:
    """The simulation's figures for the same N, settings and window (mean of 3 seeds)."""
    runs = [
        sim.measure_probe_traffic(
            n, sim.DEFAULT_INTERVAL_S, sim.DEFAULT_TIMEOUT_S, duration=window_s, seed=s
        )
        for s in range(3)
    ]
    return {
        "wire_bytes_sent_per_s": _mean([r.probe_bytes_per_s + r.gossip_bytes_per_s for r in runs]),
        "wire_bytes_received_per_s": _mean(
            [r.probe_in_out_bytes_per_s + r.gossip_in_out_bytes_per_s for r in runs]
        )
        - _mean([r.probe_bytes_per_s + r.gossip_bytes_per_s for r in runs]),
        "datagrams_sent_per_s": _mean([r.packets_per_s for r in runs]),
        "probe_frame_bytes_sent_per_s": _mean([r.probe_frame_bytes_per_s for r in runs]),
        "gossip_frame_bytes_sent_per_s": _mean([r.gossip_frame_bytes_per_s for r in runs]),
        "probe_wire_bytes_sent_per_s": _mean([r.probe_bytes_per_s for r in runs]),
        "gossip_wire_bytes_sent_per_s": _mean([r.gossip_bytes_per_s for r in runs]),
    }


COMPARED = (
    "wire_bytes_sent_per_s",
    "datagrams_sent_per_s",
    "probe_frame_bytes_sent_per_s",
    "gossip_frame_bytes_sent_per_s",
)


def compare(real: dict[str, Any], plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n, r in real.items():
        s = simulated(int(n), plan.window_s)
        ratios = {k: r[k] / s[k] if s[k] else float("nan") for k in COMPARED}
        out[n] = {
            "simulated": s,
            "ratio_real_over_sim": ratios,
            "agree": all(abs(v - 1) <= AGREEMENT for v in ratios.values()),
        }
    return out


def measure_large(plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in plan.sim_sizes:
        _say(f"simulated N={n}: steady state")
        t0 = time.perf_counter()
        traffic = sim.measure_probe_traffic(n, duration=plan.sim_window_s)
        _say(f"simulated N={n}: join")
        join = sim.measure_join(n)
        _say(f"simulated N={n}: kill -9")
        kill = sim.measure_detection(n)
        out[str(n)] = {
            "traffic": asdict(traffic),
            "join": asdict(join),
            "join_rounds": join.converged_after_s / sim.ANTI_ENTROPY_S,
            "kill": asdict(kill),
            "kill_rounds": kill.removed_everywhere_after_s / sim.ANTI_ENTROPY_S,
            "cpu_s": time.perf_counter() - t0,
        }
    return out


def run(ctx: Context) -> str:
    plan = QUICK if ctx.quick else FULL
    record = RunRecord("traffic", ctx.quick)
    nodes: list[MeshNode] = []
    try:
        try:
            real = asyncio.run(measure_real(ctx, plan, nodes))
        finally:
            _say(f"stopping {sum(1 for x in nodes if x.proc.poll() is None)} nodes")
            stop_all(nodes)
    except MeshError as exc:
        raise SystemExit(f"traffic: {exc}") from None
    comparison = compare(real, plan)
    large = measure_large(plan)
    result: dict[str, Any] = {
        **record.header(),
        "setup": {
            "nodes": "node 0: host (demo model, llama-server --threads 1); the rest: lite "
            "clients (--client) joined with its token; all on 127.0.0.1",
            "probe": "node defaults (--probe-interval 0.5 --probe-timeout 1.0)",
            "source_real": "the Gossiper's QUIC endpoint counters (run_dir/traffic.json)",
            "source_sim": "meshllm.mesh.simulation.measure_probe_traffic, mean of 3 seeds",
            "wire_bytes": "UDP payload + 28 bytes IPv4/UDP header per datagram",
            "agreement": f"real / simulated within 1 +- {AGREEMENT}",
        },
        "plan": asdict(plan),
        "real": real,
        "comparison": comparison,
        "simulated_large": large,
        "anti_entropy_s": sim.ANTI_ENTROPY_S,
    }
    return publish(ctx, "traffic", result, render_table, plot)


def render_table(r: dict[str, Any]) -> str:
    rows = []
    for n, real in r["real"].items():
        c = r["comparison"][n]
        s, q = c["simulated"], c["ratio_real_over_sim"]
        rows.append(
            [
                n,
                f"{real['wire_bytes_sent_per_s']:.0f} / {s['wire_bytes_sent_per_s']:.0f} B/s "
                f"({q['wire_bytes_sent_per_s']:.2f})",
                f"{real['datagrams_sent_per_s']:.1f} / {s['datagrams_sent_per_s']:.1f} "
                f"({q['datagrams_sent_per_s']:.2f})",
                f"{real['probe_frame_bytes_sent_per_s']:.0f} / "
                f"{s['probe_frame_bytes_sent_per_s']:.0f} B/s "
                f"({q['probe_frame_bytes_sent_per_s']:.2f})",
                f"{real['gossip_frame_bytes_sent_per_s']:.1f} / "
                f"{s['gossip_frame_bytes_sent_per_s']:.1f} B/s "
                f"({q['gossip_frame_bytes_sent_per_s']:.2f})",
                "yes" if c["agree"] else "NO",
            ]
        )
    head = [
        "N",
        "on the wire, sent (real / sim, ratio)",
        "datagrams/s",
        "probe frames",
        "gossip frames",
        f"within {AGREEMENT:.0%}",
    ]
    large = []
    for n, s in r["simulated_large"].items():
        t = s["traffic"]
        large.append(
            [
                n,
                f"{s['join']['converged_after_s']:.3f} s ({s['join_rounds']:.2f})",
                f"{s['join']['gossip_bytes_per_node'] / 1000:.0f} kB",
                f"{s['kill']['removed_everywhere_after_s']:.2f} s ({s['kill_rounds']:.1f})",
                f"{t['probe_bytes_per_s']:.0f} B/s",
                f"{t['gossip_bytes_per_s']:.0f} B/s",
            ]
        )
    head_large = [
        "N (simulated)",
        "join: all agree (rounds)",
        "join: gossip sent per node",
        "kill -9: gone everywhere (rounds)",
        "probe sent/node",
        "gossip sent/node",
    ]
    note = (
        f"Real: a host and lite clients on loopback, per-node means over "
        f"{r['plan']['window_s']:g} s read from the Gossiper's QUIC endpoint counters "
        f"(bytes: UDP payload + 28 per datagram); sim: same N and probe settings (0.5 s / 1 s), "
        f"mean of 3 seeds. Simulated N: a round is one anti-entropy period "
        f"({r['anti_entropy_s']:g} s); a join needs none (it spreads by push: the newcomer's "
        f"announcement is forwarded once), its cost is a Digest each way on each of the "
        f"newcomer's N new links and the signed announcements it lacks; a kill takes the "
        f"failure detector's probe interval plus two "
        f"timeouts at the first node to notice, whose verdict each other node then checks "
        f"with probes of its own (one more timeout) before removing the node.\n" + machine_note(r)
    )
    return table(rows, head) + "\n\n" + table(large, head_large) + "\n\n" + note


def plot(r: dict[str, Any], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    ns = [int(n) for n in r["real"]]
    real = [v["wire_bytes_sent_per_s"] for v in r["real"].values()]
    simd = [c["simulated"]["wire_bytes_sent_per_s"] for c in r["comparison"].values()]
    ax.plot(ns, real, "o-", color="#4c72b0", label="real nodes (endpoint counters)")
    ax.plot(ns, simd, "s--", color="#dd8452", label="simulation")
    ax.set_xlabel("nodes in the mesh")
    ax.set_ylabel("bytes on the wire sent per node per second")
    ax.set_title("Gossip + probe upkeep: real vs simulated")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1]
    large = r["simulated_large"]
    ns = [int(n) for n in large]
    ax.plot(ns, [v["join"]["converged_after_s"] for v in large.values()], "o-", label="join")
    ax.plot(
        ns, [v["kill"]["removed_everywhere_after_s"] for v in large.values()], "v-", label="kill -9"
    )
    ax.set_xscale("log")
    ax.set_xlabel("nodes in the mesh (simulated)")
    ax.set_ylabel("seconds until every node agrees")
    ax.set_title("Convergence at scale (simulated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.suptitle(f"meshllm gossip traffic ({r['started']})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


SECTION = Section(
    "traffic",
    "gossip/probe bytes per node: N = 2, 4, 8 real nodes vs simulation; simulated N to 1000",
    run,
)
